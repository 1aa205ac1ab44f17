"""The compiled sampling engine (eqm.sampling.Engine) gives the eager loop's samples and evaluation counts.

The step runs compiled (aot_eager: dynamo fullgraph capture without code generation; one inductor case);
CUDA graph capture needs a GPU and must never be touched on CPU.
"""
import pytest
import torch

from eqm.graph_sampler import GraphSampler, sample_fast
from eqm.samplers import make_field, sample
from model_helpers import labelled_noise, randomize_, tiny_eqm

N = 8


@pytest.fixture(scope="module")
def model():
    return randomize_(tiny_eqm(depth=1), std=0.1).eval()


@pytest.fixture(scope="module")
def inputs():
    return labelled_noise(N, seed=1)


def median_threshold(model, x, y, **cfg):
    """A stop threshold between the 4th and 5th smallest |f(x0)|: half the batch freezes at once."""
    with torch.no_grad():
        norms = make_field(model, **cfg)(x, y).flatten(1).norm(dim=1).sort().values
    return float((norms[N // 2 - 1] + norms[N // 2]) / 2)


def check_same(model, x, y, backend="aot_eager", steps=7, **kw):
    ref, ref_stats = sample(model, x, y, steps=steps, return_stats=True, **kw)
    out, stats = sample_fast(model, x, y, steps=steps, return_stats=True, backend=backend, block=3, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(stats["nfe"], ref_stats["nfe"])
    assert torch.equal(stats["stopped"], ref_stats["stopped"])
    assert not torch.equal(out, x)
    return stats


@pytest.mark.parametrize("sampler,cfg_scale,cfg_channels", [
    ("gd", 1.0, 3), ("ngd", 1.0, 3), ("gd", 2.5, 3), ("ngd", 2.5, "all"),
])
def test_matches_plain_loop(model, inputs, sampler, cfg_scale, cfg_channels):
    x, y = inputs
    check_same(model, x, y, sampler=sampler, stepsize=0.05, mu=0.3, cfg_scale=cfg_scale, cfg_channels=cfg_channels)


@pytest.mark.parametrize("sampler,cfg_scale", [("gd", 1.0), ("ngd", 2.0)])
def test_adaptive_compute_matches_plain_loop(model, inputs, sampler, cfg_scale):
    x, y = inputs
    thr = median_threshold(model, x, y, cfg_scale=cfg_scale)
    stats = check_same(model, x, y, sampler=sampler, stepsize=0.05, cfg_scale=cfg_scale, stop_grad_norm=thr)
    assert stats["stopped"].sum() >= N // 2 and stats["total_nfe"] < N * 6


def test_all_frozen_leaves_early_and_null_labels(model, inputs):
    x, _ = inputs
    ref, ref_stats = sample(model, x, None, steps=20, stop_grad_norm=1e9, return_stats=True)
    out, stats = sample_fast(model, x, None, steps=20, stop_grad_norm=1e9, return_stats=True, backend="aot_eager")
    assert torch.equal(out, x) and torch.equal(ref, x)
    assert stats["total_nfe"] == ref_stats["total_nfe"] == N and stats["evaluated_steps"] == 1


def test_energy_model_compiles_and_matches(inputs):
    ebm = randomize_(tiny_eqm(depth=1, ebm="dot"), std=0.1).eval()
    x, y = inputs
    check_same(ebm, x, y, sampler="ngd", stepsize=0.05, cfg_scale=1.5)


def test_inductor_step_matches_plain_loop(model, inputs):
    x, y = inputs
    thr = median_threshold(model, x, y, cfg_scale=1.5)
    check_same(model, x, y, backend="inductor", sampler="ngd", stepsize=0.05, cfg_scale=1.5, stop_grad_norm=thr)


def test_cuda_graph_code_is_guarded_on_cpu(model, inputs, monkeypatch):
    x, y = inputs
    with pytest.raises(ValueError, match="CUDA"):
        GraphSampler(model, x.shape, "cpu", cuda_graph=True, compile=False)

    def boom(*a, **k):
        raise AssertionError("CUDA graph code touched on CPU")
    monkeypatch.setattr(torch.cuda, "CUDAGraph", boom)
    monkeypatch.setattr(torch.cuda, "Stream", boom)
    s = GraphSampler(model, x.shape, "cpu", compile=False)
    assert not s.cuda_graph
    out, _ = s.run(x, y, steps=3)
    torch.testing.assert_close(out, sample(model, x, y, steps=3))
    with pytest.raises(ValueError, match="built for shape"):
        s.run(x[:2], y[:2], steps=3)


def test_block_replay_bookkeeping_matches_plain_loop(model, inputs, monkeypatch):
    """CUDA graphs cannot run here: a stand-in 'graph' replays its k steps eagerly, which tests the block /
    remainder split, capture-once and the per-block early exit of the CUDA path."""
    x, y = inputs
    thr = median_threshold(model, x, y)
    s = GraphSampler(model, x.shape, "cpu", sampler="ngd", stepsize=0.05, stop_grad_norm=thr, compile=False, block=4)
    s.cuda_graph = True
    captured = []

    class StandIn:
        def __init__(self, k):
            self.k = k
            captured.append(k)

        def replay(self):
            s._steps(self.k)
    monkeypatch.setattr(s, "_capture", StandIn)
    s.prepare(12)  # 11 updates: blocks of 4, then 3
    assert sorted(captured) == [3, 4]
    out, stats = s.run(x, y, steps=12)
    ref, ref_stats = sample(model, x, y, sampler="ngd", steps=12, stepsize=0.05, stop_grad_norm=thr, return_stats=True)
    assert sorted(captured) == [3, 4], "run() captured again"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(stats["nfe"], ref_stats["nfe"])
    assert stats["evaluated_steps"] % 4 == 0 or stats["evaluated_steps"] == 11


def test_runs_in_eval_mode_and_restores_training(inputs):
    """Label dropout is a train-mode behaviour: the sampler must evaluate the model in eval mode."""
    m = randomize_(tiny_eqm(depth=1), std=0.1).train()
    modes = []
    m.blocks[0].register_forward_pre_hook(lambda mod, args: modes.append(mod.training))
    x, y = inputs
    sample_fast(m, x, y, steps=3, compile=False, block=2)  # eager: the hook sees every call
    assert modes and not any(modes)
    assert m.training
