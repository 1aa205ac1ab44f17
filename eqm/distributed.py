"""Process-group setup that works under torchrun (nccl on CUDA, gloo on CPU) and as a single plain process."""
import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def resolve_device(device=None):
    """torch.device for a --device flag (default: cuda when available); a clear exit when it cannot be used."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise SystemExit(f"error: --device {device!r} is not a device; use cuda, cuda:N or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device} but torch {torch.__version__} sees no CUDA GPU here; "
                         "use --device cpu (or leave --device unset)")
    return device


DEFAULT_TIMEOUT_MIN = 10.0  # a dead or frozen rank fails the others' next collective after this long


def add_timeout_arg(parser):
    """The --dist-timeout flag (minutes) shared by the CLIs that run under torchrun."""
    from eqm.validate import number

    parser.add_argument("--dist-timeout", type=number(float, lo=0, lo_open=True), default=DEFAULT_TIMEOUT_MIN,
                        help="minutes a process waits in a collective for the others before the run fails "
                             "(a rank that died or froze); raise it if a rank legitimately lags that long")


def setup(device=None, timeout_min=DEFAULT_TIMEOUT_MIN):
    """Join the process group when launched by torchrun (WORLD_SIZE set), else run as rank 0 of 1.

    timeout_min bounds every collective: when a rank dies or freezes, the others fail after that many
    minutes (gloo raises; NCCL's watchdog aborts the process) instead of waiting 30 minutes or forever."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device)
    if device.type == "cuda":
        if device.index is None or world_size > 1:  # an explicit cuda:N in one process stays as given
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(minutes=timeout_min),
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, device)


_PEER_FAILURES = ("timed out", "connection closed by peer", "connection reset by peer", "broken pipe",
                  "watchdog caught collective operation timeout")


def peer_failure_message(err, timeout_min):
    """One line for an error a collective raised because another rank died or froze, else None."""
    is_dist_error = isinstance(err, getattr(dist, "DistError", ()))
    if not (is_dist_error or (isinstance(err, RuntimeError) and any(p in str(err).lower() for p in _PEER_FAILURES))):
        return None
    rank = dist.get_rank() if is_dist() else int(os.environ.get("RANK", "0"))
    return (f"rank {rank}: another process died or froze (no answer within --dist-timeout {timeout_min:g} min): "
            f"see the other ranks' output ({str(err).strip().splitlines()[0][:120] if str(err).strip() else ''})")


def is_dist():
    return dist.is_available() and dist.is_initialized()


def barrier():
    if is_dist():
        dist.barrier()


def all_reduce_mean(x):
    """Mean of a tensor over ranks (identity in a single process)."""
    if is_dist():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= dist.get_world_size()
    return x


def all_gather_object(obj):
    """List of `obj` from every rank (a one-element list in a single process)."""
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src=0):
    """`obj` from rank `src` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup():
    """Leave the process group, after freeing what still refers to it (FSDP state sits in reference cycles:
    collected at interpreter exit instead, its pending gloo work can abort the process)."""
    if is_dist():
        gc.collect()
        dist.destroy_process_group()


def run_job(prog, job, device, timeout_min, expected=()):
    """setup(), job(dist_info), cleanup(). The `expected` errors, file-system errors and a peer's death or freeze
    end the program with one line, `prog: error: ...`, instead of a traceback."""
    from eqm.utils import os_error_line

    info = setup(device, timeout_min)
    try:
        return job(info)
    except expected as e:
        raise SystemExit(f"{prog}: error: {e}") from None
    except OSError as e:
        raise SystemExit(f"{prog}: error: {os_error_line(e)}") from None
    except RuntimeError as e:
        line = peer_failure_message(e, timeout_min)
        if line is None:
            raise
        raise SystemExit(f"{prog}: error: {line}") from None
    finally:
        cleanup()
