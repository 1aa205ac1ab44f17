"""Fused EqM loss / interpolation kernels against their PyTorch reference."""
import pytest
import torch

import eqm_kernels as kernels
from eqm_kernels._testing import assert_matches, poisoned_allocations, print_errors

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(3, 1, 1, 1), (4, 3, 17, 5), (2, 4, 32, 32)]  # (N, C, H, W); the last is an EqM-XL/2 latent


@pytest.fixture(scope="module", autouse=True)
def report_errors(request):
    yield
    print_errors(request, ("eqm_",))


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    pred, x1, x0 = (torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE, dtype) for _ in range(3))
    # t on both sides of a = 0.8, where c(t) switches from the constant lam to the linear ramp
    t = torch.tensor([0.1, 0.95, 0.5, 0.85][: shape[0]], dtype=torch.float64, device=DEVICE)
    return pred, x1, x0, t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_eqm_loss(shape, dtype):
    pred, x1, x0, t = _inputs(shape, dtype, seed=sum(shape))
    t = t.float()
    ins = [z.requires_grad_() for z in (pred, x1, x0)]
    ref_in = [z.detach().clone().requires_grad_() for z in ins]
    in64 = [z.detach().double().requires_grad_() for z in ins]
    with poisoned_allocations():
        loss = kernels.eqm_loss(*ins, t)
    ref, loss64 = kernels.eqm_loss_reference(*ref_in, t), kernels.eqm_loss_reference(*in64, t.double())
    assert loss.shape == (shape[0],) and loss.dtype == ref.dtype
    assert_matches("eqm_loss[out]", loss, ref, loss64.detach(), dtype)
    g = torch.randn(shape[0], dtype=torch.float64, device=DEVICE)
    with poisoned_allocations():
        grads = torch.autograd.grad(loss, ins, g.to(loss.dtype))
    ref_grads = torch.autograd.grad(ref, ref_in, g.to(ref.dtype))
    for name, gr, r, g64 in zip(["pred", "x1", "x0"], grads, ref_grads, torch.autograd.grad(loss64, in64, g)):
        assert_matches(f"eqm_loss[d{name}]", gr, r, g64, dtype)


def test_eqm_loss_grad_of_pred_only_and_of_t():
    pred, x1, x0, t = _inputs((4, 3, 17, 5), torch.float32, seed=1)
    pred.requires_grad_()
    (gp,) = torch.autograd.grad(kernels.eqm_loss(pred, x1, x0, t.float()).sum(), pred)
    (gp_ref,) = torch.autograd.grad(kernels.eqm_loss_reference(pred, x1, x0, t.float()).sum(), pred)
    torch.testing.assert_close(gp, gp_ref)
    t = t.float().requires_grad_()  # t off the clamp corner: c(t) is differentiable there
    (gt,) = torch.autograd.grad(kernels.eqm_loss(pred, x1, x0, t).sum(), t)
    (gt_ref,) = torch.autograd.grad(kernels.eqm_loss_reference(pred, x1, x0, t).sum(), t)
    assert gt[1].abs() > 0 and gt[0] == 0  # the ramp (t > a) has a slope, the plateau none
    torch.testing.assert_close(gt, gt_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_eqm_interpolate(shape, dtype):
    _, x1, x0, t = _inputs(shape, dtype, seed=2 + sum(shape))
    t = t.float()
    with poisoned_allocations():
        xt, target = kernels.eqm_interpolate(x1, x0, t, with_target=True)
        xt_only = kernels.eqm_interpolate(x1, x0, t)
    ref = kernels.eqm_interpolate_reference(x1, x0, t, with_target=True)
    ref64 = kernels.eqm_interpolate_reference(x1.double(), x0.double(), t.double(), with_target=True)
    assert_matches("eqm_interpolate[xt]", xt, ref[0], ref64[0], dtype)
    assert_matches("eqm_interpolate[target]", target, ref[1], ref64[1], dtype)
    torch.testing.assert_close(xt_only, xt)


def test_eqm_interpolate_backward():
    _, x1, x0, t = _inputs((4, 3, 17, 5), torch.float32, seed=3)
    ins = [z.float().requires_grad_() for z in (x1, x0, t)]
    xt, target = kernels.eqm_interpolate(*ins, with_target=True)
    xr, tr = kernels.eqm_interpolate_reference(*ins, with_target=True)
    w1, w2 = torch.randn_like(xt), torch.randn_like(xt)
    for a, b in zip(torch.autograd.grad((xt * w1 + target * w2).sum(), ins),
                    torch.autograd.grad((xr * w1 + tr * w2).sum(), ins)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_double_backward_through_loss():
    # EqM-E shape of computation: pred depends on x through a gradient taken with create_graph.
    pred, x1, x0, t = (z.float() for z in _inputs((4, 3, 17, 5), torch.float32, seed=4))
    w = pred.clone().requires_grad_()

    def grads(loss_fn):
        loss = loss_fn(w * x1, x1, x0, t).sum()
        (gw,) = torch.autograd.grad(loss, w, create_graph=True)
        return torch.autograd.grad(gw.pow(2).sum(), w)[0]

    torch.testing.assert_close(grads(kernels.eqm_loss), grads(kernels.eqm_loss_reference), atol=1e-5, rtol=1e-5)


def test_opcheck():
    pred, x1, x0, t = (z.float() for z in _inputs((3, 2, 5, 3), torch.float32, seed=5))
    pred.requires_grad_()
    torch.library.opcheck(torch.ops.eqm.eqm_loss, (pred, x1, x0, t, 0.8, 4.0))
    torch.library.opcheck(torch.ops.eqm.eqm_interpolate, (x1.requires_grad_(), x0, t, 0.8, 4.0, True))


def test_bad_shapes_raise():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="t must have shape"):
        kernels.eqm_loss(x, x, x, torch.rand(2))
    with pytest.raises(ValueError, match="pred must have the shape"):
        kernels.eqm_loss(x[:, :2], x, x, torch.rand(3))
