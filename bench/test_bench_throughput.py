"""pytest-benchmark versions of bench/throughput.py: reference vs fast path on a small model.

Not collected by CI (pytest's testpaths is tests/). Run:
    pytest bench/test_bench_throughput.py --benchmark-enable
"""
import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import Path  # noqa: E402

from eqm.models import EqM_models  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
ARGS = argparse.Namespace(batch_size=64 if GPU else 8, sample_batch_size=64 if GPU else 4,
                          sample_steps=50 if GPU else 10, cfg_scale=1.5, warmup=2, graph_block=10, train_iters=1)
PATHS = {
    "reference": dict(kind="reference"),
    "fast": dict(kind="fast", precision="bf16", compile=True, fused=GPU, cuda_graph=GPU),
}


@pytest.fixture(scope="module")
def paths():
    model = EqM_models["EqM-Ti/2"](input_size=16, num_classes=1000).to(DEVICE)
    return {name: Path(name, model, ARGS, DEVICE, **kw) for name, kw in PATHS.items()}


def run_synced(fn):
    fn()
    if GPU:
        torch.cuda.synchronize()


@pytest.mark.parametrize("name", list(PATHS))
def test_train_step(benchmark, paths, name):
    benchmark.extra_info.update(images_per_call=paths[name].train_batch)
    benchmark(run_synced, paths[name].train_fn)


@pytest.mark.parametrize("cfg", [False, True], ids=["uncond", "cfg"])
@pytest.mark.parametrize("name", list(PATHS))
def test_sampling(benchmark, paths, name, cfg):
    benchmark.extra_info.update(images_per_call=paths[name].sample_batch, steps=ARGS.sample_steps)
    benchmark.pedantic(run_synced, args=(paths[name].sample_fn[cfg],), rounds=3, iterations=1)
