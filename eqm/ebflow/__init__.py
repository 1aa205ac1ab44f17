"""Energy-based normalizing flows trained with score-matching objectives.

`Flow.energy` leaves out every linear layer's log-determinant, so the score-matching losses in `losses`
cost O(D^2 L) per step; `Flow.log_prob` adds the (cached) determinants back for exact likelihoods.
"""
from .flow import Flow
from .losses import LOSSES, compute_loss
from .models import build_flow, cnn_flow, coupling_flow, fc_flow
from .preprocess import MaP, nll

__all__ = ["Flow", "LOSSES", "compute_loss", "build_flow", "cnn_flow", "coupling_flow", "fc_flow", "MaP", "nll"]
