"""The published EqM code (github.com/raywang4/EqM) as an outside reference, imported from a checkout.

Its models.py imports timm's PatchEmbed, Attention and Mlp; timm does not import beside this CPU torch
(it needs torchvision), so where it is missing small equivalents of those three layers stand in for it,
written from timm's documented behaviour. The published code is only ever imported from the given path,
never copied into this project.
"""
import importlib.util
import os
import sys
import types

import torch.nn as nn
import torch.nn.functional as F


def timm_stand_in():
    """A module with timm 1.0's PatchEmbed, Attention and Mlp behaviour (fused SDPA attention, no norms)."""

    class PatchEmbed(nn.Module):
        def __init__(self, img_size, patch_size, in_chans, embed_dim, bias=True):
            super().__init__()
            self.num_patches = (img_size // patch_size) ** 2
            self.patch_size = (patch_size, patch_size)
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    class Attention(nn.Module):
        def __init__(self, dim, num_heads=8, qkv_bias=False, **kw):
            super().__init__()
            self.num_heads, self.head_dim = num_heads, dim // num_heads
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            B, N, C = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            x = F.scaled_dot_product_attention(q, k, v)
            return self.proj(x.transpose(1, 2).reshape(B, N, C))

    class Mlp(nn.Module):
        def __init__(self, in_features, hidden_features=None, act_layer=nn.GELU, drop=0.0, **kw):
            super().__init__()
            self.fc1 = nn.Linear(in_features, hidden_features)
            self.act = act_layer()
            self.fc2 = nn.Linear(hidden_features, in_features)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    return types.SimpleNamespace(PatchEmbed=PatchEmbed, Attention=Attention, Mlp=Mlp)


def _load(file, name):
    """Import `file` as module `name` (a package when it is an __init__.py), without touching sys.path."""
    folder = os.path.dirname(file) if file.endswith("__init__.py") else None
    spec = importlib.util.spec_from_file_location(name, file, submodule_search_locations=[folder] if folder else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def import_published(path):
    """(models, transport, note) from a checkout of the published code.

    The files are loaded by path (nothing is added to sys.path); the timm stand-ins are on sys.modules only while
    they load, so nothing else (diffusers probes for timm) sees a stand-in afterwards."""
    if not os.path.isfile(os.path.join(path, "models.py")) or not os.path.isdir(os.path.join(path, "transport")):
        raise FileNotFoundError(f"{path!r} is not a checkout of raywang4/EqM (models.py, transport/)")
    note, stand_ins = "timm", {}
    try:
        import timm.models.vision_transformer  # noqa: F401
    except ImportError:
        vt = types.ModuleType("timm.models.vision_transformer")
        vars(vt).update(vars(timm_stand_in()))
        stand_ins = {"timm": types.ModuleType("timm"), "timm.models": types.ModuleType("timm.models"),
                     "timm.models.vision_transformer": vt}
        note = "timm not importable: stand-ins for PatchEmbed/Attention/Mlp"
    saved = {k: sys.modules.get(k) for k in stand_ins}
    sys.modules.update(stand_ins)
    try:
        models = _load(os.path.join(path, "models.py"), "eqm_published_models")
        transport = _load(os.path.join(path, "transport", "__init__.py"), "eqm_published_transport")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return models, transport, note
