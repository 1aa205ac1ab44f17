"""Typed configuration: one preset table, resolution that leaves the Namespace alone, and the resolved config
stored in checkpoints as plain data that eqm-sample reads back (published checkpoints still sample from `args`)."""
import argparse
import copy

import numpy as np
import pytest
import torch

from eqm import sample, train
from eqm.checkpoint import load_checkpoint
from eqm.config import PRESETS, TrainConfig, trained_settings
from model_helpers import train_tiny_digits

pytestmark = pytest.mark.usefixtures("one_thread")

PLAIN = (dict, list, str, int, float, bool, type(None))


def assert_plain(obj, where="config"):
    assert isinstance(obj, PLAIN), f"{where} is a {type(obj).__name__}"
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, str), f"{where} has the key {k!r}"
            assert_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            assert_plain(v, f"{where}[{i}]")


@pytest.mark.parametrize("argv", [["--data-path", "digits"], ["--data-path", "/x", "--uncond", "False"],
                                  ["--data-path", "digits", "--fused", "--lr", "3e-4", "--epochs", "2"]])
def test_resolution_leaves_the_namespace_alone(argv):
    parser = train.get_parser()
    args = parser.parse_args(argv)
    before = copy.deepcopy(vars(args))
    cfg = train.resolve_config(args, parser)
    assert vars(args) == before
    assert isinstance(cfg, TrainConfig)
    with pytest.raises(AttributeError):  # frozen: nothing edits it after resolution either
        cfg.model.name = "EqM-S/2"


def test_one_preset_table_for_both_clis():
    parser = train.get_parser()
    t = train.resolve_config(parser.parse_args(["--data-path", "digits"]), parser)
    s = sample.resolve_config(sample.get_parser().parse_args(["--data-path", "digits"]), sample.get_parser())
    d = PRESETS["digits"]
    assert t.model.name == s.model.name == d["model"] and t.data.image_size == s.image_size == d["image_size"]
    assert t.grids.cfg_scale == s.sampling.cfg_scale == d["cfg_scale"]
    assert (t.model.num_classes, s.model.num_classes) == (d["num_classes"], d["num_classes"])
    assert t.grids.stepsize == d["sample_stepsize"] and s.sampling.stepsize == d["stepsize"]
    p = train.resolve_config(parser.parse_args(["--data-path", "/x"]), parser)
    assert (p.model.name, p.optim.lr, p.optim.ema_decay) == ("EqM-XL/2", 1e-4, 0.9999)
    assert (p.grids.stepsize, p.ckpt_every) == (PRESETS["published"]["sample_stepsize"], 50_000)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cfg")
    s = train_tiny_digits(out, 2, "--ct-lam", "2.0", "--num-workers", "0")
    return s["checkpoint"], out


def test_checkpoint_config_is_plain_data_and_matches_args(trained):
    ck = load_checkpoint(trained[0])
    cfg = ck["config"]
    assert_plain(cfg)
    assert cfg["model"] == {"name": "EqM-Ti/4", "input_size": 8, "in_channels": 1, "num_classes": 10,
                            "uncond": True, "ebm": "none"}
    assert cfg["data"]["vae"] == "none" and cfg["data"]["image_size"] == 8 and cfg["objective"]["ct_lam"] == 2.0
    # resolved by eqm.execution: on this CPU no Triton ops; one process keeps compile "auto" (None: timed in the run)
    rt = cfg["runtime"]
    assert rt["precision"] in ("fp32", "tf32", "bf16") and rt["fused"] is False and rt["compile"] is None
    a = ck["args"]  # the published Namespace stays, with the same values
    assert isinstance(a, argparse.Namespace)
    assert (a.model, a.input_size, a.in_channels, a.ct_lam) == ("EqM-Ti/4", 8, 1, 2.0)
    settings = trained_settings(ck)
    assert settings.model.build().in_channels == 1


def test_sampling_reads_the_config_before_the_args(trained, tmp_path):
    ck = load_checkpoint(trained[0])
    # args that disagree with the config: eqm-sample must follow the config
    ck["args"] = argparse.Namespace(**{**vars(ck["args"]), "image_size": 4, "input_size": 4, "in_channels": 3,
                                       "ct_lam": 4.0})
    path = tmp_path / "0000002.pt"
    torch.save(ck, path)
    s = sample.main(["--ckpt", str(path), "--folder", str(tmp_path / "s"), "--num-fid-samples", "2",
                     "--num-sampling-steps", "2"])
    assert np.load(s["npz"])["arr_0"].shape == (2, 8, 8, 3)
    assert s["ct"]["lam"] == 2.0 and s["stepsize"] == pytest.approx(PRESETS["digits"]["stepsize"] * 4.0 / 2.0)


def test_published_style_checkpoint_without_config_samples_from_args(trained, tmp_path):
    ck = load_checkpoint(trained[0])
    del ck["config"]
    args = {k: v for k, v in vars(ck["args"]).items() if k not in ("input_size", "in_channels", "ct_lam")}
    ck["args"] = argparse.Namespace(**args)  # as the published train.py writes it
    path = tmp_path / "0000002.pt"
    torch.save(ck, path)
    s = sample.main(["--ckpt", str(path), "--folder", str(tmp_path / "s"), "--num-fid-samples", "2",
                     "--num-sampling-steps", "2"])
    assert np.load(s["npz"])["arr_0"].shape == (2, 8, 8, 3) and s["ct"]["lam"] == 4.0


def test_triton_ops_where_they_cannot_run_is_one_line(tmp_path, monkeypatch):
    from eqm import execution

    monkeypatch.setattr(execution, "triton_unavailable", lambda device: "no kernels here: use --no-fused")
    with pytest.raises(SystemExit, match="eqm-train: error: Triton ops were asked for .* use --no-fused"):
        train.main(["--data-path", "digits", "--image-size", "4", "--max-steps", "1", "--fused",
                    "--results-dir", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="eqm-sample: error: Triton ops were asked for .* use --no-fused"):
        sample.main(["--data-path", "digits", "--image-size", "4", "--num-fid-samples", "1", "--fused",
                     "--folder", str(tmp_path / "s")])
