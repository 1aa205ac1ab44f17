"""Gradient-descent samplers for EqM: plain GD and the published Nesterov variant, with CFG.

Sign convention of the published code: the model predicts f(x) = -grad E, so every step adds eta * f.
`steps` sampling steps make `steps - 1` updates (250 -> 249), as the reference does.
"""
import torch
from tqdm.auto import tqdm

from eqm.models import cfg_combine

SAMPLERS = ("gd", "ngd")


def gd_step(x, f, stepsize):
    """GD update: x + eta * f(x)."""
    return x + stepsize * f


def ngd_step(x, g_prev, field, stepsize, mu):
    """Published NAG-GD update: g = f(x + eta*mu*g_prev); returns (x + eta*g, g)."""
    g = field(x + stepsize * mu * g_prev)
    return x + stepsize * g, g


def make_field(model, cfg_scale=1.0, cfg_channels=3, null_label=None):
    """field(x, y) -> f(x) for labels y, with classifier-free guidance when cfg_scale != 1.

    CFG doubles the batch with the null label (default model.num_classes), guides the first
    `cfg_channels` channels (3, the published setting, or "all") and keeps the conditional
    prediction on the others. t = 0 is fed to the model (EqM is time-free).
    """
    use_cfg = cfg_scale != 1.0
    if use_cfg and null_label is None:
        null_label = getattr(model, "num_classes", None)
        if null_label is None:
            raise ValueError("CFG needs the null label: pass null_label= or give the model a num_classes")

    def field(x, y):
        if not use_cfg:
            return model(x, torch.zeros(x.shape[0], device=x.device), y)
        xx = torch.cat([x, x], dim=0)
        yy = torch.cat([y, torch.full_like(y, null_label)], dim=0)
        out = model(xx, torch.zeros(xx.shape[0], device=x.device), yy)
        return cfg_combine(out, cfg_scale, cfg_channels)[: x.shape[0]]
    return field


@torch.no_grad()
def sample(model, x, y, *, sampler="gd", steps=250, stepsize=0.003, mu=0.3, cfg_scale=1.0, cfg_channels=3,
           stop_grad_norm=None, null_label=None, return_stats=False, progress=False):
    """Descend the learned landscape from the start point x (noise, or any tensor, e.g. a noisy image).

    x: (N, C, H, W) start point (not modified); y: (N,) labels, or None for the null label.
    sampler: "gd" (x += eta f(x)) or "ngd" (published NAG variant, momentum mu).
    stop_grad_norm: adaptive compute; a sample stops (is frozen, no more model evaluations) once
        the L2 norm of its f over (C, H, W) falls below this threshold.
    Returns the final x, or (x, stats) with return_stats; stats["nfe"] (N,) counts the field
    evaluations spent on each sample (a CFG evaluation counts once), stats["stopped"] (N,) bool.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if y is None:
        y = torch.full((x.shape[0],), null_label if null_label is not None else model.num_classes,
                       dtype=torch.long, device=x.device)
    field = make_field(model, cfg_scale, cfg_channels, null_label)
    x = x.clone()
    g = torch.zeros_like(x)  # NAG momentum, g_prev = 0
    n = x.shape[0]
    nfe = torch.zeros(n, dtype=torch.long, device=x.device)
    active = torch.ones(n, dtype=torch.bool, device=x.device)

    for _ in tqdm(range(steps - 1), disable=not progress, desc=f"{sampler} sampling"):
        if stop_grad_norm is None:
            if sampler == "gd":
                x = gd_step(x, field(x, y), stepsize)
            else:
                x, g = ngd_step(x, g, lambda z: field(z, y), stepsize, mu)
            nfe += 1
            continue
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        xa, ya = x[idx], y[idx]
        if sampler == "gd":
            f = field(xa, ya)
            xa_new = gd_step(xa, f, stepsize)
        else:
            xa_new, f = ngd_step(xa, g[idx], lambda z: field(z, ya), stepsize, mu)
        nfe[idx] += 1
        done = f.flatten(1).norm(dim=1) < stop_grad_norm
        go = idx[~done]
        x[go] = xa_new[~done].to(x.dtype)  # under bf16 autocast the field comes back in bf16
        g[go] = f[~done].to(g.dtype)
        active[idx[done]] = False

    if return_stats:
        return x, {"nfe": nfe, "total_nfe": int(nfe.sum()), "stopped": ~active, "updates": steps - 1}
    return x
