"""Triton kernels for the EqM hot path, each beside its plain-PyTorch reference (kernels/reference.py).

Every op is a torch.library custom op (traceable by torch.compile(fullgraph=True)). CUDA tensors run
the compiled Triton kernel; CPU tensors run the reference, or the Triton kernel through the
interpreter when TRITON_INTERPRET=1 was set before import. Backward passes run Triton kernels; under
create_graph=True they switch to differentiable torch ops, so eager double backward works. torch.func
transforms (grad, vmap) cannot see through custom ops: inside them the public functions call the
references instead (detected automatically, or forced with `reference_ops()`).
The references import no Triton; the Triton ops are only defined where Triton is installed (Linux), so
`import eqm_kernels` and the model's reference path work everywhere (eqm.execution says why Triton cannot run).
"""
import hashlib
import importlib.util
import pathlib

import torch

from .reference import (adaln_modulate_reference, attention_reference, eqm_interpolate_reference,
                        eqm_loss_reference, eqm_target_scale_reference, gated_residual_adaln_reference)

HAS_TRITON = importlib.util.find_spec("triton") is not None  # the Triton ops exist only where Triton is installed
if HAS_TRITON:
    from .adaln import adaln_modulate, gated_residual_adaln
    from .attention import attention
    from .eqm_loss import eqm_interpolate, eqm_loss
    from ._dispatch import INTERPRET, reference_ops



def _tag_compile_caches():
    """Put a hash of this package's source into torch.compile's cache keys (torch.compiler.config.cache_key_tag,
    appended to any tag already set). torch's FX-graph and AOT-autograd caches key a compiled graph by the graph,
    not by the Python of the custom ops' autograd (setup_context, backward) it calls: after these kernels change,
    a warm cache would replay the old saved-tensor layout and give wrong gradients."""
    source = hashlib.sha256()
    for path in sorted(pathlib.Path(__file__).parent.glob("*.py")):
        source.update(path.name.encode() + path.read_bytes())
    tag = f"eqm_kernels-{source.hexdigest()[:16]}"
    config = torch.compiler.config
    if tag not in config.cache_key_tag:
        config.cache_key_tag = f"{config.cache_key_tag}|{tag}" if config.cache_key_tag else tag


_tag_compile_caches()

__all__ = ["adaln_modulate_reference", "gated_residual_adaln_reference", "attention_reference", "eqm_loss_reference",
           "eqm_interpolate_reference", "eqm_target_scale_reference"]
if HAS_TRITON:
    __all__ += ["adaln_modulate", "gated_residual_adaln", "attention", "eqm_loss", "eqm_interpolate", "reference_ops",
                "INTERPRET"]
