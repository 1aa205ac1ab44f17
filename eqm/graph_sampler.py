"""Compatibility names: the compiled / CUDA-graph sampling loop is eqm.sampling.Engine with compile=True."""
from eqm.sampling import Engine, sample


def GraphSampler(model, shape, device, *, compile=True, **kw):
    """eqm.sampling.Engine, compiled by default (the former static-buffer sampler)."""
    return Engine(model, shape, device, compile=compile, **kw)


def sample_fast(model, x, y, *, compile=True, **kw):
    """eqm.sampling.sample, compiled by default (cached per model and setting)."""
    return sample(model, x, y, compile=compile, **kw)
