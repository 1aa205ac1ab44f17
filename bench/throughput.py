"""Training and sampling throughput of EqM: the reference path against the fast path, in one run.

    python bench/throughput.py                                    # small CPU default, a few minutes
    python bench/throughput.py --model EqM-XL/2 --batch-size 256  # the headline table on a GPU

reference: eager fp32 (TF32 on CUDA, as the published code sets), the reference ops, torch AdamW, a per-parameter
    EMA and eqm.sampling.sample (eager): the published code's way of running.
fast: eqm.fast.TrainStep and eqm.sampling.Engine under one eqm.execution.Execution (torch.compile fullgraph,
    bf16 autocast over fp32 weights, Triton ops on CUDA), fused AdamW on CUDA, foreach EMA, static buffers and
    CUDA graphs.
    On CPU: static buffers, bf16 where eqm.runtime's sub-second matmul probe finds it clearly faster than
    fp32 (avx512_bf16 / AMX CPUs; never on AVX2-only ones), kernels off (they would run the Triton interpreter),
    and compile where it pays within the benchmark (eqm.compiling: a few timed eager steps, the steps left, and
    the compile cost and speed-up measured on this machine before; a first, cold CPU compile takes a minute or
    more and gains ~1.1x, so a default run stays eager). --compile on/off decides it yourself.
Inputs are random latents of the model's input size (image_size / eqm.vae.FACTOR): the VAE is not run.
Both training and sampling report the median over their timed runs; "setup s" is each path's build time
(compilation included) and is not part of the throughput.

FLOPs are counted analytically from the config (eqm.fast.forward_flops_per_image: matmuls and attention
scores; training = 3x forward, sampling = (steps - 1) evaluations, doubled with CFG); utilisation is
achieved FLOP/s over a matmul peak measured here, in the dtype the path computes in.
Timings exclude warm-up (compilation, CUDA graph capture), which the setup column reports instead.
"""
import argparse
import copy
import dataclasses
import json
import os
import statistics
import time

import torch
from tqdm.auto import tqdm

from eqm import validate as V, vae as vae_lib
from eqm.distributed import resolve_device
from eqm.ema import EMA
from eqm.execution import PRECISION_CHOICES, Execution, resolve_execution, set_precision, use_execution
from eqm.fast import (TrainStep, forward_flops_per_image, make_optimizer, sample_flops_per_image,
                      train_flops_per_image)
from eqm import compiling, runtime
from eqm.models import EqM_models
from eqm.objective import eqm_training_losses
from eqm.sampling import Engine, sample


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device, dtype, n=None, reps=None):
    """Measured dense matmul TFLOP/s of an n x n x n product in `dtype` (fp32 uses TF32 on CUDA)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    reps = reps or (20 if device.type == "cuda" else 4)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n ** 3 / best / 1e12


class PeakMemory:
    """Peak memory of a phase: torch.cuda.max_memory_allocated on CUDA, peak RSS (VmHWM, reset per phase) on CPU.

    A path's footprint is its phase peak minus what was held before (baseline_gb): the paths live side by side.
    """

    def __init__(self, device):
        self.device = device

    def reset(self):
        """Start a phase; self.baseline_gb is what was already held (other paths' state)."""
        self.baseline_gb = self.current_gb()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
            except OSError:
                pass

    def current_gb(self):
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 1e9
        try:
            with open("/proc/self/status") as f:
                return int(next(l for l in f if l.startswith("VmRSS:")).split()[1]) * 1024 / 1e9
        except (OSError, StopIteration):
            return 0.0

    def gb(self):
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        try:
            with open("/proc/self/status") as f:
                line = next(l for l in f if l.startswith("VmHWM:"))
            return int(line.split()[1]) * 1024 / 1e9
        except (OSError, StopIteration):
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def timed(fn, iters, device, desc):
    """Seconds of each of `iters` calls of fn() (after the caller's warm-up)."""
    times = []
    for _ in tqdm(range(iters), desc=desc, leave=False):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def on_oom_halve(build, batch, what):
    """build(b) at batch b, halving b on CUDA out-of-memory; returns (result, b used)."""
    while True:
        try:
            return build(batch), batch
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
            torch.cuda.empty_cache()
            batch //= 2
            tqdm.write(f"{what}: out of memory, retrying with batch {batch}")


#################################################################################
#                                   The paths                                   #
#################################################################################

def reference_train_step(model, opt, ema, decay=0.9999, loss_fn=None):
    """The published training step: eager loss, backward, AdamW, per-parameter EMA.

    loss_fn(x1, y) -> mean loss; default: this project's reference EqM objective."""
    ema_params = dict(ema.named_parameters())
    params = list(model.named_parameters())
    if loss_fn is None:
        loss_fn = lambda x1, y: eqm_training_losses(model, x1, dict(y=y))["loss"].mean()  # noqa: E731

    def step(x1, y):
        loss = loss_fn(x1, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for name, p in params:
                ema_params[name].mul_(decay).add_(p.data, alpha=1 - decay)
        return loss.detach()
    return step


class Path:
    """One way of running EqM (reference, fast, or a step in between) on its own copy of the model.

    Building it compiles and captures everything (warm-up), so the timing calls measure steady state.
    kind "reference": eager fp32/TF32 as published; "fast": TrainStep + sampling Engine running `execution`
    (an eqm.execution.Execution: ops, compile, precision). auto_compile: execution.compile is decided per
    step by timed eager calls and the compile cost measured here before (eqm.compiling) instead.
    """

    def __init__(self, name, base_model, args, device, kind, execution=Execution(), cuda_graph=False, cfg=True,
                 auto_compile=False):
        self.name, self.args, self.device, self.kind = name, args, device, kind
        self.train_times, self.sample_times = [], {False: [], True: []}
        if kind == "reference":
            execution, auto_compile = Execution("reference", False, "tf32"), False  # as published: eager, TF32
        self.execution, self.precision, self.compiled, self.reasons = execution, execution.precision, {}, []
        self.compile = "auto" if auto_compile else execution.compile
        t_setup = time.perf_counter()
        mem = PeakMemory(device)
        mem.reset()
        self.model = use_execution(copy.deepcopy(base_model).eval(), execution)  # eval: train=True is passed
        self.train_fn, self.train_batch = on_oom_halve(self._build_train, args.batch_size, f"{name} training")
        self.sample_fn, self.sample_batch = {}, None
        for use_cfg in ((False, True) if cfg else (False,)):
            self.sample_fn[use_cfg], self.sample_batch = on_oom_halve(
                lambda b: self._build_sample(b, use_cfg, cuda_graph), self.sample_batch or args.sample_batch_size,
                f"{name} sampling")
        self.peak_mem_gb = mem.gb() - mem.baseline_gb
        self.setup_s = time.perf_counter() - t_setup

    def _inputs(self, b):
        m = self.model
        return (torch.randn(b, m.in_channels, m.input_size, m.input_size, device=self.device),
                torch.randint(0, m.num_classes, (b,), device=self.device))

    def _build_train(self, b):
        """The warmed-up training step at batch b (compiled in the warm-up where compiling is on or pays)."""
        m, args, device = self.model, self.args, self.device
        x1, y = self._inputs(b)
        if self.kind == "reference":
            ema = copy.deepcopy(m).requires_grad_(False)
            step = reference_train_step(m, torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0), ema)
        else:  # compile "auto": timed eager steps decide whether compiling pays within this benchmark
            ex = dataclasses.replace(self.execution, compile=self.compile is True)
            step = TrainStep(m, make_optimizer(m, lr=1e-4), ema=EMA(m), execution=ex)
            if self.compile == "auto":
                step = compiling.AutoCompile(step, step.use_compiled, device=device, compile="auto",
                                             log=lambda reason: self.log(f"training: {reason}"),
                                             total_steps=args.warmup + args.rounds * args.train_iters,
                                             key=compiling.compile_key("train", m, x1.shape, self.precision, device),
                                             probe=max(args.warmup - 1, 1))
        for _ in tqdm(range(args.warmup), desc=f"{self.name}: train warm-up", leave=False):
            self._set_precision()
            step(x1, y)
        while isinstance(step, compiling.AutoCompile) and (step.deciding or step.compiled and not step.compiled_times):
            step(x1, y)  # the decision and the compile belong to the warm-up, not to the timed steps
        self.compiled["train"] = step.compiled if isinstance(step, compiling.AutoCompile) else self.compile is True
        sync(device)
        return lambda: step(x1, y)

    def _build_sample(self, b, use_cfg, cuda_graph):
        """The warmed-up sampling run at batch b, with or without CFG."""
        m, args, device, precision = self.model, self.args, self.device, self.precision
        kw = dict(sampler="ngd", stepsize=0.0017, mu=0.3, cfg_scale=args.cfg_scale if use_cfg else 1.0)
        x, y = self._inputs(b)
        self._set_precision()
        if self.kind == "reference":
            sample(m, x, y, steps=2, **kw)
            sync(device)
            return lambda: sample(m, x, y, steps=args.sample_steps, **kw)
        on, key = self.compile is True, compiling.compile_key("sample-cfg" if use_cfg else "sample", m, x.shape,
                                                                precision, device)
        if self.compile == "auto":
            eager = Engine(m, x.shape, device, precision=precision, compile=False, **kw)
            on, reason, eager_s = compiling.decide_by_timing(
                "auto", lambda: eager.run(x, y, steps=2), key=key, device=device,
                steps_left=(args.rounds + 1) * (args.sample_steps - 1))
            self.log(f"sampling{' with cfg' if use_cfg else ''}: {reason}")
        sampler = Engine(m, x.shape, device, precision=precision, compile=on, cuda_graph=cuda_graph and on,
                         block=args.graph_block, **kw)
        t0 = time.perf_counter()
        sampler.prepare(args.sample_steps)  # compile; on CUDA capture the graphs
        sampler.run(x, y, steps=2)
        sync(device)
        first_s = time.perf_counter() - t0
        if on and self.compile == "auto":
            steady_s = compiling.time_calls(lambda: sampler.run(x, y, steps=2), 1, device)
            compiling.record_compile(key, first_s, steady_s, eager_s)
        self.compiled["sample-cfg" if use_cfg else "sample"] = on
        return lambda: sampler.run(x, y, steps=args.sample_steps)

    def log(self, reason):
        """Keep and print a compile decision of this path."""
        self.reasons.append(reason)
        tqdm.write(f"{self.name}: {reason}")

    def _set_precision(self):
        set_precision(self.precision, self.device)

    def time_round(self):
        """Time args.train_iters training steps and one sampling run per setting."""
        self._set_precision()
        self.train_times += timed(self.train_fn, self.args.train_iters, self.device, f"{self.name}: train")
        for use_cfg, fn in self.sample_fn.items():
            self.sample_times[use_cfg] += timed(fn, 1, self.device, f"{self.name}: sample{' cfg' if use_cfg else ''}")

    def results(self):
        """img/s from the median time of the timed runs, for training and sampling alike."""
        out = {"train_img_s": self.train_batch / statistics.median(self.train_times), "setup_s": self.setup_s}
        for use_cfg, key in ((False, "sample_img_s"), (True, "sample_cfg_img_s")):
            if self.sample_times[use_cfg]:
                out[key] = self.sample_batch / statistics.median(self.sample_times[use_cfg])
        return out


#################################################################################
#                                      Main                                     #
#################################################################################

def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="EqM-Ti/2", choices=list(EqM_models))
    p.add_argument("--image-size", type=int, default=None,
                   help="pixels; the model sees image_size/8 latents (default 256 on CUDA, 128 on CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default 256 CUDA, 16 CPU)")
    p.add_argument("--sample-batch-size", type=int, default=None, help="default: --batch-size (CPU: 8)")
    p.add_argument("--sample-steps", type=int, default=None, help="NAG-GD steps (default 250 CUDA, 30 CPU)")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--train-iters", type=int, default=None,
                   help="timed training steps per round (default 20 CUDA, 4 CPU); the median counts")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps first (compilation)")
    p.add_argument("--rounds", type=int, default=None,
                   help="timing rounds, paths in alternating order (default 1 CUDA, 3 CPU); medians")
    p.add_argument("--graph-block", type=int, default=10, help="sampling steps per captured CUDA graph")
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                   help="fast path: auto = bf16 where a sub-second matmul probe finds it clearly faster")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="fast path torch.compile (auto: on with CUDA; on a CPU only where timed eager steps and the "
                        "compile cost measured here before show it pays within the benchmark: eqm.compiling)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for every path (default: probed for this model, 1 or all cores)")
    p.add_argument("--fused", default="auto", choices=["auto", "on", "off"],
                   help="fast path Triton ops (auto: on with CUDA; on CPU only under TRITON_INTERPRET=1)")
    p.add_argument("--breakdown", action="store_true",
                   help="also measure the pieces one at a time (+compile, +bf16, +fused; the CUDA graph is the "
                        "rest): more compiles")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--png", default=None, help="bar chart of the table (default: beside --json)")
    p.add_argument("--seed", type=int, default=0)
    return V.apply_types(p, NUMERIC_FLAGS)


NUMERIC_FLAGS = dict(image_size=V.positive_int, batch_size=V.positive_int, sample_batch_size=V.positive_int,
                     sample_steps=V.number(int, lo=2, hint=" (steps - 1 updates)"), cfg_scale=V.nonneg_float,
                     train_iters=V.positive_int, warmup=V.nonneg_int, rounds=V.positive_int,
                     graph_block=V.positive_int, seed=V.seed)


def resolve(args):
    """(device, settings): the parsed flags with the device's defaults filled in, as a new Namespace (the parsed one
    is left alone); a bad combination exits with one line."""
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    batch_size = args.batch_size or (256 if gpu else 16)
    args = argparse.Namespace(**{**vars(args), **dict(
        image_size=args.image_size or (256 if gpu else 128), batch_size=batch_size,
        sample_batch_size=args.sample_batch_size or (batch_size if gpu else 8),
        sample_steps=args.sample_steps or (250 if gpu else 30), train_iters=args.train_iters or (20 if gpu else 4),
        rounds=args.rounds or (1 if gpu else 3))})
    try:
        latent = vae_lib.latent_size(args.image_size)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.sample_steps < 2:
        raise SystemExit("--sample-steps must be >= 2 (steps - 1 updates)")
    patch = int(args.model.split("/")[-1])
    if latent % patch:
        raise SystemExit(f"--image-size {args.image_size} gives {latent}x{latent} latents, "
                         f"not divisible by the patch size {patch} of {args.model}")
    return device, args


def main(argv=None):
    args = get_parser().parse_args(argv)
    device, args = resolve(args)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        print("note: TRITON_INTERPRET=1 is set; --fused on would run the Triton ops in the interpreter (slow)")
    torch.manual_seed(args.seed)
    gpu = device.type == "cuda"

    latent = vae_lib.latent_size(args.image_size)
    model = EqM_models[args.model](input_size=latent, num_classes=1000).to(device)
    threads = runtime.configure_threads(model, args.batch_size, args.threads, device)
    dev_name = torch.cuda.get_device_name(device) if gpu else f"CPU ({threads} of {os.cpu_count()} threads)"
    try:
        execution = resolve_execution(device, ops={"on": "triton", "off": "reference"}.get(args.fused, "auto"),
                                      compile={"on": True, "off": False}.get(args.compile, "auto"),
                                      precision=args.precision)
    except ValueError as e:
        raise SystemExit(f"throughput: error: {e}") from None
    precision, compile, fused = execution.precision, execution.compile, execution.ops == "triton"
    print(f"precision {precision}: {runtime.precision_reason(device)}")
    # compile auto: on with CUDA (the CUDA graphs need it); on a CPU where timed eager steps show it pays
    auto_compile = args.compile == "auto" and not gpu
    compile = "auto" if auto_compile else compile
    pieces = {"compile": compile, "precision": precision, "fused_kernels": fused, "cuda_graph": gpu,
              "static_buffers": True, "optimizer": "fused AdamW" if gpu else "foreach AdamW", "ema": "foreach lerp"}
    # matmul peaks (for utilisation) only in the dtypes the paths compute in: bf16 can be 75x slower on AVX2
    set_precision("tf32", device)
    dtypes = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if precision == "bf16" else {})}
    peaks = {k: matmul_peak_tflops(device, dt) for k, dt in dtypes.items()}
    peaks.setdefault(precision, peaks["fp32"])  # tf32 on CUDA: the fp32/TF32 peak

    fwd = forward_flops_per_image(model)
    train_flops = train_flops_per_image(model)
    s_flops = sample_flops_per_image(model, args.sample_steps)
    s_flops_cfg = sample_flops_per_image(model, args.sample_steps, cfg=True)
    what = (f"random {latent}x{latent}x{model.in_channels} latents (the VAE latent of a "
            f"{args.image_size}x{args.image_size}x3 image; the VAE is not run)")
    print(f"{args.model} on {what}, {model.num_patches} tokens: "
          f"{model.num_params / 1e6:.1f}M params, {fwd / 1e9:.2f} GFLOP forward per image")
    print(f"train batch {args.batch_size}, sample batch {args.sample_batch_size}, NAG-GD {args.sample_steps} steps "
          f"(cfg {args.cfg_scale}); peak matmul " + ", ".join(f"{k} {v:.2f}" for k, v in peaks.items()) + " TFLOP/s")
    print("fast path pieces: " + ", ".join(f"{k}={v}" for k, v in pieces.items()))

    paths = path_specs(execution, gpu, args.breakdown, auto_compile)
    built = [Path(name, model, args, device, **kw) for name, kw in tqdm(paths, desc="compile + warm-up")]
    del model
    fast_path = next(p for p in built if p.name == "fast")
    pieces["compile"] = fast_path.compiled if compile == "auto" else compile
    pieces["compile_reasons"] = fast_path.reasons
    # Rounds in alternating order (ABBA): a shared machine slows whatever runs at that moment, not one path.
    for r in tqdm(range(args.rounds), desc="timing rounds"):
        for path in (built if r % 2 == 0 else built[::-1]):
            path.time_round()

    # Measure the peaks again now and keep the best: a busy moment at start-up would inflate every MFU.
    set_precision("tf32", device)
    for key, dtype in dtypes.items():
        peaks[key] = max(peaks[key], matmul_peak_tflops(device, dtype))
    peaks[precision] = peaks.get(precision) if precision in dtypes else peaks["fp32"]
    results = {path.name: utilisation(path, peaks, train_flops, s_flops, s_flops_cfg) for path in built}
    breakdown = None
    if args.breakdown:
        fast_label = " ".join(["fast: +static buffers", "+compile" if compile is True else "", "+bf16" if precision == "bf16"
                               else "", "+fused" if fused else "", "+CUDA graph" if gpu else ""]).split()
        breakdown = [{"step": " ".join(fast_label) if name == "fast" else name, "setup_s": results[name]["setup_s"],
                      "train_img_s": results[name]["train_img_s"],
                      "sample_img_s": results[name]["sample_img_s"]} for name, _ in paths]
    speedup = {k: results["fast"][k] / results["reference"][k]
               for k in ("train_img_s", "sample_img_s", "sample_cfg_img_s")}
    print_table(args, what, dev_name, results, speedup, breakdown)
    out = {"device": dev_name, "model": args.model, "measured_on": what, "threads": threads,
           "precision_reason": runtime.precision_reason(device), "batch_size": args.batch_size,
           "image_size": args.image_size, "latent_size": latent, "latent_channels": built[0].model.in_channels,
           "precision": precision, "sample_batch_size": args.sample_batch_size,
           "sample_steps": args.sample_steps, "cfg_scale": args.cfg_scale, "sampler": "ngd", "rounds": args.rounds,
           "reference": results["reference"], "fast": results["fast"], "fast_pieces": pieces,
           "flops_per_image": {"forward": fwd, "train": train_flops, "sample": s_flops, "sample_cfg": s_flops_cfg},
           "peak_matmul_tflops": peaks, "speedup": speedup, "breakdown": breakdown,
           "torch": torch.__version__}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    png = args.png or (os.path.splitext(args.json)[0] + ".png" if args.json else None)
    if png:
        plot(out, png)
        print(f"wrote {png}")
    return out


def path_specs(execution, gpu, breakdown, auto_compile=False):
    """[(name, Path keywords)]: the reference, the fast path running `execution` (its compile decided by timing
    with `auto_compile`), and with `breakdown` the fast path's pieces added one at a time between the two
    (uncond sampling only)."""
    paths = [("reference", dict(kind="reference")),
             ("fast", dict(kind="fast", execution=execution, cuda_graph=gpu, auto_compile=auto_compile))]
    if not breakdown:
        return paths
    on = Execution("reference", False, "fp32")
    steps = [("+static buffers (fp32)", on)]
    if execution.compile:
        steps.append(("+compile", on := dataclasses.replace(on, compile=True)))
    if execution.precision == "bf16":
        steps.append(("+bf16", on := dataclasses.replace(on, precision="bf16")))
    if execution.ops == "triton":
        steps.append(("+fused", on := dataclasses.replace(on, ops="triton")))
    steps = [(n, dict(kind="fast", execution=ex, cuda_graph=False, cfg=False, auto_compile=False)) for n, ex in steps]
    fast_kw = dict(paths[1][1], cfg=False, auto_compile=False)
    paths[1:1] = [(n, kw) for n, kw in steps if kw != fast_kw]  # a step equal to the fast path is the fast path
    return paths


def utilisation(path, peaks, train_flops, s_flops, s_flops_cfg):
    """A built Path's results with achieved TFLOP/s and MFU against the matmul peak of its precision."""
    res = path.results()
    tflops = res["train_img_s"] * train_flops / 1e12
    peak = peaks.get(path.precision, peaks["fp32"])  # tf32: the fp32/TF32 peak
    res.update(tflops=tflops, mfu=tflops / peak, peak_tflops=peak, peak_mem_gb=path.peak_mem_gb,
               train_batch=path.train_batch, sample_batch=path.sample_batch)
    res["sample_tflops"] = res["sample_img_s"] * s_flops / 1e12
    res["sample_mfu"] = res["sample_tflops"] / peak
    if "sample_cfg_img_s" in res:
        res["sample_cfg_tflops"] = res["sample_cfg_img_s"] * s_flops_cfg / 1e12
    return res


def plot(out, path):
    """Reference vs fast images/s, one group of bars per measurement, speed-ups written on top."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("train_img_s", "train"), ("sample_img_s", "sample"), ("sample_cfg_img_s", "sample + CFG")]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for j, (name, color) in enumerate((("reference", "tab:gray"), ("fast", "tab:orange"))):
        xs = [i + (j - 0.5) * 0.38 for i in range(len(keys))]
        ax.bar(xs, [out[name][k] for k, _ in keys], width=0.38, label=name, color=color)
    for i, (k, _) in enumerate(keys):
        ax.annotate(f"{out['speedup'][k]:.2f}x", (i + 0.19, out["fast"][k]), ha="center", va="bottom")
    ax.set_xticks(range(len(keys)), [label for _, label in keys])
    ax.set_ylabel("images / s")
    size = f"{out['latent_size']}x{out['latent_size']}x{out['latent_channels']} latents"
    ax.set_title(f"{out['model']} on {size}, fast path {out['precision']}, {out['device']}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(args, what, dev_name, results, speedup, breakdown):
    ref, fast = results["reference"], results["fast"]
    print(f"\n{args.model} on {what}, {dev_name}: train batch {args.batch_size}, "
          f"sample batch {args.sample_batch_size}, NAG-GD {args.sample_steps} steps, cfg {args.cfg_scale}; "
          f"img/s from median times")
    head = f"{'path':<10} {'train img/s':>12} {'sample img/s':>13} {'cfg img/s':>10} {'train TFLOP/s':>14} " \
           f"{'MFU':>6} {'sample MFU':>11} {'peak mem GB':>12} {'setup s':>8}"
    print(head)
    print("-" * len(head))
    for name, r in (("reference", ref), ("fast", fast)):
        print(f"{name:<10} {r['train_img_s']:>12.2f} {r['sample_img_s']:>13.3f} {r['sample_cfg_img_s']:>10.3f} "
              f"{r['tflops']:>14.3f} {r['mfu']:>6.1%} {r['sample_mfu']:>11.1%} {r['peak_mem_gb']:>12.2f} "
              f"{r['setup_s']:>8.1f}")
    print(f"{'speedup':<10} {speedup['train_img_s']:>11.2f}x {speedup['sample_img_s']:>12.2f}x "
          f"{speedup['sample_cfg_img_s']:>9.2f}x")
    print(f"MFU: achieved over the measured matmul peak of the path's dtype "
          f"(reference fp32 {ref['peak_tflops']:.2f}, fast {fast['peak_tflops']:.2f} TFLOP/s); "
          f"setup: build, warm-up and compilation, not in the img/s")
    if breakdown:
        print(f"\n{'contribution':<40} {'train img/s':>12} {'sample img/s':>13} {'setup s':>8}")
        for row in breakdown:
            print(f"{row['step']:<40} {row['train_img_s']:>12.2f} {row['sample_img_s']:>13.3f} {row['setup_s']:>8.1f}")


if __name__ == "__main__":
    main()
