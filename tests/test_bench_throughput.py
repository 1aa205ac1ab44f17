"""bench/throughput.py's Paths as pytest-benchmark cases: each timed call must also do its work.

CI runs these once each (pytest.ini disables timing); time them with:
    pytest tests/test_bench_throughput.py --benchmark-enable
"""
import argparse

import pytest
import torch

from eqm.execution import Execution
from eqm.models import EqM_models
from eqm_bench.throughput import Path

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
ARGS = argparse.Namespace(batch_size=64 if GPU else 4, sample_batch_size=64 if GPU else 4,
                          sample_steps=50 if GPU else 4, cfg_scale=1.5, warmup=1, graph_block=10, train_iters=1,
                          rounds=1)
# On CPU the fast path runs eagerly in fp32 (a compile costs minutes here); on a GPU it is the full fast path.
PATHS = {
    "reference": dict(kind="reference"),
    "fast": dict(kind="fast", execution=Execution("triton" if GPU else "reference", GPU, "bf16" if GPU else "fp32"),
                 cuda_graph=GPU),
}


@pytest.fixture(scope="module")
def paths():
    torch.manual_seed(0)
    model = EqM_models["EqM-Ti/4"](input_size=8, num_classes=10).to(DEVICE)
    return {name: Path(name, model, ARGS, DEVICE, **kw) for name, kw in PATHS.items()}


def run_synced(fn):
    out = fn()
    if GPU:
        torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("name", list(PATHS))
def test_train_step(benchmark, paths, name):
    path = paths[name]
    before = [p.detach().clone() for p in path.model.parameters() if p.requires_grad]
    benchmark.extra_info.update(images_per_call=path.train_batch)
    loss = benchmark(run_synced, path.train_fn)
    after = [p for p in path.model.parameters() if p.requires_grad]
    assert torch.isfinite(loss).all() and loss.numel() == 1
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "the timed call did not update the weights"


@pytest.mark.parametrize("cfg", [False, True], ids=["uncond", "cfg"])
@pytest.mark.parametrize("name", list(PATHS))
def test_sampling(benchmark, paths, name, cfg):
    path = paths[name]
    benchmark.extra_info.update(images_per_call=path.sample_batch, steps=ARGS.sample_steps)
    out = benchmark.pedantic(run_synced, args=(path.sample_fn[cfg],), rounds=3, iterations=1)
    out = out[0] if isinstance(out, tuple) else out  # the engine returns (x, stats)
    m = path.model
    assert out.shape == (path.sample_batch, m.in_channels, m.input_size, m.input_size)
    assert torch.isfinite(out).all() and out.std() > 0
