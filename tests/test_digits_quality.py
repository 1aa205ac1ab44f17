"""Frechet distance on the real-digits classifier's features."""
import numpy as np
import torch

from eqm import digits_quality
from eqm.datasets import load_digits_tensor


def test_frechet_distance_of_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    b = rng.normal(size=(20000, 3)) * 2 + np.array([1.0, 0, 0])
    # |mu|^2 = 1; per dim tr(1 + 4 - 2 * 2) = 1 -> 1 + 3
    assert abs(digits_quality.frechet_distance(a, b) - 4.0) < 0.15
    assert abs(digits_quality.frechet_distance(a, a)) < 1e-6


def test_real_digits_score_well_and_noise_scores_badly():
    x, y = load_digits_tensor()
    ref = digits_quality.real_features()
    real = digits_quality.quality(x[::3], y[::3], ref)
    noise = digits_quality.quality(torch.rand(len(y[::3]), 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1, y[::3], ref)
    assert real["accuracy"] > 0.95 and noise["accuracy"] < 0.3
    assert real["fd"] < 0.1 * noise["fd"]
