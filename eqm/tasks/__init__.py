"""Inference tasks on a trained EqM (Python API; CLI: python -m eqm.tasks)."""
from eqm.tasks.core import OOD_SCORES, add_noise, auroc, compose, denoise, inpaint, ood_scores, psnr

__all__ = ["add_noise", "denoise", "inpaint", "compose", "ood_scores", "auroc", "psnr", "OOD_SCORES"]
