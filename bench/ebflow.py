"""Seconds per EBFlow training step: ML (with log-determinants) against score matching (without).

    python bench/ebflow.py --dims 64 784 3072 --losses ml ssm dsm fdssm --json PATH

Same FC flow (FC(D) -> SmoothLeakyReLU -> FC(D)) and batch for every loss. ML pays O(D^3) per step for
slogdet and its backward; ssm / dsm / fdssm never touch a determinant, O(B D^2). Prints the table, the
speed-up of each loss over ML per D and the growth exponent b of seconds ~ D^b fitted by least squares on
log-log axes; writes JSON {"results": [{"D", "loss", "seconds_per_step"}], "exponents": {loss: b}}, a CSV
and a log-log PNG.
"""
import argparse
import csv
import json
import math
import os
import statistics
import time

import torch

from eqm import validate as V
from eqm.ebflow.losses import LOSSES, compute_loss
from eqm.ebflow.models import fc_flow


def time_step(dim, loss, batch_size, steps, warmup, seed=0):
    """Median seconds of one full optimiser step (loss, backward, Adam) of the FC flow at dimension dim."""
    torch.manual_seed(seed)
    flow = fc_flow(dim)
    with torch.no_grad():
        for layer in flow.layers:
            if layer.is_linear:
                layer.weight.add_(torch.randn(dim, dim) / math.sqrt(dim) * 0.1)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-5)
    x = torch.randn(batch_size, dim)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        value = compute_loss(flow, x, loss)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        if not torch.isfinite(value):
            raise RuntimeError(f"{loss} at D={dim} gave a non-finite loss")
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def fit_exponent(dims, seconds):
    """Least-squares slope of log(seconds) against log(D)."""
    lx, ly = [math.log(d) for d in dims], [math.log(s) for s in seconds]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else float("nan")


def plot(results, dims, losses, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for loss in losses:
        ax.loglog(dims, [results[(d, loss)] for d in dims], "o-", label=loss)
    ref = results[(dims[-1], losses[0])]
    for p, style in ((2, ":"), (3, "--")):
        ax.loglog(dims, [ref * (d / dims[-1]) ** p for d in dims], "k" + style, lw=0.8, label=f"~ D^{p}")
    ax.set_xlabel("D")
    ax.set_ylabel("seconds per training step")
    ax.set_title("EBFlow FC flow: ML (slogdet) vs score matching")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 256, 784, 3072])
    p.add_argument("--losses", nargs="+", default=["ml", "ssm", "dsm", "fdssm"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps per (D, loss); the median is reported")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--csv", default=None, help="default: next to --json, or bench/results/ebflow.csv")
    p.add_argument("--png", default=None, help="default: next to the CSV")
    V.apply_types(p, dict(dims=V.number(int, lo=2), batch_size=V.positive_int, steps=V.positive_int,
                          warmup=V.nonneg_int, threads=V.positive_int))
    args = p.parse_args(argv)
    bad = [name for name in args.losses if name not in LOSSES]
    if bad:
        p.error(f"unknown loss {bad}; choose from {', '.join(LOSSES)}")
    if any(d < 2 for d in args.dims):
        p.error("--dims must be at least 2")
    old_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(old_threads)


def _run(args):
    dims = sorted(set(args.dims))
    base = os.path.splitext(args.json)[0] if args.json else os.path.join("bench", "results", "ebflow")
    csv_path, png_path = args.csv or base + ".csv", args.png or base + ".png"

    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = lambda it, **k: it
    results = {}
    for d in tqdm(dims, desc="dims"):
        for loss in args.losses:
            results[(d, loss)] = time_step(d, loss, args.batch_size, args.steps, args.warmup)

    exponents = {loss: fit_exponent(dims, [results[(d, loss)] for d in dims]) for loss in args.losses}
    w = max(12, *(len(n) + 2 for n in args.losses))
    print(f"\nseconds per training step, FC flow, batch {args.batch_size}, {torch.get_num_threads()} threads")
    print("D".rjust(6) + "".join(n.rjust(w) for n in args.losses))
    for d in dims:
        print(str(d).rjust(6) + "".join(f"{results[(d, n)]:.4g}".rjust(w) for n in args.losses))
    if "ml" in args.losses:
        others = [n for n in args.losses if n != "ml"]
        print("\nspeed-up over ml (ml seconds / loss seconds)")
        print("D".rjust(6) + "".join(n.rjust(w) for n in others))
        for d in dims:
            print(str(d).rjust(6) + "".join(f"{results[(d, 'ml')] / results[(d, n)]:.2f}x".rjust(w) for n in others))
    print("\ngrowth exponent b in seconds ~ D^b (least squares over all dims"
          + (f"; last pair {dims[-2]}->{dims[-1]}" if len(dims) > 2 else "") + ")")
    for n in args.losses:
        tail = ""
        if len(dims) > 2:
            tail = f"   (last pair {fit_exponent(dims[-2:], [results[(d, n)] for d in dims[-2:]]):.2f})"
        print(f"  {n:>8}: {exponents[n]:.2f}{tail}")

    rows = [{"D": d, "loss": n, "seconds_per_step": results[(d, n)]} for d in dims for n in args.losses]
    os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["D", "loss", "seconds_per_step"])
        wr.writeheader()
        wr.writerows(rows)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"results": rows, "exponents": exponents, "batch_size": args.batch_size,
                       "threads": torch.get_num_threads()}, f, indent=1)
    if len(dims) > 1:
        plot(results, dims, args.losses, png_path)
    print(f"wrote {csv_path}" + (f", {args.json}" if args.json else "") + (f", {png_path}" if len(dims) > 1 else ""))
    return {"results": rows, "exponents": exponents}


if __name__ == "__main__":
    main()
