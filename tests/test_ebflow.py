"""EBFlow layers, flow container, objectives and bookkeeping against closed forms (fp64)."""
import math

import pytest
import torch

from eqm.ebflow import losses
from eqm.ebflow.flow import Flow
from eqm.ebflow.layers import (ActNorm, AffineCoupling, Conv1x1, Convolution, FullyConnected,
                               LogitTransform, SmoothLeakyReLU, Squeeze)
from eqm.ebflow.models import build_flow, cnn_flow, coupling_flow, fc_flow
from eqm.ebflow.preprocess import MaP, nll



@pytest.fixture(autouse=True)
def _fp64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _perturb(module, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _layer_cases():
    return [
        ("fc", lambda: FullyConnected(6), (6,)),
        ("fc_image", lambda: FullyConnected(12), (3, 2, 2)),
        ("conv3", lambda: Convolution((2, 4, 4), 3), (2, 4, 4)),
        ("conv5", lambda: Convolution((1, 3, 5), 5), (1, 3, 5)),
        ("conv1x1", lambda: Conv1x1(3), (3, 2, 3)),
        ("slrelu", lambda: SmoothLeakyReLU(0.3), (5,)),
        ("slrelu_res", lambda: SmoothLeakyReLU(0.3, residual=True), (2, 2, 2)),
        ("logit", lambda: LogitTransform(1e-3), (4,)),
        ("actnorm", lambda: ActNorm(3), (3, 2, 2)),
        ("coupling", lambda: AffineCoupling(5, hidden=8), (5,)),
        ("coupling_odd", lambda: AffineCoupling(3, hidden=8, parity=1), (3,)),
        ("squeeze", lambda: Squeeze(), (2, 4, 2)),
    ]


@pytest.mark.parametrize("name,make,shape", _layer_cases(), ids=[c[0] for c in _layer_cases()])
def test_layer_inverse_and_logdet(name, make, shape):
    """inverse(forward(x)) == x, and logdet == log|det| of the autograd Jacobian, for every layer."""
    torch.manual_seed(1)
    layer = _perturb(make())
    x = torch.rand(4, *shape) if name == "logit" else 2 * torch.randn(4, *shape)
    y, ld = layer(x)
    assert y.shape[0] == 4 and ld.shape == (4,)
    x_rec = layer.inverse(y)
    err = (x_rec - x).abs().max().item()
    assert err < 1e-9, f"{name}: max inverse error {err}"
    for i in range(2):
        jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0].flatten(), x[i])
        ref = torch.linalg.slogdet(jac.reshape(y[i].numel(), x[i].numel()))[1]
        assert torch.allclose(ld[i], ref, atol=1e-9), f"{name}: logdet {ld[i].item()} vs {ref.item()}"


def test_convolution_matrix_is_the_conv():
    layer = _perturb(Convolution((2, 3, 4), 3, bias=False))
    x = torch.randn(5, 2, 3, 4)
    assert torch.allclose(layer.matrix() @ x.flatten(1).T, layer.apply(x).flatten(1).T, atol=1e-12)


def _random_flows():
    torch.manual_seed(0)
    return {"fc": _perturb(fc_flow(5), 0.2), "cnn": _perturb(cnn_flow((1, 4, 4), kernel_size=3), 0.1),
            "coupling": _perturb(coupling_flow(4, n_layers=2, hidden=8), 0.2)}


@pytest.mark.parametrize("arch", ["fc", "cnn", "coupling"])
def test_energy_and_log_prob_differ_by_a_constant(arch):
    flow = _random_flows()[arch]
    x = torch.randn(6, *flow.shape).requires_grad_(True)
    e, lp = flow.energy(x), flow.log_prob(x)
    c = lp + e
    assert torch.allclose(c, c[0].expand_as(c), atol=1e-10)
    assert abs(c[0].item()) > 1e-3  # the constant is the linear log-dets, not trivially zero
    ge = torch.autograd.grad(e.sum(), x)[0]
    glp = torch.autograd.grad(flow.log_prob(x).sum(), x)[0]
    assert torch.allclose(-ge, glp, atol=1e-10)
    assert torch.allclose(flow.score(x), glp, atol=1e-10)
    assert torch.allclose(flow.inverse(flow.transform(x)[0]), x, atol=1e-8)


def test_linear_flow_gaussian_closed_form():
    """z = W x + b, z ~ N(0, I) -> x ~ N(-W^-1 b, (W^T W)^-1); log p and score exact."""
    torch.manual_seed(0)
    d = 4
    layer = _perturb(FullyConnected(d), 0.5)
    flow = Flow([layer], (d,))
    W, b = layer.weight.detach(), layer.bias.detach()
    mu = -torch.linalg.solve(W, b)
    prec = W.T @ W
    ref = torch.distributions.MultivariateNormal(mu, precision_matrix=prec)
    x = torch.randn(10, d)
    assert torch.allclose(flow.log_prob(x), ref.log_prob(x), atol=1e-10)
    assert torch.allclose(flow.score(x), -(x - mu) @ prec, atol=1e-10)
    s = flow.sample(20000)
    assert torch.allclose(s.mean(0), mu, atol=0.05)


@pytest.mark.parametrize("arch", ["fc", "coupling"])
def test_log_prob_integrates_to_one(arch):
    torch.manual_seed(0)
    flow = _perturb(fc_flow(2), 0.2) if arch == "fc" else _perturb(coupling_flow(2, n_layers=3, hidden=8), 0.3)
    flow.initialize(torch.randn(500, 2))
    g = torch.linspace(-20, 20, 801)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    with torch.no_grad():
        p = flow.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).exp()
    mass = p.sum().item() * (g[1] - g[0]).item() ** 2
    assert abs(mass - 1) < 5e-3, f"integral of p = {mass}"


def test_log_prob_caches_linear_logdets_until_weights_change(monkeypatch):
    flow = _random_flows()["cnn"]
    calls = []
    real = torch.linalg.slogdet
    monkeypatch.setattr(torch.linalg, "slogdet", lambda a: calls.append(1) or real(a))
    x = torch.randn(3, *flow.shape)
    n_linear = sum(layer.is_linear for layer in flow.layers)
    with torch.no_grad():
        a = flow.log_prob(x)
        assert len(calls) == n_linear
        b = flow.log_prob(x)
        assert len(calls) == n_linear and torch.equal(a, b)
        flow.layers[0].weight.mul_(1.1)  # an in-place update, as an optimizer step makes
        c = flow.log_prob(x)
        assert len(calls) == 2 * n_linear and not torch.allclose(a, c)
    flow.log_prob(x).sum().backward()  # with gradients: always recomputed, with graph
    assert len(calls) == 3 * n_linear and flow.layers[0].weight.grad is not None


@pytest.mark.parametrize("name", ["sml", "ssm", "dsm", "fdssm", "exact_sm", "sf"])
@pytest.mark.parametrize("arch", ["fc", "cnn", "coupling"])
def test_score_matching_never_computes_a_determinant(monkeypatch, name, arch):
    flow = _random_flows()[arch]

    def forbidden(*a, **k):
        raise AssertionError("a linear log-determinant was computed on the training path")

    for fn in ("slogdet", "det", "logdet"):
        monkeypatch.setattr(torch.linalg, fn, forbidden, raising=False)
    monkeypatch.setattr(torch, "slogdet", forbidden)
    monkeypatch.setattr(torch, "logdet", forbidden)
    loss = losses.compute_loss(flow, torch.randn(3, *flow.shape), name)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in flow.layers[-2].parameters())
    with pytest.raises(AssertionError, match="log-determinant"):
        losses.compute_loss(flow, torch.randn(3, *flow.shape), "ml")


# ----------------------------------------------------------------------------------------------------
# Objectives on a Gaussian model: E(x) = 0.5 |W x + b|^2 + const, score -P (x - mu), Hessian -P.
# ----------------------------------------------------------------------------------------------------

@pytest.fixture
def gauss():
    torch.manual_seed(0)
    d = 5
    layer = _perturb(FullyConnected(d), 0.4)
    flow = Flow([layer], (d,))
    W, b = layer.weight.detach(), layer.bias.detach()
    mu = -torch.linalg.solve(W, b)
    P = W.T @ W
    x = torch.randn(7, d)
    s = -(x - mu) @ P
    return dict(flow=flow, W=W, b=b, mu=mu, P=P, x=x, s=s, d=d)


def test_ml_and_sml_closed_form(gauss):
    g = gauss
    ref = torch.distributions.MultivariateNormal(g["mu"], precision_matrix=g["P"])
    assert torch.allclose(losses.ml(g["flow"], g["x"]), -ref.log_prob(g["x"]), atol=1e-10)
    xm = torch.randn(7, g["d"])
    energy = lambda v: 0.5 * (v @ g["W"].T + g["b"]).pow(2).sum(1)
    assert torch.allclose(losses.sml(g["flow"], g["x"], xm), energy(g["x"]) - energy(xm), atol=1e-10)


def test_exact_sm_closed_form(gauss):
    g = gauss
    ref = (0.5 * g["s"].pow(2).sum(1) - torch.trace(g["P"])) / g["d"]
    assert torch.allclose(losses.exact_sm(g["flow"], g["x"]), ref, atol=1e-10)


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_ssm_closed_form_and_converges_to_exact_sm(gauss, dist):
    g = gauss
    v = losses._projections(g["x"], 3, dist)
    quad = torch.einsum("kni,ij,knj->n", v, g["P"], v) / 3
    ref = (0.5 * g["s"].pow(2).sum(1) - quad) / g["d"]
    assert torch.allclose(losses.ssm(g["flow"], g["x"], v=v), ref, atol=1e-10)
    torch.manual_seed(1)
    many = losses.ssm(g["flow"], g["x"], n_slices=4000, dist=dist)
    exact = losses.exact_sm(g["flow"], g["x"])
    few = losses.ssm(g["flow"], g["x"], n_slices=1, dist=dist)
    err_many, err_few = (many - exact).abs().max().item(), (few - exact).abs().max().item()
    assert err_many < 0.05 * exact.abs().max().item() and err_many < err_few


def test_dsm_closed_form(gauss):
    g = gauss
    e = torch.randn_like(g["x"])
    sigma = 0.3
    s_noisy = -(g["x"] + sigma * e - g["mu"]) @ g["P"]
    ref = 0.5 * (s_noisy + e / sigma).pow(2).sum(1) / g["d"]
    assert torch.allclose(losses.dsm(g["flow"], g["x"], sigma=sigma, noise=e), ref, atol=1e-10)


def test_fdssm_closed_form(gauss):
    """For a quadratic energy the finite differences are exact: (0.5 (v.s)^2 - v^T P v) / eps^2."""
    g = gauss
    eps = 0.2
    u = torch.randn_like(g["x"])
    v = eps * u / u.norm(dim=1, keepdim=True)
    ref = (0.5 * (v * g["s"]).sum(1).pow(2) - torch.einsum("ni,ij,nj->n", v, g["P"], v)) / eps ** 2
    assert torch.allclose(losses.fdssm(g["flow"], g["x"], eps=eps, v=v), ref, atol=1e-8)
    torch.manual_seed(2)
    xs = g["x"].repeat(20000, 1)
    mean = losses.fdssm(g["flow"], xs, eps=eps).view(20000, -1).mean(0)
    exact = losses.exact_sm(g["flow"], g["x"])
    assert torch.allclose(mean, exact, atol=0.05 * exact.abs().max().item())


def test_srinivas_fleuret_closed_form_on_gaussian(gauss):
    g = gauss
    sigma = 0.1
    v = sigma * torch.randn(4, *g["x"].shape)
    quad = torch.einsum("kni,ij,knj->n", v, g["P"], v) / 4
    assert torch.allclose(losses.sf_trace(g["flow"], g["x"], sigma, v=v), -quad / sigma ** 2, atol=1e-8)
    ref = (0.5 * g["s"].pow(2).sum(1) - quad / sigma ** 2) / g["d"]
    assert torch.allclose(losses.srinivas_fleuret(g["flow"], g["x"], sigma, v=v), ref, atol=1e-8)


def test_srinivas_fleuret_approaches_hessian_trace_as_sigma_shrinks():
    torch.manual_seed(0)
    flow = _perturb(fc_flow(3), 0.4)
    x = torch.randn(4, 3)
    hess = torch.stack([torch.autograd.functional.hessian(lambda v: flow.log_prob(v[None])[0], xi) for xi in x])
    tr = hess.diagonal(dim1=1, dim2=2).sum(1)
    u = torch.randn(20000, *x.shape)
    limit = torch.einsum("kni,nij,knj->n", u, hess, u) / len(u)  # the same draws at sigma -> 0
    assert torch.allclose(limit, tr, atol=0.05 * tr.abs().max().item())
    errs = {}
    for sigma in (1.0, 0.3, 0.03):
        est = losses.sf_trace(flow, x, sigma, v=sigma * u)
        errs[sigma] = (est - limit).abs().max().item()
    assert errs[1.0] > errs[0.3] > errs[0.03], errs
    assert errs[0.03] < 1e-3 * tr.abs().max().item(), errs
    plain = losses.sf_trace(flow, x, 0.3, v=0.3 * u, antithetic=False)
    assert torch.allclose(plain, tr, atol=0.2 * tr.abs().max().item())


# ----------------------------------------------------------------------------------------------------
# Preprocessing and NLL bookkeeping
# ----------------------------------------------------------------------------------------------------

def test_bits_per_dim_of_a_uniform_model_is_eight():
    """A model whose logit-space density is the logistic one is uniform on [0,1]^D: exactly 8 bits/dim on
    8-bit data, once the MaP Jacobian is included."""
    torch.manual_seed(0)
    pre = MaP(256, alpha=0.0)
    x = torch.randint(0, 256, (50, 3, 4, 4))
    y, ld = pre(x)
    log_logistic = (-y - 2 * torch.nn.functional.softplus(-y)).flatten(1).sum(1)
    nats, bpd = nll(log_logistic, 48, 256, logdet=ld)
    assert torch.allclose(bpd, torch.full_like(bpd, 8.0), atol=1e-6)
    assert torch.allclose(nats, torch.full_like(nats, 48 * math.log(256)), atol=1e-4)
    nats_wrong, _ = nll(log_logistic, 48, 256)  # forgetting the Jacobian is visibly wrong
    assert (nats_wrong - nats).abs().min() > 1.0


def test_nll_of_a_known_discrete_distribution():
    """Data uniform on {0, ..., 3} per pixel, modelled exactly (uniform on [0,1)): NLL = D log 4 nats = 2 bits/dim."""
    pre = MaP(4, alpha=0.0)
    x = torch.randint(0, 4, (10, 6))
    u = pre.dequantize(x)
    assert ((u >= 0) & (u < 1)).all() and torch.equal((u * 4).floor().long(), x)
    nats, bpd = nll(torch.zeros(10), 6, 4)
    assert torch.allclose(bpd, torch.full_like(bpd, 2.0))
    y, ld = pre.logit(u)
    jac = torch.autograd.functional.jacobian(lambda v: pre.logit(v[None])[0].flatten(), u[0])
    assert torch.allclose(ld[0], torch.linalg.slogdet(jac)[1], atol=1e-8)
    assert torch.equal(pre.to_int(y), x)


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown loss"):
        losses.compute_loss(fc_flow(2), torch.randn(2, 2), "nope")
    with pytest.raises(ValueError, match="unknown arch"):
        build_flow("mlp", (2,))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        build_flow("cnn", (2,))
    with pytest.raises(ValueError, match="divisible by 4"):
        cnn_flow((1, 6, 6))
    with pytest.raises(ValueError, match="expects inputs of shape"):
        fc_flow(4).energy(torch.randn(3, 5))
    with pytest.raises(ValueError, match="rademacher"):
        losses.ssm(fc_flow(2), torch.randn(2, 2), dist="uniform")
