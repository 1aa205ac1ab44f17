"""Benchmark the EqM kernels against PyTorch eager, torch.compile of the same reference, SDPA / flash-attn.

    python bench/kernel_ops.py [--batch 32] [--dtype bf16] [--json out.json]

On a CUDA GPU one command prints the whole table at EqM-XL/2 shapes (256 tokens, hidden 1152, 16 heads
of 72, 4x32x32 latents): milliseconds, GB/s and % of the measured device-to-device copy bandwidth for
the memory-bound kernels, TFLOP/s for attention. Without a GPU it says so and times only the CPU
reference (eager and compiled) at small shapes: the Triton kernels run there only in the interpreter.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import eqm_kernels as kernels
from eqm import validate as V

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bench_ms(fn, cuda: bool) -> float:
    """Median milliseconds of fn() (CUDA events via triton's do_bench on GPU, perf_counter on CPU)."""
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def copy_bandwidth_gbps() -> float:
    """Measured device-to-device copy bandwidth (bytes read + written), the ceiling for memory-bound kernels."""
    x = torch.empty(256 * 2**20, dtype=torch.float32, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x), cuda=True)
    return 2 * x.numel() * 4 / ms / 1e6


def fwd_bwd(fn, inputs, grads):
    """A callable that runs fn forward and backward with fixed output grads."""
    def run():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(outs, [t for t in inputs if t.requires_grad], grads)
    return run


def nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts)


def cases(batch, tokens, hidden, heads, dtype, device):
    """(kernel, impls {name: fn}, inputs, fwd bytes, fwd+bwd bytes or None, fwd FLOP or None)."""
    def rnd(*shape, grad=True, dt=dtype):
        return torch.randn(*shape, device=device, dtype=dt).requires_grad_(grad)

    N, T, D = batch, tokens, hidden
    x, y, gate, shift, scale = rnd(N, T, D), rnd(N, T, D), rnd(N, D), rnd(N, D), rnd(N, D)
    E = N * T * D * x.element_size()
    yield ("adaln_modulate", {"eager": kernels.adaln_modulate_reference, "triton": kernels.adaln_modulate},
           (x, shift, scale), 2 * E, 5 * E, None)
    yield ("gated_residual_adaln",
           {"eager": kernels.gated_residual_adaln_reference, "triton": kernels.gated_residual_adaln},
           (x, gate, y, shift, scale), 4 * E, 10 * E, None)

    Dh = D // heads
    q, k, v = rnd(N, heads, T, Dh), rnd(N, heads, T, Dh), rnd(N, heads, T, Dh)
    impls = {"eager": kernels.attention_reference, "triton": kernels.attention,
             "sdpa": F.scaled_dot_product_attention}
    try:
        from flash_attn import flash_attn_func

        if device == "cuda" and dtype != torch.float32:
            impls["flash-attn"] = lambda q, k, v: flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    except ImportError:
        pass
    yield ("attention", impls, (q, k, v), 4 * nbytes(q), None, 4 * N * heads * T * T * Dh)

    shape = (N, 4, 32, 32) if device == "cuda" else (N, 4, 16, 16)
    pred, x1, x0 = rnd(*shape), rnd(*shape, grad=False), rnd(*shape, grad=False)
    t = torch.rand(N, device=device)
    L = nbytes(pred)
    yield ("eqm_loss", {"eager": kernels.eqm_loss_reference, "triton": kernels.eqm_loss},
           (pred, x1, x0, t), 3 * L, 7 * L, None)
    xt_bytes = nbytes(x1, x0) + 2 * x1.numel() * 4  # two fp32 outputs (t is fp32)
    yield ("eqm_interpolate+target",
           {"eager": lambda a, b, t: kernels.eqm_interpolate_reference(a, b, t, with_target=True),
            "triton": lambda a, b, t: kernels.eqm_interpolate(a, b, t, with_target=True)},
           (x1, x0, t), xt_bytes, None, None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="default 32 on GPU, 2 on CPU")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1152)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--all-impls", action="store_true",
                        help="on CPU, time every implementation too (Triton via TRITON_INTERPRET=1: a slow smoke test)")
    V.apply_types(parser, dict(batch=V.positive_int, tokens=V.positive_int, hidden=V.positive_int,
                               heads=V.positive_int))
    args = parser.parse_args(argv)
    if args.hidden % args.heads:
        parser.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = DTYPES[args.dtype]
    if cuda:
        name = torch.cuda.get_device_name()
        bw = copy_bandwidth_gbps()
        print(f"{name}: measured copy bandwidth {bw:.0f} GB/s; batch {args.batch or 32}, {args.tokens} tokens, "
              f"hidden {args.hidden}, {args.heads} heads, {args.dtype}")
    else:
        name, bw = "cpu", None
        print("No CUDA GPU found: timing the CPU PyTorch reference only (eager and torch.compile) at small shapes; "
              "the Triton kernels run on CPU only through the interpreter, which is not worth timing.")
        if args.dtype == "bf16":
            dtype = torch.float32
        args.hidden, args.heads, args.tokens = min(args.hidden, 384), min(args.heads, 6), min(args.tokens, 256)
    batch = args.batch or (32 if cuda else 2)

    rows = []
    header = f"{'kernel':<24s} {'pass':<8s} {'impl':<11s} {'ms':>9s} {'GB/s':>8s} {'%copy':>6s} {'TFLOP/s':>8s} {'vs eager':>8s}"
    print(header + "\n" + "-" * len(header))
    for kernel, impls, inputs, fwd_bytes, fb_bytes, flops in cases(batch, args.tokens, args.hidden, args.heads,
                                                                  dtype, device):
        if not cuda and not args.all_impls:
            impls = {k: v for k, v in impls.items() if k == "eager"}
        if not args.no_compile:
            impls["compile"] = torch.compile(impls["eager"])
        with torch.no_grad():
            out = impls["eager"](*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        grads = [torch.randn_like(o) for o in outs]
        passes = [("fwd", fwd_bytes, flops)]
        if fb_bytes is not None or flops is not None:
            passes.append(("fwd+bwd", fb_bytes, None if flops is None else 3.5 * flops))
        for pass_name, bytes_, flop in passes:
            eager_ms = None
            for impl, fn in impls.items():
                if pass_name == "fwd":
                    def run(fn=fn):
                        with torch.no_grad():
                            fn(*inputs)
                else:
                    run = fwd_bwd(fn, inputs, grads)
                try:
                    ms = bench_ms(run, cuda)
                except Exception as e:  # e.g. a backend without a backward for this dtype
                    print(f"{kernel:<24s} {pass_name:<8s} {impl:<11s} failed: {type(e).__name__}: {e}"[:200])
                    continue
                eager_ms = ms if impl == "eager" else eager_ms
                gbps = bytes_ / ms / 1e6 if bytes_ else None
                row = {"kernel": kernel, "pass": pass_name, "impl": impl, "ms": ms,
                       "GBps": gbps, "pct_copy": 100 * gbps / bw if gbps and bw else None,
                       "TFLOPs": flop / ms / 1e9 if flop else None,
                       "speedup_vs_eager": eager_ms / ms if eager_ms else None}
                rows.append(row)
                fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
                print(f"{kernel:<24s} {pass_name:<8s} {impl:<11s} {ms:9.4f} {fmt(row['GBps'], '8.1f'):>8s} "
                      f"{fmt(row['pct_copy'], '6.1f'):>6s} {fmt(row['TFLOPs'], '8.1f'):>8s} "
                      f"{fmt(row['speedup_vs_eager'], '8.2f'):>8s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "copy_bandwidth_GBps": bw, "batch": batch, "tokens": args.tokens,
                       "hidden": args.hidden, "heads": args.heads, "dtype": str(dtype), "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
