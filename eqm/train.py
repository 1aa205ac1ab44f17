"""Train EqM: `python -m eqm.train` (or `eqm-train`, or under `torchrun`).

Accepts every flag of the published EqM train.py with the same defaults, plus --max-steps, --lr,
--ema-decay, --precision, --grad-clip, --fused, --compile, --fsdp, --dali, --sample-every.
`--data-path digits` trains a small pixel-space model on scikit-learn's 8x8 digits so the whole loop
runs on a laptop CPU.
"""
import argparse
import os
import sys

from eqm import distributed, validate as V
from eqm.checkpoint import CheckpointError
from eqm.config import TrainConfig
from eqm.guard import NONFINITE_CHOICES, NonFiniteError
from eqm.latents import is_latent_dir, read_manifest
from eqm.objective import CT_SHAPES
from eqm.training import SetupError, build_trainer
from eqm.training.setup import new_experiment_dir  # noqa: F401  (part of this module's API)

EBM_CHOICES = ["none", "l2", "dot", "mean"]


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


def resolve_config(args, parser):
    """The TrainConfig of parsed flags: the preset of --data-path fills what they leave unset. Bad combinations
    end with one line (parser.error); the Namespace is not edited."""
    if args.fresh_optimizer and not args.ckpt:
        parser.error("--fresh-optimizer goes with --ckpt (it starts a new AdamW for the checkpoint's weights)")
    manifest = read_manifest(args.data_path) if is_latent_dir(args.data_path) else None  # its VAE and image size
    cfg = TrainConfig.from_args(args, parser.error, latent_manifest=manifest)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and cfg.data.global_batch_size % world:
        parser.error(f"--global-batch-size {cfg.data.global_batch_size} is not divisible by the {world} processes")
    if cfg.runtime.fsdp and cfg.model.ebm != "none":
        parser.error("--fsdp does not support --ebm (the explicit-energy double backward): use DDP (drop --fsdp)")
    if args.path_type != "Linear" or args.prediction != "velocity" or args.loss_weight is not None:
        print("note: --path-type/--prediction/--loss-weight are published SiT flags; EqM ignores them",
              file=sys.stderr)
    return cfg


def resolve_args(args, parser):
    """The resolved flags as the published train.py's Namespace (what checkpoints store as `args`)."""
    return resolve_config(args, parser).published_args()


def main(argv=None):
    """Parse flags, train, and return a summary dict (steps, seconds, final loss, paths, log)."""
    parser = get_parser()
    cfg = resolve_config(parser.parse_args(argv), parser)
    return distributed.run_job("eqm-train", lambda info: build_trainer(cfg, info).fit(), cfg.runtime.device,
                               cfg.runtime.dist_timeout, expected=(SetupError, CheckpointError, NonFiniteError))


if __name__ == "__main__":
    main()
