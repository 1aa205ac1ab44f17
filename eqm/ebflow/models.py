"""Reference EBFlow models: the FC flow (FC -> SmoothLeakyReLU -> FC), the CNN flow (blocks of k x k
convolutions and residual smooth leaky ReLUs with squeezes) and a coupling flow for 2-D data."""
import math

from .flow import Flow
from .layers import (ActNorm, AffineCoupling, Convolution, FullyConnected, LogitTransform,
                     SmoothLeakyReLU, Squeeze)


def _shape(shape):
    return (shape,) if isinstance(shape, int) else tuple(shape)


def fc_flow(shape, alpha=0.3, logit=False):
    """FC(D) -> SmoothLeakyReLU(alpha) -> FC(D) over the flattened input; W = -I, b = 1 at init.
    `logit=True` puts the MaP logit inside the model (inputs in [0, 1])."""
    shape = _shape(shape)
    d = math.prod(shape)
    layers = [LogitTransform()] if logit else []
    layers += [FullyConnected(d), SmoothLeakyReLU(alpha), FullyConnected(d)]
    return Flow(layers, shape)


def cnn_flow(shape, blocks=3, convs_per_block=2, kernel_size=7, alpha=0.3, logit=False):
    """`blocks` blocks of `convs_per_block` x [Conv k x k + residual SmoothLeakyReLU], squeeze between
    blocks; Dirac init times -1."""
    shape = _shape(shape)
    if len(shape) != 3:
        raise ValueError(f"cnn_flow needs image data of shape (C, H, W), got {shape}; use --arch fc or coupling")
    c, h, w = shape
    f = 2 ** (blocks - 1)
    if h % f or w % f:
        raise ValueError(f"cnn_flow with {blocks} blocks squeezes {blocks - 1} times, so H and W must be "
                         f"divisible by {f}; got {h}x{w}")
    layers = [LogitTransform()] if logit else []
    cur = shape
    for b in range(blocks):
        for _ in range(convs_per_block):
            layers += [Convolution(cur, kernel_size), SmoothLeakyReLU(alpha, residual=True)]
        if b < blocks - 1:
            layers.append(Squeeze())
            cur = (cur[0] * 4, cur[1] // 2, cur[2] // 2)
    return Flow(layers, shape)


def coupling_flow(shape=2, n_layers=6, hidden=64, logit=False):
    """RealNVP-style flow: n_layers x [ActNorm, FullyConnected (identity init), AffineCoupling]."""
    shape = _shape(shape)
    d = math.prod(shape)
    layers = [LogitTransform()] if logit else []
    for i in range(n_layers):
        layers += [ActNorm(shape[0]), FullyConnected(d, init_scale=1.0, bias=0.0),
                   AffineCoupling(d, hidden=hidden, parity=i % 2)]
    return Flow(layers, shape)


ARCHS = {"fc": fc_flow, "cnn": cnn_flow, "coupling": coupling_flow}


def build_flow(arch, shape, **kwargs):
    """Build `arch` ('fc' | 'cnn' | 'coupling') for inputs of event shape `shape`."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[arch](shape, **kwargs)
