"""Inference tasks (eqm.tasks): the Python API against hand computations, and the CLI end to end."""
import json
import os

import numpy as np
import pytest
import torch

from eqm import tasks, train
from eqm.tasks.__main__ import main as tasks_main
from eqm.tasks.sources import SOURCES, load_source
from model_helpers import Bowl, randomize_, tiny_eqm

pytestmark = pytest.mark.usefixtures("one_thread")


def test_denoise_moves_toward_the_data_and_add_noise_interpolates():
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    assert torch.equal(tasks.add_noise(clean, 0.0), clean)
    noisy = tasks.add_noise(clean, 0.5, torch.Generator().manual_seed(1))
    n = torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(noisy, 0.5 * clean + 0.5 * n)
    out = tasks.denoise(Bowl(clean), noisy, steps=11, stepsize=0.2)
    torch.testing.assert_close(out, clean + 0.8 ** 10 * (noisy - clean))
    assert (tasks.psnr(out, clean) > tasks.psnr(noisy, clean) + 15).all()
    with pytest.raises(ValueError, match="noise level"):
        tasks.add_noise(clean, 1.5)


def test_psnr_and_auroc_values():
    ref = torch.zeros(2, 1, 2, 2)
    x = torch.full((2, 1, 2, 2), 0.2)  # mse 0.04, range 2: 10 log10(4 / 0.04) = 20 dB
    torch.testing.assert_close(tasks.psnr(x, ref), torch.full((2,), 20.0))
    assert tasks.auroc([0.1, 0.2], [0.3, 0.9]) == 1.0 and tasks.auroc([0.3, 0.9], [0.1, 0.2]) == 0.0
    assert tasks.auroc([0.1, 0.4], [0.3, 0.9]) == 0.75


def test_inpaint_keeps_known_pixels_and_fills_the_rest():
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    known = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    known[..., :4] = True
    target = clean.clone()
    target[..., 4:] = 0.5  # the field pulls the unknown pixels to 0.5
    out = tasks.inpaint(Bowl(target), clean, known, steps=60, stepsize=0.2, generator=g)
    assert torch.equal(out[..., :4], clean[..., :4])
    torch.testing.assert_close(out[..., 4:], torch.full_like(out[..., 4:], 0.5), atol=1e-4, rtol=0)


def test_ood_scores_by_hand():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4, 8, 8), torch.randint(0, 10, (5,))
    ebm = randomize_(tiny_eqm(ebm="dot"), std=0.1).eval()
    head = ebm._head(x, None, torch.full((5,), 10), False)[0]
    torch.testing.assert_close(tasks.ood_scores(ebm, x, "energy", batch_size=2), -(head * x).flatten(1).sum(1),
                               rtol=1e-4, atol=1e-4)
    implicit = randomize_(tiny_eqm(), std=0.1).train()
    norms = implicit.eval()(x, torch.zeros(5), y).flatten(1).norm(dim=1)
    implicit.train()
    torch.testing.assert_close(tasks.ood_scores(implicit, x, "field-norm", y=y, batch_size=3), norms)
    assert implicit.training  # mode restored
    with pytest.raises(ValueError, match="EqM-E"):
        tasks.ood_scores(implicit, x, "energy")


def test_sources():
    for name in SOURCES:
        x, labels = load_source(name)
        assert x.shape[1:] == (1, 8, 8) and x.min() >= -1 and x.max() <= 1 and x.std() > 0.1, name
        assert (labels is not None) == (name == "digits")
    with pytest.raises(ValueError, match="no such file"):
        load_source("nope.npy")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    common = ["--data-path", "digits", "--model", "EqM-Ti/4", "--image-size", "8", "--global-batch-size", "16",
              "--max-steps", "2", "--sample-every", "0"]
    plain = train.main(common + ["--results-dir", str(out / "a")])["checkpoint"]
    ebm = train.main(common + ["--results-dir", str(out / "b"), "--ebm", "dot"])["checkpoint"]
    torch.set_num_threads(n)
    return plain, ebm


def test_cli_tasks(ckpts, tmp_path, capsys):
    plain, ebm = ckpts
    s = tasks_main(["denoise", "--ckpt", plain, "--out", str(tmp_path / "d"), "--num", "4", "--steps", "3",
                    "--noise-level", "0.2", "0.6", "--conditional"])
    assert set(s["psnr"]) == {"0.2", "0.6"} and os.path.exists(s["grid"])
    assert s["psnr"]["0.2"]["noisy"] > s["psnr"]["0.6"]["noisy"]
    assert json.load(open(tmp_path / "d" / "denoise.json"))["psnr"] == s["psnr"]
    s = tasks_main(["inpaint", "--ckpt", plain, "--out", str(tmp_path / "i"), "--num", "3", "--steps", "3",
                    "--mask", "center", "--sampler", "adam"])
    assert np.isfinite(s["psnr_unknown"]) and os.path.exists(s["grid"])
    s = tasks_main(["compose", "--ckpt", plain, "--out", str(tmp_path / "c"), "--num", "2", "--steps", "3",
                    "--labels", "1", "7", "--weights", "0.5", "0.5"])
    assert s["labels"] == [1, 7] and os.path.exists(s["grid"])
    s = tasks_main(["ood", "--ckpt", ebm, "--out", str(tmp_path / "o"), "--ood", "photo-patches", "inverted-digits"])
    assert s["score"] == "energy" and set(s["auroc"]) == {"photo-patches", "inverted-digits"}
    assert all(0 <= v <= 1 for v in s["auroc"].values())
    scores = np.load(tmp_path / "o" / "ood_scores.npz")
    assert scores["digits"].shape == (1797,) and scores["photo-patches"].shape == (1797,)
    assert tasks_main(["ood", "--ckpt", plain, "--out", str(tmp_path / "o2"), "--ood", "noisy-digits"])["score"] == \
        "field-norm"


@pytest.mark.parametrize("argv,msg", [
    (["denoise", "--noise-level", "1.5"], "argument --noise-level: must be <= 1"),
    (["compose", "--labels", "1", "2", "--weights", "1"], "--weights needs one value per label"),
    (["inpaint", "--stepsize", "-1"], "argument --stepsize: must be > 0"),
    (["inpaint", "--temperature", "-1"], "argument --temperature: must be >= 0"),
])
def test_cli_bad_values(ckpts, tmp_path, capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        tasks_main(argv + ["--ckpt", ckpts[0], "--out", str(tmp_path)])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_cli_energy_score_on_an_implicit_model_is_one_line(ckpts, tmp_path):
    with pytest.raises(SystemExit, match="energy score needs an EqM-E model"):
        tasks_main(["ood", "--ckpt", ckpts[0], "--out", str(tmp_path), "--score", "energy"])
