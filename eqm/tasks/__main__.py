"""Inference tasks on a trained EqM checkpoint: `python -m eqm.tasks {denoise,inpaint,compose,ood} --ckpt C ...`.

    python -m eqm.tasks denoise --ckpt C --input digits --noise-level 0.2 0.4 0.6 --out runs/denoise
    python -m eqm.tasks inpaint --ckpt C --input digits --mask left --out runs/inpaint
    python -m eqm.tasks compose --ckpt C --labels 0 6 --weights 1 1 --out runs/compose
    python -m eqm.tasks ood --ckpt C --in digits --ood photo-patches noisy-digits --score field-norm --out runs/ood

Each writes a PNG grid and a JSON summary into --out (ood: the scores as .npz too) and prints the summary.
Inputs (--input/--in/--ood): digits, photo-patches, noisy-digits, shuffled-digits, inverted-digits, a .npy
array (N, C, H, W) in model space, or an image file.
"""
import argparse
import dataclasses
import json
import os
import sys

import numpy as np
import torch

from eqm import validate as V
from eqm.config import trained_settings
from eqm.sample import SAMPLER_FLAGS, add_sampler_options, check_sampler_args, sampler_options
from eqm.sampling import SAMPLERS
from eqm.tasks.core import OOD_SCORES, add_noise, auroc, compose, denoise, inpaint, ood_scores, psnr
from eqm.tasks.sources import load_source
from eqm.utils import save_image_grid

MASKS = ("left", "right", "top", "bottom", "center", "random")


def get_parser():
    p = argparse.ArgumentParser(prog="python -m eqm.tasks", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="task", required=True)

    def common(sp, steps=250):
        sp.add_argument("--ckpt", required=True, help="an eqm-train checkpoint (EMA weights used)")
        sp.add_argument("--out", default="runs/tasks", help="output folder")
        sp.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--num", type=int, default=16, help="number of inputs / samples")
        g = sp.add_argument_group("sampler")
        g.add_argument("--sampler", choices=SAMPLERS, default="gd")
        g.add_argument("--steps", type=int, default=steps, help="sampling steps (steps - 1 updates)")
        g.add_argument("--stepsize", type=float, default=0.01)
        g.add_argument("--mu", type=float, default=0.3, help="--sampler ngd momentum")
        g.add_argument("--cfg-scale", type=float, default=1.0)
        g.add_argument("--stop-grad-norm", type=float, default=None, help="adaptive compute threshold")
        add_sampler_options(g)
        V.apply_types(sp, dict(num=V.positive_int, seed=V.seed, steps=V.positive_int, stepsize=V.step_size,
                               mu=V.nonneg_float, cfg_scale=V.nonneg_float, stop_grad_norm=V.positive_float,
                               **SAMPLER_FLAGS))

    sp = sub.add_parser("denoise", help="descend from a partially noised input")
    common(sp, steps=50)
    sp.add_argument("--input", default="digits")
    sp.add_argument("--noise-level", type=V.unit_interval, nargs="+", default=[0.3],
                    help="s in [0, 1]: input (1 - s) x + s n, the training interpolation at t = 1 - s")
    sp.add_argument("--conditional", action="store_true", help="use the input's labels (digits) instead of none")

    sp = sub.add_parser("inpaint", help="fill unknown pixels, the known ones clamped")
    common(sp)
    sp.add_argument("--input", default="digits")
    sp.add_argument("--mask", choices=MASKS, default="left", help="the unknown region")
    sp.add_argument("--conditional", action="store_true", help="use the input's labels (digits) instead of none")

    sp = sub.add_parser("compose", help="sample several classes at once (weighted sum of their fields)")
    common(sp)
    sp.add_argument("--labels", type=int, nargs="+", required=True)
    sp.add_argument("--weights", type=float, nargs="+", default=None, help="default: 1 each")

    sp = sub.add_parser("ood", help="score inputs and report the AUROC of each OOD set against the in-distribution one")
    sp.add_argument("--ckpt", required=True)
    sp.add_argument("--out", default="runs/ood")
    sp.add_argument("--device", default=None)
    sp.add_argument("--in", dest="in_source", default="digits", help="in-distribution inputs")
    sp.add_argument("--ood", nargs="+", default=["photo-patches", "noisy-digits"], help="out-of-distribution inputs")
    sp.add_argument("--score", choices=OOD_SCORES, default=None,
                    help="default: energy for EqM-E checkpoints, field-norm otherwise")
    return p


def load_model(path, device):
    """The EMA model of an eqm-train checkpoint (built from the args stored in it), in eval mode."""
    from eqm.checkpoint import load_checkpoint, load_model_state

    ckpt = load_checkpoint(path)
    trained = trained_settings(ckpt)
    if trained.model.name is None or trained.model.input_size is None:
        raise ValueError(f"{path!r} has no eqm-train args (model, input size): train it with eqm-train")
    model = dataclasses.replace(trained.model, uncond=trained.model.uncond is not False,
                                ebm=trained.model.ebm or "none").build()
    load_model_state(model, ckpt, prefer="ema")
    if trained.data.vae not in (None, "none"):
        raise ValueError("the tasks CLI works on pixel-space checkpoints; for latent models call the Python API "
                         "(eqm.tasks) on latents")
    return model.to(device).eval().requires_grad_(False)


def pick(x, labels, n, seed):
    """n inputs (a fixed random subset) and their labels (or None)."""
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], (labels[idx] if labels is not None else None)


def region(kind, shape, seed):
    """Known-pixel mask (1, 1, H, W): True where known."""
    h, w = shape[-2:]
    m = torch.ones(1, 1, h, w, dtype=torch.bool)
    if kind == "left":
        m[..., : w // 2] = False
    elif kind == "right":
        m[..., w // 2:] = False
    elif kind == "top":
        m[..., : h // 2, :] = False
    elif kind == "bottom":
        m[..., h // 2:, :] = False
    elif kind == "center":
        m[..., h // 4: h - h // 4, w // 4: w - w // 4] = False
    else:
        m = torch.rand(1, 1, h, w, generator=torch.Generator().manual_seed(seed)) < 0.5
    return m


def run(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(getattr(args, "seed", 0))
    model = load_model(args.ckpt, device)
    os.makedirs(args.out, exist_ok=True)
    size = model.input_size
    summary = {"task": args.task, "ckpt": args.ckpt}
    if args.task == "ood":
        score = args.score or ("energy" if model.ebm != "none" else "field-norm")
        x_in = load_source(args.in_source, size)[0].to(device)
        s_in = ood_scores(model, x_in, score).cpu().numpy()
        scores, summary["score"], summary["auroc"] = {args.in_source: s_in}, score, {}
        for name in args.ood:
            s_out = ood_scores(model, load_source(name, size)[0].to(device), score).cpu().numpy()
            scores[name] = s_out
            summary["auroc"][name] = auroc(s_in, s_out)
        np.savez(os.path.join(args.out, "ood_scores.npz"), **scores)
    else:
        kw = dict(steps=args.steps, cfg_scale=args.cfg_scale, stop_grad_norm=args.stop_grad_norm,
                  cfg_channels=min(3, model.in_channels), **sampler_options(args))
        g = torch.Generator().manual_seed(args.seed)
        if args.task == "compose":
            weights = args.weights or [1.0] * len(args.labels)
            noise = torch.randn(args.num, model.in_channels, size, size, generator=g).to(device)
            out = compose(model, args.labels, weights, noise, **kw)
            rows = [out]
            summary.update(labels=args.labels, weights=weights)
        else:
            x, labels = load_source(args.input, size)
            x, labels = pick(x, labels, args.num, args.seed)
            x = x.to(device)
            y = labels.to(device) if (args.conditional and labels is not None) else None
            if args.task == "denoise":
                rows, summary["psnr"] = [x], {}
                for level in args.noise_level:
                    noisy = add_noise(x, level, g)
                    out = denoise(model, noisy, y, **kw)
                    rows += [noisy, out]
                    summary["psnr"][str(level)] = {"noisy": float(psnr(noisy, x).mean()),
                                                   "denoised": float(psnr(out, x).mean())}
            else:
                mask = region(args.mask, x.shape, args.seed).to(device)
                out = inpaint(model, x, mask, y, generator=g, **kw)
                hole = (~mask).expand_as(x)
                err = ((out - x) * hole).pow(2).flatten(1).sum(1) / hole.flatten(1).sum(1)
                summary["psnr_unknown"] = float((10 * torch.log10(4.0 / err.clamp_min(1e-12))).mean())
                rows = [x, torch.where(mask.expand_as(x), x, torch.full_like(x, -1.0)), out]
        grid = torch.cat([r.clamp(-1, 1).cpu() for r in rows])
        summary["grid"] = save_image_grid(grid, os.path.join(args.out, f"{args.task}.png"), nrow=rows[0].shape[0])
    with open(os.path.join(args.out, f"{args.task}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))
    return summary


def check(args, parser):
    """One clear line for what the types cannot check alone."""
    if args.task == "ood":
        return
    check_sampler_args(args, parser)
    if args.task == "compose" and args.weights is not None and len(args.weights) != len(args.labels):
        parser.error(f"--weights needs one value per label: {len(args.labels)} labels, {len(args.weights)} weights")


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    check(args, parser)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"eqm.tasks {args.task}: error: {e}")


if __name__ == "__main__":
    main()
