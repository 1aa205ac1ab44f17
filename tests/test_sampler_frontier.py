"""bench/sampler_frontier.py on a 2-step digits model with tiny settings: every part runs and writes its files."""
import json
import os

import pytest

from eqm import train

from eqm_bench import sampler_frontier


def test_sampler_frontier_writes_every_part(tmp_path, one_thread):
    pytest.importorskip("torchdiffeq")
    ckpt = train.main(["--data-path", "digits", "--model", "EqM-Ti/4", "--image-size", "8", "--global-batch-size",
                       "16", "--max-steps", "2", "--sample-every", "0",
                       "--results-dir", str(tmp_path / "t")])["checkpoint"]
    out = tmp_path / "o"
    r = sampler_frontier.main(["--ckpt", ckpt, "--out", str(out), "--n", "12", "--budgets", "2", "4",
                               "--dopri5-tols", "0.5", "--noise-levels", "0.5", "--denoise-steps", "2",
                               "--pairs", "0", "6", "--compose-steps", "3", "--ood", "photo-patches"])
    rows = r["frontier"]
    samplers = {row["sampler"] for row in rows}
    assert samplers == {"gd", "gd cosine", "ngd", "adam cosine", "langevin", "ode euler", "ode heun", "ode rk4",
                        "ode dopri5"}
    fixed = [row for row in rows if row["adaptive"] is None and row["sampler"] == "ode rk4"]
    assert sorted(row["nfe"] for row in fixed) == [4.0, 4.0]  # rk4 needs 4 evaluations: one step per budget
    assert all(row["nfe"] <= 4 for row in rows if row["adaptive"] is not None and row["sampler"] != "ode dopri5")
    assert all(0 <= row["accuracy"] <= 1 and row["fd"] >= 0 for row in rows)
    assert 0 <= r["ood"]["auroc"]["photo-patches"] <= 1
    assert r["denoise"]["rows"][0]["noise_level"] == 0.5
    for name in ("frontier.png", "denoise.png", "compose.png", "results.json"):
        assert os.path.getsize(out / name) > 100, name
    assert json.load(open(out / "results.json"))["n"] == 12
