"""Small EqM models and a tiny digits run for fast CPU tests; a counter of the Triton kernel launches they cause."""
import collections
import contextlib
import importlib

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


# The functions in kernels/ that launch Triton programs (the only places a Triton kernel starts).
_LAUNCHERS = {"adaln": ("_launch_forward", "_launch_backward"), "attention": ("_launch_forward", "_launch_backward"),
              "eqm_loss": ("_launch_loss_forward", "_launch_loss_backward", "_launch_interpolate")}


@contextlib.contextmanager
def count_triton_launches():
    """Counter {"adaln.forward": n, "attention.backward": n, "eqm_loss.loss_forward": n, ...} of the Triton
    launches made inside the block: a test that reads it fails if the ops quietly took a PyTorch path."""
    counts, saved = collections.Counter(), []
    for module_name, names in _LAUNCHERS.items():
        module = importlib.import_module(f"eqm_kernels.{module_name}")
        for name in names:
            real = getattr(module, name)
            key = f"{module_name}.{name.removeprefix('_launch_')}"

            def spy(*args, _real=real, _key=key, **kwargs):
                counts[_key] += 1
                return _real(*args, **kwargs)
            saved.append((module, name, real))
            setattr(module, name, spy)
    try:
        yield counts
    finally:
        for module, name, real in saved:
            setattr(module, name, real)


def train_tiny_digits(out, max_steps, *extra):
    """eqm-train on digits at its smallest (EqM-Ti/4, 8x8, batch 16, no grids), one thread; train.main's summary."""
    from eqm import train

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train.main(["--data-path", "digits", "--model", "EqM-Ti/4", "--image-size", "8", "--global-batch-size",
                           "16", "--max-steps", str(max_steps), "--sample-every", "0", "--results-dir", str(out),
                           *extra])
    finally:
        torch.set_num_threads(n)


def labelled_noise(n, seed, shape=(4, 8, 8), num_classes=10):
    """A seeded batch for tiny_eqm: (x (n, *shape) standard normal, y (n,) labels)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def batches_through(fn):
    """A stand-in for eqm.data.make_source whose loaders yield fn(x, y) for each batch (x, y) of the real ones
    (their sampler, epochs and resume position untouched)."""
    from eqm import data

    make = data.make_source

    def make_source(*a, **k):
        source = make(*a, **k)
        make_loader = source.loader

        def loader(*a, **k):
            loader = make_loader(*a, **k)
            inner = type(loader).__iter__

            class Mapped(type(loader)):
                def __iter__(self):
                    for x, y in inner(self):
                        yield fn(x, y)
            loader.__class__ = Mapped
            return loader
        source.loader = loader
        return source
    return make_source
