"""The field a sampler descends: f(x) = model(x, t=0, y), with classifier-free guidance."""
import torch

from eqm.models import cfg_combine


def make_field(model, cfg_scale=1.0, cfg_channels=3, null_label=None):
    """field(x, y) -> f(x) for labels y, with classifier-free guidance when cfg_scale != 1.

    CFG doubles the batch with the null label (default model.num_classes), guides the first
    `cfg_channels` channels (3, the published setting, clamped to C, or "all") and keeps the conditional
    prediction on the others. t = 0 is fed to the model (EqM is time-free).
    """
    use_cfg = cfg_scale != 1.0
    if use_cfg and null_label is None:
        null_label = getattr(model, "num_classes", None)
        if null_label is None:
            raise ValueError("CFG needs the null label: pass null_label= or give the model a num_classes")

    def field(x, y):
        if not use_cfg:
            return model(x, torch.zeros(x.shape[0], device=x.device), y)
        xx = torch.cat([x, x], dim=0)
        yy = torch.cat([y, torch.full_like(y, null_label)], dim=0)
        out = model(xx, torch.zeros(xx.shape[0], device=x.device), yy)
        return cfg_combine(out, cfg_scale, cfg_channels)[: x.shape[0]]
    return field


def composed_field(model, labels, weights, cfg_scale=1.0, cfg_channels=3, null_label=None):
    """field(x, y) -> sum_j w_j f(x | labels[j]): several classes composed (y is ignored).

    Each class's field is evaluated (with CFG when cfg_scale != 1) on the whole batch; the weighted sum is
    a field whose minima lie where the classes' energies are jointly low (the paper's composition).
    """
    if len(labels) != len(weights) or not labels:
        raise ValueError(f"composition needs one weight per label, got {len(labels)} labels and {len(weights)} weights")
    base = make_field(model, cfg_scale, cfg_channels, null_label)

    def field(x, y):
        out = 0
        for label, w in zip(labels, weights):
            out = out + w * base(x, torch.full((x.shape[0],), int(label), dtype=torch.long, device=x.device))
        return out
    return field
