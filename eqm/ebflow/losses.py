"""Training objectives for EBFlow. Each returns a per-sample loss of shape (N,).

Only `ml` touches a determinant of a linear layer; every score-matching objective works from the energy
E(x) (no linear log-dets) and its x-derivatives. Score-matching losses are divided by D (SPEC 2).
"""
import torch


def _energy_score(flow, x):
    """(x with grad, E(x), s(x) = -grad E) with the graph kept for a backward through s."""
    x = x.detach().requires_grad_(True)
    e = flow.energy(x)
    (g,) = torch.autograd.grad(e.sum(), x, create_graph=True)
    return x, e, -g


def _sqnorm(t):
    return t.flatten(1).pow(2).sum(1)


def _dot(a, b):
    return (a * b).flatten(1).sum(1)


def ml(flow, x):
    """Maximum likelihood: -log p(x) with every log-determinant."""
    return -flow.log_prob(x)


def sml(flow, x, x_model=None):
    """Sampling-based ML: E(x_data) - E(x_model), x_model exact flow samples (no gradient through them)."""
    if x_model is None:
        x_model = flow.sample(x.shape[0])
    return flow.energy(x) - flow.energy(x_model.detach())


def ssm(flow, x, n_slices=1, dist="rademacher", v=None):
    """Sliced score matching (variance-reduced): (0.5|s|^2 + mean_v v^T grad_x(v^T s)) / D."""
    with torch.enable_grad():
        x, _, s = _energy_score(flow, x)
        if v is None:
            v = _projections(x, n_slices, dist)
        hv = 0.0
        for vi in v:
            (gv,) = torch.autograd.grad(_dot(s, vi).sum(), x, create_graph=True)
            hv = hv + _dot(gv, vi)
        return (0.5 * _sqnorm(s) + hv / len(v)) / flow.dim


def _projections(x, n, dist):
    if dist == "rademacher":
        return torch.randint(0, 2, (n, *x.shape), device=x.device).to(x.dtype) * 2 - 1
    if dist == "gaussian":
        return torch.randn(n, *x.shape, device=x.device, dtype=x.dtype)
    raise ValueError(f"unknown projection distribution {dist!r}; use 'rademacher' or 'gaussian'")


def dsm(flow, x, sigma=0.1, noise=None):
    """Denoising score matching: 0.5 |s(x + sigma e) + e / sigma|^2 / D."""
    e = torch.randn_like(x) if noise is None else noise
    with torch.enable_grad():
        _, _, s = _energy_score(flow, x + sigma * e)
        return 0.5 * _sqnorm(s + e / sigma) / flow.dim


def fdssm(flow, x, eps=0.1, v=None):
    """Finite-difference SSM: v uniform on the sphere of radius eps,
    ((E(x+v) - E(x-v))^2 / 8 - E(x+v) - E(x-v) + 2 E(x)) / eps^2. Needs no gradient in x."""
    n = x.shape[0]
    if v is None:
        u = torch.randn_like(x)
        v = eps * u / u.flatten(1).norm(dim=1).view(n, *([1] * (x.dim() - 1)))
    e = flow.energy(torch.cat([x + v, x - v, x]))
    ep, em, e0 = e[:n], e[n:2 * n], e[2 * n:]
    return ((ep - em).pow(2) / 8 - ep - em + 2 * e0) / eps ** 2


def exact_sm(flow, x):
    """Exact score matching (0.5|s|^2 + tr grad_x s) / D with the full Hessian trace: D backward passes,
    for small D only (a ground truth)."""
    with torch.enable_grad():
        x, _, s = _energy_score(flow, x)
        sf = s.flatten(1)
        tr = 0.0
        for i in range(sf.shape[1]):
            (gi,) = torch.autograd.grad(sf[:, i].sum(), x, create_graph=True)
            tr = tr + gi.flatten(1)[:, i]
        return (0.5 * _sqnorm(s) + tr) / flow.dim


def sf_trace(flow, x, sigma=0.05, n=1, v=None, antithetic=True, e0=None):
    """Srinivas & Fleuret Hessian-free estimate of tr(grad_x^2 log p) per sample:
    (2 / sigma^2) E_v[log p(x+v) - log p(x)], v ~ N(0, sigma^2 I). With `antithetic`, v and -v are
    averaged, which cancels the first-order term (far lower variance, same expectation)."""
    if v is None:
        v = sigma * torch.randn(n, *x.shape, device=x.device, dtype=x.dtype)
    e0 = flow.energy(x) if e0 is None else e0
    m = v.shape[0]
    shifted = torch.cat([x + vi for vi in v] + ([x - vi for vi in v] if antithetic else []))
    diff = (flow.energy(shifted).view(-1, m, x.shape[0]) - e0).mean((0, 1))
    return -2 * diff / sigma ** 2


def srinivas_fleuret(flow, x, sigma=0.05, n=1, antithetic=True, v=None):
    """Score matching with the Srinivas-Fleuret trace estimate: (0.5|s|^2 + tr_SF) / D."""
    with torch.enable_grad():
        x, e, s = _energy_score(flow, x)
        tr = sf_trace(flow, x, sigma=sigma, n=n, v=v, antithetic=antithetic, e0=e)
        return (0.5 * _sqnorm(s) + tr) / flow.dim


LOSSES = {"ml": ml, "sml": sml, "ssm": ssm, "dsm": dsm, "fdssm": fdssm, "exact_sm": exact_sm,
          "sf": srinivas_fleuret}
_KWARGS = {"ssm": ("n_slices", "dist"), "dsm": ("sigma",), "fdssm": ("eps",), "sf": ("sigma", "n")}


def compute_loss(flow, x, name, lam=0.0, **options):
    """Mean objective `name` over the batch plus lam * mean(E(x)); options not used by `name` are ignored."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    kw = {k: options[k] for k in _KWARGS.get(name, ()) if k in options}
    loss = LOSSES[name](flow, x, **kw).mean()
    if lam:
        loss = loss + lam * flow.energy(x).mean()
    return loss
