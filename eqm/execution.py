"""One execution choice, made once: the ops (PyTorch reference or Triton kernels), compile or not, and the precision.

    execution = resolve_execution(device, ops="auto", compile="auto", precision="auto")
    use_execution(model, execution)          # the one place a model's ops are set

Everything downstream (eqm.fast.TrainStep, eqm.sampling.Engine, eqm.objective, the benchmarks) takes the
resolved Execution (or one of its fields) instead of deciding again. Asking for Triton where it cannot run
is a ValueError here, at resolution time, never a silent fallback later.
Precision has one vocabulary: fp32 (strict), tf32 (TF32 matmuls for fp32 tensors, the published setting)
and bf16 (bf16 autocast over fp32 weights, TF32 for what stays fp32); flags add "auto" (eqm.runtime's probe).
"""
import contextlib
import dataclasses
import importlib.util

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from eqm import compiling, runtime

OPS = ("reference", "triton")
PRECISIONS = ("fp32", "tf32", "bf16")
PRECISION_CHOICES = ("auto",) + PRECISIONS  # what every --precision flag accepts


@dataclasses.dataclass(frozen=True)
class Execution:
    """How the model runs. ops: "reference" (plain PyTorch) or "triton" (kernels/ for LayerNorm+modulate,
    the gated residuals, attention and the loss); compile: torch.compile the step; precision: see PRECISIONS."""

    ops: str = "reference"
    compile: bool = False
    precision: str = "fp32"

    def __post_init__(self):
        if self.ops not in OPS:
            raise ValueError(f"ops must be one of {OPS}, got {self.ops!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be True or False, got {self.compile!r}")
        check_precision(self.precision)


def check_precision(precision, allow_auto=False):
    """The precision, or a ValueError naming the valid ones."""
    valid = PRECISION_CHOICES if allow_auto else PRECISIONS
    if precision not in valid:
        raise ValueError(f"precision must be one of {valid}, got {precision!r}")
    return precision


def triton_unavailable(device):
    """Why the Triton ops cannot run on `device` (a sentence saying what to do), or None when they can."""
    kind = torch.device(device).type
    if kind not in ("cuda", "cpu"):
        return f"Triton ops run on CUDA (or on CPU under TRITON_INTERPRET=1), not on {kind}: use ops='reference'"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton, Linux only): use ops='reference' (--no-fused)"
    import eqm_kernels as kernels

    if kind == "cpu" and not kernels.INTERPRET:
        return ("Triton ops need CUDA; on CPU only the Triton interpreter runs them (set TRITON_INTERPRET=1 "
                "before start, slow): use ops='reference' (--no-fused)")
    return None


def resolve_ops(ops, device):
    """"auto" -> "triton" on CUDA where the kernels can run, else "reference"; "triton" where it cannot run is an
    error. Accepts the compat booleans of `fused=` (True -> "triton", False -> "reference", None -> "auto")."""
    if ops is None or isinstance(ops, bool):
        ops = {None: "auto", True: "triton", False: "reference"}[ops]
    if ops == "auto":
        on_cuda = torch.device(device).type == "cuda"
        return "triton" if on_cuda and triton_unavailable(device) is None else "reference"
    if ops not in OPS:
        raise ValueError(f"ops must be 'auto' or one of {OPS}, got {ops!r}")
    if ops == "triton" and (why := triton_unavailable(device)) is not None:
        raise ValueError(f"Triton ops were asked for on {torch.device(device)}: {why}")
    return ops


def resolve_compile(compile, device):
    """"auto" (or None) without a run to time: eqm.compiling's fixed rule (compiled on CUDA, eager on CPU); the CLIs
    and benchmarks that know their length decide "auto" by timing instead (eqm.compiling.should_compile)."""
    return compiling.should_compile(compile, device)[0]


def resolve_precision(precision, device):
    """"auto" -> the precision eqm.runtime measured as fast on this device; others are checked and kept."""
    return runtime.resolve_precision(check_precision(precision, allow_auto=True), device)


def resolve_execution(device, ops="auto", compile="auto", precision="auto"):
    """The one execution choice for `device`; each field "auto" or explicit (resolve_ops, _compile, _precision)."""
    return Execution(resolve_ops(ops, device), resolve_compile(compile, device), resolve_precision(precision, device))


def use_execution(model, execution):
    """Set the ops `model` runs (an Execution, or "reference" / "triton"): the one setter of EqM's ops.
    Unwraps DDP / torch.compile wrappers; returns the model."""
    ops = execution.ops if isinstance(execution, Execution) else execution
    if ops not in OPS:
        raise ValueError(f"ops must be one of {OPS}, got {ops!r}")
    unwrap(model)._ops = ops  # EqM.ops is a read-only property: this line is the only writer
    return model


def model_ops(model):
    """The ops a model (or a DDP / compile wrapper of one) runs: "reference" for models without the switch."""
    return getattr(unwrap(model), "ops", "reference")


def unwrap(model):
    """The bare model inside DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, DDP):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def set_precision(precision, device=None):
    """Matmul precision for fp32 tensors: strict for "fp32"; TF32 for "tf32" and "bf16" (the published setting),
    on CUDA matmuls and convolutions (and oneDNN CPU matmuls where the CPU has TF32). Process-wide."""
    tf32 = check_precision(precision) != "fp32"
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32


def autocast(device, precision):
    """bf16 autocast context for precision "bf16", else a no-op (weights and grads stay fp32 either way)."""
    if precision == "bf16":
        # cache_enabled=False: the weight-cast cache must not outlive a CUDA graph capture.
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()
