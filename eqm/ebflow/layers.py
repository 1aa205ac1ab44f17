"""Invertible layers for energy-based normalizing flows.

Every layer maps x -> (y, logdet) with logdet = log|det dy/dx| per sample (shape (N,)) and has an exact
`inverse`. Linear layers (`is_linear = True`) also expose `apply(x)` (the map alone) and
`log_abs_det(shape)` (the x-independent log-determinant), so a flow can leave the determinant out of the
energy. Shapes are event shapes without the batch dimension.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class FlowLayer(nn.Module):
    """Base class: forward(x) -> (y, logdet), inverse(y) -> x."""

    is_linear = False

    def out_shape(self, shape):
        """Event shape of the output for an input of event shape `shape`."""
        return tuple(shape)

    def inverse(self, y):
        raise NotImplementedError


class LinearFlowLayer(FlowLayer):
    """A layer y = A x + b whose log|det A| does not depend on x."""

    is_linear = True

    def apply(self, x):
        raise NotImplementedError

    def log_abs_det(self, shape):
        """log|det A| for inputs of event shape `shape` (scalar tensor)."""
        raise NotImplementedError

    def forward(self, x):
        return self.apply(x), self.log_abs_det(tuple(x.shape[1:])).expand(x.shape[0])


# ----------------------------------------------------------------------------------------------------
# Linear layers
# ----------------------------------------------------------------------------------------------------

class FullyConnected(LinearFlowLayer):
    """Dense y = W x + b on the flattened input (any D x D weight). Init: `init_scale * I`, bias `bias`."""

    def __init__(self, dim, init_scale=-1.0, bias=1.0):
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(init_scale * torch.eye(dim))
        self.bias = nn.Parameter(torch.full((dim,), float(bias)))

    def _check(self, x):
        d = math.prod(x.shape[1:])
        if d != self.dim:
            raise ValueError(f"FullyConnected(dim={self.dim}) got inputs of shape {tuple(x.shape[1:])} "
                             f"({d} values); build the flow with dim={d}")

    def apply(self, x):
        self._check(x)
        return F.linear(x.flatten(1), self.weight, self.bias).view_as(x)

    def log_abs_det(self, shape):
        return torch.linalg.slogdet(self.weight)[1]

    def inverse(self, y):
        self._check(y)
        x = torch.linalg.solve(self.weight, (y.flatten(1) - self.bias).T).T
        return x.reshape(y.shape)


class Convolution(LinearFlowLayer):
    """k x k 'same' convolution, a linear map on the C*H*W values of an image of fixed shape (C, H, W).

    The log-determinant and the inverse go through the equivalent (CHW x CHW) matrix, built only when
    asked by applying the convolution to the identity basis.
    """

    def __init__(self, shape, kernel_size=3, init_scale=-1.0, bias=True):
        super().__init__()
        if len(shape) != 3:
            raise ValueError(f"Convolution needs an image shape (C, H, W), got {tuple(shape)}")
        if kernel_size % 2 != 1:
            raise ValueError(f"Convolution kernel_size must be odd for 'same' padding, got {kernel_size}")
        self.shape = tuple(shape)
        c = shape[0]
        w = torch.zeros(c, c, kernel_size, kernel_size)
        nn.init.dirac_(w)
        self.weight = nn.Parameter(init_scale * w)
        self.bias = nn.Parameter(torch.zeros(c)) if bias else None
        self.padding = kernel_size // 2

    def _check(self, x):
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"Convolution built for images of shape {self.shape} got {tuple(x.shape[1:])}")

    def apply(self, x):
        self._check(x)
        return F.conv2d(x, self.weight, self.bias, padding=self.padding)

    def matrix(self):
        """The (CHW x CHW) matrix M with conv(x) = M x.flatten() (bias excluded)."""
        d = math.prod(self.shape)
        basis = torch.eye(d, dtype=self.weight.dtype, device=self.weight.device).view(d, *self.shape)
        return F.conv2d(basis, self.weight, padding=self.padding).view(d, d).T

    def log_abs_det(self, shape):
        return torch.linalg.slogdet(self.matrix())[1]

    def inverse(self, y):
        self._check(y)
        if self.bias is not None:
            y = y - self.bias.view(-1, 1, 1)
        return torch.linalg.solve(self.matrix(), y.flatten(1).T).T.reshape(y.shape)


class Conv1x1(LinearFlowLayer):
    """1x1 convolution (channel mixing) with a C x C weight; log|det| = H * W * log|det W|."""

    def __init__(self, channels, init="orthogonal"):
        super().__init__()
        w = torch.linalg.qr(torch.randn(channels, channels))[0] if init == "orthogonal" else torch.eye(channels)
        self.weight = nn.Parameter(w)

    def apply(self, x):
        return torch.einsum("ij,nj...->ni...", self.weight, x)

    def log_abs_det(self, shape):
        return math.prod(shape[1:]) * torch.linalg.slogdet(self.weight)[1]

    def inverse(self, y):
        return torch.einsum("ij,nj...->ni...", torch.linalg.inv(self.weight), y)


# ----------------------------------------------------------------------------------------------------
# Nonlinear layers (their log-det depends on x and stays in the energy)
# ----------------------------------------------------------------------------------------------------

def _sum_per_sample(t):
    return t.flatten(1).sum(1)


class SmoothLeakyReLU(FlowLayer):
    """y = a x + (1 - a) softplus(x) (+ x if residual); dy/dx = a + (1 - a) sigmoid(x) (+ 1)."""

    def __init__(self, alpha=0.3, residual=False):
        super().__init__()
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"SmoothLeakyReLU alpha must be in (0, 1], got {alpha}")
        self.alpha, self.residual = alpha, residual

    def _f(self, x):
        return self.alpha * x + (1 - self.alpha) * F.softplus(x) + (x if self.residual else 0)

    def _df(self, x):
        return self.alpha + (1 - self.alpha) * torch.sigmoid(x) + (1.0 if self.residual else 0.0)

    def forward(self, x):
        return self._f(x), _sum_per_sample(torch.log(self._df(x)))

    @torch.no_grad()
    def inverse(self, y, iters=100):
        # f is convex and increasing, and f(x) >= (a + r) x, so Newton started at y / (a + r) (right of the
        # root) decreases monotonically to it.
        y64 = y.double()
        x = y64 / (self.alpha + float(self.residual))
        for _ in range(iters):
            step = (self._f(x) - y64) / self._df(x)
            x = x - step
            if step.abs().max() < 1e-13:
                break
        return x.to(y.dtype)


class LogitTransform(FlowLayer):
    """x in (0, 1) -> logit(alpha + (1 - 2 alpha) x): the MaP preprocessing as a layer."""

    def __init__(self, alpha=1e-6):
        super().__init__()
        self.alpha = alpha

    def forward(self, x):
        p = self.alpha + (1 - 2 * self.alpha) * x
        y = torch.log(p) - torch.log1p(-p)
        return y, _sum_per_sample(math.log(1 - 2 * self.alpha) - torch.log(p) - torch.log1p(-p))

    def inverse(self, y):
        return (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)


class ActNorm(FlowLayer):
    """Per-channel (dim 1) y = (x + loc) * exp(log_scale), initialised from the first batch it sees."""

    def __init__(self, channels):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))

    def _view(self, t, x):
        return t.view(1, -1, *([1] * (x.dim() - 2)))

    @torch.no_grad()
    def initialize(self, x):
        """Set loc/scale so this batch leaves the layer with zero mean and unit variance per channel."""
        dims = [d for d in range(x.dim()) if d != 1]
        self.loc.copy_(-x.mean(dims))
        self.log_scale.copy_(-torch.log(x.std(dims) + 1e-6))
        self.initialized.fill_(True)

    def forward(self, x):
        if not self.initialized and self.training:
            self.initialize(x.detach())
        y = (x + self._view(self.loc, x)) * self._view(self.log_scale, x).exp()
        spatial = math.prod(x.shape[2:])
        return y, (spatial * self.log_scale.sum()).expand(x.shape[0])

    def inverse(self, y):
        return y * self._view(-self.log_scale, y).exp() - self._view(self.loc, y)


class AffineCoupling(FlowLayer):
    """RealNVP coupling on the flattened input: half the values (by index parity) set a scale and shift
    for the other half through an MLP; y_b = x_b * exp(s) + t, s = tanh-bounded."""

    def __init__(self, dim, hidden=64, parity=0, layers=2):
        super().__init__()
        if dim < 2:
            raise ValueError(f"AffineCoupling needs at least 2 values per sample, got dim={dim}")
        mask = (torch.arange(dim) % 2 == parity)
        self.register_buffer("mask", mask)
        n_in, n_out = int(mask.sum()), int((~mask).sum())
        mods, width = [], n_in
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        last = nn.Linear(width, 2 * n_out)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*mods, last)
        self.s_scale = nn.Parameter(torch.ones(n_out))

    def _st(self, xa):
        s, t = self.net(xa).chunk(2, dim=1)
        return self.s_scale * torch.tanh(s), t

    def forward(self, x):
        flat = x.flatten(1)
        s, t = self._st(flat[:, self.mask])
        y = flat.clone()
        y[:, ~self.mask] = flat[:, ~self.mask] * s.exp() + t
        return y.view_as(x), s.sum(1)

    def inverse(self, y):
        flat = y.flatten(1)
        s, t = self._st(flat[:, self.mask])
        x = flat.clone()
        x[:, ~self.mask] = (flat[:, ~self.mask] - t) * (-s).exp()
        return x.view_as(y)


class Squeeze(FlowLayer):
    """(C, H, W) -> (4C, H/2, W/2) space-to-depth; volume preserving."""

    def out_shape(self, shape):
        c, h, w = self._check(shape)
        return (4 * c, h // 2, w // 2)

    @staticmethod
    def _check(shape):
        if len(shape) != 3 or shape[1] % 2 or shape[2] % 2:
            raise ValueError(f"Squeeze needs an image shape (C, H, W) with even H and W, got {tuple(shape)}")
        return shape

    def forward(self, x):
        n, c, h, w = x.shape
        self._check((c, h, w))
        y = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, 4 * c, h // 2, w // 2)
        return y, x.new_zeros(n)

    def inverse(self, y):
        n, c4, h, w = y.shape
        c = c4 // 4
        return y.view(n, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c, 2 * h, 2 * w)
