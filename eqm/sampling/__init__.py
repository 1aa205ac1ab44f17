"""Sampling EqM: one engine (eager, compiled, CUDA graphs) running every sampler; see engine.py."""
from eqm.sampling.engine import Engine, sample
from eqm.sampling.field import composed_field, make_field
from eqm.sampling.samplers import ODE_METHODS, SAMPLERS, SCHEDULES, make_sampler

__all__ = ["Engine", "sample", "make_field", "composed_field", "make_sampler", "SAMPLERS", "SCHEDULES",
           "ODE_METHODS"]
