"""Train an EBFlow: python -m eqm.ebflow.train --data 8gaussians --arch coupling --loss ssm --out runs/x

Writes <out>/log.csv (step, loss, test NLL), <out>/ckpt.pt (atomic), <out>/samples.png and prints a summary.
Score-matching losses (ssm, dsm, fdssm, sf, exact_sm, sml) never compute a linear layer's determinant;
the test NLL computes them once per evaluation.
"""
import argparse
import csv
import math
import os
import time

import torch
from tqdm import tqdm

from eqm import validate as V
from eqm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from eqm.distributed import resolve_device
from eqm.ema import EMA, warmup_decay
from eqm.guard import NONFINITE_CHOICES, NonFiniteError, all_finite, grad_norm, message

from .data import TOYS, load_data
from .losses import LOSSES, compute_loss
from .models import ARCHS, build_flow
from .preprocess import MaP, nll


LIKELIHOOD_LOSSES = ("ml", "sml")
ADVICE = "lower --lr, keep --grad-clip on (e.g. 10), or check the data for NaN/inf"
NUMERIC_FLAGS = dict(lr=V.positive_float, batch_size=V.positive_int, steps=V.positive_int, ema=V.unit_interval,
                     grad_clip=V.nonneg_float, eval_every=V.positive_int, seed=V.seed, sigma=V.positive_float,
                     eps=V.positive_float, slices=V.positive_int, lam=V.finite_float,
                     kernel_size=V.number(int, lo=1, hint=" (an odd size, e.g. 3)"), n_layers=V.positive_int,
                     hidden=V.positive_int, n_train=V.positive_int, n_test=V.positive_int)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="8gaussians",
                   help=f"{', '.join(TOYS)}, digits, a folder of images or a .npy of 8-bit images")
    p.add_argument("--arch", default=None, choices=list(ARCHS), help="default: coupling for 2-D, fc for images")
    p.add_argument("--loss", default="ssm", help=f"one of {', '.join(LOSSES)}")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam lr (default: 1e-3 for ml and sml, 1e-4 for the score-matching losses, whose test NLL "
                        "drifts upward over long runs at 1e-3)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay (warmed up over the first steps); 0 disables")
    p.add_argument("--grad-clip", type=float, default=10.0, help="max grad norm; 0 disables")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--out", default="runs/ebflow")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sigma", type=float, default=0.1, help="noise scale of dsm and sf")
    p.add_argument("--eps", type=float, default=0.1, help="finite-difference radius of fdssm")
    p.add_argument("--slices", type=int, default=1, help="projections per sample for ssm")
    p.add_argument("--proj", default="rademacher", choices=["rademacher", "gaussian"])
    p.add_argument("--lam", type=float, default=0.0, help="weight of the lambda * mean(E) term")
    p.add_argument("--map", default="outside", choices=["outside", "inside"],
                   help="MaP logit preprocessing outside the model (score matching in logit space) or inside "
                        "(as a first layer; perturbation-based losses then step outside (0, 1): use ml)")
    p.add_argument("--kernel-size", type=int, default=3, help="cnn: convolution size")
    p.add_argument("--n-layers", type=int, default=6, help="coupling: number of coupling layers")
    p.add_argument("--hidden", type=int, default=64, help="coupling: hidden width")
    p.add_argument("--n-train", type=int, default=20000, help="2-D toys: training points")
    p.add_argument("--n-test", type=int, default=2000, help="2-D toys: test points")
    p.add_argument("--resume", default=None, help="checkpoint to continue from")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (default: refuse)")
    p.add_argument("--on-nonfinite", choices=NONFINITE_CHOICES, default="stop",
                   help="non-finite loss or gradient: stop, or skip the step (at most --max-skips times)")
    p.add_argument("--max-skips", type=V.nonneg_int, default=20, help="with --on-nonfinite skip")
    V.apply_types(p, NUMERIC_FLAGS)
    args = p.parse_args(argv)
    if args.loss not in LOSSES:
        p.error(f"unknown loss {args.loss!r}; choose one of {', '.join(LOSSES)}")
    if args.lr is None:
        args.lr = 1e-3 if args.loss in LIKELIHOOD_LOSSES else 1e-4
    if args.kernel_size % 2 == 0:
        p.error(f"--kernel-size must be odd (the convolutions pad to 'same'), got {args.kernel_size}")
    return args


class Pipeline:
    """Turns raw data into model inputs and model log-densities into test NLL."""

    def __init__(self, data, inside):
        self.data, self.inside = data, inside
        self.pre = MaP(data.n_bins) if data.n_bins else None
        self.dim = math.prod(data.shape)

    def inputs(self, x, noise=None):
        """Model input and log|d input / d u| (None for continuous data or MaP inside)."""
        if self.pre is None:
            return x.float(), None
        if self.inside:
            return self.pre.dequantize(x, noise), None
        return self.pre(x, noise)

    @torch.no_grad()
    def test_nll(self, flow, batch=1000):
        """Mean test NLL in nats (per example) and bits/dim (None for continuous data)."""
        g = torch.Generator().manual_seed(1234)  # the same dequantisation noise at every evaluation
        nats, bpd = [], []
        for x in self.data.test.split(batch):
            noise = torch.rand(x.shape, generator=g) if self.pre else None
            inp, ld = self.inputs(x, noise)
            dev = flow._device()
            lp = flow.log_prob(inp.to(dev)).cpu()
            if self.pre is None:
                nats.append(-lp)
            else:
                n, b = nll(lp, self.dim, self.pre.n_bins, ld)
                nats.append(n)
                bpd.append(b)
        return torch.cat(nats).mean().item(), (torch.cat(bpd).mean().item() if bpd else None)

    def to_pixels(self, y):
        """Model-space samples -> [0, 1] images."""
        return y.clamp(0, 1) if self.inside else self.pre.inverse(y)


def load_resume(path, flow, opt, ema, device):
    """Load an EBFlow checkpoint into flow/opt/ema; returns its step. One-line CheckpointError otherwise."""
    state = load_checkpoint(path, map_location=device, kind="ebflow")
    if not {"model", "opt", "step"} <= set(state):
        raise CheckpointError(f"{path} is not an EBFlow training checkpoint (it has {sorted(state)[:6]}, "
                              "not model/opt/step)")
    try:
        flow.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if ema is not None:
            ema.load_state_dict(state.get("ema") or state["model"])
    except (RuntimeError, ValueError, KeyError) as e:
        was = state.get("args") or {}
        was = ", ".join(f"--{k} {was[k]}" for k in ("data", "arch", "n_layers", "hidden", "kernel_size")
                       if was.get(k) is not None)
        raise CheckpointError(f"{path} holds another flow ({was or 'other settings'}): resume with the same "
                              f"--data and --arch flags ({str(e).strip().splitlines()[0][:100]})") from None
    return state["step"]


def claim_out(out, csv_path, ckpt_path, resume, overwrite):
    """Open <out>/log.csv for this run: append on --resume, else create it exclusively (another run's
    folder is refused unless --overwrite). Returns (file, new)."""
    os.makedirs(out, exist_ok=True)
    if resume and os.path.exists(csv_path):
        return open(csv_path, "a", newline=""), False
    if overwrite or resume:
        return open(csv_path, "w", newline=""), True
    try:
        if os.path.exists(ckpt_path):
            raise FileExistsError
        return open(csv_path, "x", newline=""), True  # exclusive: two runs started together cannot share it
    except FileExistsError:
        raise SystemExit(f"ebflow: error: --out {out} already holds a run (log.csv / ckpt.pt): pass --resume "
                         f"{ckpt_path} to continue it, --overwrite to replace it, or choose a new --out") from None


@torch.no_grad()
def save_samples(flow, pipe, path, seed=0):
    """2-D: data | samples | model density. Images: a grid of samples above a grid of test images."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.manual_seed(seed)
    data = pipe.data
    if data.n_bins is None and data.shape == (2,):
        x = data.test
        s = flow.sample(2000).cpu()
        lo, hi = x.min(0).values - 1, x.max(0).values + 1
        gx, gy = torch.meshgrid(torch.linspace(lo[0], hi[0], 200), torch.linspace(lo[1], hi[1], 200), indexing="ij")
        grid = torch.stack([gx.flatten(), gy.flatten()], 1)
        dens = torch.cat([flow.log_prob(c.to(flow._device())).cpu() for c in grid.split(10000)]).exp()
        fig, ax = plt.subplots(1, 3, figsize=(12, 4))
        ax[0].scatter(x[:, 0], x[:, 1], s=1)
        ax[0].set_title(f"data ({data.name})")
        ax[1].scatter(s[:, 0], s[:, 1], s=1, color="C1")
        ax[1].set_title("flow samples")
        ax[2].imshow(dens.view(200, 200).T, origin="lower", extent=(lo[0], hi[0], lo[1], hi[1]), cmap="viridis")
        ax[2].set_title("model density")
        for a in ax[:2]:
            a.set_xlim(lo[0], hi[0])
            a.set_ylim(lo[1], hi[1])
    else:
        shape = data.shape if len(data.shape) == 3 else (1, 1, data.shape[0])
        s = pipe.to_pixels(flow.sample(64).cpu().float()).view(-1, *shape)
        real = data.test[:64].float().div(pipe.pre.n_bins - 1).view(-1, *shape)
        fig, ax = plt.subplots(1, 2, figsize=(10, 5))
        for a, imgs, title in ((ax[0], s, "flow samples"), (ax[1], real, "test data")):
            a.imshow(_tile(imgs), cmap="gray" if shape[0] == 1 else None, vmin=0, vmax=1)
            a.set_title(title)
            a.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _tile(imgs, ncol=8):
    n, c, h, w = imgs.shape
    nrow = math.ceil(n / ncol)
    out = torch.ones(c, nrow * (h + 1), ncol * (w + 1))
    for i, im in enumerate(imgs):
        r, q = divmod(i, ncol)
        out[:, r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = im
    out = out.permute(1, 2, 0)
    return out[..., 0] if c == 1 else out[..., :3]


def main(argv=None):
    """Train, evaluate and save; returns a summary dict. Bad input ends in one line (SystemExit)."""
    args = parse_args(argv)
    try:
        return train(args)
    except (CheckpointError, NonFiniteError) as e:
        raise SystemExit(f"ebflow: error: {e}") from None
    except OSError as e:
        from eqm.utils import os_error_line

        raise SystemExit(f"ebflow: error: {os_error_line(e)}") from None


def build(args):
    """(data, pipeline, flow, arch name) for the flags; bad data or flags end with one line."""
    try:
        data = load_data(args.data, args.n_train, args.n_test, args.seed)
        image = data.n_bins is not None
        arch = args.arch or ("fc" if image else "coupling")
        kw = {"cnn": {"kernel_size": args.kernel_size}, "coupling": {"n_layers": args.n_layers, "hidden": args.hidden}}
        inside = image and args.map == "inside"
        flow = build_flow(arch, data.shape, logit=inside, **kw.get(arch, {})).to(args.device)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"ebflow: error: {e}") from None
    return data, Pipeline(data, inside), flow, arch


class RunLog:
    """<out>/log.csv (one row per step; test NLL at evaluations) and the evaluation history."""

    def __init__(self, out, pipe, evaluated, resume, overwrite):
        self.csv, self.ckpt, self.png = (os.path.join(out, f) for f in ("log.csv", "ckpt.pt", "samples.png"))
        self.file, new = claim_out(out, self.csv, self.ckpt, resume, overwrite)
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(["step", "loss", "test_nll_nats", "test_bpd", "seconds"])
        self.pipe, self.evaluated, self.history, self.t0 = pipe, evaluated, [], time.time()

    def evaluate(self, step, loss):
        """Test NLL of the evaluated (EMA) flow, logged; returns (nats, bits/dim or None)."""
        self.evaluated.eval()
        nats, bpd = self.pipe.test_nll(self.evaluated)
        self.row(step, loss, f"{nats:.6f}", f"{bpd:.6f}" if bpd is not None else "")
        self.file.flush()
        self.history.append((step, nats, bpd))
        return nats, bpd

    def row(self, step, loss, nats="", bpd=""):
        self.writer.writerow([step, f"{loss:.6g}" if loss is not None else "", nats, bpd,
                              f"{time.time() - self.t0:.2f}"])


def step_once(flow, opt, x, args, step):
    """One optimizer step; returns (loss, applied): not applied when skipped (--on-nonfinite skip).
    A non-finite loss or gradient stops the run (NonFiniteError) under --on-nonfinite stop."""
    loss = compute_loss(flow, x, args.loss, lam=args.lam, sigma=args.sigma, eps=args.eps, n_slices=args.slices,
                        dist=args.proj, n=1)
    opt.zero_grad(set_to_none=True)
    norm = None
    if torch.isfinite(loss):  # (the loss is read on the host every step anyway)
        loss.backward()
        norm = (torch.nn.utils.clip_grad_norm_(flow.parameters(), args.grad_clip) if args.grad_clip > 0
                else grad_norm(flow.parameters()))
    if norm is None or not torch.isfinite(norm):
        if args.on_nonfinite == "stop":
            raise NonFiniteError(message(step, loss.item(), None if norm is None else norm.item(), advice=ADVICE))
        opt.zero_grad(set_to_none=True)
        return loss, False
    opt.step()
    return loss, True


def save(path, flow, ema, opt, args, step):
    """The checkpoint (atomic); refuses non-finite weights."""
    state = {"model": flow.state_dict(), "ema": ema.model.state_dict() if ema else None,
             "opt": opt.state_dict(), "args": vars(args), "step": step}
    if not all_finite(list(state["model"].values()) + (list(state["ema"].values()) if ema else [])):
        raise NonFiniteError(f"the weights at step {step} are non-finite; stopped without saving them. Try: {ADVICE}")
    save_checkpoint(path, state)


def train(args):
    """Train, evaluate every --eval-every steps (checkpointing then), draw samples; returns the summary."""
    args = argparse.Namespace(**{**vars(args), "device": str(resolve_device(args.device))})  # parsed args untouched
    torch.manual_seed(args.seed)
    data, pipe, flow, arch = build(args)
    opt = torch.optim.Adam(flow.parameters(), lr=args.lr)
    init_batch = pipe.inputs(data.train[torch.randperm(len(data.train))[:min(1024, len(data.train))]])[0]
    flow.initialize(init_batch.to(args.device))
    ema = EMA(flow) if args.ema > 0 else None
    start = load_resume(args.resume, flow, opt, ema and ema.model, args.device) if args.resume else 0
    run = RunLog(args.out, pipe, ema.model if ema else flow, args.resume, args.overwrite)
    print(f"EBFlow {arch} on {data.name} {data.shape}: {sum(p.numel() for p in flow.parameters()):,} parameters, "
          f"loss {args.loss}, {len(data.train)} train / {len(data.test)} test")
    if start == 0:
        run.evaluate(0, None)
    bar = tqdm(range(start + 1, args.steps + 1), desc=f"ebflow {args.loss}", dynamic_ncols=True)
    loss_avg, skipped = None, 0
    for step in bar:
        flow.train()
        x = pipe.inputs(data.train[torch.randint(0, len(data.train), (args.batch_size,))])[0].to(args.device)
        loss, applied = step_once(flow, opt, x, args, step)
        if not applied:
            skipped += 1
            if skipped > args.max_skips:
                raise NonFiniteError(f"more than --max-skips {args.max_skips} steps had a non-finite loss or "
                                     f"gradient (the last at step {step}, loss {loss.item():.4g}). Try: {ADVICE}")
            continue
        if ema is not None:
            ema.update(warmup_decay(args.ema, step))
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % args.eval_every == 0 or step == args.steps:
            nats, bpd = run.evaluate(step, loss.item())
            bar.set_postfix(loss=f"{loss_avg:.4g}", nll=f"{nats:.4f}", **({"bpd": f"{bpd:.3f}"} if bpd else {}))
            save(run.ckpt, flow, ema, opt, args, step)
        else:
            run.row(step, loss.item())
    if not run.history:
        run.evaluate(start, None)
    run.file.close()
    save_samples(run.evaluated, pipe, run.png, args.seed)
    return summarize(args, data, arch, run, start, skipped)


def summarize(args, data, arch, run, start, skipped):
    """The summary dict, printed in two lines."""
    seconds, history = time.time() - run.t0, run.history
    final, best = history[-1], min(history, key=lambda h: h[1])
    summary = {"data": data.name, "arch": arch, "loss": args.loss, "steps": args.steps, "seconds": seconds,
               "initial_nll": history[0][1], "final_nll": final[1], "final_bpd": final[2],
               "best_nll": best[1], "best_step": best[0], "skipped_steps": skipped,
               "csv": run.csv, "ckpt": run.ckpt, "png": run.png}
    unit = f" nats ({final[2]:.4f} bits/dim)" if final[2] is not None else " nats"
    print(f"done: {args.steps - start} steps in {seconds:.1f}s; test NLL {history[0][1]:.4f} -> "
          f"{final[1]:.4f}{unit}; best {best[1]:.4f} at step {best[0]}; skipped {skipped}")
    print(f"wrote {run.csv}, {run.ckpt}, {run.png}")
    return summary


if __name__ == "__main__":
    main()
