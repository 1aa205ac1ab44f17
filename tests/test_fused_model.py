"""EqM with the Triton ops (use_execution(model, "triton")) against the reference path (Triton interpreter on
CPU): fp32, bf16 autocast, EqM-E, compile.

Tolerance rule (as for the kernels): |fused - fp64 reference| <= 2 x |reference - fp64 reference| in the same
dtype + about one ulp of the largest value. The fp64 reference is the same model in float64 (kernels/ take
their reference path for float64).
"""
import copy

import pytest
import torch

from eqm.objective import eqm_training_losses
from eqm_kernels._testing import assert_matches, print_errors
from eqm.execution import use_execution
from model_helpers import count_triton_launches, randomize_, tiny_eqm

# Head dim 16 with two blocks (the cross-block fusion), and head dim 72 (EqM-XL's) with one block.
CONFIGS = {"h32-depth2": dict(hidden_size=32, num_heads=2, depth=2),
           "h72-depth1": dict(hidden_size=72, num_heads=1, depth=1)}
Y = torch.tensor([1, 7])


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    print_errors(request, ("EqM",))


def _models(seed=0, **kwargs):
    """(fused fp32, reference fp32, reference fp64) copies of one randomly initialised tiny EqM."""
    ref = randomize_(tiny_eqm(**kwargs), seed=seed, std=0.1).eval()
    fused = use_execution(copy.deepcopy(ref), "triton")
    return fused, ref, copy.deepcopy(ref).double()


def _forward_backward(model, x, cotangent, autocast=False):
    """Output, input gradient and parameter gradients of sum(model(x) * cotangent)."""
    dtype = next(model.parameters()).dtype
    x = x.detach().to(dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, None, Y)
    (out.to(dtype) * cotangent.to(dtype)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out, x.grad, grads


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fused_model_matches_fp64_reference(cfg, autocast):
    torch.manual_seed(0)
    x, cotangent = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    fused_m, ref_m, ref64_m = _models(**CONFIGS[cfg])
    with count_triton_launches() as launches:
        fused = _forward_backward(fused_m, x, cotangent, autocast)
    depth = CONFIGS[cfg]["depth"]
    assert launches == {"adaln.forward": 1 + 2 * depth, "attention.forward": depth,
                        "adaln.backward": 1 + 2 * depth, "attention.backward": depth}
    ref = _forward_backward(ref_m, x, cotangent, autocast)
    ref64 = _forward_backward(ref64_m, x, cotangent)
    dtype = torch.bfloat16 if autocast else torch.float32
    assert fused[0].dtype == ref[0].dtype
    assert fused[0].abs().max() > 0.1  # randomised weights: a non-trivial output
    assert_matches(f"EqM forward[{cfg}]", fused[0], ref[0], ref64[0], dtype)
    assert_matches(f"EqM grad_x[{cfg}]", fused[1], ref[1], ref64[1], dtype)
    for name, g in fused[2].items():
        assert_matches(f"EqM grad_params[{cfg}:{name}]", g, ref[2][name], ref64[2][name], dtype)


def test_state_dict_and_switch_unchanged():
    fused, ref, _ = _models(**CONFIGS["h32-depth2"])
    assert fused.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out_fused = fused(x, None, Y)
        use_execution(fused, "reference")  # switched at run time: exactly the reference again
        assert torch.equal(fused(x, None, Y), ref(x, None, Y))
    assert not torch.equal(out_fused, ref(x, None, Y).detach())  # the fused path really ran other code


# ---------------------------------------------------------------- EqM-E: the double backward

def _ebm_training_grads(model, x1, x0, t, **kwargs):
    torch.manual_seed(3)  # same label dropout in every call
    terms = eqm_training_losses(model, x1, dict(y=Y, **kwargs), noise=x0, t=t)
    terms["loss"].mean().backward()
    return terms, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("ebm", ["dot", "l2"])
def test_ebm_training_step_with_triton_ops_same_gradients(ebm):
    """loss.backward() through grad_x E (double backward) of an EqM-E with ops="triton" == reference, fp32.

    What runs in Triton there: the objective's interpolation and loss (forward and backward, counted). The head
    keeps the reference ops by design (its output is a torch.func.grad, which custom ops cannot join): no
    adaLN or attention kernel may launch."""
    torch.manual_seed(0)
    x1, x0, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.9])
    ref = randomize_(tiny_eqm(ebm=ebm), std=0.1).train()
    fused = use_execution(copy.deepcopy(ref), "triton")
    terms_r, grads_r = _ebm_training_grads(ref, x1, x0, t, return_act=True)  # with the dispersive loss
    with count_triton_launches() as launches:
        terms_f, grads_f = _ebm_training_grads(fused, x1, x0, t, return_act=True)
    assert launches == {"eqm_loss.interpolate": 1, "eqm_loss.loss_forward": 1, "eqm_loss.loss_backward": 1}
    assert "disp_loss" in terms_f
    torch.testing.assert_close(terms_f["loss"], terms_r["loss"], rtol=1e-5, atol=1e-6)
    assert grads_r["blocks.0.attn.qkv.weight"].abs().sum() > 0  # reached through the second derivative
    for name, g in grads_f.items():
        torch.testing.assert_close(g, grads_r[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------- torch.compile(fullgraph=True)

@pytest.fixture(scope="module")
def compiled_fused_step():
    """A tiny fused EqM (one block, final layer), compiled with fullgraph=True, eager twin, one forward+backward."""
    model = randomize_(tiny_eqm(depth=1, hidden_size=32, fused=True), std=0.1).eval()
    compiled = torch.compile(model, fullgraph=True)
    x, cotangent = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    results = []
    for m in (compiled, model):
        model.zero_grad()
        with count_triton_launches() as launches:
            out = m(x, None, Y)
            (out * cotangent).sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad},
                        launches))
    return results


def test_compiled_fused_model_forward_backward_matches_eager(compiled_fused_step):
    (out_c, grads_c, launches_c), (out_e, grads_e, launches_e) = compiled_fused_step
    # the compiled graph calls the same Triton kernels (depth 1: adaLN + one fused residual+adaLN per block)
    assert launches_c == launches_e == {"adaln.forward": 3, "attention.forward": 1, "adaln.backward": 3,
                                        "attention.backward": 1}
    assert out_e.abs().max() > 0.1
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_compiled_fused_ebm_forward_matches_eager():
    """EqM-E (torch.func.grad inside) with fused=True traces with fullgraph=True and matches eager."""
    model = randomize_(tiny_eqm(depth=1, hidden_size=32, ebm="dot", fused=True), std=0.1).eval()
    x = torch.randn(2, 4, 8, 8)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():  # sampling: the single-backward input gradient
        out_c, out_e = compiled(x, None, Y), model(x, None, Y)
    assert out_e.abs().max() > 0.1
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)


def test_gated_residual_adaln_non_contiguous_stream():
    """The residual stream leaves the patch embedder transposed (strides (T*D, 1, T)): gradients and strides hold."""
    import eqm_kernels as kernels
    torch.manual_seed(0)
    N, T, D = 2, 16, 32
    x, y = (torch.randn(N, D, T).transpose(1, 2).requires_grad_() for _ in range(2))
    gate, shift, scale = (torch.randn(N, D, requires_grad=True) for _ in range(3))
    ins = (x, gate, y, shift, scale)
    r, h = kernels.gated_residual_adaln(*ins)
    r_ref, h_ref = kernels.gated_residual_adaln_reference(*ins)
    dr, dh = torch.randn(N, T, D), torch.randn(N, T, D)
    grads = torch.autograd.grad((r * dr).sum() + (h * dh).sum(), ins)
    grads_ref = torch.autograd.grad((r_ref * dr).sum() + (h_ref * dh).sum(), ins)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    for name, g, g_ref in zip(["x", "gate", "y", "shift", "scale"], grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{name}: {m}")
    torch.library.opcheck(torch.ops.eqm.gated_residual_adaln, (*ins, 1e-6))  # fake strides == real strides


def test_fused_path_runs_inside_module_calls():
    """A stand-in for FSDP2: each block's and the final layer's weights are garbage (NaN) outside their own
    module call and restored by a pre-forward hook, as FSDP2's all-gather does. The fused forward and
    backward must touch every weight inside its module's call, so the hooked model matches the plain one."""
    fused, ref, _ = _models(seed=3)
    x = torch.randn(2, 4, 8, 8)
    want = ref(x, None, Y)
    for module in [*fused.blocks, fused.final_layer]:
        real = {n: p.detach().clone() for n, p in module.named_parameters()}

        def gather(mod, args, kwargs, real=real):
            with torch.no_grad():
                for n, p in mod.named_parameters():
                    p.copy_(real[n])

        def reshard(mod, args, kwargs, out):
            with torch.no_grad():
                for p in mod.parameters():
                    p.fill_(float("nan"))

        module.register_forward_pre_hook(gather, with_kwargs=True)
        module.register_forward_hook(reshard, with_kwargs=True)
        reshard(module, (), {}, None)
    out, act = fused(x, None, Y, return_act=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert len(act) == len(fused.blocks) and all(torch.isfinite(a).all() for a in act)
    _, want_act = ref(x, None, Y, return_act=True)
    for a, b in zip(act, want_act):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_adaln_output_in_autocast_dtype():
    """Under bf16 autocast the fused adaLN writes h in bf16, the dtype its Linear reads (no extra cast),
    while the residual stream stays fp32; the result equals the fp32 h rounded to bf16."""
    fused, ref, _ = _models(seed=4)
    seen = []
    fused.blocks[0].attn.qkv.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    fused.blocks[0].register_forward_hook(lambda mod, args, out: seen.append(out[1].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused(torch.randn(2, 4, 8, 8), None, Y)
    assert seen == [torch.bfloat16, torch.float32]
    import eqm_kernels as kernels
    x, y = torch.randn(2, 5, 32, requires_grad=True), torch.randn(2, 5, 32)
    gate, shift, scale = (torch.randn(2, 32) for _ in range(3))
    r, h = kernels.gated_residual_adaln(x, gate, y, shift, scale, out_dtype=torch.bfloat16)
    r_ref, h_ref = kernels.gated_residual_adaln_reference(x, gate, y, shift, scale)
    assert h.dtype == torch.bfloat16 and r.dtype == torch.float32
    torch.testing.assert_close(h.float(), h_ref.to(torch.bfloat16).float(), atol=2e-2, rtol=1e-2)
    (gx,) = torch.autograd.grad(h.float().sum() + r.sum(), x)
    (gx_ref,) = torch.autograd.grad(h_ref.sum() + r_ref.sum(), x)
    torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-4)


def test_compiled_fused_model_under_autocast_matches_eager():
    """The autocast-dtype lookup of the fused adaLN traces under torch.compile(fullgraph=True)."""
    fused, _, _ = _models(seed=5)
    x = torch.randn(2, 4, 8, 8)

    def f(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fused(x, None, Y)

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, f(x), atol=0, rtol=0)
