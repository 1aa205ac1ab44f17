"""eqm.runtime: precision and thread decisions from injected timings (no real timing is asserted)."""
import pytest
import torch

from eqm import runtime
from eqm.fast import TrainStep, make_optimizer
from eqm.models import EqM_models

# Seconds of one 256^3 matmul: an avx512_bf16 CPU (bf16 ~4x faster) and an AVX2-only one (bf16 ~75x slower).
AVX512_BF16 = {torch.float32: 1.0e-3, torch.bfloat16: 0.25e-3}
AVX2_ONLY = {torch.float32: 1.0e-3, torch.bfloat16: 75e-3}


@pytest.fixture
def fake_matmuls(monkeypatch):
    """Route the probe's matmul timer to a table of seconds per dtype; returns (table, calls)."""
    table, calls = {}, []

    def fake(dtype, device, n, budget_s):
        calls.append(dtype)
        return table[dtype]

    monkeypatch.setattr(runtime, "_matmul_seconds", fake)
    runtime.probe_precision.cache_clear()
    yield table, calls
    runtime.probe_precision.cache_clear()


@pytest.mark.parametrize("timings, expected", [(AVX512_BF16, "bf16"), (AVX2_ONLY, "fp32")], ids=["avx512", "avx2"])
def test_auto_precision_follows_the_probe(fake_matmuls, timings, expected):
    table, calls = fake_matmuls
    table.update(timings)
    assert runtime.resolve_precision("auto", "cpu") == expected
    assert runtime.resolve_precision("auto", "cpu") == expected
    assert len(calls) == 2, "the probe must run once per process, not per call"
    assert "probe" in runtime.precision_reason("cpu")


def test_explicit_precision_is_honoured_without_probing(fake_matmuls):
    table, calls = fake_matmuls
    table.update(AVX2_ONLY)
    assert runtime.resolve_precision("bf16", "cpu") == "bf16"
    assert runtime.resolve_precision("fp32", "cpu") == "fp32"
    assert calls == []


def test_decide_precision_threshold_and_cuda_name():
    assert runtime.decide_precision(1.0, 1.0 / (runtime.BF16_MIN_SPEEDUP + 0.1))[0] == "bf16"
    assert runtime.decide_precision(1.0, 1.0 / (runtime.BF16_MIN_SPEEDUP - 0.1))[0] == "fp32"
    assert runtime.decide_precision(1.0, 2.0, "cuda")[0] == "tf32"
    assert runtime.decide_precision(1.0, 0.1, "cuda")[0] == "bf16"


@pytest.mark.parametrize("timings, expected", [(AVX512_BF16, "bf16"), (AVX2_ONLY, "fp32")], ids=["avx512", "avx2"])
def test_train_step_defaults_to_the_probed_precision(fake_matmuls, timings, expected):
    fake_matmuls[0].update(timings)
    model = EqM_models["EqM-Ti/4"](input_size=8, in_channels=1, num_classes=10)
    step = TrainStep(model, make_optimizer(model), compile=False)
    assert step.precision == expected
    assert step.loss_fn.precision == expected


@pytest.mark.parametrize("seconds, expected", [
    ({1: [1.0, 1.0, 1.0], 2: [0.6, 0.55, 0.7]}, 2),   # a free second core: use it
    ({1: [0.09], 2: [1.1]}, 1),                       # a busy core: contention, 12x slower
    ({1: [1.0, 1.0, 1.0], 2: [0.95, 0.97, 0.9]}, 1),  # too small a gain to risk contention
    ({1: [1.0, 5.0, 1.0], 2: [0.5, 0.5, 9.0]}, 2),    # medians, not single outliers
], ids=["free", "busy", "marginal", "outliers"])
def test_decide_threads(seconds, expected):
    assert runtime.decide_threads(seconds) == expected


def test_configure_threads_explicit_and_env(monkeypatch):
    n = torch.get_num_threads()
    model = EqM_models["EqM-Ti/4"](input_size=8, in_channels=1, num_classes=10)
    monkeypatch.setattr(runtime, "probe_threads", lambda work, max_threads, reps=3: pytest.fail("probed"))
    try:
        assert runtime.configure_threads(model, 8, threads=1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert runtime.configure_threads(model, 8) == torch.get_num_threads()
    finally:
        torch.set_num_threads(n)


def test_configure_threads_probes_small_models(monkeypatch):
    n = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 4)
    seen = []

    def fake_probe(work, max_threads, reps=3):
        work()  # the model's forward pass must run
        seen.append(max_threads)
        return 1
    monkeypatch.setattr(runtime, "probe_threads", fake_probe)
    model = EqM_models["EqM-Ti/4"](input_size=8, in_channels=1, num_classes=10)
    try:
        assert runtime.configure_threads(model, 8) == 1 and torch.get_num_threads() == 1
        assert seen == [4]
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("calls", [1, 3])
def test_probes_leave_the_global_rng_alone(monkeypatch, calls):
    """A seeded run draws the same noise however many times a timing probe ran (it once varied with load)."""
    n = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)

    def fake_probe(work, max_threads, reps=3):
        for _ in range(calls):  # how often the probe runs depends on the timings
            work()
        return 1
    monkeypatch.setattr(runtime, "probe_threads", fake_probe)
    model = EqM_models["EqM-Ti/4"](input_size=8, in_channels=1, num_classes=10).train()  # drops labels at random
    try:
        torch.manual_seed(0)
        runtime.configure_threads(model, 8)
        runtime.probe_precision("cpu")
        after_probes = torch.rand(4)
        torch.manual_seed(0)
        assert torch.equal(after_probes, torch.rand(4))
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("cost, expected", [({1: 1.0, 4: 0.5}, 4), ({1: 1.0, 4: 12.0}, 1)], ids=["free", "busy"])
def test_thread_governor_keeps_the_faster_count(monkeypatch, cost, expected):
    """A simulated step whose time depends on the thread count: the governor must end on the faster count,
    call the step exactly once per call, and back off (longer intervals) while its trials lose."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    n = torch.get_num_threads()
    now, calls = [0.0], []

    def step(i):
        calls.append(i)
        now[0] += cost[torch.get_num_threads()]
        return i

    try:
        torch.set_num_threads(1)
        gov = runtime.ThreadGovernor(step, interval_s=5.0, max_interval_s=40.0, max_threads=4, clock=lambda: now[0])
        assert [gov(i) for i in range(200)] == list(range(200)) and calls == list(range(200))
        assert torch.get_num_threads() == expected
        assert gov.switches == (1 if expected == 4 else 0)
        assert gov.interval == 40.0  # the later trials (of the slower count) lost and backed off
    finally:
        torch.set_num_threads(n)


def test_thread_governor_is_a_pass_through_when_threads_are_fixed(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    gov = runtime.ThreadGovernor(lambda: 7, max_threads=4, clock=lambda: 0.0)
    gov.next_trial = -1.0  # a trial would be due at once
    assert not gov.enabled and [gov() for _ in range(5)] == [7] * 5 and gov.trial is None


def test_compile_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # unset, and restored after the test
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert runtime.use_compile_cache() == str(tmp_path / "eqm" / "torchinductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert runtime.use_compile_cache() == str(tmp_path / "mine")  # the user's choice wins
    import torch._inductor.config as inductor_config
    assert inductor_config.fx_graph_cache
