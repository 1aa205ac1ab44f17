"""Sampling CLI: train a few digits steps, sample, check the ADM .npz, the PNGs, the grid and the errors."""
import os

import numpy as np
import pytest
from PIL import Image

from eqm import sample
from model_helpers import train_tiny_digits


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    return train_tiny_digits(tmp_path_factory.mktemp("train"), 3)["checkpoint"]


def run_sample(ckpt, folder, *extra):
    return sample.main(["--ckpt", ckpt, "--folder", str(folder), "--num-sampling-steps", "4", *map(str, extra)])


def test_sample_npz_pngs_grid(digits_ckpt, tmp_path):
    s = run_sample(digits_ckpt, tmp_path / "s", "--num-fid-samples", 13, "--global-batch-size", 5)
    d = np.load(s["npz"])
    arr, labels = d["arr_0"], d["labels"]
    assert s["npz"] == str(tmp_path / "s.npz")  # beside the folder, as the published sample_gd.py writes it
    assert arr.shape == (13, 8, 8, 3) and arr.dtype == np.uint8  # model, image size from the checkpoint
    assert labels.shape == (13,) and labels.dtype == np.int64 and set(labels.tolist()) <= set(range(10))
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all()  # grayscale -> RGB
    pngs = sorted(f for f in os.listdir(tmp_path / "s") if f.endswith(".png") and f != "grid.png")
    assert pngs == [f"{i:06d}.png" for i in range(13)]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "s" / "000007.png")), arr[7])
    grid = np.asarray(Image.open(s["grid"]))
    assert grid.shape[2] == 3 and grid.std() > 1
    assert arr.std() > 1  # not a constant image
    # sample i depends only on the seed and i: another batch size gives the same npz
    s2 = run_sample(digits_ckpt, tmp_path / "s2", "--num-fid-samples", 13, "--global-batch-size", 13)
    d2 = np.load(s2["npz"])
    np.testing.assert_array_equal(d2["arr_0"], arr)
    np.testing.assert_array_equal(d2["labels"], labels)


def test_sample_options(digits_ckpt, tmp_path):
    base = np.load(run_sample(digits_ckpt, tmp_path / "a", "--num-fid-samples", 4)["npz"])["arr_0"]
    ngd = run_sample(digits_ckpt, tmp_path / "b", "--num-fid-samples", 4, "--sampler", "ngd", "--mu", 0.3,
                     "--stepsize", 0.05, "--cfg-scale", 2.0, "--cfg-channels", "all")
    assert np.load(ngd["npz"])["arr_0"].shape == base.shape
    # guidance on a 1-channel model with the default rule "3" (= channels 0..2 = every channel here)
    big = ["--num-fid-samples", 4, "--stepsize", 1.0]
    plain, cfg = (np.load(run_sample(digits_ckpt, tmp_path / f"d{s}", *big, "--cfg-scale", s)["npz"])["arr_0"]
                  for s in (1.0, 1000.0))  # a 3-step model barely uses its labels: a large scale
    assert np.abs(plain.astype(int) - cfg.astype(int)).max() > 0
    stop = run_sample(digits_ckpt, tmp_path / "c", "--num-fid-samples", 4, "--stop-grad-norm", 1e9)
    assert stop["nfe_per_sample"] == 1  # every sample stops after its first field evaluation


def test_compile_flag_gives_the_plain_samples(digits_ckpt, tmp_path, aot_eager_compiles):
    compiled = aot_eager_compiles
    common = ["--num-fid-samples", 6, "--global-batch-size", 4, "--sampler", "ngd", "--stepsize", 0.2,
              "--cfg-scale", 2.0]
    plain = run_sample(digits_ckpt, tmp_path / "plain", *common)
    assert not compiled  # off by default on CPU
    comp = run_sample(digits_ckpt, tmp_path / "compiled", *common, "--compile")
    assert len(compiled) == 2  # one static-buffer sampler per batch shape (4, then the last 2)
    a, b = (np.load(s["npz"]) for s in (plain, comp))
    assert np.array_equal(a["labels"], b["labels"])
    assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1  # uint8 rounding only
    assert comp["nfe_per_sample"] == plain["nfe_per_sample"] == 3


def test_compile_auto_decides_by_timing(digits_ckpt, tmp_path, monkeypatch, aot_eager_compiles):
    """Unset --compile: two timed eager updates against the compile cost recorded here (eqm.compiling)."""
    import json

    from eqm import compiling

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    common = ["--num-fid-samples", 4, "--global-batch-size", 4, "--sampler", "ngd", "--stepsize", 0.2]
    run_sample(digits_ckpt, tmp_path / "a", *common)
    assert not aot_eager_compiles  # no record: a compile is assumed to cost minutes, far more than 3 updates
    with open(tmp_path / "cache" / compiling.RECORD_FILE) as f:
        (key,) = [k for k in json.load(f) if k.startswith("sample")]
    assert compiling.read_record(key)["eager_step_s"] > 0  # the timing it decided by
    compiling.write_record(key, compile_s=0.0, compiled_step_s=1e-9)  # a warm record: free and a huge speed-up
    run_sample(digits_ckpt, tmp_path / "b", *common)
    assert len(aot_eager_compiles) == 1


def test_sample_errors(digits_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit, match="checkpoint is EqM-Ti/4 .* but model is EqM-S/2"):
        run_sample(digits_ckpt, tmp_path / "x", "--model", "EqM-S/2", "--num-fid-samples", 2)
    with pytest.raises(SystemExit, match="checkpoint not found"):
        run_sample(str(tmp_path / "nope.pt"), tmp_path / "x")
    with pytest.raises(SystemExit) as e:
        sample.main(["--model", "EqM-Z/2"])
    assert e.value.code == 2 and "unknown --model 'EqM-Z/2'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        sample.main(["--image-size", "100"])
    assert e.value.code == 2 and "divisible by 8" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="huggingface-cli download stabilityai/sd-vae-ft-ema"):
        sample.main(["--model", "EqM-Ti/4", "--image-size", "32", "--num-fid-samples", "1",
                     "--folder", str(tmp_path / "v")])


def test_sample_latent_with_local_vae(tmp_path):
    from test_data import make_tiny_vae

    vae = make_tiny_vae(tmp_path / "vae")
    s = sample.main(["--model", "EqM-Ti/2", "--image-size", "32", "--vae", vae, "--num-classes", "3",
                     "--num-fid-samples", "3", "--num-sampling-steps", "2", "--folder", str(tmp_path / "s")])
    d = np.load(s["npz"])
    assert d["arr_0"].shape == (3, 32, 32, 3) and d["arr_0"].dtype == np.uint8
    assert set(d["labels"].tolist()) <= {0, 1, 2}


@pytest.mark.parametrize("extra,nfe", [(["--sampler", "adam", "--schedule", "cosine", "--adam-betas", 0.8, 0.99], 3),
                                       (["--sampler", "langevin", "--temperature", 0.1], 3),
                                       (["--sampler", "ode", "--ode-method", "heun"], 6)])
def test_new_samplers_from_the_cli(digits_ckpt, tmp_path, extra, nfe):
    s = run_sample(digits_ckpt, tmp_path / "n", "--num-fid-samples", 3, *extra)
    assert np.load(s["npz"])["arr_0"].shape == (3, 8, 8, 3) and s["nfe_per_sample"] == nfe


@pytest.mark.parametrize("extra,msg", [(["--adam-betas", 0.9, 1.0], "argument --adam-betas: must be < 1"),
                                       (["--temperature", -1], "argument --temperature: must be >= 0"),
                                       (["--atol", 0], "argument --atol: must be > 0"),
                                       (["--ode-method", "rk45"], "invalid choice")])
def test_sampler_flag_errors(digits_ckpt, tmp_path, capsys, extra, msg):
    with pytest.raises(SystemExit) as e:
        run_sample(digits_ckpt, tmp_path / "e", *extra)
    assert e.value.code == 2 and msg in capsys.readouterr().err
