"""This project's fast path against the published EqM code, same CPU, same model, batch and weights.

    python bench/vs_published.py --published /path/to/raywang4/EqM     # a checkout of the published code

Both run one thread, in interleaved rounds (ABAB...), and report medians and their ratio. Training: the
published step (transport.training_losses, AdamW, update_ema, fp32) against eqm.fast.TrainStep (precision
"auto", foreach AdamW and EMA; --compile to compile it). Sampling: the published sample_gd.py loop
(NAG-GD, forward_with_cfg) against eqm.sampling.Engine (static buffers, same precision). Then one step of each
is profiled (torch.profiler) and the ops taking the most time are listed, so the table says where time goes.
The published model needs timm's PatchEmbed, Attention and Mlp; where timm cannot be imported (it needs
torchvision), small equivalents of those three layers stand in for it, and the output says so.
The published code is only imported from --published, never copied here.
"""
import argparse
import copy
import statistics
import time

import torch
from tqdm.auto import tqdm

from eqm.execution import PRECISION_CHOICES, Execution, resolve_precision
from eqm import runtime, validate as V
from eqm.ema import EMA
from eqm.fast import TrainStep, make_optimizer
from eqm.sampling import Engine
from eqm.models import EqM_configs, EqM_models
from eqm.published import import_published
from eqm_bench.throughput import reference_train_step


def published_train_step(model, transport, decay=0.9999, lr=1e-4, ema=None):
    """The published train.py step (training_losses, AdamW, per-parameter EMA) on the published model."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0)
    ema = copy.deepcopy(model).requires_grad_(False) if ema is None else ema

    def loss_fn(x, y):
        return transport.training_losses(model, x, dict(y=y, return_act=False, train=True))["loss"].mean()
    return reference_train_step(model, opt, ema, decay, loss_fn=loss_fn)


def published_sample(model, z, y, steps, stepsize, mu, cfg_scale):
    """The published sample_gd.py loop (NAG-GD; CFG doubles the batch with the null label 1000)."""
    n = z.shape[0]
    t = torch.ones(n)
    if cfg_scale > 1:
        z, y, t = torch.cat([z, z]), torch.cat([y, torch.full_like(y, 1000)]), torch.cat([t, t])
        model_fn = model.forward_with_cfg
    else:
        model_fn = lambda x, t, y, s: model.forward(x, t, y)  # noqa: E731
    with torch.no_grad():
        xt, m = z, torch.zeros_like(z)
        for _ in range(steps - 1):
            out = model_fn(xt + stepsize * m * mu, t, y, cfg_scale)
            m = out
            xt = xt + out * stepsize
            t += stepsize
    return xt[:n]


def fast_work(model, x, y, xs, ys, precision, compiled, steps, cfg_scale):
    """{"train": one TrainStep call on (x, y), "sample": one NAG-GD sampling Engine run on (xs, ys)} for model."""
    execution = Execution("reference", bool(compiled), precision)
    step = TrainStep(model, make_optimizer(model, lr=1e-4), ema=EMA(model), execution=execution)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    sampler = Engine(ema, xs.shape, "cpu", sampler="ngd", stepsize=0.0017, mu=0.3, cfg_scale=cfg_scale,
                     precision=execution.precision, compile=execution.compile)
    return {"train": lambda: step(x, y), "sample": lambda: sampler.run(xs, ys, steps=steps)}


def median_s(fn, n):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def warm_up(work, compiled):
    """Call every work item twice (compiles the fast path when compiled) and print how long it took."""
    t0 = time.perf_counter()
    for fn in tqdm(work.values(), desc="warm-up" + (" + compile" if compiled else "")):
        fn()
        fn()
    print(f"warm-up{' and compile' if compiled else ''}: {time.perf_counter() - t0:.1f} s")


def interleaved_medians(work, rounds, train_iters):
    """Median seconds per call of each (task, side) in work, timed in interleaved rounds (order reversed each round)."""
    items, times = list(work.items()), {k: [] for k in work}
    for r in tqdm(range(rounds), desc="interleaved rounds"):
        for (what, who), fn in (items if r % 2 == 0 else items[::-1]):
            times[(what, who)] += median_s(fn, train_iters if what == "train" else 1)
    return {k: statistics.median(v) for k, v in times.items()}


def ratio_table(med, peer):
    """Print the peer's and the fast path's medians and their ratio; return {task: peer s / fast s}."""
    print(f"\n{'':<8} {peer + ' s':>12} {'fast s':>10} {'speed-up':>9}   (median per call)")
    out = {}
    for what, unit in (("train", "step"), ("sample", "batch")):
        a, b = med[(what, peer)], med[(what, "fast")]
        out[what] = a / b
        print(f"{what + ' ' + unit:<13} {a:>7.4f} {b:>10.4f} {a / b:>8.2f}x")
    return out


def print_profiles(work, rows):
    """The profile table of one call of each work item."""
    for (what, who), fn in work.items():
        print(f"\nprofile: {what}, {who} (one call)")
        print(profile_table(fn, rows))


def compare(work, args, peer):
    """Warm up, time in interleaved rounds, print the ratio table (and the profiles); returns the table's data."""
    warm_up(work, args.compile)
    out = ratio_table(interleaved_medians(work, args.rounds, args.train_iters), peer)
    if args.profile_rows:
        print_profiles(work, args.profile_rows)
    return out


def profile_table(fn, rows):
    """The ops with the most self CPU time in one call of fn()."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def comparison_parser(description, peer):
    """The flags both peer benchmarks share (model, sizes, steps, rounds, our precision and compile), checked when
    parsed; `peer` names the other side in the help."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="EqM-Ti/2", choices=list(EqM_models))
    p.add_argument("--input-size", type=V.positive_int, default=16, help="latent side (16: a 128px image)")
    p.add_argument("--batch-size", type=V.positive_int, default=16)
    p.add_argument("--sample-batch-size", type=V.positive_int, default=8)
    p.add_argument("--sample-steps", type=V.number(int, lo=2), default=30, help="steps (steps - 1 updates)")
    p.add_argument("--cfg-scale", type=V.finite_float, default=1.5)
    p.add_argument("--train-iters", type=V.positive_int, default=5, help="timed training steps per round")
    p.add_argument("--rounds", type=V.positive_int, default=3)
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES, help=f"ours only ({peer}: fp32)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="compile the fast path (costs minutes cold on CPU; the compile cache makes reruns quick)")
    p.add_argument("--profile-rows", type=V.nonneg_int, default=8)
    return p


def main(argv=None):
    p = comparison_parser(__doc__.split("\n\n")[0], "the published code")
    p.add_argument("--published", required=True, help="path to a checkout of the published EqM code")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        models, transport_mod, note = import_published(args.published)
    except FileNotFoundError as e:
        raise SystemExit(f"vs_published: error: {e}") from None
    precision = resolve_precision(args.precision, "cpu")
    depth, hidden, heads, patch = EqM_configs[args.model]
    pub = models.EqM(input_size=args.input_size, patch_size=patch, in_channels=4, hidden_size=hidden, depth=depth,
                     num_heads=heads, num_classes=1000)
    ours = EqM_models[args.model](input_size=args.input_size, num_classes=1000)
    ours.load_state_dict(pub.state_dict())
    print(f"{args.model} on {args.input_size}x{args.input_size}x4 latents, train batch {args.batch_size}, sample batch "
          f"{args.sample_batch_size} (NAG-GD {args.sample_steps} steps, cfg {args.cfg_scale}); 1 thread each; "
          f"published: fp32 eager ({note}); fast: {precision} ({runtime.precision_reason()}), "
          f"compile {args.compile}")
    x = torch.randn(args.batch_size, 4, args.input_size, args.input_size)
    y = torch.randint(0, 1000, (args.batch_size,))
    xs = torch.randn(args.sample_batch_size, 4, args.input_size, args.input_size)
    ys = torch.randint(0, 1000, (args.sample_batch_size,))
    transport = transport_mod.create_transport("Linear", "velocity", None, None, None)
    pub.train()
    ours.train()
    pub_step = published_train_step(pub, transport)
    fast = fast_work(ours, x, y, xs, ys, precision, args.compile, args.sample_steps, args.cfg_scale)
    pub_ema = copy.deepcopy(pub).eval().requires_grad_(False)
    work = {
        ("train", "published"): lambda: pub_step(x, y),
        ("train", "fast"): fast["train"],
        ("sample", "published"): lambda: published_sample(pub_ema, xs, ys, args.sample_steps, 0.0017, 0.3,
                                                          args.cfg_scale),
        ("sample", "fast"): fast["sample"],
    }
    return compare(work, args, "published")


if __name__ == "__main__":
    main()
