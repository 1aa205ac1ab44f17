import math

import numpy as np
import pytest
import torch

from eqm.models import (EqM, EqM_configs, EqM_models, TimestepEmbedder, cfg_combine, create_model,
                        get_2d_sincos_pos_embed)
from eqm.execution import use_execution
from model_helpers import count_triton_launches, randomize_, tiny_eqm

PUBLISHED_COUNTS = {"EqM-XL/2": 675_129_632, "EqM-L/2": 458_102_816, "EqM-B/2": 130_512_416, "EqM-S/2": 32_963_360}


def expected_state_dict_shapes(depth, D, p, C=4, classes=1000, T=256, learn_sigma=True):
    """The published key names and shapes, written out from the SPEC."""
    out_c = 2 * C if learn_sigma else C
    s = {
        "pos_embed": (1, T, D),
        "x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (classes + 1, D),
        "final_layer.linear.weight": (p * p * out_c, D), "final_layer.linear.bias": (p * p * out_c,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        s.update({
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
            b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,),
            b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,),
        })
    return s


@pytest.mark.parametrize("name", list(EqM_models))
def test_registry_keys_shapes_and_counts(name):
    depth, D, heads, p = EqM_configs[name]
    with torch.device("meta"):
        model = EqM_models[name]()
    sd = model.state_dict()
    expected = expected_state_dict_shapes(depth, D, p, T=(32 // p) ** 2)
    assert len(sd) == 12 + 10 * depth
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert model.num_params == sum(math.prod(s) for s in expected.values())
    if name in PUBLISHED_COUNTS:
        assert model.num_params == PUBLISHED_COUNTS[name]
    assert model.num_heads == heads and not model.pos_embed.requires_grad


def test_learn_sigma_false_and_custom_sizes():
    model = tiny_eqm(learn_sigma=False, in_channels=3, num_classes=7, input_size=12)
    sd = model.state_dict()
    assert sd["final_layer.linear.weight"].shape[0] == 2 * 2 * 3
    assert sd["y_embedder.embedding_table.weight"].shape[0] == 8
    assert sd["pos_embed"].shape == (1, 36, 32)
    out = randomize_(model)(torch.randn(2, 3, 12, 12), None, torch.tensor([0, 6]))
    assert out.shape == (2, 3, 12, 12) and out.abs().sum() > 0


def test_no_null_row_without_dropout():
    assert tiny_eqm(class_dropout_prob=0.0).y_embedder.embedding_table.weight.shape[0] == 10


def test_zero_output_at_init():
    torch.manual_seed(0)
    for kw in [{}, {"learn_sigma": False}, {"in_channels": 3, "num_classes": 5}]:
        model = tiny_eqm(**kw)
        x = torch.randn(3, model.in_channels, 8, 8)
        out = model(x, torch.rand(3), torch.tensor([0, 1, 2]))
        assert out.shape == x.shape
        assert torch.equal(out, torch.zeros_like(out))


def test_learn_sigma_uses_first_channels():
    model = randomize_(tiny_eqm()).eval()
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    assert model.final_layer.linear.out_features == 2 * 2 * 8
    # Drop the sigma half of the head by hand: the output must not change.
    out = model(x, None, y)
    with torch.no_grad():
        w = model.final_layer.linear.weight.view(4, 8, 32)  # (p*p, 2C, D), channel fastest
        w[:, 4:] = 0
    assert torch.equal(model(x, None, y), out)
    with torch.no_grad():
        w[:, :4] += 0.1
    assert not torch.allclose(model(x, None, y), out)


def test_unpatchify_layout():
    model = tiny_eqm(learn_sigma=False)
    p, c, h = 2, 4, 4
    tokens = torch.arange(1 * h * h * p * p * c, dtype=torch.float32).reshape(1, h * h, p * p * c)
    img = model.unpatchify(tokens)
    for (i, j, pi, pj, ch) in [(0, 0, 0, 0, 0), (1, 2, 1, 0, 3), (3, 3, 1, 1, 2)]:
        assert img[0, ch, i * p + pi, j * p + pj] == tokens[0, i * h + j, (pi * p + pj) * c + ch]


def test_pos_embed_mae_layout():
    D, grid = 16, 3
    pe = get_2d_sincos_pos_embed(D, grid)
    assert pe.shape == (9, D)
    for tok in range(9):
        row, col = divmod(tok, grid)
        for half, pos in [(0, col), (1, row)]:  # first half encodes the column (w)
            w = 1.0 / 10000 ** (np.arange(4) / 4)
            expect = np.concatenate([np.sin(pos * w), np.cos(pos * w)])
            np.testing.assert_allclose(pe[tok, half * 8:(half + 1) * 8], expect, atol=1e-12)
    model = tiny_eqm()
    np.testing.assert_allclose(model.pos_embed[0].numpy(), get_2d_sincos_pos_embed(32, 4), atol=1e-6)


def test_timestep_embedding_cos_first():
    t = torch.tensor([0.0, 2.0])
    emb = TimestepEmbedder.timestep_embedding(t, 256)
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(emb[0, 128:], torch.zeros(128))
    f = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(2 * f), torch.sin(2 * f)]))


def test_uncond_ignores_t():
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 4])
    model = randomize_(tiny_eqm()).eval()
    assert torch.equal(model(x, torch.rand(2), y), model(x, torch.zeros(2), y))
    model.uncond = False
    assert not torch.allclose(model(x, torch.full((2,), 0.7), y), model(x, torch.zeros(2), y))


def test_label_dropout_only_in_training():
    x, y = torch.randn(4, 4, 8, 8), torch.tensor([1, 2, 3, 4])
    model = randomize_(tiny_eqm(class_dropout_prob=1.0)).eval()  # every label dropped when training
    null = torch.full((4,), 10)
    cond, uncond = model(x, None, y), model(x, None, null)
    assert not torch.allclose(cond, uncond)
    assert torch.equal(model(x, None, y, train=True), cond)  # as published: `train` does not drop labels
    model.train()
    assert torch.equal(model(x, None, y), uncond)


def test_return_act():
    model = randomize_(tiny_eqm())
    out, act = model(torch.randn(2, 4, 8, 8), None, torch.tensor([0, 1]), return_act=True)
    assert out.shape == (2, 4, 8, 8) and len(act) == 2 and act[-1].shape == (2, 16, 32)


def test_forward_with_cfg_three_channel_rule():
    model = randomize_(tiny_eqm()).eval()
    x = torch.randn(2, 4, 8, 8)
    xx, yy = torch.cat([x, torch.randn_like(x)]), torch.tensor([1, 2, 10, 10])  # second half x unused
    cond, uncond = model(x, None, yy[:2]), model(x, None, yy[2:])
    s = 2.5
    out = model.forward_with_cfg(xx, None, yy, s)
    guided = uncond + s * (cond - uncond)
    torch.testing.assert_close(out[:2, :3], guided[:, :3])
    torch.testing.assert_close(out[2:, :3], guided[:, :3])
    torch.testing.assert_close(out[:2, 3:], cond[:, 3:])  # channel 3 keeps the conditional value
    torch.testing.assert_close(out[2:, 3:], uncond[:, 3:])
    out_all = model.forward_with_cfg(xx, None, yy, s, cfg_channels="all")
    torch.testing.assert_close(out_all[:2], guided)


def test_cfg_combine_channel_counts():
    out = torch.randn(4, 2, 2, 2)
    cond, uncond = out[:2], out[2:]
    guided = uncond + 1.5 * (cond - uncond)
    clamped = cfg_combine(out, 1.5, cfg_channels=3)  # the published x[:, :3] slice guides both channels here
    torch.testing.assert_close(clamped, torch.cat([guided, guided]))
    for bad in (0, -1, "some", 1.5):
        with pytest.raises(ValueError, match="cfg_channels"):
            cfg_combine(out, 1.5, cfg_channels=bad)


@pytest.mark.parametrize("ebm", ["none", "dot"])
def test_forward_with_cfg_published_return_structures(ebm):
    model = randomize_(tiny_eqm(in_channels=1, ebm=ebm)).eval()  # one channel: CFG guides it
    x, yy = torch.randn(2, 1, 8, 8), torch.tensor([1, 2, 10, 10])
    xx = torch.cat([x, x])
    cond, uncond = model(x, None, yy[:2]), model(x, None, yy[2:])
    guided = uncond + 2.0 * (cond - uncond)
    out = model.forward_with_cfg(xx, None, yy, 2.0)
    torch.testing.assert_close(out, torch.cat([guided, guided]))
    out_act, act = model.forward_with_cfg(xx, None, yy, 2.0, return_act=True)
    torch.testing.assert_close(out_act, out)
    assert len(act) == model.depth and act[0].shape == (4, model.num_patches, model.hidden_size)
    out_e, score = model.forward_with_cfg(xx, None, yy, 2.0, get_energy=True)
    torch.testing.assert_close(out_e, out)
    _, score_direct = model(xx, None, yy, get_energy=True)
    torch.testing.assert_close(score, score_direct)
    assert score.shape == (4,) and (score.abs().sum() > 0) == (ebm != "none")
    # Positional call of the published sample_gd.py: forward(x, t, y, cfg_scale) with cfg_scale in the
    # return_act slot returns (f, act), which it unpacks with out[0].
    f, _ = model(x, None, yy[:2], 1.0)
    torch.testing.assert_close(f, cond)


def test_triton_switch_matches_reference():
    """use_execution switches the ops at run time: the Triton kernels really launch (counted), give the reference's
    output within tolerance, and switching back gives exactly the reference again."""
    model = randomize_(tiny_eqm(), std=0.1).eval()
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([0, 5])
    with count_triton_launches() as launches:
        ref = model(x, None, y)
        assert sum(launches.values()) == 0 and model.ops == "reference" and not model.fused
        use_execution(model, "triton")
        out = model(x, None, y)
    assert model.ops == "triton" and model.fused  # the compat name reads the same switch
    # depth 2: one adaLN, two fused residual+adaLN per block; one attention per block
    assert launches == {"adaln.forward": 1 + 2 * 2, "attention.forward": 2}
    assert not torch.equal(out, ref)  # other code ran
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    use_execution(model, "reference")
    assert torch.equal(model(x, None, y), ref)
    with pytest.raises(ValueError, match="ops must be one of"):
        use_execution(model, "fused")
    with pytest.raises(AttributeError):
        model.ops = "triton"  # read-only: use_execution is the one setter
    with pytest.raises(AttributeError):
        model.fused = True  # the compat name is read-only too
    assert model.ops == "reference"


@pytest.mark.parametrize("kwargs, x_shape, y, match", [
    ({}, (2, 3, 8, 8), [0, 1], "channels"),
    ({}, (2, 4, 7, 7), [0, 1], "divisible by patch_size"),
    ({}, (2, 4, 16, 16), [0, 1], "input_size=16"),
    ({}, (2, 4, 8), [0, 1], r"\(N, C, H, W\)"),
    ({}, (2, 4, 8, 8), [0, 11], r"\[0, 10\]"),
    ({}, (2, 4, 8, 8), [0], "class labels"),
])
def test_bad_inputs(kwargs, x_shape, y, match):
    model = tiny_eqm(**kwargs)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*x_shape), None, torch.tensor(y))


def test_bad_constructor_and_names():
    with pytest.raises(ValueError, match="EqM-XL/2"):
        create_model("EqM-XXL/2")
    with pytest.raises(ValueError, match="ebm"):
        tiny_eqm(ebm="quadratic")
    with pytest.raises(ValueError, match="num_heads"):
        tiny_eqm(num_heads=5)
    with pytest.raises(ValueError, match="explicit-energy"):
        tiny_eqm().energy(torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8))
    assert isinstance(create_model("EqM-Ti/4", input_size=8, num_classes=3), EqM)


# ---------------------------------------------------------------- EqM-E (explicit energy)

def energy_by_hand(model, x, y):
    head = model._head(x, None, y, False)[0]
    if model.ebm == "l2":
        return -0.5 * head.pow(2).flatten(1).sum(1)
    return (head * x).flatten(1).sum(1)


@pytest.mark.parametrize("ebm", ["dot", "l2", "mean"])
def test_ebm_output_is_grad_of_energy(ebm):
    model = randomize_(tiny_eqm(ebm=ebm)).double().eval()
    x, y = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([1, 2])
    xr = x.clone().requires_grad_(True)
    expected = torch.autograd.grad(energy_by_hand(model, xr, y).sum(), xr)[0]
    assert expected.abs().sum() > 0
    torch.testing.assert_close(model(x, None, y), expected)
    with torch.no_grad():
        out = model(x, None, y)
        field, score = model(x, None, y, get_energy=True)  # published structure: (f, -E)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(field, expected)
    assert not out.requires_grad and score.shape == (2,)
    torch.testing.assert_close(score, -energy_by_hand(model, x, y))


def test_ebm_training_double_backward_matches_finite_difference():
    torch.manual_seed(0)
    model = randomize_(tiny_eqm(ebm="dot", depth=1, hidden_size=16)).double().train()
    x, y = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([1, 2])
    target = torch.randn_like(x)

    def loss_fn():
        torch.manual_seed(1)  # same label dropout each call
        return (model(x, None, y, train=True) - target).pow(2).mean()

    loss = loss_fn()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    w = dict(model.named_parameters())["blocks.0.attn.qkv.weight"]
    assert grads["blocks.0.attn.qkv.weight"].abs().sum() > 0
    direction = torch.randn_like(w)
    eps = 1e-6
    with torch.no_grad():
        w += eps * direction
        lp = loss_fn()
        w -= 2 * eps * direction
        lm = loss_fn()
        w += eps * direction
    fd = (lp - lm) / (2 * eps)
    torch.testing.assert_close((grads["blocks.0.attn.qkv.weight"] * direction).sum(), fd, rtol=1e-5, atol=1e-8)


def test_triton_routes_hot_ops_to_kernels(monkeypatch):
    """Each hot op calls its real kernel (spied, not replaced) the expected number of times, the kernels launch
    Triton, and output and activations match the reference path."""
    import eqm_kernels as kernels

    calls = {"adaln_modulate": 0, "gated_residual_adaln": 0, "attention": 0}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    for name in calls:
        monkeypatch.setattr(kernels, name, spy(name, getattr(kernels, name)))
    model = randomize_(tiny_eqm(depth=3), std=0.1).eval()
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([0, 5])
    ref, act_ref = model(x, None, y, return_act=True)
    assert sum(calls.values()) == 0
    use_execution(model, "triton")
    with count_triton_launches() as launches:
        out, act = model(x, None, y, return_act=True)
    # One adaLN for block 0; every residual add is fused with the adaLN after it (next block / final layer).
    assert calls == {"adaln_modulate": 1, "gated_residual_adaln": 2 * 3, "attention": 3}
    assert launches == {"adaln.forward": 1 + 2 * 3, "attention.forward": 3}
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert len(act) == len(act_ref) == 3
    for a, b in zip(act, act_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

    # EqM-E: its output is a torch.func.grad, which custom ops cannot join: the head never calls kernels/.
    ebm = randomize_(tiny_eqm(depth=3, ebm="dot", fused=True)).eval()
    assert ebm.ops == "triton"
    calls.update(dict.fromkeys(calls, 0))
    with count_triton_launches() as launches:
        ebm(x, None, y, train=True)
        with torch.no_grad():
            ebm(x, None, y)
        ebm(x, None, y, get_energy=True)
    assert sum(calls.values()) == 0 and sum(launches.values()) == 0


def test_execution_resolution(monkeypatch):
    """resolve_execution: one vocabulary, "auto" rules, and Triton where it cannot run is one clear error."""
    import eqm_kernels as kernels
    from eqm import execution as ex

    cpu = ex.resolve_execution("cpu", precision="fp32")
    assert cpu == ex.Execution(ops="reference", compile=False, precision="fp32")
    explicit = ex.resolve_execution("cpu", ops="triton", compile=True, precision="bf16")
    assert explicit == ex.Execution("triton", True, "bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        ex.resolve_execution("cpu", precision="fp16")
    with pytest.raises(ValueError, match="ops must be"):
        ex.resolve_execution("cpu", ops="fused")
    with pytest.raises(ValueError, match="ops must be one of"):
        ex.Execution(ops="cuda")
    assert ex.resolve_ops(True, "cpu") == "triton" and ex.resolve_ops(None, "cpu") == "reference"
    with pytest.raises(ValueError, match="not on meta"):
        ex.resolve_ops("triton", "meta")
    # Without the interpreter a CPU cannot run Triton: an error at resolution, never a quiet reference path.
    monkeypatch.setattr(kernels, "INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ex.resolve_execution("cpu", ops="triton")
    assert ex.resolve_ops("auto", "cpu") == "reference"
    # a model switched without resolution (the compat EqM(fused=True)) refuses to run there, never falls back
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tiny_eqm(fused=True)(torch.randn(1, 4, 8, 8), None, torch.tensor([0]))


def test_flops_per_sample_matches_spec_and_counts():
    with torch.device("meta"):
        xl = EqM_models["EqM-XL/2"]()
    assert abs(xl.flops_per_sample() / 1e9 - 237) < 3  # SPEC: about 237 GFLOP forward per 256px image
    # Cross-check the tiny model against an operation count from torch's FLOP counter.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    model = tiny_eqm().eval()
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):  # counted as matmuls
        model(torch.randn(1, 4, 8, 8), None, torch.tensor([0]))
    assert counter.get_total_flops() == model.flops_per_sample()
