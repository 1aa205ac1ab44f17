"""MaP preprocessing (dequantise, scale to [0, 1], squeeze, logit) and NLL bookkeeping for quantised data.

For data with `n_bins` levels (256 for 8-bit), u = (x + U[0,1)) / n_bins has a density on [0,1)^D, and
-log P(x) <= -log p_u(u) + D log n_bins (the discrete NLL under uniform dequantisation). If the model lives
on y = logit(alpha + (1 - 2 alpha) u), then log p_u(u) = log p_y(y) + log|dy/du|.
"""
import math

import torch

from .layers import LogitTransform


class MaP:
    """Maps integer data in [0, n_bins) to logit space; `forward` returns (y, log|dy/du| per sample)."""

    def __init__(self, n_bins=256, alpha=1e-6):
        self.n_bins, self.alpha = n_bins, alpha
        self.logit = LogitTransform(alpha)

    def dequantize(self, x, noise=None):
        """u = (x + noise) / n_bins with noise ~ U[0, 1) unless given."""
        x = x.to(torch.get_default_dtype()) if not x.is_floating_point() else x
        noise = torch.rand_like(x) if noise is None else noise
        return (x + noise) / self.n_bins

    def __call__(self, x, noise=None):
        return self.logit(self.dequantize(x, noise))

    def inverse(self, y):
        """y -> u in [0, 1]."""
        return self.logit.inverse(y).clamp(0, 1)

    def to_int(self, y):
        """y -> integer levels in [0, n_bins)."""
        return (self.inverse(y) * self.n_bins).floor().clamp(0, self.n_bins - 1).long()


def nll(log_p, dim, n_bins=256, logdet=None):
    """Discrete NLL per sample in nats and bits/dim from a model log-density.

    log_p: log density of what the model sees (y in logit space, or u in [0,1) when logdet is None);
    logdet: log|dy/du| from MaP when the model sees y. Returns (nats, bits_per_dim), each shape (N,).
    """
    log_pu = log_p if logdet is None else log_p + logdet
    nats = -log_pu + dim * math.log(n_bins)
    return nats, nats / (dim * math.log(2))
