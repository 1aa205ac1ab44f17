"""The plain-PyTorch references of the kernels: the ops EqM's reference path runs, and what each kernel must match.

One copy: eqm/models.py calls these on its reference path and kernels/*.py test and fall back to them.
Plain torch only (no triton import), so the model works where Triton is not installed.
"""
from typing import Optional

import torch
import torch.nn.functional as F


def modulate(x, shift, scale):
    """adaLN modulation: x (N, T, D) scaled and shifted per sample by (N, D) vectors."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def adaln_modulate_reference(x, shift, scale, eps: float = 1e-6):
    """LayerNorm without affine over the last dim, then `modulate` by (N, D) shift and scale."""
    return modulate(F.layer_norm(x, x.shape[-1:], eps=eps), shift, scale)


def gated_residual(x, gate, y):
    """x + gate * y with a per-sample (N, D) gate."""
    return x + gate.unsqueeze(1) * y


def gated_residual_adaln_reference(x, gate, y, shift, scale, eps: float = 1e-6):
    """(r, h): r = x + gate * y, then h = adaln_modulate_reference(r, shift, scale)."""
    r = gated_residual(x, gate, y)
    return r, adaln_modulate_reference(r, shift, scale, eps)


def attention_reference(q, k, v, scale: Optional[float] = None):
    """softmax(q k^T * scale) v on (B, H, N, Dh), same dtype as the inputs (scale defaults to Dh**-0.5).

    Written as SDPA's math backend does (sqrt(scale) on each of q and k): plain matmul + softmax, twice
    differentiable everywhere (EqM-E training), where the SDPA flash/efficient backends are not.
    """
    s = (q.shape[-1] ** -0.5 if scale is None else scale) ** 0.5
    return torch.softmax((q * s) @ (k * s).transpose(-2, -1), dim=-1) @ v


def batch_view(t, x):
    """Per-sample values (N,) viewed as (N, 1, 1, ...) to broadcast against x."""
    return t.reshape((-1,) + (1,) * (x.dim() - 1))


def eqm_target_scale_reference(t, a: float = 0.8, lam: float = 4.0):
    """c(t) = lam * min(1, (1 - t) / (1 - a))."""
    return lam * torch.clamp((1 - t) / (1 - a), max=1.0)


def eqm_loss_reference(pred, x1, x0, t, a: float = 0.8, lam: float = 4.0):
    """Per-sample mean of (pred - (x1 - x0) * c(t))^2 over all non-batch dims."""
    target = (x1 - x0) * batch_view(eqm_target_scale_reference(t, a, lam), x1)
    return (pred - target).pow(2).flatten(1).mean(1)


def eqm_interpolate_reference(x1, x0, t, a: float = 0.8, lam: float = 4.0, with_target: bool = False):
    """xt = t * x1 + (1 - t) * x0, and the target (x1 - x0) * c(t) when with_target."""
    tb = batch_view(t, x1)
    xt = tb * x1 + (1 - tb) * x0
    if not with_target:
        return xt
    return xt, (x1 - x0) * batch_view(eqm_target_scale_reference(t, a, lam), x1)
