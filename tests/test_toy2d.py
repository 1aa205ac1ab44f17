"""The 2-D EqM example trains in seconds and its GD samples land on the data."""
import os

import torch

from eqm import toy2d


def test_toy2d_trains_and_samples_onto_the_data(tmp_path, one_thread):
    s = toy2d.main(["--data", "8gaussians", "--steps", "300", "--out", str(tmp_path), "--gif"])
    d = s["mean_distance_to_data"]
    assert d["samples"] < d["start"] / 4, d
    assert os.path.getsize(s["png"]) > 10_000 and os.path.getsize(s["gif"]) > 1_000


def test_potential_field_is_the_gradient():
    torch.manual_seed(0)
    m = toy2d.Potential(width=16)
    x = torch.randn(5, 2, dtype=torch.float64)
    m = m.double()
    eps = 1e-6
    num = torch.stack([(m.net(x + eps * e) - m.net(x - eps * e)).squeeze(-1) / (2 * eps)
                       for e in torch.eye(2, dtype=torch.float64)], 1)
    torch.testing.assert_close(m(x), num, rtol=1e-6, atol=1e-8)
