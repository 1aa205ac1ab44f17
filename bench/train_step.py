"""Steps/s of the eqm.train step (EqM loss, AdamW, EMA update) on random data, as the CLI runs it.

    python bench/train_step.py                                   # EqM-S/2, batch 8, 32x32x4, this CPU
    python bench/train_step.py --model EqM-Ti/2 --batch-size 64 --input-size 8 --channels 1 --threads 1
    python bench/train_step.py --compile --precision bf16          # the CLI's default on CUDA
"""
import argparse
import time

import torch

from eqm.execution import PRECISION_CHOICES, resolve_execution
from eqm import validate as V
from eqm.models import EqM_models
from eqm.distributed import resolve_device
from eqm.ema import EMA
from eqm.fast import TrainStep, make_optimizer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="EqM-S/2", choices=list(EqM_models))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                   help="auto: bf16 where a probe finds it faster on this machine (eqm.runtime), else fp32")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the forward + loss, as eqm-train --compile")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    V.apply_types(p, dict(batch_size=V.positive_int, input_size=V.positive_int, channels=V.positive_int,
                          num_classes=V.positive_int, steps=V.positive_int, warmup=V.nonneg_int,
                          threads=V.positive_int))
    args = p.parse_args(argv)
    patch = int(args.model.split("/")[-1])
    if args.input_size % patch:
        p.error(f"--input-size {args.input_size} is not divisible by the patch size {patch} of {args.model}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = EqM_models[args.model](input_size=args.input_size, in_channels=args.channels,
                                   num_classes=args.num_classes).to(device).train()
    opt = make_optimizer(model, lr=1e-4)
    execution = resolve_execution(device, ops="reference", compile=args.compile, precision=args.precision)
    step_fn = TrainStep(model, opt, ema=EMA(model), ema_decay=0.9999, execution=execution)
    x = torch.randn(args.batch_size, args.channels, args.input_size, args.input_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)

    def step():
        return step_fn(x, y)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / args.steps
    mode = step_fn.precision + (" compiled" if args.compile else "")
    print(f"{args.model} batch {args.batch_size} input {args.input_size}x{args.input_size}x{args.channels} "
          f"{mode} on {device} ({torch.get_num_threads()} threads): {1 / dt:.3f} steps/s, "
          f"{args.batch_size / dt:.1f} img/s, {dt * 1e3:.0f} ms/step")
    return 1 / dt


if __name__ == "__main__":
    main()
