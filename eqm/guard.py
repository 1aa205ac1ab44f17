"""Non-finite guard for the training loops: a NaN/inf loss or gradient stops the run (or, on request,
skips the step a bounded number of times) and never reaches a checkpoint.

Cheap on GPU: `record` keeps the first bad step and its loss in two device tensors (no host sync);
the trainer calls `check` where it syncs anyway (log steps) and before every checkpoint or grid.
"""
import math

import torch

from eqm import distributed

NONFINITE_CHOICES = ("stop", "skip")
ADVICE = "lower --lr, set --grad-clip (e.g. 1.0), use --precision fp32, or check the data for NaN/inf"


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient; the message is one line that says what to try."""


def grad_norm(params):
    """Global L2 norm of the gradients (a 0-d tensor; NaN or inf if any gradient is); no host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP: this rank's shard
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)


def all_finite(tensors):
    """True when every tensor is finite (one fused norm per device; one host sync)."""
    tensors = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    if not tensors:
        return True
    norms = [n.float().to(tensors[0].device) for n in torch._foreach_norm(tensors)]
    return bool(torch.isfinite(torch.stack(norms)).all())


class NonFiniteGuard:
    """Remembers the first step whose loss or gradient norm was non-finite, without syncing the host."""

    def __init__(self, device, what="loss"):
        self.device, self.what = device, what
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.first_loss = torch.zeros((), device=device)
        self.first_norm = torch.zeros((), device=device)

    def record(self, step, loss, norm=None):
        """Note `step` if its loss (or grad norm) is non-finite and no earlier step was."""
        if hasattr(norm, "to_local"):
            norm = norm.to_local()
        loss = loss.detach().float().reshape(())
        ok = torch.isfinite(loss)
        if norm is not None:
            norm = norm.detach().float().reshape(()).to(loss.device)
            ok = ok & torch.isfinite(norm)
        new = (self.first_step < 0) & ~ok
        self.first_step = torch.where(new, step, self.first_step)
        self.first_loss = torch.where(new, loss, self.first_loss)
        if norm is not None:
            self.first_norm = torch.where(new, norm, self.first_norm)

    def check(self, where=""):
        """Raise NonFiniteError if any rank recorded a bad step (a collective: every rank must call it)."""
        bad = self.first_step.clone()
        bad = torch.where(bad < 0, torch.full_like(bad, 2 ** 62), bad)
        if distributed.is_dist():
            import torch.distributed as dist

            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
        step = int(bad)
        if step >= 2 ** 62:
            return
        mine = (int(self.first_step), float(self.first_loss), float(self.first_norm))
        first = next(r for r in distributed.all_gather_object(mine) if r[0] == step)  # the rank that saw it
        raise NonFiniteError(message(step, first[1], first[2], where))


def message(step, loss, norm=None, where="", advice=ADVICE):
    """The one-line report of a non-finite step."""
    what = f"loss {loss:.4g}" if not math.isfinite(loss) or norm is None or math.isfinite(norm) else \
        f"loss {loss:.4g} with gradient norm {norm:.4g}"
    at = f" (found {where})" if where else ""
    return f"non-finite training at step {step}: {what}{at}; stopped without saving it. Try: {advice}"
