"""The published EqM model itself as the oracle: same weights, same numbers, same return structures.

Needs a checkout of github.com/raywang4/EqM: set EQM_PUBLISHED_REPO=/path/to/EqM (skipped otherwise; its
code is never copied here). eqm.published imports it, with stand-ins for timm's layers where timm is missing.
"""
import contextlib
import itertools
import sys
import os

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from eqm.models import EqM, EqM_models
from eqm.published import import_published

REPO = os.environ.get("EQM_PUBLISHED_REPO")
pytestmark = pytest.mark.skipif(not REPO, reason="set EQM_PUBLISHED_REPO to a checkout of raywang4/EqM")


@pytest.fixture(scope="module")
def published():
    """The published models.py (timm's three layers stood in for where timm does not import)."""
    had_timm = "timm" in sys.modules
    models, _, _ = import_published(REPO)
    assert ("timm" in sys.modules) == had_timm  # no stand-in left behind (diffusers probes for timm)
    return models


def _pair(published, name, **kw):
    torch.manual_seed(0)
    theirs = published.EqM_models[name](**kw)
    with torch.no_grad():  # random everything, so no zero-initialised layer hides a difference
        for p in theirs.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    ours = EqM_models[name](**kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs.eval(), ours.eval()


def _close(a, b):
    if isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for u, v in zip(a, b):
            _close(u, v)
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape
        err = (a.double() - b.double()).abs().max() / a.double().abs().max().clamp_min(1e-30)
        assert err <= 1e-6, f"relative error {err:.2e}"
    elif isinstance(a, (int, float)) and torch.is_tensor(b):  # ebm="none": published -E is the int 0
        assert (b == a).all()  # intended difference: a zero tensor (N,), so .cpu() / .tolist() work
    else:
        assert a == b


def test_registry_and_signatures_match(published):
    import inspect
    assert list(published.EqM_models) == [n for n in EqM_models if not n.startswith("EqM-Ti")]
    for meth in ("forward", "forward_with_cfg", "unpatchify", "initialize_weights", "__init__"):
        theirs = list(inspect.signature(getattr(published.EqM, meth)).parameters)
        ours = list(inspect.signature(getattr(EqM, meth)).parameters)
        assert ours[: len(theirs)] == theirs, (meth, theirs, ours)


def test_module_level_names_match(published):
    import inspect

    import eqm.models as ours
    public = [n for n, v in vars(published).items() if not n.startswith("_") and getattr(v, "__module__", None)
              == published.__name__]
    missing = [n for n in public if not hasattr(ours, n)]
    assert not missing, missing
    for n in public:
        theirs, mine = getattr(published, n), getattr(ours, n)
        if inspect.isfunction(theirs) or inspect.isclass(theirs):
            a, b = list(inspect.signature(theirs).parameters), list(inspect.signature(mine).parameters)
            a = [p for p in a if p != "block_kwargs"]  # SiTBlock's unused **block_kwargs
            assert b[: len(a)] == a, (n, a, b)
    assert {"EqM", "SiTBlock", "modulate", "EqM_XL_2", "get_2d_sincos_pos_embed_from_grid"} <= set(public)
    for grid in (1, 4, 16):
        for dim in (16, 384):
            np.testing.assert_array_equal(ours.get_2d_sincos_pos_embed(dim, grid, True, 1),
                                          published.get_2d_sincos_pos_embed(dim, grid, True, 1))


@pytest.mark.parametrize("ebm", ["none", "dot", "l2", "mean"])
@pytest.mark.parametrize("in_channels,learn_sigma", [(4, True), (3, False), (1, True), (2, False)])
def test_same_numbers_every_call(published, ebm, in_channels, learn_sigma):
    kw = dict(input_size=8, in_channels=in_channels, num_classes=10, learn_sigma=learn_sigma, ebm=ebm)
    theirs, ours = _pair(published, "EqM-S/4", **kw)
    x, y, t = torch.randn(4, in_channels, 8, 8), torch.tensor([1, 2, 10, 10]), torch.rand(4)
    for return_act, get_energy, train in itertools.product((False, True), repeat=3):
        call = dict(return_act=return_act, get_energy=get_energy, train=train)
        cfg_call = call if not (return_act and get_energy) else dict(call, return_act=False)  # a published bug
        # EqM-E with train=True needs the double backward, which the published train.py gets from SDPA's
        # math backend (set for --ebm); on CPU its default backend has no double backward.
        math_only = train and ebm != "none"
        with sdpa_kernel(SDPBackend.MATH) if math_only else contextlib.nullcontext():
            _close(theirs(x.clone(), t, y, **call), ours(x, t, y, **call))
            _close(theirs.forward_with_cfg(x.clone(), t, y, 1.7, **cfg_call),
                   ours.forward_with_cfg(x, t, y, 1.7, **cfg_call))
