"""Flash-attention kernel against softmax(q k^T / sqrt(d)) v (Triton interpreter on CPU, compiled on CUDA)."""
import pytest
import torch

import eqm_kernels as kernels
from eqm_kernels._testing import assert_matches, poisoned_allocations, print_errors

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, H, N, Dh): a single token, odd token counts with masked tails, head dims 64 / 72 (XL) / 128
SHAPES = [(1, 2, 1, 64), (2, 1, 17, 72), (1, 2, 70, 128), (1, 1, 250, 72)]


@pytest.fixture(scope="module", autouse=True)
def report_errors(request):
    yield
    print_errors(request, ("attention",))


def _qkv(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(2 * torch.randn(shape, generator=g, dtype=torch.float64)).to(DEVICE, dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_attention_forward_backward(shape, dtype):
    q, k, v = (t.requires_grad_() for t in _qkv(shape, seed=sum(shape), dtype=dtype))
    ref_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    in64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    with poisoned_allocations():
        out = kernels.attention(q, k, v)
    ref, out64 = kernels.attention_reference(*ref_in), kernels.attention_reference(*in64)
    assert_matches("attention[out]", out, ref, out64.detach(), dtype)
    do64 = torch.randn_like(out64)
    with poisoned_allocations():
        grads = torch.autograd.grad(out, (q, k, v), do64.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_in, do64.to(dtype))
    grads64 = torch.autograd.grad(out64, in64, do64)
    for name, g, r, g64 in zip("qkv", grads, ref_grads, grads64):
        assert_matches(f"attention[d{name}]", g, r, g64, dtype)


def test_strided_qkv_from_fused_projection():
    # The model splits one (B, N, 3, H, Dh) projection: q, k, v are permuted views, not contiguous.
    B, N, H, Dh = 2, 17, 2, 72
    qkv = torch.randn(B, N, 3, H, Dh, device=DEVICE, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    out = kernels.attention(q, k, v)
    ref = kernels.attention_reference(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(out.pow(2).sum(), qkv)
    (g_ref,) = torch.autograd.grad(ref.pow(2).sum(), qkv)
    torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)


def test_double_backward_matches_reference():
    qkv = _qkv((1, 2, 17, 64), seed=1)

    def second_order(fn, dtype):
        q, k, v = (t.to(dtype).requires_grad_() for t in qkv)
        (gq,) = torch.autograd.grad(fn(q, k, v).pow(2).sum(), q, create_graph=True)
        return torch.autograd.grad(gq.pow(2).sum(), (q, k, v))

    ours = second_order(kernels.attention, torch.float32)
    torch_fp32 = second_order(kernels.attention_reference, torch.float32)
    for name, a, b, c in zip("qkv", ours, torch_fp32, second_order(kernels.attention_reference, torch.float64)):
        assert_matches(f"attention_double_backward[d{name}]", a, b, c, torch.float32)


def test_opcheck():
    q, k, v = (t.float().requires_grad_() for t in _qkv((1, 2, 9, 16), seed=2))
    torch.library.opcheck(torch.ops.eqm.attention, (q, k, v, 0.25))


def test_compiled_fused_block_matches_eager():
    """torch.compile(fullgraph=True) of a small adaLN-Zero block built from all the ops runs and matches."""
    torch.manual_seed(0)
    N, T, D, H = 2, 17, 64, 2
    qkv, proj = torch.nn.Linear(D, 3 * D).to(DEVICE), torch.nn.Linear(D, D).to(DEVICE)

    def block(x, gate, y, shift, scale, x1, x0, t):
        r, h = kernels.gated_residual_adaln(x, gate, y, shift, scale)
        q, k, v = qkv(h).view(N, T, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)
        a = proj(kernels.attention(q, k, v).transpose(1, 2).reshape(N, T, D))
        pred = r + kernels.adaln_modulate(a, shift, scale)
        xt = kernels.eqm_interpolate(x1, x0, t)
        return kernels.eqm_loss(pred + xt, x1, x0, t).mean()

    shapes = [(N, T, D), (N, D), (N, T, D), (N, D), (N, D), (N, T, D), (N, T, D)]
    ins = [torch.randn(s, device=DEVICE, requires_grad=True) for s in shapes] + [torch.rand(N, device=DEVICE)]
    compiled = torch.compile(block, fullgraph=True)
    loss_c, loss_e = compiled(*ins), block(*ins)
    torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
    grads_c = torch.autograd.grad(loss_c, ins[:5])
    grads_e = torch.autograd.grad(loss_e, ins[:5])
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_bad_inputs_raise():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="one shape"):
        kernels.attention(q, q[:, :1], q)
    with pytest.raises(ValueError, match="one dtype"):
        kernels.attention(q, q.half(), q)
