"""Test helpers shared by tests/test_kernels_*.py: the tolerance rule, poisoned allocations, an error log."""
import contextlib
import json
import os

import torch

# Small absolute slack per dtype, relative to the reference's magnitude: about one unit in the last place.
# (bf16 needs the full ulp: the Triton interpreter truncates fp32 -> bf16 where a GPU rounds to nearest.)
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 2**-7}
ERRORS: dict = {}  # (kernel, dtype) -> worst kernel error seen, printed by the tests' session hook


def assert_matches(name, out, ref_same_dtype, ref64, dtype):
    """Tolerance rule: |out - ref64| <= 2 * |ref_same_dtype - ref64| + atol, worst element reported."""
    out64, same64 = out.double(), ref_same_dtype.double()
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out64).all(), f"{name}: non-finite output (unwritten poisoned element?)"
    err = (out64 - ref64).abs().max().item() if out.numel() else 0.0
    torch_err = (same64 - ref64).abs().max().item() if out.numel() else 0.0
    scale = max(1.0, ref64.abs().max().item() if out.numel() else 0.0)
    bound = 2 * torch_err + ATOL[dtype] * scale
    key = f"{name.split('[')[0]} {str(dtype).replace('torch.', '')}"
    old = ERRORS.get(key, (0.0, 0.0))
    ERRORS[key] = (max(old[0], err), max(old[1], err / scale))
    if os.environ.get("KERNEL_ERRORS_LOG"):
        with open(os.environ["KERNEL_ERRORS_LOG"], "a") as f:
            f.write(json.dumps({"key": key, "err": err, "torch_err": torch_err}) + "\n")
    if not err <= bound:
        diff = (out64 - ref64).abs().nan_to_num(float("inf"))
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{name} ({dtype}): kernel error {err:.3e} > bound {bound:.3e} (2 x torch error {torch_err:.3e} + atol); "
            f"worst at {idx}: kernel {out64[idx].item():.6g}, fp64 reference {ref64[idx].item():.6g}, "
            f"torch {same64[idx].item():.6g}")


@contextlib.contextmanager
def poisoned_allocations():
    """torch.empty / empty_like return NaN-filled float tensors, so an element a kernel skips shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() and t.numel() else t

    torch.empty = lambda *a, **k: poison(empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def print_errors(request, prefixes):
    """Print the worst errors recorded for kernels whose names start with prefixes (past pytest's capture)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        for key, (err, rel) in sorted(ERRORS.items()):
            if key.startswith(prefixes):
                print(f"\nmax error vs fp64  {key:<45s} abs {err:.2e}  rel to max|ref| {rel:.2e}", end="")
        print()
