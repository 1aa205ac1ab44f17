"""eqm.compiling: the compile policy's rule on given numbers, its record, and "auto" in a loop (no real compile)."""
import time

import pytest
import torch

from eqm import compiling
from eqm.fast import TrainStep, make_optimizer
from eqm.models import EqM_models


def test_pays_off_rule():
    # 1000 steps of 0.1 s at 2x save 50 s
    assert compiling.pays_off(1000, 0.1, 2.0, 40.0) == (True, pytest.approx(50.0))
    assert compiling.pays_off(1000, 0.1, 2.0, 60.0)[0] is False
    assert compiling.pays_off(10 ** 9, 1.0, 1.0, 1.0) == (False, 0.0)  # no speed-up: never pays
    assert compiling.pays_off(10 ** 9, 1.0, 0.8, 1.0) == (False, 0.0)  # compiled slower: never pays


def test_record_round_trip(tmp_path):
    assert compiling.read_record("k", tmp_path) == {}
    compiling.write_record("k", tmp_path, eager_step_s=0.5)
    compiling.write_record("k", tmp_path, compile_s=12.0, compiled_step_s=0.25, eager_step_s=None)
    compiling.write_record("other", tmp_path, compile_s=3.0)
    rec = compiling.read_record("k", tmp_path)
    assert rec == {"eager_step_s": 0.5, "compile_s": 12.0, "compiled_step_s": 0.25, "compiles": 1}
    assert compiling.read_record("other", tmp_path)["compile_s"] == 3.0
    (tmp_path / compiling.RECORD_FILE).write_text("{not json")
    assert compiling.read_record("k", tmp_path) == {}  # a damaged record is no record


def test_compile_key_separates_models_shapes_and_precisions():
    ti2, ti4 = EqM_models["EqM-Ti/2"](input_size=8), EqM_models["EqM-Ti/4"](input_size=8)
    key = compiling.compile_key("train", ti2, (16, 4, 8, 8), "fp32", "cpu")
    assert key != compiling.compile_key("train", ti4, (16, 4, 8, 8), "fp32", "cpu")
    assert key != compiling.compile_key("train", ti2, (8, 4, 8, 8), "fp32", "cpu")
    assert key != compiling.compile_key("train", ti2, (16, 4, 8, 8), "bf16", "cpu")
    assert key != compiling.compile_key("sample", ti2, (16, 4, 8, 8), "fp32", "cpu")
    assert key == compiling.compile_key("train", EqM_models["EqM-Ti/2"](input_size=8), (16, 4, 8, 8), "fp32", "cpu")


def test_should_compile_explicit_and_without_timing():
    assert compiling.should_compile("on", "cpu")[0] is True
    assert compiling.should_compile(False, "cuda")[0] is False
    assert compiling.should_compile("auto", "cpu")[0] is False
    assert compiling.should_compile("auto", "cuda")[0] is True  # no measurement: the fixed rule
    with pytest.raises(ValueError, match="compile must be"):
        compiling.should_compile("yes", "cpu")


def test_auto_eager_for_a_short_run_compiled_for_a_long_one_with_a_warm_record(tmp_path):
    # no record: the conservative default (minutes of compile, 1.1x) keeps even 10k steps of 10 ms eager
    on, reason = compiling.should_compile("auto", "cpu", steps_left=10_000, eager_step_s=0.01, key="k",
                                          cache_dir=tmp_path)
    assert not on and "assumed" in reason
    compiling.write_record("k", tmp_path, compile_s=5.0, compiled_step_s=0.005, eager_step_s=0.01)  # warm, 2x
    on, reason = compiling.should_compile("auto", "cpu", steps_left=100, eager_step_s=0.01, key="k", cache_dir=tmp_path)
    assert not on and "5 s measured" in reason  # 100 steps save 0.5 s < 5 s
    on, reason = compiling.should_compile("auto", "cpu", steps_left=10_000, eager_step_s=0.01, key="k",
                                          cache_dir=tmp_path)
    assert on and "2.00x measured" in reason  # 10k steps save 50 s > 5 s
    # no step time now: the record's eager step time counts
    assert compiling.should_compile("auto", "cpu", steps_left=10_000, key="k", cache_dir=tmp_path)[0]


class FakeStep:
    """A step of known minimum duration; `compiled` tells which version ran."""

    def __init__(self, seconds, compiled=False):
        self.seconds, self.compiled, self.calls, self.skipped = seconds, compiled, 0, "read through"

    def __call__(self, x):
        time.sleep(self.seconds)
        self.calls += 1
        return x + 1


def run_loop(total, tmp_path, compile="auto"):
    built, logs = [], []

    def compile_now():
        built.append(FakeStep(0.001, compiled=True))
        return built[-1]
    step = compiling.AutoCompile(FakeStep(0.01), compile_now, total_steps=total, key="k", device="cpu",
                                 compile=compile, probe=2, log=logs.append, cache_dir=tmp_path)
    assert [step(i) for i in range(total)] == [i + 1 for i in range(total)]  # every call runs the step once
    return step, built, logs


def test_auto_compile_in_a_loop(tmp_path):
    step, built, logs = run_loop(6, tmp_path)
    assert not step.compiled and not built and logs and "compile off" in logs[0]
    assert compiling.read_record("k", tmp_path)["eager_step_s"] >= 0.01  # what later decisions can use
    assert step.skipped == "read through"
    compiling.write_record("k", tmp_path, compile_s=0.01, compiled_step_s=0.001)  # a warm record: 10x, 10 ms
    step, built, logs = run_loop(50, tmp_path)
    assert step.compiled and len(built) == 1 and "compile on" in logs[0]
    assert built[0].calls == 50 - 3  # a warm-up and two timed eager calls, then compiled
    rec = compiling.read_record("k", tmp_path)
    assert rec["compiles"] == 2 and rec["compiled_step_s"] >= 0.001


def test_explicit_compile_records_its_cost(tmp_path):
    step, built, _ = run_loop(5, tmp_path, compile=True)
    assert step.compiled and built[0].calls == 5
    rec = compiling.read_record("k", tmp_path)
    assert "compile_s" in rec and "eager_step_s" not in rec


def test_train_step_switches_to_compiled(aot_eager_compiles, one_thread):
    torch.manual_seed(0)
    model = EqM_models["EqM-Ti/4"](input_size=8, num_classes=10).eval()  # no label dropout: same draws both ways
    step = TrainStep(model, make_optimizer(model), precision="fp32", compile=False)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    noise, t = torch.randn_like(x), torch.rand(2)
    eager = step.eager_loss(x, y, noise, t)
    assert step.use_compiled() is step and len(aot_eager_compiles) == 1
    torch.testing.assert_close(step.loss_fn(x, y, noise, t), eager)
