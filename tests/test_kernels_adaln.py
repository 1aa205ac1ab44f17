"""Fused adaLN kernels against their PyTorch reference (Triton interpreter on CPU, compiled on CUDA)."""
import importlib
import os
import subprocess
import sys

import pytest
import torch

import eqm_kernels as kernels
from eqm_kernels._testing import assert_matches, poisoned_allocations, print_errors

adaln = importlib.import_module("eqm_kernels.adaln")  # the module (the package attribute is the function)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(2, 1, 72), (2, 17, 384), (1, 250, 72), (1, 17, 1152)]  # (N, T, D): odd token counts, odd widths


@pytest.fixture(scope="module", autouse=True)
def report_errors(request):
    yield
    print_errors(request, ("adaln", "gated"))


def _inputs(shapes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(DEVICE) for s in shapes]


def _check_op(name, fn, ref, inputs64, dtype, n_out):
    """Forward and backward of fn in dtype against ref in fp64 and ref in the same dtype."""
    ins = [t.to(dtype).requires_grad_() for t in inputs64]
    ins_ref = [t.detach().clone().requires_grad_() for t in ins]
    ins64 = [t.detach().double().requires_grad_() for t in ins]
    with poisoned_allocations():
        out = fn(*ins)
    ref_out, out64 = ref(*ins_ref), ref(*ins64)
    outs, ref_outs, outs64 = [(o,) if n_out == 1 else o for o in (out, ref_out, out64)]
    gens = [torch.randn_like(o) for o in outs64]
    for i, (o, r, o64) in enumerate(zip(outs, ref_outs, outs64)):
        assert o.dtype == r.dtype, f"{name}: output dtype {o.dtype} != reference {r.dtype}"
        assert_matches(f"{name}[out{i}]", o, r, o64.detach(), dtype)
    with poisoned_allocations():
        grads = torch.autograd.grad(outs, ins, [g.to(o.dtype) for g, o in zip(gens, outs)])
    ref_grads = torch.autograd.grad(ref_outs, ins_ref, [g.to(o.dtype) for g, o in zip(gens, ref_outs)])
    grads64 = torch.autograd.grad(outs64, ins64, gens)
    for i, (gr, r, g64) in enumerate(zip(grads, ref_grads, grads64)):
        assert gr.dtype == ins[i].dtype
        assert_matches(f"{name}[grad{i}]", gr, r, g64, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_adaln_modulate(shape, dtype):
    N, T, D = shape
    x, shift, scale = _inputs([(N, T, D), (N, D), (N, D)], dtype, seed=T + D)
    x = 3 * x + 1  # a non-zero mean and non-unit variance for the statistics to remove
    _check_op("adaln_modulate", kernels.adaln_modulate, kernels.adaln_modulate_reference, [x, shift, scale], dtype, 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_residual_adaln(shape, dtype):
    N, T, D = shape
    ins = _inputs([(N, T, D), (N, D), (N, T, D), (N, D), (N, D)], dtype, seed=1 + T + D)
    _check_op("gated_residual_adaln", kernels.gated_residual_adaln, kernels.gated_residual_adaln_reference,
              ins, dtype, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_programs_walk_several_token_blocks(monkeypatch, dtype):
    # As on a GPU: small token blocks, each program summing dshift/dscale/dgate over several of them
    # (3 programs per sample over 9 blocks of 2 tokens, the last one ragged), partials summed after.
    monkeypatch.setattr(adaln, "_rows_per_program", lambda block_d: 2)
    monkeypatch.setattr(adaln, "_programs_per_sample", lambda n_blocks, N, slots: 3)
    x, gate, y, shift, scale = _inputs([(2, 17, 72), (2, 72), (2, 17, 72), (2, 72), (2, 72)], dtype, seed=7)
    _check_op("gated_residual_adaln_token_loop", kernels.gated_residual_adaln,
              kernels.gated_residual_adaln_reference, [x, gate, y, shift, scale], dtype, 2)
    _check_op("adaln_modulate_token_loop", kernels.adaln_modulate, kernels.adaln_modulate_reference,
              [3 * x + 1, shift, scale], dtype, 1)


def test_backward_grid_fills_whole_waves():
    split = adaln._programs_per_sample
    assert split(256, 256, 528) == 2  # 512 programs of 528 resident blocks (EqM-XL/2 on an H100, 64 warps/SM)
    assert split(256, 256, 396) == 3  # 768 = 1.94 waves of 396; 1 or 2 programs/sample leave a third idle
    assert split(256, 1024, 528) == 1  # 1024 programs: 1.94 waves already
    assert split(17, 1, 528) == 17  # one wave cannot be filled: a program per token block


def test_backward_occupancy_when_compiled():
    """Compiled for sm_90 and sm_80 (no GPU needed): the backward keeps 64 warps per SM resident (full occupancy,
    32 registers) with and without the residual, with no spills and 16-byte loads."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "eqm_kernels.aot", "--arch", "90", "80", "--precision", "bf16", "tf32",
                          "--model", "EqM-B/2", "--kernel", "adaln"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("adaln_bwd")]
    assert len(lines) == 8  # 2 architectures x 2 precisions x with/without the residual
    for ln in lines:
        assert "regs  32  spill    0  warps/SM 64" in ln and "ld 16B" in ln and ln.endswith(" ok"), ln


def test_mixed_dtypes_follow_type_promotion():
    # As under autocast: fp32 residual stream, bf16 conditioning vectors and branch output.
    x, gate, y, shift, scale = _inputs([(2, 17, 72), (2, 72), (2, 17, 72), (2, 72), (2, 72)], None, seed=3)
    gate, y, shift, scale = (t.to(torch.bfloat16) for t in (gate, y, shift, scale))
    x = x.float()
    r, h = kernels.gated_residual_adaln(x, gate, y, shift, scale)
    r_ref, h_ref = kernels.gated_residual_adaln_reference(x, gate, y, shift, scale)
    r64, h64 = kernels.gated_residual_adaln_reference(*(t.double() for t in (x, gate, y, shift, scale)))
    assert r.dtype == r_ref.dtype == torch.float32 and h.dtype == h_ref.dtype == torch.float32
    assert_matches("gated_residual_adaln_mixed[r]", r, r_ref, r64, torch.bfloat16)
    assert_matches("gated_residual_adaln_mixed[h]", h, h_ref, h64, torch.bfloat16)
    # backward from the saved fp32 r, gradients in each input's dtype
    ins = [t.detach().requires_grad_() for t in (x, gate, y, shift, scale)]
    ins_ref = [t.detach().clone().requires_grad_() for t in ins]
    ins64 = [t.detach().double().requires_grad_() for t in ins]
    outs, outs_ref, outs64 = (fn(*i) for fn, i in ((kernels.gated_residual_adaln, ins),
                                                   (kernels.gated_residual_adaln_reference, ins_ref),
                                                   (kernels.gated_residual_adaln_reference, ins64)))
    gens = [torch.randn_like(o) for o in outs64]
    grads, grads_ref = (torch.autograd.grad(o, i, [g.to(t.dtype) for g, t in zip(gens, o)])
                        for o, i in ((outs, ins), (outs_ref, ins_ref)))
    for i, (a, b, c) in enumerate(zip(grads, grads_ref, torch.autograd.grad(outs64, ins64, gens))):
        assert a.dtype == ins[i].dtype
        assert_matches(f"gated_residual_adaln_mixed[grad{i}]", a, b, c, torch.bfloat16)


def test_double_backward_matches_reference():
    ins = _inputs([(2, 17, 72), (2, 72), (2, 17, 72), (2, 72), (2, 72)], None, seed=4)

    def second_order(fn, dtype):
        x, gate, y, shift, scale = (t.to(dtype).requires_grad_() for t in ins)
        r, h = fn(x, gate, y, shift, scale)
        (gx,) = torch.autograd.grad((h.pow(3) + r.pow(2)).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), (x, gate, y, shift, scale))

    ours = second_order(kernels.gated_residual_adaln, torch.float32)
    torch_fp32 = second_order(kernels.gated_residual_adaln_reference, torch.float32)
    fp64 = second_order(kernels.gated_residual_adaln_reference, torch.float64)
    for i, (a, b, c) in enumerate(zip(ours, torch_fp32, fp64)):
        assert_matches(f"gated_residual_adaln_double_backward[grad{i}]", a, b, c, torch.float32)


def test_func_grad_falls_back_to_reference():
    x, shift, scale = (t.float() for t in _inputs([(2, 17, 72), (2, 72), (2, 72)], None, seed=5))
    f = lambda fn: torch.func.grad(lambda z: fn(z, shift, scale).pow(3).sum())(x)  # noqa: E731
    torch.testing.assert_close(f(kernels.adaln_modulate), f(kernels.adaln_modulate_reference))


def test_opcheck():
    x, gate, y, shift, scale = (t.float().requires_grad_() for t in
                                _inputs([(2, 5, 40), (2, 40), (2, 5, 40), (2, 40), (2, 40)], None, seed=6))
    torch.library.opcheck(torch.ops.eqm.adaln_modulate, (x, shift, scale, 1e-6))
    torch.library.opcheck(torch.ops.eqm.gated_residual_adaln, (x, gate, y, shift, scale, 1e-6))


def test_bad_shapes_raise():
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="shift of shape"):
        kernels.adaln_modulate(x, torch.randn(2, 7), torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"\(N, T, D\)"):
        kernels.adaln_modulate(x[0], torch.randn(2, 8), torch.randn(2, 8))
