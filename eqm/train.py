"""Train EqM: `python -m eqm.train` (or `eqm-train`, or under `torchrun`).

Accepts every flag of the published EqM train.py with the same defaults, plus --max-steps, --lr,
--ema-decay, --precision, --grad-clip, --fused, --compile, --fsdp, --dali, --sample-every.
`--data-path digits` trains a small pixel-space model on scikit-learn's 8x8 digits so the whole loop
runs on a laptop CPU.
"""
import argparse
import hashlib
import os
import re
import sys
import time
from copy import deepcopy

import torch
from tqdm import tqdm

from eqm import compiling, data, distributed, runtime, sharding, validate as V, vae as vae_lib
from eqm.checkpoint import (CheckpointError, OptimizerStateMismatch, export_optimizer_state,
                            import_optimizer_state, save_checkpoint)
from eqm.guard import ADVICE, NONFINITE_CHOICES, NonFiniteError, NonFiniteGuard, all_finite
from eqm.models import EqM_models
from eqm.objective import CT_SHAPES
from eqm.fast import EMA, TrainStep, make_optimizer
from eqm.latents import is_latent_dir, read_manifest, vae_factor
from eqm.utils import claim_run_dir, create_logger, format_config, save_image_grid

EBM_CHOICES = ["none", "l2", "dot", "mean"]

# Defaults of the published train.py (ImageNet, latent space) and of the built-in digits run.
PUBLISHED_DEFAULTS = dict(model="EqM-XL/2", epochs=80, image_size=256, num_classes=1000, global_batch_size=256, vae="ema",
                          lr=1e-4, ema_decay=0.9999, ckpt_every=50_000, sample_every=10_000, cfg_scale=4.0,
                          sample_stepsize=0.003)  # grids: GD with the published EqM-B/2 step size
DIGITS_DEFAULTS = dict(model="EqM-Ti/4",  # 4 tokens of 4x4 pixels: ~3x cheaper a step than Ti/2, as accurate here
                       image_size=8, num_classes=10, global_batch_size=64, vae="none",
                       lr=1e-3,  # a 6-layer model on 1797 images learns fast; 1e-4 needs ~10x the steps
                       ema_decay=0.995,  # 0.9999 averages over 10k steps: longer than a whole CPU run
                       max_steps=1500,  # ~80 s on a free core, ~2.3 min on a busy one; class accuracy 0.98 by then
                       ckpt_every=1000, sample_every=1500, cfg_scale=2.0, sample_stepsize=0.01)


def str2bool(v):
    """argparse type for the published `--uncond` (type=bool there, which turns "False" into True)."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if v.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {v!r}")


def add_transport_args(parser):
    """The published SiT transport flags: accepted so old commands run; EqM's objective does not use them."""
    g = parser.add_argument_group("published transport flags (accepted, unused by EqM)")
    g.add_argument("--path-type", type=str, default="Linear", choices=["Linear", "GVP", "VP"])
    g.add_argument("--prediction", type=str, default="velocity", choices=["velocity", "score", "noise"])
    g.add_argument("--loss-weight", type=none_or_str, default=None, choices=[None, "velocity", "likelihood"])
    g.add_argument("--sample-eps", type=float)
    g.add_argument("--train-eps", type=float)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" except for options whose default is resolved later (None)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def none_or_str(v):
    return None if v == "None" else v


def get_parser():
    p = argparse.ArgumentParser(prog="eqm-train", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("published flags (defaults in brackets are the ImageNet ones; digits -> small run)")
    g.add_argument("--data-path", type=str, required=True, help="ImageFolder root, or 'digits' (built in)")
    g.add_argument("--results-dir", type=str, default="results")
    g.add_argument("--model", type=str, default=None, help="[EqM-XL/2] registry name; digits: EqM-Ti/4")
    g.add_argument("--image-size", type=int, default=None, help="[256]; digits: 8")
    g.add_argument("--num-classes", type=int, default=None, help="[1000]; digits: 10")
    g.add_argument("--epochs", type=int, default=None, help="[80]; digits: --max-steps 1500 unless --epochs is given")
    g.add_argument("--global-batch-size", type=int, default=None, help="[256]; digits: 64")
    g.add_argument("--global-seed", type=int, default=0)
    g.add_argument("--vae", type=str, default=None, help="[ema] ema | mse | none (pixel space) | local folder")
    g.add_argument("--num-workers", type=int, default=4)
    g.add_argument("--log-every", type=int, default=100)
    g.add_argument("--ckpt-every", type=int, default=None, help="[50000]; digits: 1000")
    g.add_argument("--cfg-scale", type=float, default=None, help="[4.0] for sample grids; digits: 2.0")
    g.add_argument("--wandb", action="store_true")
    g.add_argument("--ckpt", type=str, default=None, help="checkpoint to resume from (or initialise with): "
                   "this project's or the published train.py's")
    g.add_argument("--disp", action="store_true", help="add the Dispersive Loss")
    g.add_argument("--uncond", type=str2bool, default=True, help="disable noise conditioning (t = 0)")
    g.add_argument("--ebm", type=str, choices=EBM_CHOICES, default="none", help="explicit energy (EqM-E)")
    add_transport_args(p)
    g = p.add_argument_group("additions")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps (overrides --epochs); digits: 1500")
    g.add_argument("--fresh-optimizer", action="store_true", help="with --ckpt: load the weights (and step) only "
                   "and start a new AdamW, e.g. when the checkpoint's optimizer state is for another model or optimizer")
    g.add_argument("--lr", type=float, default=None, help="[1e-4] AdamW lr; digits: 1e-3")
    g.add_argument("--ema-decay", type=float, default=None, help="[0.9999]; digits: 0.995")
    g.add_argument("--precision", choices=["auto", "fp32", "tf32", "bf16"], default="auto",
                   help="auto: bf16 where a sub-second matmul probe finds it faster here, else tf32/fp32; fp32: strict "
                        "fp32; tf32: TF32 matmuls (the published setting); bf16: bf16 autocast")
    g.add_argument("--grad-clip", type=float, default=None, help="clip the global grad norm (off when unset)")
    g.add_argument("--ct-a", type=float, default=0.8, help="c(t) keeps its full value lam up to t = a (in [0, 1))")
    g.add_argument("--ct-lam", type=float, default=4.0, help="c(t)'s value lam, the gradient scale (> 0)")
    g.add_argument("--ct-shape", choices=CT_SHAPES, default="truncated-linear",
                   help="c(t) from t = a to 1: truncated-linear (published) or truncated-cosine; stored in the "
                   "checkpoint's args, where eqm-sample reads lam back")
    g.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="route the hot path through kernels/ (default: on with CUDA)")
    g.add_argument("--sample-every", type=int, default=None,
                   help="[10000] save an EMA sample grid PNG every N steps and at the end; 0 = off; digits: 1500")
    g.add_argument("--sample-steps", type=int, default=250, help="GD steps for those grids")
    g.add_argument("--sample-stepsize", type=float, default=None, help="[0.003] GD step size for those grids; "
                   "digits: 0.01")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the forward + loss (fullgraph); default: where it pays (timed eager steps "
                        "against the compile cost measured here before; eqm.compiling), on with CUDA for DDP/FSDP")
    g.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state over the "
                   "processes (FSDP2, per block) instead of DDP: for models too large to replicate")
    g.add_argument("--dali", action="store_true", help="decode, crop and flip ImageFolder JPEGs with NVIDIA DALI "
                   "(GPU decoding on CUDA). --data-path may also be a latent folder from eqm-extract-latents")
    g.add_argument("--device", type=str, default=None, help="cuda | cpu (default: cuda when available)")
    add_reliability_args(p)
    return V.apply_types(p, NUMERIC_FLAGS)


# Every numeric flag is checked when parsed: a run that starts does not fail later on its own settings.
NUMERIC_FLAGS = dict(image_size=V.positive_int, num_classes=V.positive_int, epochs=V.positive_int,
                     global_batch_size=V.positive_int, global_seed=V.seed, num_workers=V.nonneg_int,
                     log_every=V.positive_int, ckpt_every=V.positive_int, cfg_scale=V.nonneg_float,
                     sample_eps=V.finite_float, train_eps=V.finite_float, max_steps=V.nonneg_int,
                     lr=V.positive_float, ema_decay=V.unit_interval, grad_clip=V.nonneg_float,
                     sample_every=V.nonneg_int, sample_steps=V.positive_int, sample_stepsize=V.step_size,
                     ct_a=V.number(float, lo=0, hi=1, hi_open=True), ct_lam=V.positive_float)


def add_reliability_args(p):
    """What a run does on a non-finite loss or gradient, and how long ranks wait for each other."""
    g = p.add_argument_group("faults")
    g.add_argument("--on-nonfinite", choices=NONFINITE_CHOICES, default="stop",
                   help="non-finite loss or gradient: stop (found at the next log step or checkpoint, no host "
                        "sync per step) or skip the step's update (one host sync per step)")
    g.add_argument("--max-skips", type=V.nonneg_int, default=10,
                   help="with --on-nonfinite skip: stop once more steps than this were skipped")
    distributed.add_timeout_arg(g)


def fill_defaults(args, parser, digits_defaults, published_defaults, auto_compile=False):
    """Unset options from the digits or the published defaults; --fused and --compile on with CUDA (with
    auto_compile an unset --compile stays None: "auto"). Returns the model's patch size, after checking the name."""
    for k, v in (digits_defaults if args.data_path == "digits" else published_defaults).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    on_cuda = torch.cuda.is_available() and args.device != "cpu"
    for k in ("fused", "compile"):
        if getattr(args, k) is None and not (k == "compile" and auto_compile):
            setattr(args, k, on_cuda)
    if args.model not in EqM_models:
        parser.error(f"unknown --model {args.model!r}; choose one of: {', '.join(EqM_models)}")
    return int(args.model.split("/")[-1])


def resolve_args(args, parser):
    """Fill unset options from the published or the digits defaults and validate them."""
    if args.fresh_optimizer and not args.ckpt:
        parser.error("--fresh-optimizer goes with --ckpt (it starts a new AdamW for the checkpoint's weights)")
    factor = vae_lib.FACTOR
    if is_latent_dir(args.data_path):  # the extraction's VAE, image size and downsampling, unless set
        manifest = read_manifest(args.data_path)
        args.vae = manifest["vae"] if args.vae is None else args.vae
        args.image_size = manifest["image_size"] if args.image_size is None else args.image_size
        factor = vae_factor(manifest)
    digits_defaults = DIGITS_DEFAULTS
    if args.epochs is not None:  # an explicit --epochs wins over the digits step budget
        digits_defaults = {k: v for k, v in DIGITS_DEFAULTS.items() if k != "max_steps"}
    one_process = not args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) == 1  # DDP/FSDP compile at build time
    patch = fill_defaults(args, parser, digits_defaults, PUBLISHED_DEFAULTS, auto_compile=one_process)
    args.epochs = PUBLISHED_DEFAULTS["epochs"] if args.epochs is None else args.epochs
    if vae_lib.is_pixel_space(args.vae):
        args.vae, input_size = "none", args.image_size
    else:
        try:
            input_size = vae_lib.latent_size(args.image_size, factor)
        except ValueError as e:
            parser.error(f"{e}; or use --vae none for pixel space")
    if input_size % patch:
        parser.error(f"{args.model} has patch size {patch}, but its input is {input_size}x{input_size} "
                     f"(--image-size {args.image_size}{'' if args.vae == 'none' else f' / {factor}'}): pick an image "
                     f"size whose model input is divisible by {patch}")
    for name in ("global_batch_size", "epochs", "log_every", "ckpt_every", "num_classes"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and args.global_batch_size % world:
        parser.error(f"--global-batch-size {args.global_batch_size} is not divisible by the {world} processes")
    if args.fsdp and args.ebm != "none":
        parser.error("--fsdp does not support --ebm (the explicit-energy double backward): use DDP (drop --fsdp)")
    if args.max_steps is not None and args.max_steps < 0:
        parser.error("--max-steps must be >= 0")
    if not 0.0 <= args.ema_decay <= 1.0:
        parser.error("--ema-decay must lie in [0, 1]")
    if args.path_type != "Linear" or args.prediction != "velocity" or args.loss_weight is not None:
        print("note: --path-type/--prediction/--loss-weight are published SiT flags; EqM ignores them",
              file=sys.stderr)
    args.input_size = input_size
    return args


def set_precision(precision):
    """TF32 on for tf32/bf16 (the published setting), off for strict fp32."""
    tf32 = precision in ("tf32", "bf16")
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32


def step_from_filename(path):
    """Published checkpoints are named <step:07d>.pt and store no step: recover it from the name."""
    m = re.fullmatch(r"(\d+)\.pt", os.path.basename(path))
    return int(m.group(1)) if m else 0


def new_experiment_dir(results_dir, model_name):
    """A new run folder of its own (claimed atomically, see claim_run_dir) with a checkpoints/ subfolder."""
    exp = claim_run_dir(results_dir, model_name.replace("/", "-"))
    os.makedirs(os.path.join(exp, "checkpoints"))
    return exp


def rng_state(device):
    """This process's RNG state (noise, t and label dropout are drawn from the global generators)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def grid_inputs(args, num_classes, device):
    """Fixed noise and labels for the periodic sample grids (the same at every step, so grids compare)."""
    g = torch.Generator().manual_seed(args.global_seed)
    n = 10 * num_classes if num_classes <= 10 else 64
    y = torch.arange(n) % num_classes if num_classes <= 10 else torch.randint(num_classes, (n,), generator=g)
    x = torch.randn(n, args.in_channels, args.input_size, args.input_size, generator=g)
    return x.to(device), y.to(device), (num_classes if num_classes <= 10 else 8)


@torch.no_grad()
def sample_grid(ema, vae, args, num_classes, device, path):
    """Sample with the EMA model from fixed noise and save one PNG grid."""
    from eqm.samplers import sample

    x, y, nrow = grid_inputs(args, num_classes, device)
    out = sample(ema, x, y, sampler="gd", steps=args.sample_steps, stepsize=args.sample_stepsize,
                 cfg_scale=args.cfg_scale, cfg_channels=min(3, args.in_channels))  # the published x[:, :3] rule
    out = out[0] if isinstance(out, tuple) else out
    if not torch.isfinite(out).all():
        return None  # the caller says so; a grid of NaN is not worth a PNG
    if vae is not None:
        out = torch.cat([vae_lib.decode(vae, z) for z in out.split(16)])
    return save_image_grid(out.float(), path, nrow=nrow)


class SetupError(Exception):
    """A user-facing configuration problem found while setting up a run."""


def main(argv=None):
    """Parse flags, train, and return a summary dict (steps, seconds, final loss, paths, log)."""
    parser = get_parser()
    args = resolve_args(parser.parse_args(argv), parser)
    return distributed.run_job("eqm-train", lambda info: train(args, info), args.device, args.dist_timeout,
                               expected=(SetupError, CheckpointError, NonFiniteError))


def load_resume(args, model, ema, logger):
    """Load --ckpt into model/ema; return the saved training state (step, data position, rng, opt)."""
    from eqm.checkpoint import load_checkpoint, load_model_state

    try:
        ckpt = load_checkpoint(args.ckpt)
    except FileNotFoundError as e:
        raise SetupError(f"--ckpt {args.ckpt!r} not found") from e
    try:
        if "model" in ckpt:
            load_model_state(model, ckpt, prefer="model")
            load_model_state(ema, ckpt, prefer="ema")
        else:  # a bare state dict (e.g. published EMA weights): initialise both from it, as published
            load_model_state(model, ckpt)
            load_model_state(ema, ckpt)
    except (ValueError, RuntimeError, KeyError) as e:
        raise SetupError(f"cannot load --ckpt {args.ckpt!r} into {args.model}: {e}") from None
    state = {"step": ckpt.get("step", step_from_filename(args.ckpt)), "data": ckpt.get("data"),
             "rng": ckpt.get("rng"), "opt": ckpt.get("opt")}
    logger.info(f"Resumed from {args.ckpt} at step {state['step']}")
    return state


def train(args, dist_info):
    rank, world, device = dist_info.rank, dist_info.world_size, dist_info.device
    if args.fsdp and world == 1:
        print("note: --fsdp with a single process has nothing to shard: training unsharded "
              "(launch with torchrun --nproc_per_node N to shard)", file=sys.stderr)
        args.fsdp = False
    args.precision = distributed.broadcast_object(runtime.resolve_precision(args.precision, device))  # rank 0's
    set_precision(args.precision)
    torch.manual_seed(args.global_seed * world + rank)

    try:
        source = data.make_source(args.data_path, args.image_size, num_classes=args.num_classes, dali=args.dali,
                                  device=device, num_workers=args.num_workers)
        loader = source.loader(args.global_batch_size // world, rank, world, args.global_seed)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise SetupError(str(e)) from None
    if source.num_classes > args.num_classes:
        raise SetupError(f"the data has {source.num_classes} classes but --num-classes is {args.num_classes}")
    exp_dir = new_experiment_dir(args.results_dir, args.model) if rank == 0 else None
    exp_dir = distributed.broadcast_object(exp_dir)
    logger = create_logger(exp_dir, rank)
    pixel = args.vae == "none"
    if pixel or source.latent:
        args.in_channels = source.channels
    else:
        args.in_channels = vae_lib.CHANNELS
    vae = None
    if not pixel:
        try:
            vae = vae_lib.load_vae(args.vae, device)
        except (FileNotFoundError, RuntimeError) as e:
            if not source.latent:
                raise SetupError(str(e)) from None
            logger.info(f"warning: {e}\nTraining on the latents without sample grids (they need the VAE decoder).")
            args.sample_every = 0
    logger.info("Resolved configuration:\n" + format_config(args))
    if rank == 0:
        print(f"Experiment directory: {exp_dir}", flush=True)

    model = EqM_models[args.model](input_size=args.input_size, in_channels=args.in_channels,
                                   num_classes=args.num_classes, uncond=args.uncond, ebm=args.ebm).to(device)
    model.fused = args.fused
    ema = deepcopy(model).requires_grad_(False)
    logger.info(f"EqM Parameters: {sum(p.numel() for p in model.parameters()):,}")
    threads = runtime.configure_threads(model, args.global_batch_size // world, device=device)
    logger.info(f"Precision {args.precision} ({runtime.precision_reason(device)}); "
                f"{threads} CPU thread(s)")

    step, epoch, batch, state = 0, 0, 0, {}
    if args.ckpt:
        state = load_resume(args, model, ema, logger)
        step = state["step"]
        pos = state["data"]
        if pos is not None:
            epoch = pos["epoch"]
            batch = pos["batch"] * pos["global_batch_size"] // args.global_batch_size
        elif step:
            epoch, batch = divmod(step, loader.batches_per_epoch)
        rngs = state["rng"]
        if rngs is not None and len(rngs) == world:
            set_rng_state(rngs[rank], device)
        else:
            torch.manual_seed((args.global_seed * world + rank) * 1_000_003 + step)
    plain_ema = None
    if args.fsdp:
        plain_ema = deepcopy(ema) if rank == 0 and args.sample_every else None  # the grids sample on rank 0 only
        sharding.shard_model(model, compile_blocks=args.compile)
        sharding.shard_model(ema)
    opt = make_optimizer(model, lr=args.lr)
    if state.get("opt") is not None and not args.fresh_optimizer:
        try:
            opt_state = import_optimizer_state(state["opt"], model, opt)
        except OptimizerStateMismatch as e:
            raise SetupError(f"cannot resume the optimizer from --ckpt {args.ckpt!r}: {e}. Pass --fresh-optimizer "
                             "to load the weights alone with a new AdamW") from None
        if args.fsdp:
            sharding.load_optimizer_state(model, opt, opt_state)
        else:
            opt.load_state_dict(opt_state)
    for g_ in opt.param_groups:  # --lr wins over the lr stored in the optimizer state
        g_["lr"] = args.lr

    bpe = loader.batches_per_epoch
    total_steps = args.max_steps if args.max_steps is not None else args.epochs * bpe
    single = world == 1 and not args.fsdp  # DDP and FSDP compile at build time (--compile, on with CUDA)
    step_fn = TrainStep(model, opt, ema=EMA(model, ema), ema_decay=args.ema_decay, precision=args.precision,
                        compile=bool(args.compile) and not args.fsdp and not single, ddp=world > 1 and not args.fsdp,
                        grad_clip=args.grad_clip or None, a=args.ct_a, lam=args.ct_lam, ct_shape=args.ct_shape,
                        model_kwargs=dict(return_act=args.disp),
                        check_finite=True, skip_nonfinite=args.on_nonfinite == "skip")
    if single:  # --compile unset: compile once a few timed eager steps show it pays for the steps left
        key = compiling.compile_key("train", model, (args.global_batch_size, args.in_channels, args.input_size,
                                                      args.input_size), step_fn.precision, device)
        step_fn = compiling.AutoCompile(step_fn, step_fn.use_compiled, total_steps=total_steps - step, key=key,
                                        device=device, compile="auto" if args.compile is None else args.compile,
                                        log=logger.info)
    guard, skipped = NonFiniteGuard(device), 0
    step_fn = runtime.ThreadGovernor(step_fn, enabled=device.type == "cpu" and world == 1)
    model.train()  # enables label dropout for classifier-free guidance
    ema.eval()

    if args.wandb and rank == 0:
        try:
            import wandb
        except ImportError:
            raise SetupError("--wandb needs the wandb package: pip install wandb") from None
        if os.environ.get("WANDB_KEY"):  # the published README's variables: WANDB_KEY, ENTITY, PROJECT
            wandb.login(key=os.environ["WANDB_KEY"])
        name = os.path.basename(exp_dir)
        run_id = str(int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10**8)  # stable per run folder
        wandb.init(project=os.environ.get("PROJECT", "eqm"), entity=os.environ.get("ENTITY"), name=name,
                   config=vars(args), id=run_id, resume="allow")

    log, last_ckpt, last_grid, avg_loss = [], None, None, float("nan")
    running, log_steps = torch.zeros((), device=device), 0
    t_start = t_log = time.time()
    start_step = step
    pbar = tqdm(total=total_steps, initial=min(step, total_steps), disable=None if rank == 0 else True,
                desc="train", dynamic_ncols=True)
    logger.info(f"Training to step {total_steps} ({bpe} batches/epoch per rank, {world} rank(s))...")

    def save_grid(step):
        """The EMA sample grid PNG, made on rank 0 (with --fsdp every rank first gathers the EMA weights)."""
        sampling_model = ema
        if args.fsdp:
            full = sharding.full_model_state(ema)
            if rank == 0:
                plain_ema.load_state_dict(full)
            sampling_model = plain_ema
        if rank != 0:
            return None
        path = sample_grid(sampling_model, vae, args, source.num_classes, device,
                           os.path.join(exp_dir, "samples", f"{step:07d}.png"))
        if path is None:
            logger.info(f"warning: the EMA sample grid at step {step} is non-finite (no PNG written): "
                        f"lower --sample-stepsize {args.sample_stepsize}")
        else:
            logger.info(f"Saved sample grid to {path}")
        return path

    def save(step, epoch, batch):
        guard.check("before writing the checkpoint")
        rngs = distributed.all_gather_object(rng_state(device))
        if args.fsdp:  # collectives: every rank gathers, rank 0 writes
            states = (sharding.full_model_state(model), sharding.full_model_state(ema),
                      sharding.full_optimizer_state(model, opt))
        else:
            states = (model.state_dict(), ema.state_dict(), opt.state_dict())
        finite = all_finite(list(states[0].values()) + list(states[1].values())) if rank == 0 else None
        if not distributed.broadcast_object(finite):
            raise NonFiniteError(f"the weights at step {step} are non-finite; stopped without saving them. "
                                 f"Try: {ADVICE}")
        if rank != 0:
            return None
        path = os.path.join(exp_dir, "checkpoints", f"{step:07d}.pt")
        save_checkpoint(path, {
            "model": states[0], "ema": states[1], "opt": export_optimizer_state(states[2]), "args": args,
            "step": step, "epoch": epoch, "world_size": world, "rng": rngs,
            "data": {"epoch": epoch, "batch": batch, "global_batch_size": args.global_batch_size,
                     "seed": args.global_seed},
        })
        logger.info(f"Saved checkpoint to {path}")
        return path

    while step < total_steps:
        loader.set_epoch(epoch, batch)
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if vae is not None and not source.latent:
                x = vae_lib.encode(vae, x)
            loss = step_fn(x, y)
            step += 1
            batch += 1
            if step_fn.skipped:  # --on-nonfinite skip: the update was not applied
                skipped += 1
                logger.info(f"warning: skipped step {step}: non-finite loss {loss.item():.4g} or gradient "
                            f"({skipped} skipped so far, --max-skips {args.max_skips})")
                if skipped > args.max_skips:
                    raise NonFiniteError(f"more than --max-skips {args.max_skips} steps had a non-finite loss or "
                                         f"gradient (the last at step {step}). Try: {ADVICE}")
            else:
                guard.record(step, loss, step_fn.grad_norm)
                running += loss.detach()
                log_steps += 1
            pbar.update(1)

            if step % args.log_every == 0 or step == total_steps:
                guard.check("at the log step")
                if device.type == "cuda":
                    torch.cuda.synchronize()
                now = time.time()
                # the skip decisions agree on every rank, so log_steps == 0 on all of them or on none
                avg_loss = distributed.all_reduce_mean(running / log_steps).item() if log_steps else float("nan")
                steps_per_sec = log_steps / (now - t_log)
                logger.info(f"(step={step:07d}) Train Loss: {avg_loss:.4f}, Train Steps/Sec: {steps_per_sec:.2f}")
                pbar.set_postfix(loss=f"{avg_loss:.4f}", it_s=f"{steps_per_sec:.1f}")
                log.append({"step": step, "loss": avg_loss, "steps_per_sec": steps_per_sec})
                if args.wandb and rank == 0:
                    wandb.log({"train loss": avg_loss, "train steps/sec": steps_per_sec}, step=step)
                running.zero_()
                log_steps, t_log = 0, time.time()
            if args.sample_every and step % args.sample_every == 0:
                guard.check("before drawing the sample grid")
                last_grid = save_grid(step)
            if step % args.ckpt_every == 0:
                last_ckpt = save(step, epoch, batch)
                distributed.barrier()
            if step >= total_steps:
                break
        if batch >= bpe:
            epoch, batch = epoch + 1, 0
    pbar.close()

    trained = step > start_step
    if trained and step % args.ckpt_every:  # the final state, unless the loop just saved it
        last_ckpt = save(step, epoch, batch)
    if trained and args.sample_every and step % args.sample_every:
        guard.check("before drawing the sample grid")
        last_grid = save_grid(step)
    distributed.barrier()
    seconds = time.time() - t_start
    summary = {"steps": step, "steps_this_run": step - start_step, "seconds": seconds, "final_loss": avg_loss,
               "skipped_steps": skipped,
               "experiment_dir": exp_dir, "checkpoint": last_ckpt, "sample_grid": last_grid, "log": log}
    if rank == 0:
        logger.info(
            f"Done: {step - start_step} steps this run (now at step {step}) in {seconds:.1f} s "
            f"({(step - start_step) / max(seconds, 1e-9):.2f} steps/s), final loss {avg_loss:.4f}.\n"
            f"  checkpoint:  {last_ckpt}\n  sample grid: {last_grid}\n"
            f"  log:         {os.path.join(exp_dir, 'log.txt')}")
    return summary


if __name__ == "__main__":
    main()
