"""Digits sample quality beyond accuracy: a Frechet distance on the real-digits classifier's features.

Wraps eqm.digits_eval (its SVC, fit on real digits): the features are the SVC's 10 one-vs-rest decision values.
"""
import numpy as np

from eqm import digits_eval


def features(images):
    """(N, 10) decision values of the real-digits classifier (images as digits_eval.to_features accepts)."""
    return digits_eval.classifier()[0].decision_function(digits_eval.to_features(images))


def frechet_distance(a, b):
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fit to the rows of a and b."""
    from scipy import linalg

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def real_features():
    """Features of all 1797 real digits (the reference set of the distance)."""
    from eqm.datasets import load_digits_tensor

    return features(load_digits_tensor()[0])


def quality(images, labels, reference=None):
    """{"accuracy": class accuracy of images drawn for labels, "fd": Frechet distance to the real digits}."""
    ref = real_features() if reference is None else reference
    return {"accuracy": digits_eval.class_accuracy(images, labels), "fd": frechet_distance(features(images), ref)}
