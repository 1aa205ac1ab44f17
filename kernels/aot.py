"""Compile check without a GPU: every kernel variant the model launches, built for sm_90 / sm_80 on a CPU.

    python -m eqm_kernels.aot --arch 90 [--precision bf16] [--model EqM-XL/2] [--kernel attention]

Triton's driver is replaced by a stand-in that reports the chosen GPU target; the real host wrappers
run on `meta` tensors strided as the model lays them out (q/k/v as views of the qkv output, adaLN
vectors as chunk views, the learn_sigma slice) at batch 256, and every kernel launch they make is
compiled instead of launched: every autotune config, ttir -> ptx -> cubin with the ptxas in the
Triton wheel. One line per variant: shared memory, registers, spills, resident warps per SM (64 is
full occupancy), MMA instruction, global load width, pipelining. Exit status 1 on a compile error, a
resource limit exceeded, a spill, or a dot kernel without 16-byte pipelined loads (or without tensor
cores).
"""
import argparse
import contextlib
import importlib
import io
import os
import re
import sys
import time
from dataclasses import dataclass

# (arch) -> (shared memory per block opt-in, registers per SM), from the CUDA occupancy tables
LIMITS = {90: (232448, 65536), 80: (166912, 65536)}
SHARED_PER_SM = {90: 233472, 80: 167936}  # each resident block also takes 1 KB of it for the system
MAX_WARPS, MAX_BLOCKS = 64, 32  # per SM, both architectures
MODELS = ("EqM-XL/2", "EqM-B/2", "Dh128")  # Dh128: attention alone at head dim 128 (8 heads of a 1024 width)
PRECISIONS = ("bf16", "tf32", "fp32")
BATCH = 256


@dataclass
class Variant:
    """One compiled kernel: where it came from and what the compiler made of it."""
    kernel: str
    shape: str
    config: str
    shared: int = 0
    regs: int = 0
    spill: int = 0
    warps: int = 0
    mma: str = "-"
    load_bytes: int = 0
    loads_ok: bool = True
    pipelined: str = "no"
    has_dot: bool = False
    seconds: float = 0.0
    error: str = ""
    group: str = ""
    dims: dict = None

    def problems(self, arch):
        """Reasons this variant fails the check (empty when it passes)."""
        if self.error:
            return [self.error]
        smem_limit, reg_file = LIMITS[arch]
        out = []
        if self.shared > smem_limit:
            out.append(f"shared memory {self.shared} > {smem_limit}")
        if self.regs * 32 * self.warps > reg_file:
            out.append(f"{self.regs} registers x {32 * self.warps} threads > {reg_file}")
        if self.spill:
            out.append(f"{self.spill} bytes spilled")
        if self.has_dot and self.mma == "fma":
            out.append("dot on FMA units, not tensor cores")
        if self.has_dot and (self.pipelined == "no" or not self.loads_ok):
            out.append("dot loop without 16-byte pipelined loads")
        return out

    def resident_warps(self, arch):
        """Warps resident per SM (at most 64: full occupancy) given registers, shared memory, warps per block."""
        if self.error or not self.warps:
            return 0
        warp_regs = -(-max(self.regs, 1) * 32 // 256) * 256  # registers are allocated per warp, 256 at a time
        blocks = min(MAX_BLOCKS, MAX_WARPS // self.warps, LIMITS[arch][1] // (warp_regs * self.warps),
                     SHARED_PER_SM[arch] // (self.shared + 1024))
        return blocks * self.warps

    def line(self, arch):
        bad = self.problems(arch)
        status = "FAIL " + "; ".join(bad) if bad else "ok"
        return (f"{self.kernel:<14s} {self.shape:<28s} {self.config:<22s} smem {self.shared:>6d}  "
                f"regs {self.regs:>3d}  spill {self.spill:>4d}  warps/SM {self.resident_warps(arch):>2d}  "
                f"mma {self.mma:<8s} ld {self.load_bytes:>2d}B  pipe {self.pipelined:<8s} "
                f"{self.seconds:5.1f}s  {status}")


# ---------------------------------------------------------------- PTX inspection
_BYTES = {"i1": 1, "i8": 1, "fp8e4nv": 1, "fp8e5": 1, "i16": 2, "f16": 2, "bf16": 2, "i32": 4, "f32": 4,
          "i64": 8, "f64": 8}


def inspect_copies(ttgir: str, warps: int):
    """(narrowest pipelined copy in bytes, True when every copy is as wide as alignment allows).

    Triton emits asynchronous copies (cp.async, or TMA) only where its software pipeliner
    multi-buffers a loop's loads. A copy is as wide as it can be when it moves 16 bytes, or the
    whole of each thread's share of a small tile (a 64x16 bf16 tile over 256 threads: 8 bytes).
    """
    widths, ok = [], True
    for line in ttgir.splitlines():
        if "async_copy_global_to_local" not in line:
            continue
        m = re.search(r"tensor<([0-9x]+)x!tt\.ptr<(\w+)>", line)
        contiguity = re.search(r"contiguity = (\d+)", line)
        elems = 1
        for n in m.group(1).split("x"):
            elems *= int(n)
        size = _BYTES.get(m.group(2), 4)
        width = (int(contiguity.group(1)) if contiguity else 1) * size
        share = max(1, elems // (32 * warps)) * size
        widths.append(width)
        ok &= width >= min(16, share)
    return min(widths, default=0), ok


def inspect_ptx(ptx: str):
    """(MMA instruction, pipelining, widest plain global load in bytes) read from PTX text."""
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "fma"
    pipe = "tma" if "cp.async.bulk" in ptx else "cp.async" if "cp.async" in ptx else "no"
    bits = {"8": 1, "16": 2, "32": 4, "64": 8}
    widths = [int(vec or 1) * bits[b] for vec, b in
              re.findall(r"ld\.global(?:\.[a-z0-9:]+)*?(?:\.v(\d))?\.[bfus](8|16|32|64)\s", ptx)]
    return mma, pipe, max(widths, default=0)


def parse_ptxas(log: str):
    """(registers, spill bytes) from a `ptxas -v` log."""
    regs = [int(n) for n in re.findall(r"Used (\d+) registers", log)]
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    return max(regs, default=0), max(spills, default=0)


# ---------------------------------------------------------------- stand-in driver and launch capture
class _StandInDriver:
    """Enough of Triton's driver to compile for a GPU target on a machine without one."""

    def __init__(self, arch):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch
        return torch.device("meta")

    def get_benchmarker(self):
        raise RuntimeError("the compile check never benchmarks")


class _Ptr:
    """A meta tensor as the launcher sees it: dtype and a 16-byte-aligned base plus the view's offset."""

    def __init__(self, t):
        self.dtype = t.dtype
        self._ptr = (1 << 20) + t.storage_offset() * t.element_size()

    def data_ptr(self):
        return self._ptr


def _capture(launches):
    """Context: JITFunction/Autotuner launches are recorded in `launches`, never compiled or run."""
    import torch
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def wrap(args, kwargs):
        return ([_Ptr(a) if isinstance(a, torch.Tensor) else a for a in args], dict(kwargs))

    def jit_run(self, *args, grid, warmup=False, **kwargs):
        launches.append((self, [None], *wrap(args, kwargs)))

    def tuner_run(self, *args, **kwargs):
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs)  # what autotuning would try for these arguments
        self.nargs = None
        launches.append((self.fn, configs, *wrap(args, kwargs)))

    stack = contextlib.ExitStack()
    for cls, fn in ((JITFunction, jit_run), (Autotuner, tuner_run)):
        old = cls.run
        setattr(cls, "run", fn)
        stack.callback(setattr, cls, "run", old)
    return stack


# ---------------------------------------------------------------- the model's kernel calls, on meta tensors
def _model_calls(name, precision, only=None):
    """Run the host wrappers as the model does at `name` shapes (kernel launches are captured by the caller);
    returns (a header line, the dimensions for `cost`)."""
    import torch
    from eqm.models import EqM_configs
    # (importlib: the package attributes `attention` and `eqm_loss` are the public functions, not the modules)
    adaln, attention, eqm_loss = (importlib.import_module(f"{__package__}.{m}")
                                  for m in ("adaln", "attention", "eqm_loss"))

    _, D, H, p = EqM_configs[name] if name in EqM_configs else (0, 1024, 8, 2)
    if name not in EqM_configs:
        only = "attention" if only in (None, "attention") else "none"
    C, T = 4, (32 // p) ** 2  # 4-channel 32x32 latents (256 px images)
    act = torch.bfloat16 if precision == "bf16" else torch.float32
    f32 = torch.float32
    meta = dict(device="meta")

    def run(label, fn):
        if only is None or label.startswith(only):
            fn()

    def attn():  # q, k, v: views of the qkv Linear output, as Attention.forward makes them
        qkv = torch.empty(BATCH, T, 3 * D, dtype=act, **meta)
        q, k, v = qkv.reshape(BATCH, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
        o, lse = attention._launch_forward(q, k, v, (D // H) ** -0.5)
        attention._launch_backward(q, k, v, o, lse, torch.empty_like(o), (D // H) ** -0.5)

    def adaln_calls():  # shift/scale/gate: chunks of the adaLN Linear output; residual stream fp32
        c = torch.empty(BATCH, 6 * D, dtype=act, **meta)
        shift, scale, gate, shift2, scale2, _ = c.chunk(6, dim=1)
        x = torch.empty(BATCH, T, D, dtype=f32, **meta)
        y = torch.empty(BATCH, T, D, dtype=act, **meta)  # branch output (attention proj / fc2)
        out = act if precision == "bf16" else None  # h in the autocast dtype its Linear reads (eqm/models.py)
        _, h = adaln._launch_forward(x, None, None, shift, scale, 1e-6, out)
        r, h = adaln._launch_forward(x, gate, y, shift2, scale2, 1e-6, out)
        adaln._launch_backward(x, None, None, scale, torch.empty_like(h), None, 1e-6)
        adaln._launch_backward(x, gate, y, scale2, torch.empty_like(h), torch.empty_like(r), 1e-6)

    def loss():  # latents fp32; pred: the first C channels of the learn_sigma head, unpatchified
        x1 = torch.empty(BATCH, C, 32, 32, dtype=f32, **meta)
        x0, t = torch.empty_like(x1), torch.empty(BATCH, dtype=f32, **meta)
        eqm_loss._launch_interpolate(x1, x0, t, 0.8, 4.0, True)
        head = torch.empty(BATCH, T, p * p * 2 * C, dtype=act, **meta)
        pred = head.reshape(BATCH, 32 // p, 32 // p, p, p, 2 * C).permute(0, 5, 1, 3, 2, 4).reshape(
            BATCH, 2 * C, 32, 32)[:, :C]
        eqm_loss._launch_loss_forward(pred, x1, x0, t, 0.8, 4.0)
        eqm_loss._launch_loss_backward(pred, x1, x0, t, torch.empty_like(t), 0.8, 4.0, False, False)

    matmul_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest" if precision == "fp32" else "high")  # as the CLIs set it
    try:
        if precision != "fp32":  # exact fp32 attention runs torch's SDPA (see kernels/attention.py)
            run("attention", attn)
        run("adaln", adaln_calls)
        run("eqm_loss", loss)
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
    dims = dict(B=BATCH, T=T, D=D, H=H, C=C, a=2 if precision == "bf16" else 4)
    return f"{name} B={BATCH} T={T} D={D} H={H} {precision}", dims


def _labels(fn, kwargs):
    """(kernel name, its specialising constexprs, its tiling) for one line of the report."""
    name = fn.fn.__name__.strip("_").replace("_kernel", "")
    consts = " ".join(f"{k}={v}" for k, v in kwargs.items()
                      if k.isupper() and not k.startswith("BLOCK_") and k not in ("UPCAST", "ROWS"))
    tiles = [f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in kwargs.items()
             if k.startswith("BLOCK_") or k == "ROWS"]
    tiles += [f"{k[4]}={kwargs[k]}" for k in ("num_warps", "num_stages") if k in kwargs]
    return name, consts, " ".join(tiles)


def compile_variant(fn, config, args, kwargs, arch):
    """Compile one launch with one autotune config for `arch`; returns the Variant."""
    from triton import knobs

    kw = dict(kwargs)
    if config is not None:
        kw.update(config.all_kwargs())
    kw = {k: v for k, v in kw.items() if k not in ("num_ctas", "maxnreg", "pre_hook", "ir_override") or v}
    name, consts, tiles = _labels(fn, kw)
    dtypes = sorted({str(a.dtype).replace("torch.", "").replace("float", "f") for a in args if isinstance(a, _Ptr)})
    v = Variant(name, " ".join([consts, "/".join(dtypes)]).strip(), tiles)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log), knobs.nvidia.scope(), knobs.compilation.scope():
            knobs.nvidia.dump_ptxas_log = True  # registers and spills (a cached kernel would have no log)
            knobs.compilation.always_compile = True
            fn.device_caches.clear()  # the in-memory cache is keyed by device, not by target: start afresh
            kernel = fn.run(*args, grid=(1,), warmup=True, **kw)
    except Exception as e:  # noqa: BLE001 -- any compiler failure is a failed variant, reported on its line
        v.error = f"compile error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return v
    v.seconds = time.perf_counter() - start
    v.regs, v.spill = parse_ptxas(log.getvalue())
    v.shared, v.warps = kernel.metadata.shared, kernel.metadata.num_warps
    v.mma, v.pipelined, v.load_bytes = inspect_ptx(kernel.asm["ptx"])
    if v.pipelined != "no":
        v.load_bytes, v.loads_ok = inspect_copies(kernel.asm["ttgir"], v.warps)
    v.has_dot = "tt.dot" in kernel.asm["ttir"]
    if not v.has_dot:
        v.mma = "-"
    return v


def check(arch, models=MODELS, precisions=("bf16",), only=None, out=sys.stdout, table=None):
    """Compile every variant for `arch`; print one line each; returns the list of Variants (all, duplicates
    included, are appended to `table` when given)."""
    from triton.runtime.driver import driver
    from . import _dispatch

    driver.set_active(_StandInDriver(arch))
    _dispatch.TRITON_DEVICES.add("meta")
    variants, seen = [], set()
    for precision in precisions:
        for name in models:
            launches = []
            with _capture(launches):
                header, dims = _model_calls(name, precision, only)
            print(f"# sm_{arch} {header}", file=out, flush=True)
            for fn, configs, args, kwargs in launches:
                for config in configs:
                    v = compile_variant(fn, config, args, kwargs, arch)
                    v.group, v.dims = f"{name} {precision}", dims
                    if table is not None:
                        table.append(v)
                    key = (v.kernel, v.shape, v.config, v.error)
                    if key in seen:  # the same kernel at the same constexprs (e.g. two adaLN calls)
                        continue
                    seen.add(key)
                    variants.append(v)
                    print(v.line(arch), file=out, flush=True)
    return variants


def cost(v):
    """(bytes, FLOP) a variant must move / execute per call at its model shape (the minimum: each tensor once)."""
    d = v.dims
    E, a, f, rows = d["B"] * d["T"] * d["D"], d["a"], 4, d["B"] * d["H"] * d["T"]
    matmul = 2 * d["B"] * d["T"] * d["T"] * d["D"]  # one (T x T x Dh) matmul over all heads
    h = a  # adaLN output: the autocast dtype under bf16, else fp32
    M = d["B"] * d["C"] * 32 * 32
    res = "HAS_RES=True" in v.shape
    table = {
        "attn_fwd": (4 * E * a + rows * f, 2 * matmul),
        "attn_bwd_delta": (2 * E * a + rows * f, 0),
        "attn_bwd_dkdv": (6 * E * a + 2 * rows * f, 4 * matmul),
        "attn_bwd_dq": (5 * E * a + 2 * rows * f, 3 * matmul),
        "adaln_fwd": (E * (f + a + f + h) if res else E * (f + h), 10 * E),
        "adaln_bwd": (E * (f + a + h + f + f + a) if res else E * (f + h + f), 16 * E),
        "eqm_interpolate": (16 * M, 4 * M),
        "eqm_loss_fwd": (M * (a + 8), 5 * M),
        "eqm_loss_bwd": (M * (2 * a + 8), 4 * M),
    }
    return table[v.kernel]


def markdown_table(variants, bandwidth=3.0e12, peaks=None):
    """Per-kernel markdown table: ranges over the autotune configs, bytes/FLOP per call, bound at H100 SXM
    datasheet peaks (3 TB/s; dense tensor cores 989 TFLOP/s bf16, 495 TF32)."""
    peaks = peaks or {"bf16": 989e12, "tf32": 495e12}
    groups = {}
    for v in variants:
        groups.setdefault((v.group, v.kernel, v.shape), []).append(v)
    out = ["| model, precision | kernel | registers | shared mem | spills | MMA | bytes / call | FLOP / call | bound |",
           "|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for (group, kernel, shape), vs in groups.items():
        nbytes, nflop = cost(vs[0])
        t_mem, t_flop = nbytes / bandwidth, nflop / peaks[group.split()[-1]]
        regs = sorted({v.regs for v in vs})
        smem = sorted({v.shared for v in vs})
        mma = "/".join(sorted({v.mma for v in vs}))
        consts = " ".join(c for c in shape.split() if c.startswith(("HAS_", "HEAD_DIM", "WITH_", "NEED_")))
        out.append(f"| {group} | {kernel} {consts} | {regs[0]}-{regs[-1]} | {smem[0] / 1024:.0f}-{smem[-1] / 1024:.0f} KB"
                   f" | {max(v.spill for v in vs)} | {mma} | {nbytes / 1e6:,.0f} MB | {nflop / 1e9:,.1f} G | "
                   f"{1e6 * max(t_mem, t_flop):,.0f} us ({'memory' if t_mem >= t_flop else 'compute'}) |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, choices=sorted(LIMITS), nargs="+", default=[90])
    p.add_argument("--precision", choices=PRECISIONS + ("all",), nargs="+", default=["all"])
    p.add_argument("--model", choices=MODELS + ("all",), default="all")
    p.add_argument("--kernel", choices=("attention", "adaln", "eqm_loss"), default=None,
                   help="only this kernel family (default: all)")
    p.add_argument("--table", action="store_true",
                   help="also print a markdown table per kernel (first --arch): ranges, bytes/FLOP, H100 bound")
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said explicitly (no warning)
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter was chosen at import: restart without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", "eqm_kernels.aot", *(argv or sys.argv[1:])], env)
    precisions = PRECISIONS if "all" in args.precision else tuple(args.precision)
    models = MODELS if args.model == "all" else (args.model,)
    failed = total = 0
    table = []
    for i, arch in enumerate(args.arch):
        variants = check(arch, models, precisions, args.kernel, table=table if args.table and i == 0 else None)
        total += len(variants)
        failed += sum(bool(v.problems(arch)) for v in variants)
    if args.table:
        print(markdown_table(table))
    print(f"{total} variants, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
