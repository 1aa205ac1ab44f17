"""The sampling engine (eqm.sampling) against small independent reference loops written here.

Every sampler runs eagerly and compiled (backend aot_eager: the dynamo fullgraph capture, without inductor's
slow CPU code generation); CUDA graphs need a GPU (their bookkeeping is tested in test_graph_sampler.py).
"""
import math

import pytest
import torch

from eqm.sampling import Engine, composed_field, make_field, sample
from model_helpers import labelled_noise, Bowl, randomize_, tiny_eqm

N = 6


@pytest.fixture(scope="module")
def model():
    return randomize_(tiny_eqm(depth=1), std=0.1).eval()


@pytest.fixture(scope="module")
def inputs():
    return labelled_noise(N, seed=3)


def guided(model, x, y, s):
    """Reference CFG written out: the published rule, channels 0..2 guided, channel 3 conditional."""
    t = torch.zeros(x.shape[0])
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, model.num_classes))
    out = cond.clone()
    out[:, :3] = uncond[:, :3] + s * (cond[:, :3] - uncond[:, :3])
    return out


def reference(model, x, y, sampler, updates, eta, s=1.0, mu=0.3, betas=(0.9, 0.999), eps=1e-8, stop=None):
    """The update rules as plain loops, one sample at a time (adaptive compute: a sample stops before the
    update whose field norm is below `stop`)."""
    outs, nfes = [], []
    for i in range(x.shape[0]):
        xi, yi = x[i:i + 1].clone(), y[i:i + 1]
        g, m, v, nfe = torch.zeros_like(xi), torch.zeros_like(xi), torch.zeros_like(xi), 0
        for k in range(updates):
            if sampler == "gd":
                f = guided(model, xi, yi, s)
                step = eta * f
            elif sampler == "ngd":
                f = guided(model, xi + eta * mu * g, yi, s)
                step, g = eta * f, f
            else:  # textbook Adam on the loss -E, gradient -f
                f = guided(model, xi, yi, s)
                m = betas[0] * m + (1 - betas[0]) * f
                v = betas[1] * v + (1 - betas[1]) * f * f
                step = eta * (m / (1 - betas[0] ** (k + 1))) / ((v / (1 - betas[1] ** (k + 1))).sqrt() + eps)
            nfe += 1
            if stop is not None and f.norm() < stop:
                break
            xi = xi + step
        outs.append(xi)
        nfes.append(nfe)
    return torch.cat(outs), torch.tensor(nfes)


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("sampler,s", [("gd", 1.0), ("ngd", 1.0), ("gd", 2.0), ("ngd", 2.0), ("adam", 1.5)])
def test_descent_samplers_match_reference_loops(model, inputs, sampler, s, compile, aot_eager_compiles):
    x, y = inputs
    eta = 0.02 if sampler == "adam" else 0.05
    with torch.no_grad():
        ref, _ = reference(model, x, y, sampler, 5, eta, s=s)
        out = sample(model, x, y, sampler=sampler, steps=6, stepsize=eta, cfg_scale=s, compile=compile)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert len(aot_eager_compiles) == int(compile)


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("sampler", ["gd", "ngd", "adam"])
def test_adaptive_compute_matches_reference_loops(model, inputs, sampler, compile, aot_eager_compiles):
    x, y = inputs
    with torch.no_grad():
        norms = make_field(model)(x, y).flatten(1).norm(dim=1).sort().values
        stop = float(norms[N // 2] * 0.97)  # some samples stop at once, others later or never
        ref, ref_nfe = reference(model, x, y, sampler, 8, 0.05, stop=stop)
        out, stats = sample(model, x, y, sampler=sampler, steps=9, stepsize=0.05, stop_grad_norm=stop,
                            return_stats=True, compile=compile)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert stats["nfe"].tolist() == ref_nfe.tolist()
    assert 0 < int(stats["stopped"].sum()) and stats["total_nfe"] < N * 8


def test_langevin_is_gd_plus_annealed_noise(model, inputs):
    x, y = inputs
    eta, temp, updates = 0.05, 0.3, 4
    with torch.no_grad():
        torch.manual_seed(11)
        out = sample(model, x, y, sampler="langevin", steps=updates + 1, stepsize=eta, temperature=temp)
        torch.manual_seed(11)
        ref = x.clone()
        for k in range(updates):
            f = model(ref, torch.zeros(N), y)
            ref = ref + eta * f + math.sqrt(2 * eta * temp * (1 - k / updates)) * torch.randn_like(ref)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        gd = sample(model, x, y, sampler="gd", steps=updates + 1, stepsize=eta)
        assert (out - gd).abs().max() > 1e-2
        torch.testing.assert_close(sample(model, x, y, sampler="langevin", steps=5, stepsize=eta, temperature=0.0), gd)


@pytest.mark.parametrize("method,steps,tol", [("euler", 200, 6e-3), ("midpoint", 20, 1e-3), ("heun", 20, 1e-3),
                                              ("rk4", 10, 1e-5), ("dopri5", 2, 1e-6)])
def test_ode_integrates_to_t_one(method, steps, tol):
    pytest.importorskip("torchdiffeq")
    g = torch.Generator().manual_seed(0)
    m, x0 = torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, 2, 3, 3, generator=g,
                                                                                   dtype=torch.float64)
    out, stats = sample(Bowl(m), x0, torch.zeros(4, dtype=torch.long), sampler="ode", method=method, steps=steps,
                        atol=1e-9, rtol=1e-9, return_stats=True)
    exact = m + math.exp(-1) * (x0 - m)
    err = (out - exact).abs().max().item()
    assert err < tol, f"{method}: max error {err:.2e} at t = 1"
    per_step = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
    if method in per_step:
        assert stats["nfe"].tolist() == [per_step[method] * (steps - 1)] * 4
    else:
        assert stats["total_nfe"] > 4 * 6  # dopri5: at least one step of 6 stages


@pytest.mark.parametrize("method", ["heun", "rk4"])
def test_fixed_grid_ode_matches_torchdiffeq_and_compiles(model, inputs, method, aot_eager_compiles):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    x, y = inputs
    field = make_field(model, cfg_scale=1.5)
    with torch.no_grad():
        ref = torchdiffeq.odeint(lambda t, z: field(z, y), x, torch.linspace(0, 1, 4),
                                 method={"heun": "heun2", "rk4": "rk4"}[method])[-1]
        for compile in (False, True):
            out = sample(model, x, y, sampler="ode", method=method, steps=4, cfg_scale=1.5, compile=compile)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert len(aot_eager_compiles) == 1


def test_dopri5_adaptive_compute_and_clear_errors(inputs):
    pytest.importorskip("torchdiffeq")
    x, y = inputs
    bowl = Bowl(torch.zeros(1, 4, 8, 8))
    out, stats = sample(bowl, x, y, sampler="ode", method="dopri5", stop_grad_norm=1e9, return_stats=True)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-4)  # a zero field: only torchdiffeq's interpolation rounding
    assert stats["stopped"].all() and stats["nfe"].tolist() == [1] * N
    with pytest.raises(ValueError, match="method"):
        sample(bowl, x, y, sampler="ode", method="rk45")
    with pytest.raises(ValueError, match="atol"):
        sample(bowl, x, y, sampler="ode", method="dopri5", atol=0.0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_step_size_schedules(schedule):
    g = torch.Generator().manual_seed(0)
    m, x0 = torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64), torch.randn(3, 2, 2, 2, generator=g,
                                                                                   dtype=torch.float64)
    eta, n = 0.3, 7
    out = sample(Bowl(m), x0, None, steps=n + 1, stepsize=eta, schedule=schedule)
    factors = [1 - k / n if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * k / n)) for k in range(n)]
    torch.testing.assert_close(out, m + math.prod(1 - eta * s for s in factors) * (x0 - m))
    with pytest.raises(ValueError, match="schedule"):
        sample(Bowl(m), x0, None, steps=3, schedule="exp")
    # the one precision vocabulary: tf32 is fp32 tensors (no autocast); other names are refused
    torch.testing.assert_close(sample(Bowl(m), x0, None, steps=3, precision="tf32"), sample(Bowl(m), x0, None, steps=3))
    with pytest.raises(ValueError, match="precision must be one of"):
        sample(Bowl(m), x0, None, steps=3, precision="fp16")


@pytest.mark.parametrize("sampler", ["gd", "adam", "ode"])
def test_inpainting_keeps_known_pixels_and_compiles(model, inputs, sampler, aot_eager_compiles):
    x, y = inputs
    g = torch.Generator().manual_seed(5)
    known_values, mask = torch.randn(x.shape, generator=g), torch.rand(1, 1, 8, 8, generator=g) < 0.5
    kw = dict(sampler=sampler, steps=5, stepsize=0.05, known=(mask, known_values))
    with torch.no_grad():
        out = sample(model, x, y, **kw)
        fast = Engine(model, x.shape, "cpu", compile=True, backend="aot_eager", **{k: v for k, v in kw.items()
                                                                                 if k != "steps"}).run(x, y, 5)[0]
    m = mask.expand_as(x)
    assert torch.equal(out[m], known_values[m])
    assert (out[~m] - x[~m]).abs().min() > 0  # the unknown pixels moved
    torch.testing.assert_close(fast, out, rtol=1e-5, atol=1e-5)
    if sampler == "gd":  # reference: a GD step, then clamp
        ref = torch.where(m, known_values, x)
        with torch.no_grad():
            for _ in range(4):
                ref = torch.where(m, known_values, ref + 0.05 * model(ref, torch.zeros(N), y))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_composition_is_the_weighted_sum_of_fields(model, inputs):
    x, _ = inputs
    with torch.no_grad():
        f = composed_field(model, [1, 7], [0.5, 1.5])(x, None)
        t = torch.zeros(N)
        ref = 0.5 * model(x, t, torch.full((N,), 1)) + 1.5 * model(x, t, torch.full((N,), 7))
        torch.testing.assert_close(f, ref)
        out = sample(model, x, None, steps=2, stepsize=0.1, field=composed_field(model, [1, 7], [0.5, 1.5]))
        torch.testing.assert_close(out, x + 0.1 * ref)


def test_sampling_runs_the_model_in_eval_mode(inputs):
    x, y = inputs
    net = randomize_(tiny_eqm(depth=1, class_dropout_prob=1.0), std=0.1)  # train mode would drop every label
    with torch.no_grad():
        ref = x + 0.1 * net.eval()(x, torch.zeros(N), y)
        net.train()
        for compile in (False, True):
            out = sample(net, x, y, steps=2, stepsize=0.1, compile=compile, backend="aot_eager")
            torch.testing.assert_close(out, ref)
            assert net.training  # restored
