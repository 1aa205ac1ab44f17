"""Inference tasks on a trained EqM, beyond generation: denoise, inpaint, compose classes, score OOD inputs.

Each descends the learned landscape with eqm.sampling (any sampler and its options pass through `**kw`).
Inputs are in model space: pixels in [-1, 1] for pixel-space models, scaled VAE latents otherwise.
"""
import numpy as np
import torch

from eqm.sampling import composed_field, sample


def add_noise(x, noise_level, generator=None):
    """The training interpolation at t = 1 - noise_level: (1 - s) x + s n, n ~ N(0, I); s in [0, 1]."""
    if not 0.0 <= noise_level <= 1.0:
        raise ValueError(f"noise level must lie in [0, 1], got {noise_level}")
    n = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return (1 - noise_level) * x + noise_level * n


def denoise(model, x_noisy, y=None, *, steps=50, stepsize=0.01, **kw):
    """Descend from a partially noised input x_noisy (N, C, H, W) (labels y, or None: unconditional)."""
    return sample(model, x_noisy, y, steps=steps, stepsize=stepsize, **kw)


def inpaint(model, x, mask, y=None, *, steps=250, stepsize=0.01, generator=None, **kw):
    """Fill the unknown pixels of x (mask True = known, broadcastable to x): start them from noise and descend
    with the known ones clamped to their values."""
    mask = mask.to(x.device, torch.bool).expand_as(x)
    start = torch.where(mask, x, torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device))
    return sample(model, start, y, steps=steps, stepsize=stepsize, known=(mask, x), **kw)


def compose(model, labels, weights, noise, *, steps=250, stepsize=0.01, cfg_scale=1.0, cfg_channels=3, **kw):
    """Samples of several classes at once: descend sum_j w_j f(x | labels[j]) from the start points `noise`."""
    field = composed_field(model, labels, weights, cfg_scale, cfg_channels)
    return sample(model, noise, None, steps=steps, stepsize=stepsize, field=field, **kw)


OOD_SCORES = ("energy", "field-norm")


@torch.no_grad()
def ood_scores(model, x, score="energy", y=None, batch_size=256):
    """Per-sample OOD score of inputs x (N, C, H, W); higher = less like the training data.

    score "energy": -E from forward(..., get_energy=True) (EqM-E models only; E(x) = sum(f * x) for dot);
    "field-norm": |f(x)| over (C, H, W), for any model (data points are equilibria of the learned field).
    y: labels, or None for the null label (unconditional).
    """
    if score not in OOD_SCORES:
        raise ValueError(f"score must be one of {OOD_SCORES}, got {score!r}")
    if score == "energy" and getattr(model, "ebm", "none") == "none":
        raise ValueError("the energy score needs an EqM-E model (trained with --ebm dot|l2|mean); "
                         "use the field-norm score for implicit models")
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size]
            yb = (torch.full((xb.shape[0],), model.num_classes, dtype=torch.long, device=xb.device) if y is None
                  else y[i:i + batch_size])
            t = torch.zeros(xb.shape[0], device=xb.device)
            if score == "energy":
                out.append(model(xb, t, yb, get_energy=True)[1].float())
            else:
                out.append(model(xb, t, yb).float().flatten(1).norm(dim=1))
    finally:
        model.train(was_training)
    return torch.cat(out)


def auroc(in_scores, out_scores):
    """Area under the ROC curve for telling out-of-distribution (positive, higher score) from in-distribution."""
    from sklearn.metrics import roc_auc_score

    s = np.concatenate([np.asarray(in_scores, dtype=np.float64), np.asarray(out_scores, dtype=np.float64)])
    labels = np.concatenate([np.zeros(len(in_scores)), np.ones(len(out_scores))])
    return float(roc_auc_score(labels, s))


def psnr(x, ref, data_range=2.0):
    """Per-sample PSNR in dB of x against ref (values in [-1, 1]: range 2)."""
    mse = (x.float() - ref.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(data_range ** 2 / mse)
