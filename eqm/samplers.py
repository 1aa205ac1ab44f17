"""Compatibility names: the samplers live in eqm.sampling (one engine for every sampler)."""
from eqm.sampling import SAMPLERS, make_field, sample

__all__ = ["SAMPLERS", "make_field", "sample"]
