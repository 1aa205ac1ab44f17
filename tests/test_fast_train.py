"""The compiled training step (eqm.fast): no graph breaks, same losses and updates as eager, DDP in sync.

Compiles use backend="aot_eager" (dynamo fullgraph capture + AOTAutograd, the parts that break) except
one inductor compile; torch.compile is the slow part on a 2-core CPU.
"""
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.flop_counter import FlopCounterMode

from eqm.execution import Execution
from eqm.fast import EMA, TrainStep, forward_flops_per_image, make_optimizer
from eqm import models
from eqm.models import EqM_models
from model_helpers import randomize_, tiny_eqm


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g),
            torch.randn(n, 4, 8, 8, generator=g), torch.rand(n, generator=g))


def run_steps(step, n_steps=2):
    losses = []
    for i in range(n_steps):
        x1, y, noise, t = batch(seed=i)
        torch.manual_seed(100 + i)  # label dropout draws inside the model
        losses.append(step(x1, y, noise, t))
    return torch.stack(losses)


def assert_same_params(a, b, **tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=lambda m: f"{name}: {m}", **tol)


@pytest.mark.parametrize("ebm,disp", [("none", False), ("dot", False), ("none", True)])
def test_compiled_step_fullgraph_matches_eager(ebm, disp):
    model = randomize_(tiny_eqm(depth=1, ebm=ebm), std=0.1)
    ref_model = copy.deepcopy(model)
    kw = dict(model_kwargs=dict(return_act=True)) if disp else {}  # --disp: dispersive loss on the activations
    fast = TrainStep(model, make_optimizer(model, lr=1e-3), ema=EMA(model), ema_decay=0.5, precision="fp32",
                     backend="aot_eager", **kw)
    ref = TrainStep(ref_model, make_optimizer(ref_model, lr=1e-3), ema=EMA(ref_model), ema_decay=0.5,
                    precision="fp32", compile=False, **kw)
    start = copy.deepcopy(model)
    losses, ref_losses = run_steps(fast), run_steps(ref)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    assert_same_params(model, ref_model, rtol=1e-5, atol=1e-6)
    assert_same_params(fast.ema.model, ref.ema.model, rtol=1e-5, atol=1e-6)
    moved = max((p - q).abs().max() for p, q in zip(model.parameters(), start.parameters()))
    assert moved > 1e-4, "the optimizer did not update the weights"


def matmul_dtypes_backend(seen):
    """backend="aot_eager" that also counts the dtypes of the matmuls and convolutions in the compiled forward and
    backward graphs: {(op name, dtype): count}, what the compiled step really runs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    ops = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.convolution.default}

    def record(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in ops:
                seen[(node.target.__name__, node.meta["val"].dtype)] += 1
        return make_boxed_func(gm.forward)
    return aot_autograd(fw_compiler=record, bw_compiler=record)


def test_bf16_step_close_to_fp32_and_keeps_fp32_master_weights():
    import collections

    model = randomize_(tiny_eqm(depth=1), std=0.1)
    ref_model = copy.deepcopy(model)
    seen = collections.Counter()
    fast = TrainStep(model, make_optimizer(model, lr=1e-3), precision="bf16", backend=matmul_dtypes_backend(seen))
    ref = TrainStep(ref_model, make_optimizer(ref_model, lr=1e-3), precision="fp32", compile=False)
    losses, ref_losses = run_steps(fast, 1), run_steps(ref, 1)
    torch.testing.assert_close(losses, ref_losses, rtol=2e-2, atol=0)
    # autocast really ran: every Linear and the patch convolution, forward and backward, in bf16
    assert seen and {dtype for _, dtype in seen} == {torch.bfloat16}, seen
    assert seen[("addmm.default", torch.bfloat16)] >= 9  # the Linears' forwards (qkv, proj, fc1, fc2, ...)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())  # stepped and zeroed
    assert all(s["exp_avg"].dtype == torch.float32 for s in fast.opt.state.values())


def test_inductor_compile_matches_eager():
    model = randomize_(tiny_eqm(depth=1, class_dropout_prob=0.0), std=0.1)  # inductor has its own RNG
    ref_model = copy.deepcopy(model)
    fast = TrainStep(model, make_optimizer(model, lr=1e-3), precision="fp32", backend="inductor")
    ref = TrainStep(ref_model, make_optimizer(ref_model, lr=1e-3), precision="fp32", compile=False)
    x1, y, noise, t = batch()
    loss, ref_loss = fast.loss_fn(x1, y, noise, t), ref.loss_fn(x1, y, noise, t)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    loss.backward()
    ref_loss.backward()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_train_step_rejects_ddp_wrapped_model():
    model = tiny_eqm(depth=1)
    fake_ddp = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
    with pytest.raises(ValueError, match="ddp=True"):
        TrainStep(fake_ddp, make_optimizer(model), compile=False)


def test_train_step_takes_the_execution():
    """An Execution replaces the precision / compile keywords; its ops must be the model's (set once, before)."""
    model = tiny_eqm(depth=1)
    step = TrainStep(model, make_optimizer(model), execution=Execution("reference", False, "tf32"), precision="bf16")
    assert step.precision == "tf32" and step.execution.ops == "reference"
    assert not isinstance(step.loss_fn, torch._dynamo.eval_frame.OptimizedModule)  # compile=False was taken
    with pytest.raises(ValueError, match="use_execution"):
        TrainStep(model, make_optimizer(model), execution=Execution("triton", False, "fp32"))


def test_ema_and_optimizer_choice():
    model = randomize_(tiny_eqm(depth=1))
    ema = EMA(model)
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    ema.update(0.9)
    for (name, e), b, p in zip(ema.model.named_parameters(), before, model.parameters()):
        expected = 0.9 * b + 0.1 * p if p.requires_grad else b
        torch.testing.assert_close(e, expected, msg=lambda m: f"{name}: {m}")
    opt = make_optimizer(model)
    assert opt.defaults["foreach"] and not opt.defaults["fused"]  # CPU: foreach; CUDA gets fused
    # The published layout: every parameter in model.parameters() order, the frozen pos_embed first.
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], model.parameters(), strict=True))


def test_flop_formula(monkeypatch):
    with torch.device("meta"):
        xl = EqM_models["EqM-XL/2"](input_size=32)
    assert abs(forward_flops_per_image(xl) / 237e9 - 1) < 0.01  # SPEC 3: about 237 GFLOP per 256px image
    model = tiny_eqm(depth=2, learn_sigma=True).eval()
    # The counter does not see CPU SDPA kernels: count attention as the two matmuls it is.
    monkeypatch.setattr(models, "attn_core",
                        lambda q, k, v, **kw: torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, -1) @ v)
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3])
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, None, y)
    assert counter.get_total_flops() == 3 * forward_flops_per_image(model)


def sgd(model):
    """Plain SGD: Adam's normalisation would blow rounding noise in near-zero gradients up to +-lr."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)


def _ddp_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = randomize_(tiny_eqm(depth=1, class_dropout_prob=0.0), std=0.1)
        step = TrainStep(model, sgd(model), ema=EMA(model), ema_decay=0.5, precision="fp32",
                         backend="aot_eager", ddp=True)
        for i in range(2):
            x1, y, noise, t = batch(n=4, seed=i)
            part = slice(2 * rank, 2 * rank + 2)
            step(x1[part], y[part], noise[part], t[part])
        torch.save({"model": model.state_dict(), "ema": step.ema.model.state_dict()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_processes_stay_in_sync_and_match_single_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    model = randomize_(tiny_eqm(depth=1, class_dropout_prob=0.0), std=0.1)
    single = TrainStep(model, sgd(model), precision="fp32", compile=False)
    for i in range(2):
        single(*batch(n=4, seed=i))  # DDP averages the two half-batch gradients = the full-batch gradient
    for name, p in model.state_dict().items():
        torch.testing.assert_close(r0["model"][name], r1["model"][name], rtol=0, atol=0)
        torch.testing.assert_close(r0["ema"][name], r1["ema"][name], rtol=0, atol=0)
        torch.testing.assert_close(r0["model"][name], p, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
