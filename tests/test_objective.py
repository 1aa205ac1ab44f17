import pytest
import torch

from eqm.objective import dispersive_loss, eqm_interpolate, eqm_target_scale, eqm_training_losses
from eqm.execution import model_ops, use_execution
from model_helpers import count_triton_launches, randomize_, tiny_eqm


def test_target_scale_values():
    t = torch.tensor([0.0, 0.5, 0.8, 0.85, 0.9, 1.0])
    torch.testing.assert_close(eqm_target_scale(t), torch.tensor([4.0, 4.0, 4.0, 3.0, 2.0, 0.0]))
    torch.testing.assert_close(eqm_target_scale(t, a=0.5, lam=2.0), torch.tensor([2.0, 2.0, 0.8, 0.6, 0.4, 0.0]))
    with pytest.raises(ValueError, match="a must"):
        eqm_target_scale(t, a=1.0)


def test_truncated_cosine_target_scale():
    t = torch.tensor([0.0, 0.8, 0.85, 0.9, 0.95, 1.0])
    c = eqm_target_scale(t, a=0.8, lam=2.0, shape="truncated-cosine")
    half = 1 / 2 ** 0.5  # cos(pi/4)^2 = 1/2 at a quarter of the way, etc.
    torch.testing.assert_close(c, 2.0 * torch.tensor([1.0, 1.0, (1 + half) / 2, 0.5, (1 - half) / 2, 0.0]))
    with pytest.raises(ValueError, match="lam must be positive"):
        eqm_target_scale(t, lam=0.0)
    with pytest.raises(ValueError, match="shape"):
        eqm_target_scale(t, shape="step")
    # the loss uses it: the target scales with the chosen c(t); the Triton loss implements the published c(t)
    # only, so with ops="triton" this shape is computed in PyTorch
    x1, x0, tt = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), torch.tensor([0.9, 0.95])
    with count_triton_launches() as launches:
        out = eqm_training_losses(FakeModel(), x1, dict(y=torch.zeros(2, dtype=torch.long)), noise=x0, t=tt,
                                  lam=2.0, ct_shape="truncated-cosine", ops="triton")
    assert sum(launches.values()) == 0
    torch.testing.assert_close(out["target"][:, 0, 0, 0], 2.0 * torch.tensor([0.5, (1 - half) / 2]))


class FakeModel:
    """f(x) = 2x + y (per sample), records its arguments."""

    def __call__(self, x, t, y, train=False):
        self.t, self.train = t, train
        return 2 * x + y.float().view(-1, 1, 1, 1)


def test_loss_matches_hand_computation():
    torch.manual_seed(0)
    x1, x0 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0.1, 0.8, 0.95])
    y = torch.tensor([0, 1, 2])
    model = FakeModel()
    out = eqm_training_losses(model, x1, dict(y=y), noise=x0, t=t)
    assert model.train is True and torch.equal(model.t, t)
    for i in range(3):
        ti = t[i].item()
        xt = ti * x1[i] + (1 - ti) * x0[i]
        c = 4.0 * min(1.0, (1 - ti) / 0.2)
        target = (x1[i] - x0[i]) * c
        pred = 2 * xt + y[i]
        torch.testing.assert_close(out["target"][i], target)
        torch.testing.assert_close(out["pred"][i], pred)
        torch.testing.assert_close(out["loss"][i], ((pred - target) ** 2).mean())
    assert out["loss"].shape == (3,)


def test_interpolate_endpoints():
    x1, x0 = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    xt, target = eqm_interpolate(x1, x0, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[1], x1[1])
    torch.testing.assert_close(target[0], 4 * (x1[0] - x0[0]))
    assert torch.equal(target[1], torch.zeros_like(target[1]))


def test_real_model_loss_backprops_and_draws_t():
    torch.manual_seed(0)
    model = tiny_eqm()
    x1 = torch.randn(4, 4, 8, 8)
    out = eqm_training_losses(model, x1, dict(y=torch.tensor([0, 1, 2, 3])))
    assert out["loss"].shape == (4,) and ((out["t"] >= 0) & (out["t"] < 1)).all()
    # f = 0 at init, so the loss is exactly the mean squared target.
    torch.testing.assert_close(out["loss"], out["target"].pow(2).flatten(1).mean(1))
    out["loss"].mean().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_disp_loss_added_when_activations_returned():
    torch.manual_seed(0)
    model = randomize_(tiny_eqm()).eval()
    x1, x0, t = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.rand(4)
    kw = dict(y=torch.tensor([0, 1, 2, 3]))
    plain = eqm_training_losses(model, x1, kw, noise=x0, t=t)
    disp = eqm_training_losses(model, x1, dict(kw, return_act=True), noise=x0, t=t)
    torch.testing.assert_close(disp["loss"], plain["loss"] + 0.5 * disp["disp_loss"])
    # Hand form: log of the mean over all pairs (i, j) of exp(-|z_i - z_j|^2 / D).
    z = torch.randn(5, 3)
    d2 = ((z[:, None] - z[None]) ** 2).sum(-1) / 3
    torch.testing.assert_close(dispersive_loss(z), torch.log(torch.exp(-d2).mean()))


def test_bad_noise_or_t_shape():
    x1 = torch.randn(2, 1, 2, 2)
    with pytest.raises(ValueError, match="noise shape"):
        eqm_training_losses(FakeModel(), x1, dict(y=torch.tensor([0, 1])), noise=torch.randn(2, 1, 2, 3))
    with pytest.raises(ValueError, match="t must"):
        eqm_training_losses(FakeModel(), x1, dict(y=torch.tensor([0, 1])), t=torch.rand(3))


# ---------------------------------------------------------------- fused objective (kernels/, interpreter)

@pytest.mark.parametrize("disp", [False, True], ids=["plain", "dispersive"])
def test_fused_objective_matches_reference(disp):
    """kernels.eqm_interpolate + kernels.eqm_loss give the reference losses and parameter gradients (fp32)."""
    torch.manual_seed(0)
    x1, x0 = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0.1, 0.85, 0.97])  # both sides of a = 0.8
    model = randomize_(tiny_eqm(depth=1), std=0.1).eval()
    kw = dict(y=torch.tensor([0, 1, 2]), return_act=disp)
    results = []
    for ops in ("reference", "triton"):
        model.zero_grad()
        with count_triton_launches() as launches:
            terms = eqm_training_losses(model, x1, kw, a=0.7, lam=3.0, noise=x0, t=t, ops=ops)
            terms["loss"].mean().backward()
        results.append((terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        expected = {"eqm_loss.interpolate": 1, "eqm_loss.loss_forward": 1, "eqm_loss.loss_backward": 1}
        assert launches == (expected if ops == "triton" else {})  # the model itself runs the reference ops
    (ref, ref_grads), (fused, fused_grads) = results
    assert ("disp_loss" in fused) == disp
    for key in ("loss", "pred", "target"):
        torch.testing.assert_close(fused[key], ref[key], rtol=1e-6, atol=1e-6)
    assert ref_grads["final_layer.linear.weight"].abs().sum() > 0
    for name, g in fused_grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_fused_objective_follows_model_ops(monkeypatch):
    import eqm_kernels as kernels
    calls = []
    monkeypatch.setattr(kernels, "eqm_loss", lambda *a, **k: calls.append(1) or kernels.eqm_loss_reference(*a, **k))
    model = tiny_eqm(depth=1)
    x1, kw = torch.randn(2, 4, 8, 8), dict(y=torch.tensor([0, 1]))
    eqm_training_losses(model, x1, kw)
    assert calls == []
    use_execution(model, "triton")
    eqm_training_losses(model, x1, kw)
    assert calls == [1]
    eqm_training_losses(model, x1, kw, ops="reference")  # an explicit argument wins
    assert calls == [1]
    assert model_ops(torch.compile(model)) == "triton"  # wrappers are looked through (DDP too)
    with pytest.raises(ValueError, match="ops must be"):
        eqm_training_losses(model, x1, kw, ops="fused")
    with pytest.raises(ValueError, match="a must"):
        eqm_training_losses(model, x1, kw, a=1.0)
