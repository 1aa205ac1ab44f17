"""Digits sample quality against training time: class accuracy (eqm.digits_eval) at CFG 1 and 2.

    python bench/digits_curve.py                       # the eqm-train digits defaults, 3 minutes
    python bench/digits_curve.py --model EqM-Ti/4 --batch-size 128 --lr 2e-3 --minutes 3

Trains in-process the way `eqm-train --data-path digits` does (same defaults, TrainStep, EMA) and, at every
--eval-every minutes of training wall time, copies the EMA weights; after training each copy is sampled
the way `eqm-sample` samples digits (GD, 250 steps, its eta) and scored by the real-digits classifier.
Evaluation time is not training time: the clock stops while the weights are copied.
Prints a table (minutes, steps, loss, accuracy at CFG 1 and 2) and optionally writes it as JSON.
"""
import argparse
import copy
import json
import time

import torch

from eqm.execution import PRECISION_CHOICES, resolve_precision
from eqm import digits_eval, runtime
from eqm.config import PRESETS
from eqm.datasets import load_digits_tensor
from eqm.ema import EMA
from eqm.fast import TrainStep, make_optimizer
from eqm.models import EqM_configs, EqM_models
from eqm.sampling import sample

DIGITS = PRESETS["digits"]  # the eqm-train / eqm-sample digits defaults


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DIGITS["model"], choices=list(EqM_models))
    p.add_argument("--batch-size", type=int, default=DIGITS["global_batch_size"])
    p.add_argument("--lr", type=float, default=DIGITS["lr"])
    p.add_argument("--ema-decay", type=float, default=DIGITS["ema_decay"])
    p.add_argument("--minutes", type=float, default=3.0, help="training wall time")
    p.add_argument("--eval-every", type=float, default=0.5, help="minutes of training between evaluations")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps instead (and evaluate every --eval-steps)")
    p.add_argument("--eval-steps", type=int, default=500)
    p.add_argument("--samples", type=int, default=200, help="samples per evaluation and CFG scale (class-balanced)")
    p.add_argument("--sample-steps", type=int, default=250)
    p.add_argument("--stepsize", type=float, default=DIGITS["stepsize"])
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES)
    p.add_argument("--threads", type=int, default=None, help="default: chosen by eqm.runtime")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--published", default=None, metavar="PATH",
                   help="train the published code's model and step instead (a checkout of raywang4/EqM; fp32 eager, "
                        "same config, data, batch, lr and EMA); sampling and scoring stay the same")
    p.add_argument("--json", default=None)
    return p


@torch.no_grad()
def evaluate(model, n, steps, stepsize, cfg_scale, precision, seed=0):
    """Class accuracy of n samples (labels 0..9 in turn) drawn as eqm-sample draws digits."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    x = torch.randn(n, 1, 8, 8, generator=g)
    out = sample(model, x, y, sampler="gd", steps=steps, stepsize=stepsize, cfg_scale=cfg_scale, cfg_channels=1,
                 precision=precision)
    return digits_eval.class_accuracy(out.float(), y)


def main(argv=None):
    args = get_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    precision = resolve_precision(args.precision, "cpu")
    x_all, y_all = load_digits_tensor()
    model = EqM_models[args.model](input_size=8, in_channels=1, num_classes=10)
    threads = runtime.configure_threads(model, args.batch_size, args.threads)
    print(f"{args.model}, batch {args.batch_size}, lr {args.lr}, EMA {args.ema_decay}, {precision} "
          f"({runtime.precision_reason()}), {threads} thread(s), compile {args.compile}")
    ema = copy.deepcopy(model).requires_grad_(False)
    if args.published:  # the published EqM class and train.py step; its EMA is read into ours for sampling
        from eqm_bench.vs_published import published_train_step

        from eqm.published import import_published

        models, transport_mod, note = import_published(args.published)
        depth, hidden, heads, patch = EqM_configs[args.model]
        model = models.EqM(input_size=8, patch_size=patch, in_channels=1, hidden_size=hidden, depth=depth,
                           num_heads=heads, num_classes=10)
        pub_ema = copy.deepcopy(model).requires_grad_(False)
        step_fn = published_train_step(model, transport_mod.create_transport("Linear", "velocity", None, None, None),
                                       decay=args.ema_decay, lr=args.lr, ema=pub_ema)
        ema_state = pub_ema.state_dict
        precision = "fp32"
        print(f"published code's model and step (fp32 eager; {note})")
    else:
        step_fn = TrainStep(model, make_optimizer(model, lr=args.lr), ema=EMA(model, ema), ema_decay=args.ema_decay,
                            precision=precision, compile=args.compile)
        ema_state = ema.state_dict
    step_fn = runtime.ThreadGovernor(step_fn, enabled=args.threads is None)
    model.train()
    snapshots, trained, step, losses = [], 0.0, 0, []
    next_eval = args.eval_every * 60
    perm = torch.randperm(len(x_all))
    pos = 0
    t0 = time.perf_counter()
    def done():
        return step >= args.max_steps if args.max_steps else trained >= args.minutes * 60

    def due():
        return step % args.eval_steps == 0 if args.max_steps else trained >= next_eval

    while not done():
        if pos + args.batch_size > len(x_all):
            perm, pos = torch.randperm(len(x_all)), 0
        idx = perm[pos:pos + args.batch_size]
        pos += args.batch_size
        losses.append(float(step_fn(x_all[idx], y_all[idx])))
        step += 1
        trained = time.perf_counter() - t0
        if due() or done():
            loss = sum(losses[-50:]) / len(losses[-50:])
            snapshots.append((trained / 60, step, loss, copy.deepcopy(ema_state())))
            print(f"  {trained / 60:5.2f} min  step {step:6d}  loss {loss:.3f}", flush=True)
            next_eval += args.eval_every * 60
            t0 += time.perf_counter() - t0 - trained  # the copy is not training time
    rows = []
    for minutes, step, loss, state in snapshots:
        ema.load_state_dict(state)
        acc = {s: evaluate(ema, args.samples, args.sample_steps, args.stepsize, s, precision) for s in (1.0, 2.0)}
        rows.append(dict(minutes=round(minutes, 3), step=step, loss=loss, acc_cfg1=acc[1.0], acc_cfg2=acc[2.0]))
        print(f"{minutes:5.2f} min  step {step:6d}  loss {loss:.3f}  acc cfg1 {acc[1.0]:.3f}  cfg2 {acc[2.0]:.3f}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=vars(args), precision=precision, threads=threads, rows=rows), f, indent=2)
    print(f"thread-count switches during training: {step_fn.switches}; ended at {torch.get_num_threads()}")
    return rows


if __name__ == "__main__":
    main()
