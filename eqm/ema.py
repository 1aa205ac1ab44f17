"""The exponential moving average of a model's weights, the one used by every trainer (EqM and EBFlow).

One multi-tensor lerp over the trainable parameters per update; buffers (e.g. an EBFlow's cached
statistics) are copied. Works on plain and on FSDP-sharded models (each rank averages its shards).
"""
from copy import deepcopy

import torch


def warmup_decay(decay, step):
    """min(decay, (1 + step) / (10 + step)): a short run's average must not keep a large share of the initial
    weights (0.999 ** 1000 = 37% of them after 1000 steps). The EBFlow trainer uses it."""
    return min(decay, (1 + step) / (10 + step))


class EMA:
    """Exponential moving average of `model`'s trainable parameters (the bare module, not DDP-wrapped).

    ema_model: the module holding the average (default: a copy of model); it is frozen and put in eval mode.
    """

    def __init__(self, model, ema_model=None):
        self.model = ema_model if ema_model is not None else deepcopy(model)
        self.model.requires_grad_(False).eval()
        ema_params = dict(self.model.named_parameters())
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.src = [p for _, p in trainable]
        self.dst = [ema_params[n] for n, _ in trainable]
        ema_buffers = dict(self.model.named_buffers())
        self.buffers = [(ema_buffers[n], b) for n, b in model.named_buffers() if n in ema_buffers]

    @torch.no_grad()
    def update(self, decay):
        """ema <- decay * ema + (1 - decay) * param; buffers copied."""
        if self.dst:
            torch._foreach_lerp_(self.dst, self.src, 1.0 - decay)
        for dst, src in self.buffers:
            dst.copy_(src)
