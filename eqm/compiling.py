"""Compiling only where it pays: the persistent compile cache and a measured compile policy.

torch.compile costs a minute or more on a CPU the first time (35-213 s for the EqM-Ti/2 training step on a
2-core machine, by its load) and gains little there, so a short run must not pay it. "auto" decides from measurement: the run's
own eager step time, the number of steps left, and a small record of what compiling this model, batch shape
and precision cost and gained on this machine before (kept beside the compile cache, written after each
compiled run); without a record, conservative defaults. The compile cache makes the second compile of the
same model much cheaper than the first, and the record carries that forward into the next decision.
"""
import json
import os
import platform
import time

import torch


def use_compile_cache():
    """Turn on inductor's FX-graph and AOT-autograd caches in a directory that outlives /tmp cleaning
    ($TORCHINDUCTOR_CACHE_DIR if set, else $XDG_CACHE_HOME/eqm/torchinductor); returns the directory."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, "eqm", "torchinductor")
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def compile_phases():
    """{phase: seconds} torch spent compiling in this process so far (dynamo's timers, summed per phase)."""
    from torch._dynamo.utils import compilation_time_metrics

    return {k: sum(v) for k, v in compilation_time_metrics.items()}


def cache_counters():
    """Hits and misses of the compile caches in this process so far (inductor FX graph, AOT autograd)."""
    from torch._dynamo.utils import counters

    keys = ("fxgraph_cache_hit", "fxgraph_cache_miss", "autograd_cache_hit", "autograd_cache_miss")
    out = {}
    for group in ("inductor", "aot_autograd"):
        out.update({k: v for k, v in counters[group].items() if k in keys})
    out["recompiles"] = sum(counters["recompiles"].values())
    out["unique_graphs"] = counters["stats"]["unique_graphs"]
    return out


#################################################################################
#                         The record of measured compiles                       #
#################################################################################

RECORD_FILE = "eqm_compile_record.json"
# Without a record: a cold compile of a small model's training step took 213 s on a busy 2-core CPU and gains
# ~1.1x there; on a GPU assume two minutes and 1.3x. Both err towards not compiling.
DEFAULT_COMPILE_S = {"cpu": 300.0, "cuda": 120.0}
DEFAULT_SPEEDUP = {"cpu": 1.1, "cuda": 1.3}


def machine_name(device):
    """The CPU model (or GPU name) and torch version: compile cost and speed-up belong to one machine."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"{name} x{os.cpu_count()}"
    return f"{name}, torch {torch.__version__}"


def compile_key(what, model, batch_shape, precision, device):
    """The record's key: what is compiled ("train", "sample", ...), the bare model's config, the batch shape, the
    precision and the machine. Anything whose compile cost or speed-up differs gets its own key."""
    names = ("depth", "hidden_size", "patch_size", "num_heads", "ebm", "ops")
    config = ",".join(f"{k}={getattr(model, k)}" for k in names if hasattr(model, k))
    shape = "x".join(str(s) for s in batch_shape)
    return f"{what} | {type(model).__name__}({config}) | {shape} | {precision} | {machine_name(device)}"


def _record_path(cache_dir=None):
    return os.path.join(cache_dir or use_compile_cache(), RECORD_FILE)


def read_record(key, cache_dir=None):
    """The measurements kept for `key` ({} when none): compile_s (the latest compile, cold or warm as the cache
    was then), compiled_step_s, eager_step_s, compiles."""
    try:
        with open(_record_path(cache_dir)) as f:
            return json.load(f).get(key, {})
    except (OSError, ValueError):
        return {}


def write_record(key, cache_dir=None, **fields):
    """Merge `fields` into the record of `key` (an atomic rewrite of the record file; None values are skipped)."""
    from eqm.utils import atomic_write

    path = _record_path(cache_dir)
    try:
        with open(path) as f:
            records = json.load(f)
    except (OSError, ValueError):
        records = {}
    entry = records.setdefault(key, {})
    entry.update({k: v for k, v in fields.items() if v is not None})
    if "compile_s" in fields:
        entry["compiles"] = entry.get("compiles", 0) + 1
    with atomic_write(path, "w") as f:
        json.dump(records, f, indent=1, sort_keys=True)
    return entry


#################################################################################
#                                 The decision                                  #
#################################################################################

def pays_off(steps_left, eager_step_s, speedup, compile_s):
    """(decision, seconds saved): compiling pays when steps_left * eager_step_s * (1 - 1/speedup) > compile_s."""
    saved = steps_left * eager_step_s * (1.0 - 1.0 / speedup) if speedup > 1 else 0.0
    return saved > compile_s, saved


def should_compile(compile, device, *, steps_left=None, eager_step_s=None, key=None, cache_dir=None):
    """(decision, one-line reason) for compile = True / "on", False / "off", or "auto" (also None: unset).

    "auto" compiles when the time compiling saves over the `steps_left` steps of this run beats its cost:
    steps_left * eager_step_s * (1 - 1/speedup) > compile_s. eager_step_s: measured now (else the record's);
    compile_s and speedup: from the record of `key` (compile_key) kept in the compile cache after each compiled
    run, else conservative defaults (DEFAULT_COMPILE_S, DEFAULT_SPEEDUP). Without any step time or step count,
    the fixed rule: compile on CUDA, not on CPU.
    """
    if compile in (True, "on"):
        return True, "compile on (set explicitly)"
    if compile in (False, "off"):
        return False, "compile off (set explicitly)"
    if compile not in ("auto", None):
        raise ValueError(f"compile must be True, False, 'on', 'off' or 'auto', got {compile!r}")
    kind = torch.device(device).type
    kind = kind if kind in DEFAULT_COMPILE_S else "cuda"
    rec = read_record(key, cache_dir) if key else {}
    eager_step_s = eager_step_s if eager_step_s is not None else rec.get("eager_step_s")
    if steps_left is None or eager_step_s is None:
        on = kind == "cuda"
        return on, f"compile {'on' if on else 'off'}: no step time to weigh it by (the fixed rule: on with CUDA)"
    if "compile_s" in rec:
        compile_s, src = rec["compile_s"], f"{rec['compile_s']:.3g} s measured here"
    else:
        compile_s, src = DEFAULT_COMPILE_S[kind], f"{DEFAULT_COMPILE_S[kind]:.0f} s assumed (none measured yet)"
    if rec.get("compiled_step_s") and rec.get("eager_step_s"):
        speedup = rec["eager_step_s"] / rec["compiled_step_s"]
        src += f", speed-up {speedup:.2f}x measured"
    else:
        speedup = DEFAULT_SPEEDUP[kind]
        src += f", speed-up {speedup:.2f}x assumed"
    on, saved = pays_off(steps_left, eager_step_s, speedup, compile_s)
    return on, (f"compile {'on' if on else 'off'}: {steps_left} steps x {eager_step_s:.3g} s would save {saved:.3g} s, "
                f"{'more' if on else 'less'} than the compile ({src})")


#################################################################################
#                      Measuring a loop and compiling in it                     #
#################################################################################

def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class AutoCompile:
    """A loop's step that starts eager and switches to compiled once compiling pays for the rest of the run.

    step: the eager callable; compile_now: () -> the compiled callable of the same step (called at most once);
    total_steps: the calls this run makes; key: compile_key(...); compile: "auto", True or False.
    "auto": the first call warms up, the next `probe` are timed, then should_compile decides with the calls
    left and `log` gets its reason. A compiled step's first call (the compile) and its next `probe` calls are
    written to the record (compile_s, compiled_step_s, and eager_step_s when measured), so later runs decide
    from them. Attributes of the wrapped step (e.g. a TrainStep's .skipped) read through.
    """

    def __init__(self, step, compile_now, *, total_steps, key, device, compile="auto", probe=3, log=print,
                 cache_dir=None):
        self.fn, self.compile_now, self.total, self.key = step, compile_now, total_steps, key
        self.device, self.probe, self.log, self.cache_dir = torch.device(device), probe, log, cache_dir
        self.calls, self.eager_times, self.compiled_times = 0, [], []
        self.eager_step_s = None
        self.compiled = False
        self.deciding = compile in ("auto", None)
        self.reason = None
        if not self.deciding:
            on, self.reason = should_compile(compile, device)
            if on:
                self._switch()

    def __getattr__(self, name):
        if name == "fn":
            raise AttributeError(name)
        return getattr(self.fn, name)

    def _switch(self):
        self.fn, self.compiled = self.compile_now(), True

    def __call__(self, *args, **kwargs):
        timing = ((self.deciding and 1 <= self.calls <= self.probe)
                  or (self.compiled and len(self.compiled_times) <= self.probe))
        if timing:
            _sync(self.device)
            t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.calls += 1
        if timing:
            _sync(self.device)
            (self.compiled_times if self.compiled else self.eager_times).append(time.perf_counter() - t0)
            if self.compiled and len(self.compiled_times) == self.probe + 1:
                self._record()
        if self.deciding and self.calls == self.probe + 1:
            self._decide()
        return out

    def _decide(self):
        self.deciding = False
        self.eager_step_s = _median(self.eager_times)
        on, self.reason = should_compile("auto", self.device, steps_left=self.total - self.calls,
                                         eager_step_s=self.eager_step_s, key=self.key, cache_dir=self.cache_dir)
        self.log(self.reason)
        if on:
            self._switch()
        else:
            write_record(self.key, self.cache_dir, eager_step_s=self.eager_step_s)

    def _record(self):
        record_compile(self.key, self.compiled_times[0], _median(self.compiled_times[1:]), self.eager_step_s,
                       self.cache_dir)


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def time_calls(fn, n, device="cpu"):
    """Median seconds of n calls of fn(), after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return _median(times)


def decide_by_timing(compile, eager_step, *, steps_left, key, device, probe=2, cache_dir=None):
    """(decision, reason, eager seconds or None): should_compile for "auto" after timing `probe` calls of
    eager_step() (one more warms up); explicit choices decide without running anything."""
    if compile not in ("auto", None):
        return (*should_compile(compile, device), None)
    eager_s = time_calls(eager_step, probe, device)
    on, reason = should_compile("auto", device, steps_left=steps_left, eager_step_s=eager_s, key=key,
                                cache_dir=cache_dir)
    if not on:
        write_record(key, cache_dir, eager_step_s=eager_s)
    return on, reason, eager_s


def record_compile(key, first_call_s, steady_s, eager_s=None, cache_dir=None):
    """Keep what a compiled step cost: its first call (compile included) minus a steady call is the compile."""
    return write_record(key, cache_dir, compile_s=max(first_call_s - steady_s, 0.0), compiled_step_s=steady_s,
                        eager_step_s=eager_s)
