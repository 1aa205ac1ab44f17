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

from eqm import compiling, distributed, runtime, validate as V, vae as vae_lib
from eqm.checkpoint import CheckpointError, load_checkpoint, load_model_state
from eqm.config import NO_CHECKPOINT, SampleConfig, SamplingConfig, trained_settings
from eqm.execution import resolve_execution, set_precision, use_execution
from eqm.sampling import ODE_METHODS, SAMPLERS, SCHEDULES, sample
from eqm.train import EBM_CHOICES, HelpFormatter, add_transport_args, str2bool
from eqm.utils import create_logger, find_outputs, save_image_grid, to_uint8


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


def resolve_config(args, parser, ckpt=None):
    """The SampleConfig of parsed flags: explicit flags win, then what the checkpoint was trained with (its
    `config`, else its published `args`), then the preset of the data path. The Namespace is not edited."""
    trained = trained_settings(ckpt) if ckpt is not None else NO_CHECKPOINT
    cfg = SampleConfig.from_args(args, parser.error, trained)
    check_sampler_args(args, parser)
    return cfg


def resolve_args(args, parser, ckpt=None):
    """The resolved flags as a Namespace with sample_gd.py's names (ckpt: a loaded checkpoint, or {})."""
    return resolve_config(args, parser, ckpt).published_args()


def check_sampler_args(args, parser):
    """One clear line when --sampler ode lacks its optional dependency (the numbers are checked when parsed)."""
    if args.sampler == "ode":
        try:
            import torchdiffeq  # noqa: F401
        except ImportError:
            parser.error("--sampler ode needs torchdiffeq: pip install 'eqm-fast[ode]' (torchdiffeq==0.2.5)")


def sampler_options(args):
    """The eqm.sampling.sample keywords that pick and configure the sampler, from parsed sampler flags."""
    return SamplingConfig.from_args(args, stepsize=args.stepsize).options()


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
        try:
            ckpt = load_checkpoint(args.ckpt, kind="eqm")
        except CheckpointError as e:
            raise SystemExit(f"eqm-sample: error: {e}") from None
    cfg = resolve_config(args, parser, ckpt)
    return distributed.run_job("eqm-sample", lambda info: run(cfg, ckpt, info), cfg.runtime.device,
                               cfg.runtime.dist_timeout)


def apply_runtime(model, rt, device):
    """The run's eqm.execution.Execution (ops, compile, precision; rank 0's precision on every rank), set on
    `model`; returns the eqm.sampling.sample keywords: precision (bf16, or fp32 with TF32 matmuls as the
    published sampler) and compile."""
    try:
        execution = resolve_execution(device, ops=rt.fused, compile=rt.compile, precision=rt.precision)
    except ValueError as e:
        raise SystemExit(f"eqm-sample: error: {e}") from None
    precision = distributed.broadcast_object(execution.precision)
    set_precision("tf32" if precision != "bf16" else "bf16")  # TF32 for fp32 matmuls, as the published sampler
    use_execution(model, execution)
    return dict(precision="bf16" if precision == "bf16" else "fp32", compile=execution.compile)


def load_model(cfg, ckpt, logger):
    """The EqM of cfg.model with the checkpoint's weights (EMA preferred), or untrained without a checkpoint."""
    model = cfg.model.build()
    if ckpt is None:
        logger.info("warning: no --ckpt given: sampling an untrained (randomly initialised) model")
        return model
    try:
        source = load_model_state(model, ckpt, prefer="ema")
    except ValueError as e:
        raise SystemExit(f"eqm-sample: error: cannot load --ckpt {cfg.ckpt!r} into {cfg.model.name}: {e}") from None
    logger.info(f"Loaded {cfg.model.name} weights from {cfg.ckpt} ({source})")
    return model


def load_vae(cfg, device):
    """The VAE decoder for latent models, None in pixel space."""
    if cfg.vae == "none":
        return None
    try:
        return vae_lib.load_vae(cfg.vae, device)
    except (FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"eqm-sample: error: {e}") from None


def sample_batch(model, vae, cfg, idx, labels, execution, device):
    """Samples idx (images in [-1, 1], decoded), and the field evaluations they took; non-finite ones exit."""
    m, s = cfg.model, cfg.sampling
    # the published rule guides channels 0..2 (x[:, :3]), which on a 1-channel model is every channel
    cfg_channels = "all" if s.cfg_channels == "all" else min(3, m.in_channels)
    x = start_noise(idx, (m.in_channels, m.input_size, m.input_size), cfg.runtime.global_seed).to(device)
    with torch.no_grad():
        out, stats = sample(model, x, labels[idx].to(device), steps=s.steps, cfg_scale=s.cfg_scale,
                            cfg_channels=cfg_channels, stop_grad_norm=s.stop_grad_norm, return_stats=True,
                            **execution, **s.options())
        out = out.float()
        bad = (~torch.isfinite(out.flatten(1)).all(1)).nonzero().flatten().tolist()
        if bad:
            raise SystemExit(f"eqm-sample: error: {len(bad)} of {len(idx)} samples (first: index {idx[bad[0]]}) "
                             f"became non-finite during sampling: lower --stepsize {s.stepsize} "
                             f"(or --cfg-scale {s.cfg_scale}); nothing was written for them")
        if vae is not None:
            out = vae_lib.decode(vae, out)
    return out, stats["total_nfe"]


def run(cfg, ckpt, dist_info):
    """Sample this rank's share of --num-fid-samples into --folder; rank 0 writes the .npz and the grid."""
    rank, world, device = dist_info.rank, dist_info.world_size, dist_info.device
    logger = create_logger(None, rank, name="eqm-sample")
    model = load_model(cfg, ckpt, logger).to(device).eval().requires_grad_(False)
    execution = apply_runtime(model, cfg.runtime, device)
    vae = load_vae(cfg, device)
    n, s = cfg.num_fid_samples, cfg.sampling
    bs = cfg.per_proc_batch_size or max(1, cfg.global_batch_size // world)
    labels = sample_labels(n, cfg.model.num_classes, cfg.runtime.global_seed)
    mine = list(range(rank, n, world))  # this rank's share: disjoint, interleaved like the published code
    threads = runtime.configure_threads(model, min(bs, len(mine) or 1), device=device)
    logger.info(f"Precision {execution['precision']} ({runtime.precision_reason(device)}); {threads} CPU thread(s)")
    if cfg.runtime.compile is None and cfg.sampling.sampler != "ode":  # "auto": where it pays, by timing
        on = decide_compile(model, cfg, mine[:bs], labels, execution, device, len(mine), logger) if rank == 0 else None
        execution["compile"] = bool(distributed.broadcast_object(on))  # rank 0's decision: the same numerics on all
    problem = distributed.broadcast_object(prepare_folder(cfg.folder, cfg.overwrite) if rank == 0 else None)
    if problem:
        raise SystemExit(f"eqm-sample: error: {problem}")
    if rank == 0:
        logger.info(f"Sampling {n} images ({s.sampler}, {s.steps} steps, eta {s.stepsize}, cfg {s.cfg_scale}; "
                    f"trained with c(t) {cfg.ct}) with {world} process(es), batch {bs} each, into {cfg.folder}")
    distributed.barrier()
    t0, nfe = time.time(), 0
    for start in tqdm(range(0, len(mine), bs), desc="sampling", disable=None if rank == 0 else True):
        idx = mine[start:start + bs]
        out, used = sample_batch(model, vae, cfg, idx, labels, execution, device)
        nfe += used
        for i, img in zip(idx, to_uint8(out)):
            Image.fromarray(img).save(os.path.join(cfg.folder, f"{i:06d}.png"))
    distributed.barrier()
    seconds = time.time() - t0
    nfe = int(sum(distributed.all_gather_object(nfe)))
    return summarize(cfg, labels, seconds, nfe, logger) if rank == 0 else summary_dict(cfg, seconds, nfe)


def decide_compile(model, cfg, idx, labels, execution, device, n_mine, logger):
    """eqm.compiling's rule for this run: two timed eager sampling steps on the first batch, weighed against the
    compile cost measured here before (or a conservative default) over the run's remaining steps."""
    m, s = cfg.model, cfg.sampling
    x = start_noise(idx, (m.in_channels, m.input_size, m.input_size), cfg.runtime.global_seed).to(device)
    y = labels[idx].to(device)
    opts = dict(s.options(), cfg_scale=s.cfg_scale, precision=execution["precision"], compile=False)
    key = compiling.compile_key("sample-cfg" if s.cfg_scale > 1 else "sample", model, x.shape,
                                execution["precision"], device)

    def two_updates():
        with torch.no_grad():
            sample(model, x, y, steps=3, **opts)  # 3 steps = 2 updates
    calls_left = -(-n_mine // len(idx)) * max(s.steps - 1, 1) / 2  # the run, in units of two_updates
    on, reason, _ = compiling.decide_by_timing("auto", two_updates, steps_left=calls_left, key=key, device=device)
    logger.info(f"Compile: {reason}")
    return on


def summary_dict(cfg, seconds, nfe):
    n = cfg.num_fid_samples
    return {"folder": cfg.folder, "num_samples": n, "seconds": seconds, "nfe_per_sample": nfe / n,
            "stepsize": cfg.sampling.stepsize, "ct": cfg.ct}


def summarize(cfg, labels, seconds, nfe, logger):
    """Rank 0: write <folder>.npz and grid.png, log, and return the summary."""
    n, out = cfg.num_fid_samples, summary_dict(cfg, seconds, nfe)
    npz, arr = write_npz(cfg.folder, n, labels)
    grid = save_image_grid(arr[:100], os.path.join(cfg.folder, "grid.png"), nrow=10 if arr.shape[0] >= 100 else None)
    out.update(npz=npz, grid=grid)
    logger.info(f"Done: {n} samples in {seconds:.1f} s ({nfe / n:.1f} model evaluations each).\n"
                f"  npz:  {npz} [arr_0 {arr.shape} uint8, labels]\n  grid: {grid}\n  pngs: {cfg.folder}/")
    return out


if __name__ == "__main__":
    main()
