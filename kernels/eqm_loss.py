"""EqM objective in one pass: interpolation xt and the per-sample loss against the target.

    c(t)   = lam * min(1, (1 - t) / (1 - a))
    xt     = t * x1 + (1 - t) * x0
    target = (x1 - x0) * c(t)
    loss_n = mean over non-batch dims of (pred - target)^2

t has shape (N,) and broadcasts over the other dims. Sums are fp32; outputs take the promoted
dtype of the tensor inputs, as plain PyTorch would.

Cost for E elements of b bytes:
  eqm_loss forward    reads pred, x1, x0 (3*E*b bytes), writes N floats; 5 FLOP/element
  eqm_loss backward   reads pred, x1, x0, writes dpred (+ dx1, dx0 when they need grad): 4-6*E*b bytes
  eqm_interpolate     reads x1, x0, writes xt (+ target): 3-4*E*b bytes
Eager PyTorch materialises the target and the difference: about 3x the bytes of the fused loss.
"""
import torch
import triton
import triton.language as tl

from ._dispatch import INTERPRET, num_warps_for, sm_count, use_reference, use_triton
from .reference import batch_view as _bcast
from .reference import eqm_interpolate_reference, eqm_loss_reference, eqm_target_scale_reference


def _dscale_dt(t, a, lam):
    return torch.where((1 - t) / (1 - a) < 1, torch.full_like(t, -lam / (1 - a)), torch.zeros_like(t))


# ---------------------------------------------------------------- Triton kernels
@triton.jit
def _target_scale(T, n, a, lam):
    t = tl.load(T + n).to(tl.float32)
    return lam * tl.minimum((1.0 - t) / (1.0 - a), 1.0)


@triton.jit
def _eqm_loss_fwd_kernel(
    PRED, X1, X0,  # (N, M) contiguous
    T,  # (N,)
    PARTIAL,  # (N, SPLIT) fp32 out: partial sums of squared error
    M, SPLIT, a, lam,
    BLOCK: tl.constexpr,
):
    s, n = tl.program_id(0), tl.program_id(1).to(tl.int64)
    c = _target_scale(T, n, a, lam)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(s * BLOCK, M, SPLIT * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < M
        p = tl.load(PRED + n * M + offs, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(X1 + n * M + offs, mask=mask, other=0.0).to(tl.float32)
        x0 = tl.load(X0 + n * M + offs, mask=mask, other=0.0).to(tl.float32)
        d = p - (x1 - x0) * c
        acc += d * d
    tl.store(PARTIAL + n * SPLIT + s, tl.sum(acc, axis=0))


@triton.jit
def _eqm_loss_bwd_kernel(
    PRED, X1, X0, T,  # as in the forward
    G,  # (N,) grad of the per-sample loss
    DPRED, DX1, DX0,  # (N, M) out (DX1/DX0 written only when asked)
    M, a, lam,
    NEED_X1: tl.constexpr, NEED_X0: tl.constexpr, BLOCK: tl.constexpr,
):
    pid, n = tl.program_id(0), tl.program_id(1).to(tl.int64)
    c = _target_scale(T, n, a, lam)
    g = tl.load(G + n).to(tl.float32) * 2.0 / M
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    x1 = tl.load(X1 + n * M + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = tl.load(X0 + n * M + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(PRED + n * M + offs, mask=mask, other=0.0).to(tl.float32)
    dp = (p - (x1 - x0) * c) * g
    tl.store(DPRED + n * M + offs, dp, mask=mask)
    if NEED_X1:
        tl.store(DX1 + n * M + offs, -c * dp, mask=mask)
    if NEED_X0:
        tl.store(DX0 + n * M + offs, c * dp, mask=mask)


@triton.jit
def _eqm_interpolate_kernel(
    X1, X0, T,  # (N, M), (N, M), (N,)
    XT, TARGET,  # (N, M) out (TARGET only WITH_TARGET)
    M, a, lam,
    WITH_TARGET: tl.constexpr, BLOCK: tl.constexpr,
):
    pid, n = tl.program_id(0), tl.program_id(1).to(tl.int64)
    t = tl.load(T + n).to(tl.float32)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    x1 = tl.load(X1 + n * M + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = tl.load(X0 + n * M + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(XT + n * M + offs, t * x1 + (1.0 - t) * x0, mask=mask)
    if WITH_TARGET:
        tl.store(TARGET + n * M + offs, (x1 - x0) * _target_scale(T, n, a, lam), mask=mask)


_BLOCK = 4096 if INTERPRET else 2048  # elements per program (elementwise) / per loop step (reduction)


def _flat(x):
    return x.contiguous().view(x.shape[0], -1)


def _out_dtype(*ts):
    dtype = ts[0].dtype
    for t in ts[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _launch_loss_forward(pred, x1, x0, t, a, lam):
    N = pred.shape[0]
    pred, x1, x0 = _flat(pred), _flat(x1), _flat(x0)
    M = pred.shape[1]
    # Split a sample over several programs only when the batch alone cannot fill the GPU.
    split = max(1, min(triton.cdiv(M, _BLOCK), triton.cdiv(2 * sm_count(pred.device), N)))
    partial = torch.empty((N, split), dtype=torch.float32, device=pred.device)
    _eqm_loss_fwd_kernel[(split, N)](pred, x1, x0, t.contiguous(), partial, M, split, a, lam,
                                     BLOCK=_BLOCK, num_warps=num_warps_for(_BLOCK) // 2 or 1)
    return partial.sum(1) / M


def _launch_loss_backward(pred, x1, x0, t, g, a, lam, need_x1, need_x0):
    shape, N = pred.shape, pred.shape[0]
    pred_f, x1_f, x0_f = _flat(pred), _flat(x1), _flat(x0)
    M = pred_f.shape[1]
    dpred = torch.empty_like(pred_f)
    dx1 = torch.empty_like(x1_f) if need_x1 else dpred
    dx0 = torch.empty_like(x0_f) if need_x0 else dpred
    _eqm_loss_bwd_kernel[(triton.cdiv(M, _BLOCK), N)](
        pred_f, x1_f, x0_f, t.contiguous(), g.contiguous(), dpred, dx1, dx0, M, a, lam,
        NEED_X1=need_x1, NEED_X0=need_x0, BLOCK=_BLOCK, num_warps=num_warps_for(_BLOCK))
    return dpred.view(shape), dx1.view(x1.shape) if need_x1 else None, dx0.view(x0.shape) if need_x0 else None


def _loss_backward_math(pred, x1, x0, t, g, a, lam):
    """Gradients of the per-sample loss w.r.t. pred, x1, x0, t in differentiable torch ops."""
    c = _bcast(eqm_target_scale_reference(t, a, lam), x1)
    gb = _bcast(g, pred) * 2.0 / pred[0].numel()
    dpred = (pred - (x1 - x0) * c) * gb
    dt = -(dpred * (x1 - x0)).flatten(1).sum(1) * _dscale_dt(t, a, lam)
    return dpred, -c * dpred, c * dpred, dt


# ---------------------------------------------------------------- custom ops
@torch.library.custom_op("eqm::eqm_loss", mutates_args=())
def _loss_op(pred: torch.Tensor, x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, a: float, lam: float
             ) -> torch.Tensor:
    if not use_triton(pred, x1, x0):
        return eqm_loss_reference(pred, x1, x0, t, a, lam)
    return _launch_loss_forward(pred, x1, x0, t, a, lam).to(_out_dtype(pred, x1, x0, t))


@_loss_op.register_fake
def _(pred, x1, x0, t, a, lam):
    return pred.new_empty((pred.shape[0],), dtype=_out_dtype(pred, x1, x0, t))


@torch.library.custom_op("eqm::eqm_loss_backward", mutates_args=())
def _loss_bwd_op(pred: torch.Tensor, x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, g: torch.Tensor,
                 a: float, lam: float, need_x1: bool, need_x0: bool) -> list[torch.Tensor]:
    if use_triton(pred, x1, x0):
        grads = _launch_loss_backward(pred, x1, x0, t, g, a, lam, need_x1, need_x0)
    else:
        grads = _loss_backward_math(pred, x1, x0, t, g, a, lam)[:3]
    dpred, dx1, dx0 = grads
    return [dpred.to(pred.dtype).contiguous(), dx1.to(x1.dtype).contiguous() if need_x1 else pred.new_empty(0),
            dx0.to(x0.dtype).contiguous() if need_x0 else pred.new_empty(0)]


# Outputs are contiguous whatever the input strides (the fakes must say so for torch.compile).
@_loss_bwd_op.register_fake
def _(pred, x1, x0, t, g, a, lam, need_x1, need_x0):
    return [pred.new_empty(pred.shape), x1.new_empty(x1.shape) if need_x1 else pred.new_empty(0),
            x0.new_empty(x0.shape) if need_x0 else pred.new_empty(0)]


def _loss_setup(ctx, inputs, output):
    pred, x1, x0, t, a, lam = inputs
    ctx.save_for_backward(pred, x1, x0, t)
    ctx.a, ctx.lam = a, lam


def _loss_backward(ctx, g):
    pred, x1, x0, t = ctx.saved_tensors
    need = ctx.needs_input_grad
    if torch.is_grad_enabled() or need[3]:  # create_graph=True, or a grad for t: differentiable ops
        dpred, dx1, dx0, dt = _loss_backward_math(pred, x1, x0, t, g, ctx.a, ctx.lam)
        return dpred.to(pred.dtype), dx1.to(x1.dtype), dx0.to(x0.dtype), dt.to(t.dtype), None, None
    dpred, dx1, dx0 = _loss_bwd_op(pred, x1, x0, t, g, ctx.a, ctx.lam, need[1], need[2])
    return dpred, dx1 if need[1] else None, dx0 if need[2] else None, None, None, None


_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)


@torch.library.custom_op("eqm::eqm_interpolate", mutates_args=())
def _interp_op(x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, a: float, lam: float, with_target: bool
               ) -> list[torch.Tensor]:
    if not use_triton(x1, x0):
        out = eqm_interpolate_reference(x1, x0, t, a, lam, with_target)
        return [o.contiguous() for o in out] if with_target else [out.contiguous(), x1.new_empty(0)]
    return _launch_interpolate(x1, x0, t, a, lam, with_target)


def _launch_interpolate(x1, x0, t, a, lam, with_target):
    N, dtype = x1.shape[0], _out_dtype(x1, x0, t)
    x1f, x0f = _flat(x1), _flat(x0)
    M = x1f.shape[1]
    xt = torch.empty(x1.shape, dtype=dtype, device=x1.device)
    target = torch.empty(x1.shape, dtype=dtype, device=x1.device) if with_target else x1.new_empty(0, dtype=dtype)
    _eqm_interpolate_kernel[(triton.cdiv(M, _BLOCK), N)](
        x1f, x0f, t.contiguous(), xt, target if with_target else xt, M, a, lam,
        WITH_TARGET=with_target, BLOCK=_BLOCK, num_warps=num_warps_for(_BLOCK))
    return [xt, target]


@_interp_op.register_fake
def _(x1, x0, t, a, lam, with_target):
    dtype = _out_dtype(x1, x0, t)
    return [x1.new_empty(x1.shape, dtype=dtype), x1.new_empty(x1.shape if with_target else (0,), dtype=dtype)]


def _interp_setup(ctx, inputs, output):
    x1, x0, t, a, lam, with_target = inputs
    ctx.save_for_backward(x1, x0, t)
    ctx.a, ctx.lam, ctx.with_target = a, lam, with_target


def _interp_backward(ctx, grads):
    # Elementwise and cheap: plain (differentiable) torch ops, fused by torch.compile when compiled.
    x1, x0, t = ctx.saved_tensors
    dxt, dtarget = grads
    tb = _bcast(t, x1)
    dx1, dx0 = tb * dxt, (1 - tb) * dxt
    dt = ((x1 - x0) * dxt).flatten(1).sum(1)
    if ctx.with_target:
        c = _bcast(eqm_target_scale_reference(t, ctx.a, ctx.lam), x1)
        dx1, dx0 = dx1 + c * dtarget, dx0 - c * dtarget
        dt = dt + ((x1 - x0) * dtarget).flatten(1).sum(1) * _dscale_dt(t, ctx.a, ctx.lam)
    return dx1.to(x1.dtype), dx0.to(x0.dtype), dt.to(t.dtype), None, None, None


_interp_op.register_autograd(_interp_backward, setup_context=_interp_setup)


# ---------------------------------------------------------------- public API
def _check(name, x1, x0, t, pred=None):
    for other_name, other in (("x0", x0), ("pred", pred)):
        if other is not None and other.shape != x1.shape:
            raise ValueError(f"{name}: {other_name} must have the shape of x1 {tuple(x1.shape)}, "
                             f"got {tuple(other.shape)}")
    if t.shape != (x1.shape[0],):
        raise ValueError(f"{name}: t must have shape (N,) = ({x1.shape[0]},), got {tuple(t.shape)}")


def eqm_loss(pred, x1, x0, t, a: float = 0.8, lam: float = 4.0):
    """Per-sample EqM loss mean((pred - (x1 - x0) * c(t))^2), shape (N,), in one pass."""
    _check("eqm_loss", x1, x0, t, pred)
    if use_reference():
        return eqm_loss_reference(pred, x1, x0, t, a, lam)
    return _loss_op(pred, x1, x0, t, float(a), float(lam))


def eqm_interpolate(x1, x0, t, a: float = 0.8, lam: float = 4.0, with_target: bool = False):
    """xt = t * x1 + (1 - t) * x0 in one pass; returns (xt, target) when with_target."""
    _check("eqm_interpolate", x1, x0, t)
    if use_reference():
        return eqm_interpolate_reference(x1, x0, t, a, lam, with_target)
    xt, target = _interp_op(x1, x0, t, float(a), float(lam), bool(with_target))
    return (xt, target) if with_target else xt
