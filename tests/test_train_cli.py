"""Training CLI on digits: end to end, exact resume, variants, and clear errors for bad input."""
import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image

from eqm import train
from eqm.checkpoint import load_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")


# A tiny, fast digits setup: 4x4 images (one token with patch 4).
TINY = ["--data-path", "digits", "--model", "EqM-Ti/4", "--image-size", "4", "--num-workers", "0"]


def run_train(tmp_path, *extra, results="res"):
    return train.main(TINY + ["--results-dir", str(tmp_path / results), *map(str, extra)])


def test_train_end_to_end(tmp_path):
    s = run_train(tmp_path, "--global-batch-size", 16, "--max-steps", 6, "--log-every", 2, "--ckpt-every", 3,
                  "--sample-every", 3, "--sample-steps", 3, "--cfg-scale", 2.0)
    assert s["steps"] == 6 and [e["step"] for e in s["log"]] == [2, 4, 6]
    assert all(np.isfinite(e["loss"]) and e["steps_per_sec"] > 0 for e in s["log"])
    exp = s["experiment_dir"]
    assert sorted(os.listdir(os.path.join(exp, "checkpoints"))) == ["0000003.pt", "0000006.pt"]
    assert s["checkpoint"] == os.path.join(exp, "checkpoints", "0000006.pt")
    assert sorted(os.listdir(os.path.join(exp, "samples"))) == ["0000003.png", "0000006.png"]
    grid = np.asarray(Image.open(s["sample_grid"]))
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.std() > 1
    log = open(os.path.join(exp, "log.txt")).read()
    assert "(step=0000006) Train Loss:" in log and "Train Steps/Sec:" in log
    ck = load_checkpoint(s["checkpoint"])
    assert {"model", "ema", "opt", "args", "step", "data", "rng"} <= set(ck)
    assert ck["step"] == 6 and ck["data"]["epoch"] == 0 and ck["data"]["batch"] == 6
    assert isinstance(ck["args"], argparse.Namespace) and ck["args"].model == "EqM-Ti/4"
    assert ck["args"].in_channels == 1 and ck["args"].input_size == 4 and ck["args"].vae == "none"
    # the EMA moved towards the model but is not equal to it
    diff = [(ck["model"][k] - ck["ema"][k]).abs().max().item() for k in ck["model"] if k != "pos_embed"]
    assert max(diff) > 0


def test_digits_defaults_are_resolved(capsys):
    parser = train.get_parser()
    a = train.resolve_args(parser.parse_args(["--data-path", "digits"]), parser)
    assert (a.model, a.image_size, a.vae, a.num_classes, a.global_batch_size) == ("EqM-Ti/4", 8, "none", 10, 64)
    assert a.input_size == 8 and a.max_steps == 1500 and a.lr == 1e-3 and a.cfg_scale == 2.0
    assert a.precision == "auto"  # resolved by eqm.runtime's probe when training starts
    a = train.resolve_args(parser.parse_args(["--data-path", "digits", "--epochs", "3"]), parser)
    assert a.epochs == 3 and a.max_steps is None  # an explicit --epochs is not cut by the digits step budget
    a = train.resolve_args(parser.parse_args(["--data-path", "/x", "--uncond", "False"]), parser)
    assert (a.model, a.image_size, a.vae, a.num_classes, a.global_batch_size) == ("EqM-XL/2", 256, "ema", 1000, 256)
    assert a.input_size == 32 and a.lr == 1e-4 and a.ema_decay == 0.9999 and a.ckpt_every == 50_000
    assert a.uncond is False  # the published type=bool would have read "False" as True
    a = train.resolve_args(parser.parse_args(["--data-path", "digits", "--model", "EqM-S/2", "--lr", "3e-4"]), parser)
    assert a.model == "EqM-S/2" and a.lr == 3e-4 and a.image_size == 8


def losses(summary):
    return {e["step"]: e["loss"] for e in summary["log"]}


def test_resume_gives_the_same_losses(tmp_path):
    # 256 per batch -> 7 batches per epoch, so the resumed part crosses an epoch boundary.
    common = ["--global-batch-size", 256, "--log-every", 1, "--sample-every", 0, "--lr", "3e-3"]
    full = run_train(tmp_path, *common, "--max-steps", 9, results="full")
    part = run_train(tmp_path, *common, "--max-steps", 5, results="part")
    ck = load_checkpoint(part["checkpoint"])
    assert ck["step"] == 5 and ck["data"]["batch"] == 5
    resumed = run_train(tmp_path, *common, "--max-steps", 9, "--ckpt", part["checkpoint"], results="resumed")
    assert resumed["steps"] == 9 and resumed["steps_this_run"] == 4
    assert list(losses(resumed)) == [6, 7, 8, 9]
    for step in range(1, 6):
        assert losses(part)[step] == losses(full)[step]
    for step in range(6, 10):
        assert losses(resumed)[step] == losses(full)[step], (step, losses(resumed), losses(full))
    a, b = load_checkpoint(full["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    assert a["data"] == b["data"] and a["data"]["epoch"] == 1
    for k in a["ema"]:
        torch.testing.assert_close(a["ema"][k], b["ema"][k], rtol=0, atol=0)


@pytest.mark.parametrize("extra", [["--ebm", "dot"], ["--precision", "bf16", "--grad-clip", "1.0"], ["--disp"],
                                   ["--fsdp"]])  # one process: nothing to shard, trains unsharded
def test_train_variants(tmp_path, extra):
    s = run_train(tmp_path, "--global-batch-size", 8, "--max-steps", 2, "--log-every", 1, "--sample-every", 0, *extra)
    assert s["steps"] == 2 and all(np.isfinite(e["loss"]) for e in s["log"])
    ck = load_checkpoint(s["checkpoint"])
    assert any(v.abs().sum() > 0 for k, v in ck["model"].items() if k.startswith("final_layer.linear"))


def test_latent_training_with_local_vae(tmp_path):
    from test_data import _make_folder, make_tiny_vae

    vae = make_tiny_vae(tmp_path / "vae")
    root = _make_folder(tmp_path / "imgs")
    s = train.main(["--data-path", str(root), "--vae", vae, "--image-size", "32", "--model", "EqM-Ti/2",
                    "--global-batch-size", "2", "--max-steps", "2", "--log-every", "1", "--num-workers", "0",
                    "--sample-every", "2", "--sample-steps", "2", "--results-dir", str(tmp_path / "res")])
    ck = load_checkpoint(s["checkpoint"])
    assert ck["args"].in_channels == 4 and ck["args"].input_size == 4
    assert ck["model"]["x_embedder.proj.weight"].shape[1] == 4
    assert np.asarray(Image.open(s["sample_grid"])).shape[2] == 3


def test_latent_folder_trains_without_encoding(tmp_path, monkeypatch):
    from eqm import extract_latents, vae as vae_lib
    from test_data import make_tiny_vae
    from test_latents import make_image_folder

    vae = make_tiny_vae(tmp_path / "vae")
    images = make_image_folder(tmp_path / "imgs", per_class=3)
    z = str(tmp_path / "z")
    extract_latents.main(["--data-path", images, "--vae", vae, "--image-size", "32", "--out", z, "--flip-both",
                          "--num-workers", "0", "--device", "cpu"])

    def no_encoding(*a, **k):
        raise AssertionError("a latent folder must not go through the VAE encoder")

    monkeypatch.setattr(vae_lib, "encode", no_encoding)
    common = ["--data-path", z, "--model", "EqM-Ti/2", "--num-classes", "2", "--global-batch-size", "2",
              "--max-steps", "4", "--log-every", "1", "--sample-steps", "2"]
    s = train.main(common + ["--results-dir", str(tmp_path / "res")])  # VAE and image size from the manifest
    ck = load_checkpoint(s["checkpoint"])
    assert ck["args"].vae == vae and ck["args"].image_size == 32 and ck["args"].input_size == 4
    assert ck["args"].in_channels == 4 and ck["model"]["x_embedder.proj.weight"].shape[1] == 4
    assert ck["step"] == 4 and all(np.isfinite(e["loss"]) for e in s["log"])
    assert np.asarray(Image.open(s["sample_grid"])).shape[2] == 3  # decoded by the manifest's VAE
    # a VAE that cannot be loaded only costs the sample grids: the latents need no encoder
    s = train.main(common + ["--vae", str(tmp_path / "no-such-vae"), "--results-dir", str(tmp_path / "res2")])
    assert s["steps"] == 4 and s["sample_grid"] is None
    assert "without sample grids" in open(os.path.join(s["experiment_dir"], "log.txt")).read()


def test_dali_flag_matches_the_pil_loader(tmp_path, monkeypatch):
    pytest.importorskip("nvidia.dali")
    from eqm import dali
    from test_latents import make_image_folder

    images = make_image_folder(tmp_path / "imgs", per_class=4)
    calls = []
    build = dali.DaliSource.loader
    monkeypatch.setattr(dali.DaliSource, "loader", lambda *a, **k: calls.append(a) or build(*a, **k))
    common = ["--data-path", images, "--vae", "none", "--image-size", "16", "--model", "EqM-Ti/4", "--num-classes",
              "2", "--global-batch-size", "4", "--max-steps", "1", "--log-every", "1", "--sample-every", "0",
              "--num-workers", "0"]
    pil = train.main(common + ["--results-dir", str(tmp_path / "pil")])
    assert not calls
    via_dali = train.main(common + ["--dali", "--results-dir", str(tmp_path / "dali")])
    assert len(calls) == 1
    # Same images, order, flips, noise and t; only DALI's resize differs (mean abs pixel diff ~0.015).
    assert via_dali["final_loss"] == pytest.approx(pil["final_loss"], rel=0.03)


def test_compile_flag_gives_the_eager_losses(tmp_path, aot_eager_compiles):
    compiled = aot_eager_compiles
    common = ["--global-batch-size", 8, "--max-steps", 3, "--log-every", 1, "--sample-every", 0, "--lr", "3e-3"]
    eager = run_train(tmp_path, *common, results="eager")
    assert not compiled  # off by default on CPU
    comp = run_train(tmp_path, *common, "--compile", results="compiled")
    assert len(compiled) == 1
    for step, loss in losses(eager).items():
        assert losses(comp)[step] == pytest.approx(loss, rel=1e-5)
    a, b = load_checkpoint(eager["checkpoint"]), load_checkpoint(comp["checkpoint"])
    for k in a["ema"]:
        torch.testing.assert_close(a["ema"][k], b["ema"][k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["--data-path", "digits", "--model", "EqM-Q/2"], "unknown --model 'EqM-Q/2'; choose one of: EqM-XL/2"),
    (["--data-path", "digits", "--image-size", "9"], "input is 9x9"),
    (["--data-path", "/x", "--image-size", "100"], "must be divisible by 8"),
    (["--data-path", "/x", "--image-size", "32", "--model", "EqM-B/8"], "patch size 8, but its input is 4x4"),
])
def test_bad_flags_exit_with_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_data_path_and_mismatched_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="does not exist or is not a folder.*--data-path digits"):
        train.main(["--data-path", str(tmp_path / "missing"), "--vae", "none", "--image-size", "8",
                    "--model", "EqM-Ti/2", "--results-dir", str(tmp_path / "res")])
    assert not (tmp_path / "res").exists()  # no experiment folder for a run that never started
    s = run_train(tmp_path, "--global-batch-size", 8, "--max-steps", 1, "--sample-every", 0)
    with pytest.raises(SystemExit, match="checkpoint is EqM-Ti/4 .* but model is EqM-Ti/2"):
        train.main(["--data-path", "digits", "--image-size", "4", "--model", "EqM-Ti/2", "--max-steps", "1",
                    "--ckpt", s["checkpoint"], "--results-dir", str(tmp_path / "res2")])
    with pytest.raises(SystemExit, match="not found"):
        train.main(TINY + ["--ckpt", str(tmp_path / "nope.pt"), "--results-dir", str(tmp_path / "res3")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_cuda_device_without_gpu_exits_with_message(tmp_path):
    from eqm import sample

    for cli in (train.main, sample.main):
        with pytest.raises(SystemExit, match="--device cuda but torch .* sees no CUDA GPU here; use --device cpu"):
            cli(["--data-path", "digits", "--device", "cuda"])
    with pytest.raises(SystemExit, match="'tpu' is not a device"):
        train.main(["--data-path", "digits", "--device", "tpu"])


def test_ct_flags_train_are_stored_and_read_back_by_sampling(tmp_path):
    from eqm import sample

    s = run_train(tmp_path, "--global-batch-size", 8, "--max-steps", 2, "--sample-every", 0, "--ct-shape",
                  "truncated-cosine", "--ct-a", 0.5, "--ct-lam", 2.0)
    a = load_checkpoint(s["checkpoint"])["args"]
    assert (a.ct_shape, a.ct_a, a.ct_lam) == ("truncated-cosine", 0.5, 2.0)
    out = sample.main(["--ckpt", s["checkpoint"], "--folder", str(tmp_path / "s"), "--num-sampling-steps", "2",
                       "--num-fid-samples", "2"])
    assert out["ct"] == {"shape": "truncated-cosine", "a": 0.5, "lam": 2.0}
    assert out["stepsize"] == pytest.approx(0.01 * 4.0 / 2.0)  # the digits default eta, rescaled to lam 2


@pytest.mark.parametrize("extra,msg", [(["--ct-a", 1.0], "argument --ct-a: must be < 1"),
                                       (["--ct-lam", 0], "argument --ct-lam: must be > 0"),
                                       (["--ct-shape", "step"], "invalid choice")])
def test_bad_ct_flags(tmp_path, capsys, extra, msg):
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path, "--max-steps", 1, *extra)
    assert e.value.code == 2 and msg in capsys.readouterr().err
