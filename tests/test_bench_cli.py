"""The main job, bench/throughput.py, end to end at a toy size: the JSON contract of the issue and the chart."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from eqm_bench import throughput

pytestmark = pytest.mark.usefixtures("one_thread")


def test_throughput_json_and_chart(tmp_path, aot_eager_compiles):
    out_json = tmp_path / "out" / "t.json"
    out = throughput.main(["--model", "EqM-Ti/4", "--image-size", "32", "--batch-size", "2", "--sample-batch-size", "2",
                           "--sample-steps", "3", "--train-iters", "1", "--warmup", "1", "--rounds", "2",
                           "--precision", "fp32", "--compile", "on", "--breakdown", "--json", str(out_json)])
    assert len(aot_eager_compiles) == 3  # the fast path compiled its train step and both samplers (no CFG, CFG)
    saved = json.loads(out_json.read_text())
    assert saved["model"] == "EqM-Ti/4" and saved["batch_size"] == 2 and isinstance(saved["device"], str)
    for name in ("reference", "fast"):
        r = saved[name]
        for key in ("train_img_s", "sample_img_s", "sample_cfg_img_s", "tflops", "mfu", "peak_mem_gb"):
            assert np.isfinite(r[key]), (name, key)
        assert min(r["train_img_s"], r["sample_img_s"], r["sample_cfg_img_s"], r["peak_tflops"], r["setup_s"]) > 0
    assert saved["measured_on"].startswith("random 4x4x4 latents") and saved["fast_pieces"]["compile"] is True
    assert saved["precision_reason"] == "set explicitly"
    assert [row["step"] for row in saved["breakdown"]] == ["reference", "+static buffers (fp32)",
                                                           "fast: +static buffers +compile"]
    for key, speedup in saved["speedup"].items():
        assert speedup == pytest.approx(saved["fast"][key] / saved["reference"][key])
    # training costs 3 forwards an image; 3 sampling steps are 2 field evaluations, 4 with CFG
    flops = saved["flops_per_image"]
    assert flops["train"] == 3 * flops["forward"] and flops["sample"] == 2 * flops["forward"]
    assert flops["sample_cfg"] == 2 * flops["sample"]
    assert saved == json.loads(json.dumps(out))  # what main returns is what it wrote
    chart = np.asarray(Image.open(tmp_path / "out" / "t.png"))
    assert chart.ndim == 3 and chart.shape[0] > 100 and chart.std() > 0


def test_throughput_compile_auto(tmp_path, monkeypatch, aot_eager_compiles):
    """--compile auto (the default): eager without a record; compiled where a warm record says it pays."""
    import torch
    from eqm import compiling
    from eqm.models import EqM_models

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["--model", "EqM-Ti/4", "--image-size", "32", "--batch-size", "2", "--sample-batch-size", "2",
            "--sample-steps", "3", "--train-iters", "1", "--warmup", "2", "--rounds", "1", "--precision", "fp32"]
    out = throughput.main(argv)
    decided = {"train": False, "sample": False, "sample-cfg": False}
    assert not aot_eager_compiles and out["fast_pieces"]["compile"] == decided
    assert all("compile off" in r and "assumed" in r for r in out["fast_pieces"]["compile_reasons"])
    model = EqM_models["EqM-Ti/4"](input_size=4, num_classes=1000)
    key = compiling.compile_key("train", model, (2, 4, 4, 4), "fp32", torch.device("cpu"))
    assert compiling.read_record(key)["eager_step_s"] > 0  # the eager run left its step time
    compiling.write_record(key, compile_s=0.0, compiled_step_s=1e-9)  # a warm record: free and a huge speed-up
    out = throughput.main(argv)
    assert out["fast_pieces"]["compile"]["train"] is True and len(aot_eager_compiles) == 1
    assert compiling.read_record(key)["compiles"] == 2  # the compiled run recorded what it cost


def test_digits_curve_rows(tmp_path):
    from eqm_bench import digits_curve

    rows = digits_curve.main(["--max-steps", "4", "--eval-steps", "2", "--samples", "10", "--sample-steps", "2",
                              "--threads", "1", "--json", str(tmp_path / "c.json")])
    assert [r["step"] for r in rows] == [2, 4]
    assert all(0.0 <= r[k] <= 1.0 for r in rows for k in ("acc_cfg1", "acc_cfg2"))
    assert json.loads((tmp_path / "c.json").read_text())["rows"] == rows


@pytest.mark.skipif(not os.environ.get("EQM_PUBLISHED_REPO"), reason="set EQM_PUBLISHED_REPO to a checkout of "
                    "raywang4/EqM")
def test_vs_published_runs():
    from eqm_bench import vs_published

    out = vs_published.main(["--published", os.environ["EQM_PUBLISHED_REPO"], "--model", "EqM-Ti/4",
                             "--input-size", "8", "--batch-size", "2", "--sample-batch-size", "2", "--sample-steps", "3",
                             "--train-iters", "1", "--rounds", "1", "--precision", "fp32", "--profile-rows", "2"])
    assert set(out) == {"train", "sample"} and min(out.values()) > 0


def test_vs_torchebm_runs():
    pytest.importorskip("torchebm", reason='torchebm not installed (pip install -e ".[peers]")')
    from eqm_bench import vs_torchebm

    out = vs_torchebm.main(["--model", "EqM-Ti/4", "--input-size", "8", "--batch-size", "2", "--sample-batch-size", "2",
                            "--sample-steps", "3", "--train-iters", "1", "--rounds", "1", "--precision", "fp32",
                            "--profile-rows", "2"])
    assert set(out) == {"train", "sample"} and min(out.values()) > 0


def test_vs_torchebm_twin_check_fails_on_other_weights(monkeypatch):
    pytest.importorskip("torchebm", reason='torchebm not installed (pip install -e ".[peers]")')
    import torch
    from eqm_bench import vs_torchebm

    x, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 7])
    assert vs_torchebm.check_same_function("EqM-Ti/4", 8, x, y) < 1e-5
    twin = vs_torchebm.torchebm_twin

    def other(ours, name, size):  # the same twin with one attention weight changed
        t = twin(ours, name, size)
        with torch.no_grad():
            t.model.blocks[2].attn.qkv.weight[0, 0] += 0.5
        return t
    monkeypatch.setattr(vs_torchebm, "torchebm_twin", other)
    with pytest.raises(SystemExit, match="does not reproduce"):
        vs_torchebm.check_same_function("EqM-Ti/4", 8, x, y)
