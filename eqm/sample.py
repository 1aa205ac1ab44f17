"""Sample EqM by gradient descent: `python -m eqm.sample` (or `eqm-sample`, or under `torchrun`).

Accepts the flags of the published sample_gd.py (--sampler gd|ngd, --stepsize, --mu, ...) and writes
<folder>/<index:06d>.png per sample, <folder>/grid.png, and <folder>.npz beside the folder for the ADM
evaluator, where the published script writes it (arr_0: uint8 (N, H, W, 3), exactly --num-fid-samples images;
labels: the class each was drawn for).
Sample i depends only on --global-seed and i, not on the number of processes or the batch size.
"""
import argparse
import os
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from eqm import distributed, runtime, validate as V, vae as vae_lib
from eqm.checkpoint import CheckpointError
from eqm.models import EqM_models
from eqm.sampling import ODE_METHODS, SAMPLERS, SCHEDULES, sample
from eqm.train import EBM_CHOICES, HelpFormatter, add_transport_args, fill_defaults, str2bool
from eqm.utils import create_logger, find_outputs, save_image_grid, to_uint8

PUBLISHED_DEFAULTS = dict(model="EqM-XL/2", image_size=256, num_classes=1000, vae="ema", ebm="none",
                          num_fid_samples=50_000, cfg_scale=4.0, stepsize=0.0017)
DIGITS_DEFAULTS = dict(model="EqM-Ti/4", image_size=8, num_classes=10, vae="none", ebm="none",
                       num_fid_samples=100, cfg_scale=2.0, stepsize=0.01)  # sharpest digits at 250 GD steps
FROM_CHECKPOINT = ("model", "image_size", "num_classes", "vae", "ebm", "uncond", "data_path", "in_channels")


def get_parser():
    p = argparse.ArgumentParser(prog="eqm-sample", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("published flags (unset model options come from the checkpoint's args)")
    g.add_argument("--model", type=str, default=None, help="[EqM-XL/2]")
    g.add_argument("--image-size", type=int, default=None, help="[256]")
    g.add_argument("--num-classes", type=int, default=None, help="[1000]")
    g.add_argument("--global-batch-size", type=int, default=256, help="samples per step over all processes")
    g.add_argument("--global-seed", type=int, default=0)
    g.add_argument("--vae", type=str, default=None, help="[ema] ema | mse | none (pixel space) | local folder")
    g.add_argument("--cfg-scale", type=float, default=None, help="[4.0]; digits: 2.0")
    g.add_argument("--ckpt", type=str, default=None, help="checkpoint (EMA weights preferred)")
    g.add_argument("--stepsize", type=float, default=None, help="[0.0017] step size eta; digits: 0.01")
    g.add_argument("--num-sampling-steps", type=int, default=250, help="steps; steps - 1 updates are made")
    g.add_argument("--folder", "--sample-dir", dest="folder", type=str, default="samples")
    g.add_argument("--sampler", type=str, default="gd", choices=SAMPLERS,
                   help="gd, ngd (published); adam, langevin, ode (additions)")
    g.add_argument("--mu", type=float, default=0.3, help="NAG-GD momentum mu")
    g.add_argument("--num-fid-samples", type=int, default=None, help="[50000]; digits: 100")
    g.add_argument("--uncond", type=str2bool, default=None, help="[True] disable noise conditioning")
    g.add_argument("--ebm", type=str, choices=EBM_CHOICES, default=None, help="[none] explicit energy (EqM-E)")
    add_transport_args(p)
    g = p.add_argument_group("additions")
    g.add_argument("--per-proc-batch-size", type=int, default=None, help="overrides --global-batch-size / world")
    g.add_argument("--cfg-channels", choices=["3", "all"], default="3",
                   help="channels CFG acts on: 3 (published: latent channels 0-2) or all")
    g.add_argument("--stop-grad-norm", type=float, default=None,
                   help="adaptive compute: freeze a sample once |f(x)| falls below this")
    add_sampler_options(g)
    g.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="route the hot path through kernels/ (default: on with CUDA)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="static-buffer sampling loop, compiled step, CUDA graphs on GPU (default: on with CUDA)")
    g.add_argument("--precision", choices=["auto", "tf32", "bf16"], default="auto",
                   help="auto: bf16 where a sub-second matmul probe finds it faster here; tf32: fp32 weights with TF32 "
                        "matmuls (published); bf16: bf16 autocast for the model")
    g.add_argument("--data-path", type=str, default=None, help="'digits' selects the digits defaults")
    g.add_argument("--device", type=str, default=None, help="cuda | cpu (default: cuda when available)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the samples an earlier run left in --folder (default: refuse to mix them)")
    distributed.add_timeout_arg(g)
    return V.apply_types(p, NUMERIC_FLAGS)


# the numeric options of add_sampler_options, checked when parsed (eqm.validate)
SAMPLER_FLAGS = dict(adam_betas=V.number(float, lo=0, hi=1, hi_open=True), temperature=V.nonneg_float,
                     atol=V.positive_float, rtol=V.positive_float)


def add_sampler_options(g):
    """The options of the samplers beyond the published gd/ngd (shared with python -m eqm.tasks)."""
    g.add_argument("--schedule", choices=SCHEDULES, default="constant",
                   help="step-size schedule of the descent samplers (gd, ngd, adam, langevin)")
    g.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("B1", "B2"),
                   help="--sampler adam: moment decays")
    g.add_argument("--temperature", type=float, default=0.05,
                   help="--sampler langevin: noise temperature, annealed linearly to 0")
    g.add_argument("--ode-method", choices=ODE_METHODS, default="rk4",
                   help="--sampler ode: dx/dt = f(x) over t in [0, 1]; fixed grid of steps - 1 steps, or dopri5")
    g.add_argument("--atol", type=float, default=1e-5, help="--sampler ode --ode-method dopri5: tolerance")
    g.add_argument("--rtol", type=float, default=1e-5, help="--sampler ode --ode-method dopri5: tolerance")


NUMERIC_FLAGS = dict(image_size=V.positive_int, num_classes=V.positive_int, global_batch_size=V.positive_int,
                     global_seed=V.seed, cfg_scale=V.nonneg_float, stepsize=V.step_size,
                     num_sampling_steps=V.positive_int, mu=V.nonneg_float, num_fid_samples=V.positive_int,
                     per_proc_batch_size=V.positive_int, stop_grad_norm=V.positive_float,
                     sample_eps=V.finite_float, train_eps=V.finite_float, **SAMPLER_FLAGS)


def checkpoint_args(ckpt):
    """The training options stored in a checkpoint (a Namespace or a dict), or {}."""
    a = ckpt.get("args") if isinstance(ckpt, dict) else None
    if a is None:
        return {}
    return dict(vars(a)) if isinstance(a, argparse.Namespace) else dict(a)


def resolve_args(args, parser, ckpt_args):
    """Explicit flags win, then the checkpoint's training args, then the digits/published defaults."""
    for k in FROM_CHECKPOINT:
        if getattr(args, k, None) is None and ckpt_args.get(k) is not None:
            setattr(args, k, ckpt_args[k])
    digits = args.data_path == "digits"
    default_eta = args.stepsize is None
    patch = fill_defaults(args, parser, DIGITS_DEFAULTS, PUBLISHED_DEFAULTS)
    # c(t) of the training run (published: truncated-linear, a 0.8, lam 4): the field's scale is lam, so a
    # default step size is rescaled by 4 / lam to move as far per step as with the published lam
    args.ct = {k: ckpt_args.get(f"ct_{k}", v) for k, v in (("shape", "truncated-linear"), ("a", 0.8), ("lam", 4.0))}
    if default_eta:
        args.stepsize *= 4.0 / args.ct["lam"]
    if args.uncond is None:
        args.uncond = True
    if vae_lib.is_pixel_space(args.vae):
        args.vae, args.input_size = "none", args.image_size
        if getattr(args, "in_channels", None) is None:
            args.in_channels = 1 if digits else 3
    else:
        try:
            args.input_size, args.in_channels = vae_lib.latent_size(args.image_size), vae_lib.CHANNELS
        except ValueError as e:
            parser.error(str(e))
    if args.input_size % patch:
        parser.error(f"{args.model} has patch size {patch}, but its input is {args.input_size}x{args.input_size} "
                     f"(--image-size {args.image_size}): pick an image size whose model input divides by {patch}")
    for name in ("num_fid_samples", "num_sampling_steps", "global_batch_size", "num_classes"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.per_proc_batch_size is not None and args.per_proc_batch_size <= 0:
        parser.error("--per-proc-batch-size must be positive")
    check_sampler_args(args, parser)
    return args


def check_sampler_args(args, parser):
    """One clear line when --sampler ode lacks its optional dependency (the numbers are checked when parsed)."""
    if args.sampler == "ode":
        try:
            import torchdiffeq  # noqa: F401
        except ImportError:
            parser.error("--sampler ode needs torchdiffeq: pip install 'eqm-fast[ode]' (torchdiffeq==0.2.5)")


def sampler_options(args):
    """The eqm.sampling.sample keywords that pick and configure the sampler."""
    return dict(sampler=args.sampler, stepsize=args.stepsize, mu=args.mu, schedule=args.schedule,
                betas=tuple(args.adam_betas), temperature=args.temperature, method=args.ode_method,
                atol=args.atol, rtol=args.rtol)


def prepare_folder(folder, overwrite):
    """Create --folder; with older samples in it, delete them (overwrite) or return why not (else None)."""
    old = [os.path.join(folder, f) for f in find_outputs(folder)]
    npz = os.path.normpath(folder) + ".npz"
    old += [npz] if os.path.exists(npz) else []
    if old and not overwrite:
        return (f"--folder {folder} already holds {len(old)} files from an earlier run (e.g. {old[0]}): "
                "pass --overwrite to replace them, or choose a new --folder")
    for f in old:
        os.remove(f)
    os.makedirs(folder, exist_ok=True)
    return None


def start_noise(indices, shape, seed):
    """N(0, I) start points; sample i's noise comes from its own generator seeded by (seed, i)."""
    out = torch.empty(len(indices), *shape)
    for j, i in enumerate(indices):
        out[j] = torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_000_007 + i))
    return out


def sample_labels(n, num_classes, seed):
    """The class of every sample index (uniform, fixed by the seed)."""
    return torch.randint(num_classes, (n,), generator=torch.Generator().manual_seed(seed))


def write_npz(folder, n, labels):
    """Assemble <folder>.npz (the published path) from the per-sample PNGs (arr_0 uint8 (n, H, W, 3), labels (n,))."""
    arr = np.stack([np.asarray(Image.open(os.path.join(folder, f"{i:06d}.png")).convert("RGB"))
                    for i in tqdm(range(n), desc="building .npz", disable=None)])
    path = os.path.normpath(folder) + ".npz"
    np.savez(path, arr_0=arr, labels=labels.numpy().astype(np.int64))
    return path, arr


def main(argv=None):
    """Parse flags, sample, and return a summary dict (paths, count, seconds)."""
    parser = get_parser()
    args = parser.parse_args(argv)
    ckpt = None
    if args.ckpt is not None:
        from eqm.checkpoint import load_checkpoint

        try:
            ckpt = load_checkpoint(args.ckpt, kind="eqm")
        except CheckpointError as e:
            raise SystemExit(f"eqm-sample: error: {e}") from None
    args = resolve_args(args, parser, checkpoint_args(ckpt) if ckpt is not None else {})
    return distributed.run_job("eqm-sample", lambda info: run(args, ckpt, info), args.device, args.dist_timeout)


def run(args, ckpt, dist_info):
    rank, world, device = dist_info.rank, dist_info.world_size, dist_info.device
    logger = create_logger(None, rank, name="eqm-sample")
    torch.set_float32_matmul_precision("high")  # TF32, as the published sampler
    model = EqM_models[args.model](input_size=args.input_size, in_channels=args.in_channels,
                                   num_classes=args.num_classes, uncond=args.uncond, ebm=args.ebm)
    if ckpt is not None:
        from eqm.checkpoint import load_model_state

        try:
            source = load_model_state(model, ckpt, prefer="ema")
        except ValueError as e:
            raise SystemExit(f"eqm-sample: error: cannot load --ckpt {args.ckpt!r} into {args.model}: {e}") from None
        logger.info(f"Loaded {args.model} weights from {args.ckpt} ({source})")
    else:
        logger.info("warning: no --ckpt given: sampling an untrained (randomly initialised) model")
    model = model.to(device).eval().requires_grad_(False)
    model.fused = args.fused
    vae = None
    if args.vae != "none":
        try:
            vae = vae_lib.load_vae(args.vae, device)
        except (FileNotFoundError, RuntimeError) as e:
            raise SystemExit(f"eqm-sample: error: {e}") from None

    n = args.num_fid_samples
    bs = args.per_proc_batch_size or max(1, args.global_batch_size // world)
    labels = sample_labels(n, args.num_classes, args.global_seed)
    mine = list(range(rank, n, world))  # this rank's share: disjoint, interleaved like the published code
    # the published rule guides channels 0..2 (x[:, :3]), which on a 1-channel model is every channel
    cfg_channels = "all" if args.cfg_channels == "all" else min(3, args.in_channels)
    shape = (args.in_channels, args.input_size, args.input_size)
    precision = distributed.broadcast_object(runtime.resolve_precision(args.precision, device))  # one for all ranks
    precision = "bf16" if precision == "bf16" else "fp32"
    threads = runtime.configure_threads(model, min(bs, len(mine) or 1), device=device)
    logger.info(f"Precision {precision} ({runtime.precision_reason(device)}); {threads} CPU thread(s)")
    problem = prepare_folder(args.folder, args.overwrite) if rank == 0 else None
    problem = distributed.broadcast_object(problem)
    if problem:
        raise SystemExit(f"eqm-sample: error: {problem}")
    if rank == 0:
        logger.info(f"Sampling {n} images ({args.sampler}, {args.num_sampling_steps} steps, eta {args.stepsize}, "
                    f"cfg {args.cfg_scale}; trained with c(t) {args.ct}) with {world} process(es), batch {bs} each, "
                    f"into {args.folder}")
    distributed.barrier()
    t0 = time.time()
    nfe = 0
    for start in tqdm(range(0, len(mine), bs), desc="sampling", disable=None if rank == 0 else True):
        idx = mine[start:start + bs]
        x = start_noise(idx, shape, args.global_seed).to(device)
        y = labels[idx].to(device)
        with torch.no_grad():
            out, stats = sample(model, x, y, steps=args.num_sampling_steps, cfg_scale=args.cfg_scale,
                                cfg_channels=cfg_channels, stop_grad_norm=args.stop_grad_norm, return_stats=True,
                                precision=precision, compile=bool(args.compile), **sampler_options(args))
            out = out.float()
            bad = (~torch.isfinite(out.flatten(1)).all(1)).nonzero().flatten().tolist()
            if bad:
                raise SystemExit(f"eqm-sample: error: {len(bad)} of {len(idx)} samples (first: index {idx[bad[0]]}) "
                                 f"became non-finite during sampling: lower --stepsize {args.stepsize} "
                                 f"(or --cfg-scale {args.cfg_scale}); nothing was written for them")
            nfe += stats["total_nfe"]
            if vae is not None:
                out = vae_lib.decode(vae, out)
        for i, img in zip(idx, to_uint8(out)):
            Image.fromarray(img).save(os.path.join(args.folder, f"{i:06d}.png"))
    distributed.barrier()
    seconds = time.time() - t0
    nfe = int(sum(distributed.all_gather_object(nfe)))
    summary = {"folder": args.folder, "num_samples": n, "seconds": seconds, "nfe_per_sample": nfe / n,
               "stepsize": args.stepsize, "ct": args.ct}
    if rank == 0:
        npz, arr = write_npz(args.folder, n, labels)
        grid = save_image_grid(arr[:100], os.path.join(args.folder, "grid.png"),
                               nrow=10 if arr.shape[0] >= 100 else None)
        summary.update(npz=npz, grid=grid)
        logger.info(f"Done: {n} samples in {seconds:.1f} s ({nfe / n:.1f} model evaluations each).\n"
                    f"  npz:  {npz} [arr_0 {arr.shape} uint8, labels]\n  grid: {grid}\n  pngs: {args.folder}/")
    return summary


if __name__ == "__main__":
    main()
