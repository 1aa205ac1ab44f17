"""Small EqM models for fast CPU tests."""
import torch

from eqm.models import EqM


def tiny_eqm(**kwargs):
    """A 2-block, 32-wide EqM on 8x8x4 inputs with 10 classes (about 0.1M parameters)."""
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    cfg.update(kwargs)
    return EqM(**cfg)


def randomize_(model, seed=0, std=0.2):
    """Overwrite every trainable weight with noise so the zero-initialised layers stop hiding bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


class Bowl:
    """A field with a known answer: f(x) = m - x, so descent pulls every input straight to m, and dx/dt = f has
    x(t) = m + exp(-t) (x0 - m); every label shares the centre m."""
    num_classes = 3

    def __init__(self, m):
        self.m = m

    def __call__(self, x, t, y):
        return self.m - x
