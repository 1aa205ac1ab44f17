"""Where an op runs: compiled Triton on CUDA, the Triton interpreter or the PyTorch reference on CPU."""
import os

import torch
import triton

# Triton picks interpreter or compiler when a kernel is decorated, i.e. when kernels/ is imported,
# so the flag is read once here and must be set before the first `import triton` (tests/conftest.py).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Devices whose tensors go to Triton: CUDA, the CPU under the interpreter (kernels.aot adds "meta").
TRITON_DEVICES = {"cuda", "cpu"} if INTERPRET else {"cuda"}


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should run on these tensors, False for the PyTorch reference."""
    if any(t.dtype not in KERNEL_DTYPES for t in tensors):
        return False  # float64 (gradcheck) and exotic dtypes take the reference path
    return tensors[0].device.type in TRITON_DEVICES


def row_block(n: int) -> int:
    """Power-of-two block covering a row of n elements (masked tail)."""
    return triton.next_power_of_2(max(int(n), 1))


def num_warps_for(block: int) -> int:
    """Warps for a memory-bound program handling `block` elements (about 16 bytes/thread/load on H100)."""
    return 1 if INTERPRET else max(1, min(16, block // 256))


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors on a CUDA device (a small constant under the interpreter)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


_force_reference = False


class reference_ops:
    """Context manager: the public kernel functions call their PyTorch references inside it."""

    def __enter__(self):
        global _force_reference
        self._prev, _force_reference = _force_reference, True

    def __exit__(self, *exc):
        global _force_reference
        _force_reference = self._prev


def use_reference() -> bool:
    """True inside reference_ops() or, in eager mode, inside a torch.func transform (custom ops cannot join one).

    Under torch.compile a transform cannot be detected: wrap the call in reference_ops() there.
    """
    if _force_reference:
        return True
    return not torch.compiler.is_compiling() and inside_func_transform()


def inside_func_transform() -> bool:
    """True inside a torch.func transform (grad, vjp, vmap ...), in eager mode.

    The one private torch API the kernels use, kept here alone: torch has no public way to ask whether a
    functorch interpreter is active, and custom ops must step aside for the plain references inside one.
    """
    return torch._C._functorch.peek_interpreter_stack() is not None
