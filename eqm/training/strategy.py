"""How the processes share a run: one process, DDP (replicated, gradients all-reduced) or FSDP (sharded).

A strategy wraps the models, says how TrainStep runs (DDP wraps the compiled loss), gathers full state
dicts for checkpoints, and hands rank 0 an unsharded EMA to draw sample grids with.
"""
from copy import deepcopy

from eqm import distributed, sharding


class Single:
    """One process, or DDP when ddp=True (TrainStep wraps its loss in DistributedDataParallel)."""

    name = "single"

    def __init__(self, rank=0, world=1):
        self.rank, self.world = rank, world
        self.ddp = world > 1

    @property
    def is_main(self):
        return self.rank == 0

    def wrap(self, model, ema, compile_blocks=False, grids=False):
        """Prepare model and EMA for training (nothing to do without sharding)."""

    def full_states(self, model, ema, opt):
        """(model, ema, optimizer) state dicts, unsharded (on rank 0)."""
        return model.state_dict(), ema.state_dict(), opt.state_dict()

    def load_optimizer_state(self, model, opt, state):
        opt.load_state_dict(state)

    def grid_model(self, ema):
        """The EMA model rank 0 samples grids with (None on the other ranks)."""
        return ema if self.is_main else None

    def barrier(self):
        distributed.barrier()


class FSDP(Single):
    """Parameters, gradients and optimizer state sharded per block (FSDP2); checkpoints and grids gather."""

    name = "fsdp"

    def __init__(self, rank=0, world=1):
        super().__init__(rank, world)
        self.ddp, self.plain_ema = False, None

    def wrap(self, model, ema, compile_blocks=False, grids=False):
        """Shard model and EMA; rank 0 keeps an unsharded EMA copy to load the gathered weights into for grids."""
        self.plain_ema = deepcopy(ema) if self.is_main and grids else None
        sharding.shard_model(model, compile_blocks=compile_blocks)
        sharding.shard_model(ema)

    def full_states(self, model, ema, opt):
        """Collective: every rank gathers, rank 0 gets the tensors."""
        return (sharding.full_model_state(model), sharding.full_model_state(ema),
                sharding.full_optimizer_state(model, opt))

    def load_optimizer_state(self, model, opt, state):
        sharding.load_optimizer_state(model, opt, state)

    def grid_model(self, ema):
        """Collective: gathers the EMA weights into rank 0's unsharded copy."""
        full = sharding.full_model_state(ema)
        if not self.is_main:
            return None
        self.plain_ema.load_state_dict(full)
        return self.plain_ema


def make_strategy(fsdp, rank, world):
    """FSDP with --fsdp over several processes, else Single (DDP when world > 1)."""
    return (FSDP if fsdp and world > 1 else Single)(rank, world)
