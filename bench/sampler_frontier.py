"""Digits, measured: sample quality against field evaluations for every sampler (with and without adaptive
compute), OOD AUROC against other real sources, denoising PSNR against noise level, a composition grid.

    python bench/sampler_frontier.py --ckpt results/.../0002000.pt --out docs/sampler_frontier

Quality: class accuracy of class-conditional samples and a Frechet distance (FD) to the real digits, both on the
features of a classifier fit on the real digits (eqm.digits_quality). Every sampler runs from the same noise and
labels; "nfe" is the mean number of field evaluations per sample (a CFG evaluation counts once).
Writes frontier.json/.png, ood.json, denoise.json/.png, compose.png into --out.
"""
import argparse
import json
import os
import time

import torch

from eqm import digits_quality, tasks
from eqm.datasets import load_digits_tensor
from eqm.sampling import make_field, sample
from eqm.tasks.__main__ import load_model
from eqm.tasks.sources import load_source
from eqm.utils import save_image_grid

PARTS = ("frontier", "ood", "denoise", "compose")


def sampler_settings(budget, horizon):
    """(label, sample() keywords) per sampler for a budget of about `budget` field evaluations per sample.
    Descent samplers spread a fixed total step `horizon` (eta * updates) over the budget."""
    eta = min(0.1, horizon / budget)
    out = [("gd", dict(sampler="gd", stepsize=eta, steps=budget + 1)),
           ("gd cosine", dict(sampler="gd", stepsize=2 * eta, schedule="cosine", steps=budget + 1)),
           ("ngd", dict(sampler="ngd", stepsize=eta, mu=0.3, steps=budget + 1)),
           ("adam cosine", dict(sampler="adam", stepsize=min(0.3, 2.0 / budget), schedule="cosine",
                                steps=budget + 1)),
           ("langevin", dict(sampler="langevin", stepsize=eta, temperature=0.05, steps=budget + 1))]
    for method, per in (("euler", 1), ("heun", 2), ("rk4", 4)):
        out.append((f"ode {method}", dict(sampler="ode", method=method, steps=max(budget // per, 1) + 1)))
    return out


def frontier(model, args, log):
    g = torch.Generator().manual_seed(args.seed)
    y = torch.arange(args.n) % 10
    noise = torch.randn(args.n, 1, 8, 8, generator=g)
    ref = digits_quality.real_features()
    rows = []

    def run(label, budget, adaptive, **kw):
        torch.manual_seed(args.seed)
        t0 = time.time()
        with torch.no_grad():
            out, stats = sample(model, noise, y, cfg_scale=args.cfg_scale, cfg_channels=1, return_stats=True, **kw)
        q = digits_quality.quality(out, y, ref)
        row = dict(sampler=label, budget=budget, adaptive=adaptive, nfe=stats["total_nfe"] / args.n,
                   seconds=time.time() - t0, **q, **{k: v for k, v in kw.items() if k not in ("sampler",)})
        rows.append(row)
        log(f"{label:12s} budget {budget:4d} adaptive {str(adaptive):5s} nfe {row['nfe']:6.1f} "
            f"acc {q['accuracy']:.3f} fd {q['fd']:7.3f} ({row['seconds']:.0f} s)")
        return out

    for budget in args.budgets:
        for label, kw in sampler_settings(budget, args.horizon):
            out = run(label, budget, None, **kw)
            if budget == max(args.budgets) and label == "gd":  # the adaptive thresholds: from GD's final fields
                with torch.no_grad():
                    norms = make_field(model, args.cfg_scale, 1)(out, y).flatten(1).norm(dim=1)
                thresholds = [float(norms.median()) * c for c in args.stop_factors]
    for rtol in args.dopri5_tols:
        run("ode dopri5", 0, None, sampler="ode", method="dopri5", rtol=rtol, atol=rtol, steps=2)
    budget = max(args.budgets)
    for thr in thresholds:
        for label, kw in sampler_settings(budget, args.horizon):
            run(label, budget, thr, stop_grad_norm=thr, **kw)
        run("ode dopri5", 0, thr, sampler="ode", method="dopri5", rtol=args.dopri5_tols[-1],
            atol=args.dopri5_tols[-1], steps=2, stop_grad_norm=thr)
    return rows


def plot_frontier(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), dpi=100)
    labels = sorted({r["sampler"] for r in rows}, key=[r["sampler"] for r in rows].index)
    colors = {lab: plt.cm.tab10(i) for i, lab in enumerate(labels)}
    for ax, key, name in ((axes[0], "accuracy", "class accuracy (higher is better)"),
                          (axes[1], "fd", "Frechet distance to real digits (lower is better)")):
        for lab in labels:
            fixed = sorted((r for r in rows if r["sampler"] == lab and r["adaptive"] is None), key=lambda r: r["nfe"])
            ax.plot([r["nfe"] for r in fixed], [r[key] for r in fixed], "o-", color=colors[lab], label=lab)
            ad = [r for r in rows if r["sampler"] == lab and r["adaptive"] is not None]
            ax.scatter([r["nfe"] for r in ad], [r[key] for r in ad], marker="*", s=90, color=colors[lab])
        ax.set(xscale="log", xlabel="field evaluations per sample", title=name)
        if key == "fd":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("EqM digits: quality vs compute (lines: fixed budgets; stars: adaptive compute)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def ood(model, args, log):
    x_in = load_source("digits")[0]
    score = "energy" if model.ebm != "none" else "field-norm"
    s_in = tasks.ood_scores(model, x_in, score).numpy()
    res = {"score": score, "in": "digits", "auroc": {}}
    for name in args.ood:
        s_out = tasks.ood_scores(model, load_source(name)[0], score).numpy()
        res["auroc"][name] = tasks.auroc(s_in, s_out)
        log(f"OOD {name}: AUROC {res['auroc'][name]:.3f} ({score})")
    return res


def denoise(model, args, log):
    x, labels = load_digits_tensor()
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(args.seed))[:args.n]
    x = x[idx]
    res, rows = [], [x]
    for level in args.noise_levels:
        noisy = tasks.add_noise(x, level, torch.Generator().manual_seed(args.seed + 1))
        with torch.no_grad():
            out = tasks.denoise(model, noisy, None, steps=args.denoise_steps + 1, stepsize=args.denoise_stepsize)
        res.append(dict(noise_level=level, psnr_noisy=float(tasks.psnr(noisy, x).mean()),
                        psnr_denoised=float(tasks.psnr(out, x).mean())))
        log(f"denoise s={level}: PSNR noisy {res[-1]['psnr_noisy']:.2f} dB -> "
            f"denoised {res[-1]['psnr_denoised']:.2f} dB")
        rows += [noisy[:10], out[:10]]
    rows[0] = rows[0][:10]
    grid = save_image_grid(torch.cat(rows).clamp(-1, 1), os.path.join(args.out, "denoise.png"), nrow=10)
    return {"rows": res, "grid": grid, "steps": args.denoise_steps, "stepsize": args.denoise_stepsize}


def compose(model, args, log):
    """Rows: class a alone, class b alone, a + b composed (weights 1, 1), from the same noise."""
    rows = []
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(8, 1, 8, 8, generator=g)
    kw = dict(steps=args.compose_steps + 1, stepsize=0.01, cfg_scale=args.cfg_scale, cfg_channels=1)
    with torch.no_grad():
        for a, b in args.pairs:
            for labels in ([a], [b], [a, b]):
                rows.append(tasks.compose(model, labels, [1.0] * len(labels), noise, **kw))
    path = save_image_grid(torch.cat(rows).clamp(-1, 1), os.path.join(args.out, "compose.png"), nrow=8)
    log(f"composition grid: {path}")
    return {"pairs": args.pairs, "grid": path, **{k: v for k, v in kw.items()}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="an eqm-train digits checkpoint")
    p.add_argument("--out", default="runs/sampler_frontier")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--n", type=int, default=100, help="samples per setting (class-balanced)")
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--budgets", type=int, nargs="+", default=[8, 24, 72], help="field evaluations per sample")
    p.add_argument("--horizon", type=float, default=2.5, help="eta * updates of the descent samplers "
                   "(eqm-sample's digits default: 0.01 * 249)")
    p.add_argument("--stop-factors", type=float, nargs="+", default=[2.0],
                   help="adaptive thresholds: these multiples of the median |f| at GD's samples at the largest budget")
    p.add_argument("--dopri5-tols", type=float, nargs="+", default=[1e-1, 1e-2, 1e-3])
    p.add_argument("--ood", nargs="+", default=["photo-patches", "noisy-digits", "shuffled-digits",
                                                 "inverted-digits"])
    p.add_argument("--noise-levels", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8])
    p.add_argument("--denoise-steps", type=int, default=30)
    p.add_argument("--denoise-stepsize", type=float, default=0.05)
    p.add_argument("--compose-steps", type=int, default=250, help="GD updates (eta 0.01) of the composition grid")
    p.add_argument("--pairs", type=int, nargs=2, action="append", default=None, help="composition pairs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.pairs = args.pairs or [[0, 6], [1, 7], [3, 8]]
    os.makedirs(args.out, exist_ok=True)
    model = load_model(args.ckpt, "cpu")
    log = print
    results = {"ckpt": args.ckpt, "n": args.n, "cfg_scale": args.cfg_scale, "threads": torch.get_num_threads()}
    if "frontier" in args.parts:
        results["frontier"] = frontier(model, args, log)
        results["frontier_png"] = plot_frontier(results["frontier"], os.path.join(args.out, "frontier.png"))
    for part, fn in (("ood", ood), ("denoise", denoise), ("compose", compose)):
        if part in args.parts:
            results[part] = fn(model, args, log)
    name = "results.json" if set(args.parts) == set(PARTS) else f"results_{'_'.join(args.parts)}.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
