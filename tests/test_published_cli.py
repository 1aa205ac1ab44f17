"""The published command lines: every flag of train.py and sample_gd.py with its published default, and the
README's commands run with only the script name changed (shrunk to digits so they run on a CPU)."""
import shlex
import sys
import types

import numpy as np
import pytest
import torch

from eqm import sample, train
from eqm.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

# Every flag of the published train.py, with its default (transport flags included).
PUBLISHED_TRAIN = {"data_path": "/data/train", "results_dir": "results", "model": "EqM-XL/2", "image_size": 256,
                   "num_classes": 1000, "epochs": 80, "global_batch_size": 256, "global_seed": 0, "vae": "ema",
                   "num_workers": 4, "log_every": 100, "ckpt_every": 50000, "cfg_scale": 4.0, "wandb": False,
                   "ckpt": None, "disp": False, "uncond": True, "ebm": "none", "path_type": "Linear",
                   "prediction": "velocity", "loss_weight": None, "sample_eps": None, "train_eps": None}
# Every flag of the published sample_gd.py, with its default.
PUBLISHED_SAMPLE = {"model": "EqM-XL/2", "image_size": 256, "num_classes": 1000, "global_batch_size": 256,
                    "global_seed": 0, "vae": "ema", "cfg_scale": 4.0, "ckpt": None, "stepsize": 0.0017,
                    "num_sampling_steps": 250, "folder": "samples", "sampler": "gd", "mu": 0.3,
                    "num_fid_samples": 50000, "uncond": True, "ebm": "none", "path_type": "Linear",
                    "prediction": "velocity", "loss_weight": None, "sample_eps": None, "train_eps": None}

README_TRAIN = [
    "--model EqM-XL/2 --data-path /path/to/imagenet/train",
    "--model EqM-XL/2 --data-path /path/to/imagenet/train --ebm dot",
    "--model EqM-XL/2 --data-path /path/to/imagenet/train --disp --wandb",
    "--model EqM-XL/2 --data-path /path/to/imagenet/train --ckpt /path/to/model.pt",
]
README_SAMPLE = ["--model EqM-XL/2 --ckpt /path/to/model.pt",
                 "--model EqM-XL/2 --num-fid-samples 50000 --ckpt /path/to/model.pt"]


def test_every_published_train_flag_with_its_default():
    parser = train.get_parser()
    args = train.resolve_args(parser.parse_args(["--data-path", "/data/train"]), parser)
    for name, default in PUBLISHED_TRAIN.items():
        assert getattr(args, name) == default, name


def test_every_published_sample_flag_with_its_default():
    parser = sample.get_parser()
    args = sample.resolve_args(parser.parse_args([]), parser, {})
    for name, default in PUBLISHED_SAMPLE.items():
        assert getattr(args, name) == default, name


@pytest.mark.parametrize("line", README_TRAIN)
def test_readme_train_lines_parse(line):
    parser = train.get_parser()
    args = train.resolve_args(parser.parse_args(shlex.split(line)), parser)
    assert args.model == "EqM-XL/2" and args.input_size == 32


@pytest.mark.parametrize("line", README_SAMPLE)
def test_readme_sample_lines_parse(line):
    parser = sample.get_parser()
    args = sample.resolve_args(parser.parse_args(shlex.split(line)), parser, {})
    assert args.model == "EqM-XL/2" and args.input_size == 32 and args.ckpt == "/path/to/model.pt"


DIGITS = "--model EqM-Ti/4 --data-path digits --image-size 4 --num-workers 0 --global-batch-size 16 " \
         "--max-steps 2 --sample-every 0 --log-every 1"


def test_readme_ebm_dot_and_disp_wandb_run(tmp_path, monkeypatch):
    calls = []
    stub = types.SimpleNamespace(login=lambda **kw: calls.append(("login", kw)),
                                 init=lambda **kw: calls.append(("init", kw)),
                                 log=lambda d, step=None: calls.append(("log", step, sorted(d))))
    monkeypatch.setitem(sys.modules, "wandb", stub)
    monkeypatch.setenv("WANDB_KEY", "key")
    monkeypatch.setenv("ENTITY", "entity name")
    monkeypatch.setenv("PROJECT", "project name")
    s = train.main(shlex.split(DIGITS) + ["--ebm", "dot", "--results-dir", str(tmp_path / "e")])
    assert s["steps"] == 2 and all(np.isfinite(e["loss"]) for e in s["log"])
    assert load_checkpoint(s["checkpoint"])["args"].ebm == "dot"
    s = train.main(shlex.split(DIGITS) + ["--disp", "--wandb", "--results-dir", str(tmp_path / "w")])
    assert calls[0] == ("login", {"key": "key"})
    init = calls[1][1]
    assert init["entity"] == "entity name" and init["project"] == "project name" and init["config"]["disp"] is True
    assert [c[1] for c in calls if c[0] == "log"] == [1, 2]
    assert calls[-1][2] == ["train loss", "train steps/sec"]


def test_readme_sample_line_on_a_published_checkpoint(tmp_path):
    """sample_gd.py's line on a checkpoint in the published layout, its args a Namespace from train.py."""
    from test_published_formats import published_args, published_training
    model, ema, opt = published_training(steps=1)
    path = tmp_path / "0000001.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "args": published_args(image_size=4, vae="none", data_path="digits")}, path)
    # Published flags only; the model options come from the checkpoint's args as before.
    s = sample.main(shlex.split(f"--model EqM-Ti/4 --ckpt {path} --num-fid-samples 3 --num-sampling-steps 3 "
                                f"--global-batch-size 3 --sampler ngd --stepsize 0.01 --mu 0.3 --cfg-scale 1.5 "
                                f"--folder {tmp_path / 'samples'}"))
    arr = np.load(tmp_path / "samples.npz")["arr_0"]
    assert s["npz"] == str(tmp_path / "samples.npz") and arr.shape == (3, 4, 4, 3) and arr.dtype == np.uint8
