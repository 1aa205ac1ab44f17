"""Flow container: an energy without linear log-determinants, and an exact log-density with them.

log p(x) = log N(g(x); 0, I) + sum_nonlinear log|det J_i(x)| + sum_linear log|det W_i|
E(x)     = -log N(g(x); 0, I) - sum_nonlinear log|det J_i(x)|        (so log p = -E - log Z)
"""
import math

import torch
import torch.nn as nn


class Flow(nn.Module):
    """A stack of flow layers over inputs of event shape `shape` with a standard normal base."""

    def __init__(self, layers, shape):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.shape = tuple(shape)
        self.dim = math.prod(self.shape)
        shapes = [self.shape]
        for layer in self.layers:
            shapes.append(layer.out_shape(shapes[-1]))
        self._in_shapes = shapes[:-1]
        self.z_shape = shapes[-1]
        self._logdet_cache = (None, None)

    def _check(self, x):
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"flow expects inputs of shape (N, {', '.join(map(str, self.shape))}), "
                             f"got {tuple(x.shape)}")

    def transform(self, x):
        """z = g(x) and the sum of the nonlinear layers' log-dets (linear log-dets are skipped)."""
        self._check(x)
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            if layer.is_linear:
                x = layer.apply(x)
            else:
                x, ld = layer(x)
                logdet = logdet + ld
        return x, logdet

    def energy(self, x):
        """E(x) per sample: -log p(x) up to the constant log Z = -sum_linear log|det W|."""
        z, logdet = self.transform(x)
        sq = z.flatten(1).pow(2).sum(1)
        return 0.5 * sq + 0.5 * self.dim * math.log(2 * math.pi) - logdet

    def _linear_key(self):
        return tuple((p.data_ptr(), p._version) for layer in self.layers if layer.is_linear
                     for p in layer.parameters())

    def linear_logdet(self):
        """sum_linear log|det W_i| (= -log Z). Cached while the linear weights are unchanged; always
        recomputed (with graph) when gradients are needed."""
        params = [p for layer in self.layers if layer.is_linear for p in layer.parameters()]
        need_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        key = self._linear_key()
        if not need_grad and self._logdet_cache[0] == key:
            return self._logdet_cache[1]
        total = torch.zeros((), device=self._device(), dtype=self._dtype())
        for layer, shape in zip(self.layers, self._in_shapes):
            if layer.is_linear:
                total = total + layer.log_abs_det(shape)
        self._logdet_cache = (key, total.detach())
        return total

    def log_prob(self, x):
        """Exact log p(x) per sample, including every log-determinant."""
        return -self.energy(x) + self.linear_logdet()

    def forward(self, x):
        return self.log_prob(x)

    def score(self, x, create_graph=False):
        """grad_x log p(x) = -grad_x E(x); no determinant is computed."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.energy(x).sum(), x, create_graph=create_graph)
        return -g

    def inverse(self, z):
        """x = g^{-1}(z)."""
        for layer in reversed(self.layers):
            z = layer.inverse(z)
        return z

    @torch.no_grad()
    def sample(self, n, temperature=1.0):
        """n exact samples by inverting the flow on base draws."""
        z = temperature * torch.randn(n, *self.z_shape, device=self._device(), dtype=self._dtype())
        return self.inverse(z)

    def _device(self):
        return next(iter(self.parameters()), torch.empty(0)).device

    def _dtype(self):
        return next(iter(self.parameters()), torch.empty(0)).dtype

    @torch.no_grad()
    def initialize(self, x):
        """Data-dependent init (ActNorm) from a batch: one forward pass in training mode."""
        was = self.training
        self.train()
        self.log_prob(x)
        self.train(was)
