"""Equilibrium Matching: models, objective, samplers, training and sampling."""
