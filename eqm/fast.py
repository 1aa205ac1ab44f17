"""The training step, run as an eqm.execution.Execution says: one compiled step (forward + loss), bf16 autocast
over fp32 master weights, fused AdamW, a multi-tensor EMA; and the training / sampling FLOP counts the benchmarks
report utilisation with (from eqm.models.forward_flops).

Compile the step, not the world: only `loss(x1, y, noise, t)` is compiled (fullgraph=True, so a graph
break is an error, not a silent slowdown); the optimizer step and the EMA stay plain multi-tensor ops.
The random draws (noise, t) happen outside the compiled region, so the compiled and eager steps see
the same inputs and can be compared exactly; label dropout stays inside the model.
Multi-GPU: DDP wraps the compiled loss module (DDP(compile(loss))), not the other way round.
EqM-E compiles too: the model takes its input gradient with torch.func.grad, which dynamo traces
(torch.autograd.grad(create_graph=True) would not).
"""
import contextlib
import dataclasses

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from eqm.ema import EMA  # noqa: F401  (re-exported: the one EMA lives in eqm.ema)
from eqm.execution import Execution, autocast, model_ops, resolve_precision, set_precision, unwrap
from eqm.models import forward_flops
from eqm.objective import eqm_training_losses


def compile_fn(fn, backend="inductor"):
    """torch.compile(fn, fullgraph=True): a graph break is an error, never a silent slowdown.

    Every TrainStep / GraphSampler specialises the same code on its own model and settings, so a
    process that builds many of them needs more than dynamo's default 8 cached variants per code object.
    """
    from eqm.compiling import use_compile_cache

    use_compile_cache()  # a second run of the same model reuses the generated code
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(fn, fullgraph=True, backend=backend)


def attention_backend(device, precision):
    """On CPU in bf16, scaled_dot_product_attention through its math path, which torch computes in fp32 on CPU
    (bf16 q, k, v are upcast; its bmm's run in fp32): the CPU flash kernel's bf16 backward ran 3x slower than
    this here, a quarter of a compiled EqM-Ti/2 training step. Elsewhere a no-op (CUDA keeps flash attention)."""
    if precision == "bf16" and torch.device(device).type == "cpu":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def make_optimizer(model, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999)):
    """AdamW over model.parameters() as published (the frozen pos_embed too: it gets no gradient, so no state),
    so its state dict indexes parameters as the published checkpoints do; fused on CUDA, foreach on CPU."""
    params = list(model.parameters())
    on_cuda = params[0].is_cuda
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas,
                             fused=on_cuda, foreach=not on_cuda)


class EqMLoss(torch.nn.Module):
    """Mean EqM loss of a batch for given noise and times: the module that gets compiled (and DDP-wrapped)."""

    def __init__(self, model, a=0.8, lam=4.0, precision="bf16", model_kwargs=None, ct_shape="truncated-linear"):
        super().__init__()
        self.model, self.a, self.lam, self.precision, self.ct_shape = model, a, lam, precision, ct_shape
        self.model_kwargs = dict(model_kwargs or {})

    def forward(self, x1, y, noise, t):
        with autocast(x1.device, self.precision), attention_backend(x1.device, self.precision):
            terms = eqm_training_losses(self.model, x1, dict(y=y, **self.model_kwargs), a=self.a, lam=self.lam,
                                        noise=noise, t=t, ct_shape=self.ct_shape)
        return terms["loss"].float().mean()


class TrainStep:
    """`step(x1, y) -> loss`: one optimizer step of the EqM objective, compiled, in bf16 where that is fast.

    model: the bare EqM (not DDP-wrapped: pass ddp=True instead).
    opt: its optimizer (make_optimizer); ema: an EMA or None; ema_decay: its decay per step.
    execution: the eqm.execution.Execution to run (its ops must be the model's: use_execution(model, execution)
        first); its precision and compile replace the two keywords below.
    precision (without execution): "auto" (bf16 where a bf16 matmul is clearly faster on this device, measured
        once per process by eqm.runtime; else fp32/tf32), "bf16" (autocast, fp32 master weights), "tf32" or "fp32".
    compile (without execution): torch.compile the forward + loss with fullgraph=True; backend: the compile
        backend ("inductor"; "aot_eager" traces the same graph without code generation, for quick tests).
    ddp: wrap the compiled loss in DistributedDataParallel (gradients all-reduced in backward);
        DDP must sit outside the compiled region, since dynamo cannot trace DDP.forward with fullgraph.
    a, lam, ct_shape: the objective's c(t) (eqm.objective); grad_clip: max grad norm or None.
    model_kwargs: extra model keywords, e.g. dict(return_act=True) for the dispersive loss (--disp).
    check_finite: keep the global grad norm of each step in `self.grad_norm` (a device tensor, no sync).
    skip_nonfinite: skip the optimizer and EMA update of a step whose loss or grad norm is non-finite on
        any rank (one host sync per step); `self.skipped` tells whether the last step was skipped.
    """

    def __init__(self, model, opt, *, execution=None, ema=None, ema_decay=0.9999, precision="auto", compile=True,
                 backend="inductor", ddp=False, a=0.8, lam=4.0, grad_clip=None, model_kwargs=None,
                 check_finite=False, skip_nonfinite=False, ct_shape="truncated-linear"):
        if isinstance(model, DDP):
            raise ValueError("pass the bare model to TrainStep and ddp=True: it wraps the compiled loss in DDP itself")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip} (a negative max norm flips the gradients)")
        self.model, self.opt, self.ema, self.ema_decay = model, opt, ema, ema_decay
        self.grad_clip = grad_clip
        self.check_finite, self.skip_nonfinite = check_finite or skip_nonfinite, skip_nonfinite
        self.grad_norm, self.skipped = None, False
        self.device = next(model.parameters()).device
        if execution is None:
            execution = Execution(model_ops(model), bool(compile), resolve_precision(precision, self.device))
        elif execution.ops != model_ops(model):
            raise ValueError(f"the model runs ops={model_ops(model)!r} but the execution says {execution.ops!r}: "
                             "call eqm.execution.use_execution(model, execution) first")
        self.execution = execution
        self.precision = precision = execution.precision
        set_precision(precision, self.device)
        self.eager_loss = loss = EqMLoss(model, a, lam, precision, model_kwargs, ct_shape)
        if execution.compile:
            loss = compile_fn(loss, backend)
        if ddp:
            loss = DDP(loss, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.loss_fn = loss

    def use_compiled(self, backend="inductor"):
        """Compile the loss from the next step on (what compile=True does at construction); returns self."""
        if isinstance(self.loss_fn, DDP):
            raise ValueError("a DDP TrainStep compiles at construction (compile=True)")
        self.loss_fn = compile_fn(self.eager_loss, backend)
        self.execution = dataclasses.replace(self.execution, compile=True)
        return self

    def __call__(self, x1, y, noise=None, t=None):
        if noise is None:
            noise = torch.randn_like(x1)
        if t is None:
            t = torch.rand(x1.shape[0], device=x1.device)
        loss = self.loss_fn(x1, y, noise, t)
        loss.backward()
        if self.grad_clip is not None:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        elif self.check_finite:
            from eqm.guard import grad_norm

            self.grad_norm = grad_norm(self.model.parameters())
        if self.skip_nonfinite and self._nonfinite(loss):
            self.opt.zero_grad(set_to_none=True)
            self.skipped = True
            return loss.detach()
        self.skipped = False
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.ema_decay)
        return loss.detach()

    def _nonfinite(self, loss):
        """Whether the loss or grad norm is non-finite on any rank (a host sync, and an all-reduce with DDP)."""
        norm = self.grad_norm.to_local() if hasattr(self.grad_norm, "to_local") else self.grad_norm
        bad = (~(torch.isfinite(loss.detach().float()) & torch.isfinite(norm.float().to(loss.device)))).int()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        return bool(bad)


#################################################################################
#                                FLOP accounting                                #
#################################################################################

def forward_flops_per_image(model):
    """Matmul FLOPs of one forward pass of an EqM (or a DDP / compile wrapper of one) on one image
    (eqm.models.forward_flops: EqM-XL/2 at 32x32 latents is 237 GFLOP)."""
    return forward_flops(unwrap(model))


def train_flops_per_image(model):
    """Forward + backward FLOPs of one training image: 3x forward (EqM); EqM-E about 6x (forward, the
    input-only backward (1x), and the weight backward of both (2x each))."""
    return (3 if unwrap(model).ebm == "none" else 6) * forward_flops_per_image(model)


def sample_flops_per_image(model, steps, cfg=False):
    """FLOPs to sample one image: (steps - 1) field evaluations, each on a doubled batch with CFG;
    an EqM-E field costs a forward plus an input-only backward (dX = dY W^T: one more forward's worth)."""
    per_eval = forward_flops_per_image(model) * (1 if unwrap(model).ebm == "none" else 2)
    return (steps - 1) * per_eval * (2 if cfg else 1)
