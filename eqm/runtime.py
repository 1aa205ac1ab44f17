"""What is fast on this machine, measured once per process: the compute precision and the thread count.

CPUs differ: with avx512_bf16 / AMX a bf16 matmul runs several times faster than fp32; on an AVX2-only CPU
it is emulated and runs ~75x slower. So precision "auto" times one small matmul in each dtype (well under a
second, even where bf16 is slow) and picks bf16 only where it clearly wins. Small models (digits, the CPU
benchmarks) have ops too small to share between cores on a busy machine, so the thread count is chosen
by timing the model's own forward pass at 1 and at all threads.
"""
import functools
import os
import time

import torch

BF16_MIN_SPEEDUP = 1.5  # bf16 autocast adds casts: a matmul speed-up below this does not pay end to end
THREAD_MIN_SPEEDUP = 1.1  # more threads must beat one thread by this much (contention makes them risky)
SMALL_MODEL_GFLOP = 20.0  # a forward pass of the batch below this is "small": its thread count is probed

_reasons = {}


def decide_precision(t_fp32, t_bf16, device_type="cpu"):
    """(precision, reason) from the seconds one fp32 and one bf16 matmul of the same size took."""
    fp32 = "tf32" if device_type == "cuda" else "fp32"
    speedup = t_fp32 / max(t_bf16, 1e-12)
    if speedup >= BF16_MIN_SPEEDUP:
        return "bf16", f"bf16 matmul {speedup:.1f}x faster than {fp32} here (probe)"
    return fp32, f"bf16 matmul only {speedup:.2g}x the speed of {fp32} here (probe; bf16 needs >= {BF16_MIN_SPEEDUP}x)"


def _matmul_seconds(dtype, device, n, budget_s):
    """Best seconds of an n x n x n matmul in dtype, spending about budget_s (at least 3 runs)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best, spent, runs = float("inf"), 0.0, 0
    while runs < 3 or (spent < budget_s and runs < 20):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        best, spent, runs = min(best, dt), spent + dt, runs + 1
    return best


def untouched_rng(device):
    """A context in which random draws leave torch's global RNG of `device` (and the CPU's) as they found it."""
    device = torch.device(device)
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type)


@functools.lru_cache(maxsize=None)
def probe_precision(device_type="cpu"):
    """(precision, reason): the fast precision on this device, from a sub-second matmul probe once per process."""
    device = torch.device(device_type)
    n = 2048 if device.type == "cuda" else 256
    prev, threads = torch.backends.cuda.matmul.allow_tf32, torch.get_num_threads()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_num_threads(1)  # on a busy CPU, extra threads make any timing wait on the other jobs
    try:
        with untouched_rng(device):
            t_fp32 = _matmul_seconds(torch.float32, device, n, 0.05)
            t_bf16 = _matmul_seconds(torch.bfloat16, device, n, 0.05)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
        torch.set_num_threads(threads)
    return decide_precision(t_fp32, t_bf16, device.type)


def resolve_precision(precision, device):
    """"auto" -> the probed precision of `device`; explicit precisions are returned unchanged."""
    kind = torch.device(device).type
    if precision != "auto":
        _reasons[kind] = "set explicitly"
        return precision
    precision, _reasons[kind] = probe_precision(kind)
    return precision


def precision_reason(device="cpu"):
    """Why the latest resolve_precision on this device chose what it chose (a short sentence)."""
    return _reasons.get(torch.device(device).type, "not resolved yet")


def decide_threads(seconds):
    """Thread count from {threads: [seconds of the same work]}: the most threads whose median beats one
    thread's by THREAD_MIN_SPEEDUP (and every smaller count it beats), else 1."""
    med = {n: sorted(ts)[len(ts) // 2] for n, ts in seconds.items()}
    best = 1
    for n in sorted(med):
        if n > 1 and med[n] * THREAD_MIN_SPEEDUP <= med[1] and med[n] <= med[best]:
            best = n
    return best


def probe_threads(work, max_threads, reps=3):
    """Time work() at 1 and max_threads threads, interleaved (reps each after a warm-up); decide_threads.
    Stops early when the first timed round already shows many threads losing clearly (a busy machine)."""
    seconds = {1: [], max_threads: []}
    torch.set_num_threads(1)
    work()
    for r in range(reps):
        for n in (1, max_threads):
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            work()
            seconds[n].append(time.perf_counter() - t0)
        if r == 0 and seconds[max_threads][0] > 2 * seconds[1][0]:
            break
    return decide_threads(seconds)


def configure_threads(model, batch_size, threads=None, device="cpu"):
    """Set torch's CPU thread count for running `model` at `batch_size`; returns it.

    model: the bare model (not DDP-wrapped). threads: an explicit count (used as is). Otherwise OMP_NUM_THREADS, when set, wins; a small model
    (a forward pass of the batch under SMALL_MODEL_GFLOP) gets the faster of 1 and all threads, timed on
    its own forward pass; a larger one keeps torch's default (all cores). CUDA runs are left alone.
    """
    if threads is not None:
        torch.set_num_threads(threads)
        return threads
    if torch.device(device).type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    return _probe_model_threads(model, batch_size)


def _probe_model_threads(m, batch_size):
    """The faster of 1 and all threads for a bare EqM `m` (it reports its own FLOPs: no import of the model code,
    so this module stays a leaf that eqm.execution can build on)."""
    max_threads = os.cpu_count() or 1
    if max_threads == 1 or m.flops_per_sample() * batch_size / 1e9 > SMALL_MODEL_GFLOP:
        torch.set_num_threads(max_threads)
        return max_threads
    device = next(m.parameters()).device
    with untouched_rng(device):  # the probe runs a timing-dependent number of times: keep seeded runs seeded
        x = torch.randn(batch_size, m.in_channels, m.input_size, m.input_size, device=device)
        t = torch.zeros(batch_size, device=device)
        y = torch.zeros(batch_size, dtype=torch.long, device=device)

        def work():
            with torch.no_grad():
                m(x, t, y)  # in training mode this draws label drops from the global RNG
        n = probe_threads(work, max_threads)
    torch.set_num_threads(n)
    return n


class ThreadGovernor:
    """`fn` wrapped so that a long loop keeps the faster of 1 and all threads as other jobs come and go.

    Every `interval` seconds the next two calls run at the other thread count (the first only warms the
    thread pool, unless it is already over 2x slower: then the trial ends there) and the count with the lower
    call time is kept; a trial that loses doubles the interval (up to max_interval_s), so on a steadily busy
    machine the trials cost about 1% of the run.
    Only the thread count changes: every call runs fn once, as without the wrapper. A pass-through where
    the user fixed the count (OMP_NUM_THREADS) or there is one core.
    """

    def __init__(self, fn, enabled=True, interval_s=10.0, max_interval_s=300.0, max_threads=None, clock=None):
        self.fn = fn
        self.max_threads = max_threads or os.cpu_count() or 1
        self.enabled = enabled and self.max_threads > 1 and not os.environ.get("OMP_NUM_THREADS")
        self.min_interval, self.interval, self.max_interval = interval_s, interval_s, max_interval_s
        self.clock = clock or time.perf_counter
        self.recent = []  # seconds of the latest calls at the kept count
        self.trial = None  # (kept count, calls made at the other count) while a trial runs
        self.next_trial = self.clock() + interval_s
        self.switches = 0

    def __getattr__(self, name):
        """Attributes of the wrapped callable (e.g. a TrainStep's .skipped, .grad_norm) read through."""
        if name == "fn":
            raise AttributeError(name)
        return getattr(self.fn, name)

    def __call__(self, *args, **kwargs):
        if not self.enabled:
            return self.fn(*args, **kwargs)
        t0 = self.clock()
        out = self.fn(*args, **kwargs)
        dt = self.clock() - t0
        if self.trial is None:
            self.recent = (self.recent + [dt])[-9:]
            if t0 >= self.next_trial and len(self.recent) >= 3:
                kept = torch.get_num_threads()
                self.trial = (kept, 0)
                torch.set_num_threads(1 if kept > 1 else self.max_threads)
            return out
        kept, calls = self.trial
        other, base = torch.get_num_threads(), sorted(self.recent)[len(self.recent) // 2]
        if calls == 0 and dt <= 2 * base:  # the warm-up call; one far slower than usual ends the trial at once
            self.trial = (kept, 1)
            return out
        if decide_threads({kept: [base], other: [dt]}) == other:
            self.switches += 1
            self.recent, self.interval = [dt], self.min_interval
        else:
            torch.set_num_threads(kept)
            self.interval = min(2 * self.interval, self.max_interval)
        self.trial, self.next_trial = None, self.clock() + self.interval
        return out


def use_compile_cache():
    """Compatibility name: eqm.compiling.use_compile_cache."""
    from eqm.compiling import use_compile_cache as use

    return use()
