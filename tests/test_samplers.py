import math

import numpy as np
import pytest
import torch

from eqm.sampling import sample
from model_helpers import randomize_, tiny_eqm


class LinearField:
    """f(x) = m[y] - x: an energy bowl around a per-label centre m[y]; label `num_classes` is the null label."""

    def __init__(self, centres):
        self.centres = centres  # (num_classes + 1, C, H, W)
        self.num_classes = centres.shape[0] - 1
        self.calls = 0

    def __call__(self, x, t, y):
        assert torch.equal(t, torch.zeros(x.shape[0]))
        self.calls += 1
        return self.centres[y] - x


def bowl(n=3, shape=(4, 2, 2), classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    field = LinearField(torch.randn(classes + 1, *shape, generator=g, dtype=torch.float64))
    x0 = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.arange(n) % classes
    return field, x0, y


@pytest.mark.parametrize("steps", [1, 2, 50])
def test_gd_closed_form(steps):
    field, x0, y = bowl()
    eta = 0.1
    out = sample(field, x0, y, sampler="gd", steps=steps, stepsize=eta)
    m = field.centres[y]
    torch.testing.assert_close(out, m + (1 - eta) ** (steps - 1) * (x0 - m))
    assert field.calls == steps - 1


@pytest.mark.parametrize("steps, eta, mu", [(2, 0.1, 0.3), (30, 0.2, 0.3), (250, 0.0017, 0.3), (40, 0.5, 0.9)])
def test_ngd_closed_form(steps, eta, mu):
    # e_k = x_k - m and h_k = g_{k-1} obey (e, h)_{k+1} = M (e, h)_k, M = [[1-eta, -eta^2 mu], [-1, -eta mu]].
    field, x0, y = bowl()
    out = sample(field, x0, y, sampler="ngd", steps=steps, stepsize=eta, mu=mu)
    M = np.array([[1 - eta, -eta * eta * mu], [-1.0, -eta * mu]])
    coef = np.linalg.matrix_power(M, steps - 1)[0, 0]
    m = field.centres[y]
    torch.testing.assert_close(out, m + coef * (x0 - m))
    if steps > 2:  # a textbook Nesterov loop would differ: the variant matters
        assert not torch.allclose(out, m + (1 - eta) ** (steps - 1) * (x0 - m))


@pytest.mark.parametrize("cfg_channels", [3, "all"])
def test_cfg_arithmetic_one_step(cfg_channels):
    field, x0, y = bowl(shape=(4, 2, 2))
    s, eta = 1.7, 0.25
    out = sample(field, x0, y, steps=2, stepsize=eta, cfg_scale=s, cfg_channels=cfg_channels)
    cond = field.centres[y] - x0
    uncond = field.centres[field.num_classes] - x0
    guided = uncond + s * (cond - uncond)
    expect = guided.clone()
    if cfg_channels == 3:
        expect[:, 3:] = cond[:, 3:]  # channel 3 keeps the conditional value
    torch.testing.assert_close(out, x0 + eta * expect)


def test_cfg_scale_one_is_plain_conditional():
    field, x0, y = bowl()
    torch.testing.assert_close(sample(field, x0, y, steps=5, cfg_scale=1.0, stepsize=0.1),
                               sample(field, x0, y, steps=5, cfg_scale=1.0 + 1e-12, stepsize=0.1))


def test_start_point_handling():
    field, x0, y = bowl()
    keep = x0.clone()
    sample(field, x0, y, steps=5, stepsize=0.1)
    assert torch.equal(x0, keep)  # the start point is not modified
    assert torch.equal(sample(field, x0, y, steps=1), x0)  # 1 step = 0 updates
    m = field.centres[y]
    torch.testing.assert_close(sample(field, m, y, steps=10, stepsize=0.3, sampler="ngd"), m)  # at equilibrium
    # y=None samples the null label (unconditional).
    torch.testing.assert_close(sample(field, x0, None, steps=2, stepsize=1.0), field.centres[-1].expand_as(x0))


def test_adaptive_compute_stops_each_sample():
    field, _, _ = bowl(n=3, classes=3)
    m = field.centres[:3]
    e0 = torch.randn(3, 4, 2, 2, dtype=torch.float64) * torch.tensor([1.0, 10.0, 1e4], dtype=torch.float64).view(3, 1, 1, 1)
    eta, thr, steps = 0.2, 0.5, 30
    out, stats = sample(field, m + e0, torch.arange(3), steps=steps, stepsize=eta, stop_grad_norm=thr,
                        return_stats=True)
    norms = e0.flatten(1).norm(dim=1)
    for i in range(3):
        k_stop = math.ceil(math.log(thr / norms[i].item()) / math.log(1 - eta))  # first k with |f_k| < thr
        if k_stop < steps - 1:
            assert stats["nfe"][i] == k_stop + 1 and stats["stopped"][i]
            torch.testing.assert_close(out[i], m[i] + (1 - eta) ** k_stop * e0[i])
        else:
            assert stats["nfe"][i] == steps - 1 and not stats["stopped"][i]
            torch.testing.assert_close(out[i], m[i] + (1 - eta) ** (steps - 1) * e0[i])
    assert stats["total_nfe"] == int(stats["nfe"].sum()) < 3 * (steps - 1)


@pytest.mark.parametrize("sampler", ["gd", "ngd"])
def test_adaptive_compute_under_bf16_autocast(sampler):
    """The field comes back in bf16 under autocast; the fp32 state must take it (eqm-sample's bf16 path)."""
    model = randomize_(tiny_eqm()).eval()
    x0, y = torch.randn(4, 4, 8, 8), torch.arange(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, stats = sample(model, x0, y, sampler=sampler, steps=5, stepsize=0.1, stop_grad_norm=1e-6,
                            return_stats=True)
        plain = sample(model, x0, y, sampler=sampler, steps=5, stepsize=0.1)
    assert out.dtype == torch.float32 and stats["nfe"].tolist() == [4] * 4
    # nothing stopped: the plain loop's updates, up to bf16 rounding (NAG keeps its momentum in bf16 there)
    torch.testing.assert_close(out, plain.float(), atol=2e-2, rtol=0)


def test_adaptive_compute_with_huge_threshold_and_ngd():
    field, x0, y = bowl()
    out, stats = sample(field, x0, y, sampler="ngd", steps=10, stop_grad_norm=1e9, return_stats=True)
    assert torch.equal(out, x0) and stats["nfe"].tolist() == [1, 1, 1]
    # A threshold of 0 never stops: same result as no stopping.
    torch.testing.assert_close(sample(field, x0, y, sampler="ngd", steps=10, stepsize=0.1, stop_grad_norm=0.0),
                               sample(field, x0, y, sampler="ngd", steps=10, stepsize=0.1))


def test_bad_arguments():
    field, x0, y = bowl()
    with pytest.raises(ValueError, match="sampler"):
        sample(field, x0, y, sampler="sgld")
    with pytest.raises(ValueError, match="steps"):
        sample(field, x0, y, steps=0)


def test_explicit_energy_model_samples_with_its_gradient():
    # The published sampler runs under no_grad and silently used the raw head for EqM-E; ours must not.
    torch.manual_seed(0)
    model = randomize_(tiny_eqm(ebm="dot"), std=0.1).double().eval()
    x0, y = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([1, 2])
    out = sample(model, x0, y, steps=3, stepsize=0.05)
    x = x0.clone()
    for _ in range(2):
        xr = x.clone().requires_grad_(True)
        head = model._head(xr, None, y, False)[0]
        x = x + 0.05 * torch.autograd.grad((head * xr).sum(), xr)[0]
    torch.testing.assert_close(out, x)
    raw_head = x0 + 0.05 * model._head(x0, None, y, False)[0].detach()
    assert not torch.allclose(sample(model, x0, y, steps=2, stepsize=0.05), raw_head)
