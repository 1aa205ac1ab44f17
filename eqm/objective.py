"""The Equilibrium Matching objective, with the sign convention of the published code.

xt = t*x1 + (1-t)*x0 (x1 data, x0 noise), target = (x1 - x0) * c(t), c(t) = lam * min(1, (1-t)/(1-a)).
The network learns target = -grad E, so samplers add eta * f(x).
c(t) shapes: "truncated-linear" (published, above) and "truncated-cosine" (lam up to t = a, then
lam * (1 + cos(pi u)) / 2 with u = (t - a) / (1 - a): the same end points, a smooth descent to 0 at t = 1).
"""
import math

import torch

from eqm.execution import model_ops
from eqm_kernels.reference import batch_view, eqm_interpolate_reference, eqm_target_scale_reference

CT_SHAPES = ("truncated-linear", "truncated-cosine")


def check_ct(a, lam, shape="truncated-linear"):
    """Raise ValueError with one clear line for c(t) parameters out of range."""
    if not 0.0 <= a < 1.0:
        raise ValueError(f"a must lie in [0, 1), got {a}")
    if not lam > 0:
        raise ValueError(f"lam must be positive, got {lam}")
    if shape not in CT_SHAPES:
        raise ValueError(f"c(t) shape must be one of {CT_SHAPES}, got {shape!r}")


def eqm_target_scale(t, a=0.8, lam=4.0, shape="truncated-linear"):
    """c(t): lam up to t = a, then down to 0 at t = 1, linearly (published) or along a half cosine."""
    check_ct(a, lam, shape)
    if shape == "truncated-linear":
        return eqm_target_scale_reference(t, a, lam)  # the formula the Triton loss implements, in one place
    u = torch.clamp((t - a) / (1 - a), min=0.0)
    return lam * 0.5 * (1 + torch.cos(math.pi * u))


def eqm_target(x1, x0, t, a=0.8, lam=4.0, shape="truncated-linear"):
    """The regression target (x1 - x0) * c(t) for data x1, noise x0 and times t (N,), in x1's dtype."""
    return (x1 - x0) * batch_view(eqm_target_scale(t, a, lam, shape), x1).to(x1.dtype)


def eqm_interpolate(x1, x0, t, a=0.8, lam=4.0, shape="truncated-linear"):
    """(xt, target) for data x1, noise x0 and per-sample times t (N,), in x1's dtype."""
    return eqm_interpolate_reference(x1, x0, t.to(x1.dtype)), eqm_target(x1, x0, t, a, lam, shape)


def dispersive_loss(act, tau=1.0):
    """Dispersive loss (InfoNCE-L2 form) of one activation (N, ...): log mean_ij exp(-|z_i - z_j|^2 / (D tau))."""
    z = act.reshape(act.shape[0], -1)
    d2 = torch.cdist(z, z).pow(2) / z.shape[1]
    return torch.logsumexp(-d2.flatten() / tau, dim=0) - math.log(d2.numel())


def eqm_training_losses(model, x1, model_kwargs=None, a=0.8, lam=4.0, noise=None, t=None, train=True,
                        disp_weight=0.5, ops=None, ct_shape="truncated-linear"):
    """EqM loss terms for a batch of data x1 (N, C, H, W).

    model is called as model(xt, t, **model_kwargs) (model_kwargs holds y; train=True is added unless given).
    noise / t: fixed x0 ~ N(0, I) and t ~ U[0, 1) (N,) for reproducible tests; drawn when None.
    Returns {"loss": per-sample (N,), "pred", "target", "t"}; when the model returns activations
    (return_act=True, the published --disp) also "disp_loss" (a scalar, already added to "loss"
    with weight disp_weight; the activation used is the last block's).
    ops: "triton" computes xt/target by kernels.eqm_interpolate and the loss by kernels.eqm_loss (same values),
    "reference" in plain PyTorch; None follows the model's ops (eqm.execution.model_ops, DDP / compile wrappers
    included). The kernels implement the published c(t) only: another ct_shape computes them in PyTorch.
    """
    model_kwargs = dict(model_kwargs or {})
    model_kwargs.setdefault("train", train)
    n = x1.shape[0]
    x0 = torch.randn_like(x1) if noise is None else noise
    if x0.shape != x1.shape:
        raise ValueError(f"noise shape {tuple(x0.shape)} does not match data shape {tuple(x1.shape)}")
    if t is None:
        t = torch.rand(n, device=x1.device)
    elif t.shape != (n,):
        raise ValueError(f"t must have shape ({n},), got {tuple(t.shape)}")
    if ops not in (None, "reference", "triton"):
        raise ValueError(f"ops must be None, 'reference' or 'triton', got {ops!r}")
    fused = (model_ops(model) if ops is None else ops) == "triton" and ct_shape == "truncated-linear"
    if fused:
        import eqm_kernels as kernels
        check_ct(a, lam)  # before the kernels, which assume it
        xt = kernels.eqm_interpolate(x1, x0, t, a, lam)
        # eqm_loss recomputes the target in-kernel; this copy is only for callers that read terms["target"]
        # (inductor drops it from a compiled step that does not)
        target = eqm_target(x1, x0, t, a, lam)
    else:
        xt, target = eqm_interpolate(x1, x0, t, a, lam, ct_shape)
    out = model(xt, t, **model_kwargs)
    pred, act = out if isinstance(out, tuple) else (out, None)
    if fused:
        loss = kernels.eqm_loss(pred, x1, x0, t, a, lam)
    else:
        loss = (pred - target).pow(2).flatten(1).mean(1)
    terms = {"pred": pred, "target": target, "t": t}
    if act is not None:
        disp = dispersive_loss(act[-1] if isinstance(act, (list, tuple)) else act)
        terms["disp_loss"] = disp
        loss = loss + disp_weight * disp
    terms["loss"] = loss
    return terms
