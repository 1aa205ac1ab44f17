"""FSDP for large EqM models (eqm-train --fsdp): every transformer block, then the root, sharded with
torch.distributed.fsdp.fully_shard (FSDP2), and full state dicts in the checkpoint format DDP writes.

Checkpoints stay the published layout: full (unsharded) `model` / `ema` state dicts and an `opt` state
keyed by parameter index like `optimizer.state_dict()`, so a run may resume with or without --fsdp, on
any number of processes.
"""
import warnings

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(model, compile_blocks=False, backend="inductor"):
    """Shard each block and then the root (embedders, final layer) over the default process group, starting
    from rank 0's weights (each rank keeps its slice of what it holds: unlike DDP, nothing is broadcast).

    compile_blocks: torch.compile every block first (fullgraph), the per-block compile FSDP2 is built for.
    """
    # EqM returns a reshaped (view) output; nothing downstream writes into it in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    with torch.no_grad():
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)
    for block in model.blocks:
        if compile_blocks:
            block.compile(fullgraph=True, backend=backend)
        fully_shard(block)
    fully_shard(model)
    return model


def _param_names(model):
    """Parameter names in model.parameters() order: the index layout of the published optimizer state."""
    return [n for n, _ in model.named_parameters()]


def full_model_state(model):
    """The unsharded state dict on CPU. Collective: every rank calls it; rank 0 gets the tensors."""
    return get_model_state_dict(model, options=_FULL)


def full_optimizer_state(model, opt):
    """The unsharded optimizer state, keyed by parameter index as `opt.state_dict()`. Collective."""
    by_name = get_optimizer_state_dict(model, opt, options=_FULL)
    index = {n: i for i, n in enumerate(_param_names(model))}
    return {"state": {index[n]: s for n, s in by_name.get("state", {}).items()},
            "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in by_name.get("param_groups", [])]}


def load_optimizer_state(model, opt, state):
    """Load an index-keyed full optimizer state (any checkpoint) into the sharded optimizer. Every rank
    passes the full state."""
    names = _param_names(model)
    by_name = {"state": {names[i]: s for i, s in state["state"].items()},
               "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]}
    set_optimizer_state_dict(model, opt, by_name, options=StateDictOptions(full_state_dict=True))
