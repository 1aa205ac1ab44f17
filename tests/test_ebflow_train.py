"""EBFlow training: each objective lowers the test NLL on a 2-D toy set; the CLI runs end to end."""
import csv
import os

import pytest
import torch
from PIL import Image

from eqm.ebflow import train
from eqm.ebflow.data import load_data, toy_2d
from eqm.ebflow.losses import compute_loss
from eqm.ebflow.models import fc_flow


@pytest.mark.parametrize("loss", ["ml", "ssm", "dsm", "fdssm", "sml", "sf"])
def test_training_lowers_test_nll(loss, one_thread):
    torch.manual_seed(0)
    xtr, xte = toy_2d("sine", 4000, seed=0), toy_2d("sine", 1000, seed=1)
    flow = fc_flow(2)
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    with torch.no_grad():
        before = -flow.log_prob(xte).mean().item()
    for _ in range(300):
        x = xtr[torch.randint(0, len(xtr), (128,))]
        loss_value = compute_loss(flow, x, loss, sigma=0.1, eps=0.1)
        opt.zero_grad()
        loss_value.backward()
        opt.step()
    with torch.no_grad():
        after = -flow.log_prob(xte).mean().item()
    assert after < before - 0.4, f"{loss}: test NLL {before:.3f} -> {after:.3f}"


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cli_end_to_end_2d(tmp_path, one_thread, capsys):
    out = tmp_path / "run"
    s = train.main(["--data", "sine", "--arch", "fc", "--loss", "ssm", "--steps", "6", "--eval-every", "3",
                    "--batch-size", "32", "--n-train", "500", "--n-test", "200", "--out", str(out)])
    rows = _read_csv(out / "log.csv")
    assert [r["step"] for r in rows] == ["0", "1", "2", "3", "4", "5", "6"]
    assert [r["test_nll_nats"] != "" for r in rows] == [True, False, False, True, False, False, True]
    assert s["final_nll"] == pytest.approx(float(rows[-1]["test_nll_nats"]), abs=1e-5)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and set(ckpt) >= {"model", "ema", "opt", "args"}
    assert Image.open(out / "samples.png").size[0] > 100
    assert not any(p.endswith(".tmp") for p in os.listdir(out))
    assert "test NLL" in capsys.readouterr().out
    # resume continues from the checkpoint and appends to the same log
    train.main(["--data", "sine", "--arch", "fc", "--loss", "ssm", "--steps", "8", "--eval-every", "4",
                "--batch-size", "32", "--n-train", "500", "--n-test", "200", "--out", str(out),
                "--resume", str(out / "ckpt.pt")])
    assert [r["step"] for r in _read_csv(out / "log.csv")][-2:] == ["7", "8"]


@pytest.mark.parametrize("arch,map_,loss", [("fc", "outside", "fdssm"), ("cnn", "outside", "dsm"),
                                           ("fc", "inside", "ml")])
def test_cli_end_to_end_digits(tmp_path, one_thread, arch, map_, loss):
    out = tmp_path / arch
    s = train.main(["--data", "digits", "--arch", arch, "--loss", loss, "--steps", "3", "--eval-every", "3",
                    "--batch-size", "16", "--map", map_, "--out", str(out)])
    assert s["skipped_steps"] == 0
    assert s["final_bpd"] is not None and 0 < s["final_bpd"] < float("inf")
    d = 64
    assert s["final_nll"] == pytest.approx(s["final_bpd"] * d * torch.log(torch.tensor(2.0)).item(), rel=1e-4)
    assert Image.open(out / "samples.png").size[0] > 100


def test_npy_data_and_clear_errors(tmp_path):
    a = torch.randint(0, 256, (30, 4, 4, 3), dtype=torch.uint8).numpy()
    import numpy as np
    np.save(tmp_path / "x.npy", a)
    d = load_data(str(tmp_path / "x.npy"))
    assert d.shape == (3, 4, 4) and d.n_bins == 256 and len(d.train) + len(d.test) == 30
    np.save(tmp_path / "bad.npy", a.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="8-bit integer"):
        load_data(str(tmp_path / "bad.npy"))
    with pytest.raises(ValueError, match="unknown data 'moons'"):
        load_data("moons")
    with pytest.raises(SystemExit):
        train.parse_args(["--loss", "nope"])
    with pytest.raises(SystemExit, match=r"\(C, H, W\)"):
        train.main(["--data", "sine", "--arch", "cnn", "--steps", "1", "--out", str(tmp_path / "e")])


def test_image_folder_data(tmp_path):
    import numpy as np
    for i in range(12):
        Image.fromarray(np.full((6, 4, 3), 20 * i, dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    d = load_data(str(tmp_path))
    assert d.shape == (3, 6, 4) and d.n_bins == 256 and len(d.train) == 11
    assert sorted(torch.cat([d.train, d.test])[:, 0, 0, 0].tolist()) == [20 * i for i in range(12)]
    Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(ValueError, match="different sizes"):
        load_data(str(tmp_path))


def test_ema_of_a_short_run_keeps_the_improvement(tmp_path, one_thread):
    common = ["--data", "8gaussians", "--arch", "coupling", "--n-layers", "2", "--loss", "ml", "--steps", "300",
              "--eval-every", "300", "--n-train", "4000", "--n-test", "1000", "--seed", "0"]
    raw = train.main(common + ["--ema", "0", "--out", str(tmp_path / "raw")])
    averaged = train.main(common + ["--ema", "0.999", "--out", str(tmp_path / "ema")])
    gain = raw["initial_nll"] - raw["final_nll"]
    assert gain > 0.3, raw
    # without warm-up, 0.999 ** 300 = 74% of the EMA would still be the initial weights
    assert averaged["initial_nll"] - averaged["final_nll"] > 0.7 * gain, (raw, averaged)


def test_default_lr_depends_on_the_loss():
    assert train.parse_args(["--loss", "ml"]).lr == 1e-3 and train.parse_args(["--loss", "sml"]).lr == 1e-3
    assert all(train.parse_args(["--loss", name]).lr == 1e-4 for name in ("ssm", "dsm", "fdssm", "exact_sm", "sf"))
    assert train.parse_args(["--loss", "dsm", "--lr", "3e-3"]).lr == 3e-3
