"""The train state of an EqM run: where it is (step, epoch, batch), and its checkpoints (save and resume).

A checkpoint is the published {"model", "ema", "opt", "args"} plus "step", "epoch", "world_size", "rng"
(every rank's generators), "data" (the position in the data order) and "config" (the resolved TrainConfig
as plain data). Resuming continues the same data order and random draws, on any number of processes.
"""
import os
import re
from dataclasses import dataclass

import torch

from eqm import checkpoint as files, distributed
from eqm.checkpoint import (OptimizerStateMismatch, export_optimizer_state, import_optimizer_state, load_checkpoint,
                            load_model_state)
from eqm.guard import ADVICE, NonFiniteError, all_finite


class SetupError(Exception):
    """A user-facing configuration problem found while setting up a run."""


@dataclass
class TrainState:
    """Progress of the run: optimizer steps taken, and the data position (epoch, batch within it)."""
    step: int = 0
    epoch: int = 0
    batch: int = 0


def step_from_filename(path):
    """Published checkpoints are named <step:07d>.pt and store no step: recover it from the name."""
    m = re.fullmatch(r"(\d+)\.pt", os.path.basename(path))
    return int(m.group(1)) if m else 0


def rng_state(device):
    """This process's RNG state (noise, t and label dropout are drawn from the global generators)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Checkpointer:
    """Saves and restores the train state of one run (cfg: its TrainConfig) into <exp_dir>/checkpoints."""

    def __init__(self, cfg, exp_dir, strategy, device, logger):
        self.cfg, self.strategy, self.device, self.logger = cfg, strategy, device, logger
        self.folder = os.path.join(exp_dir, "checkpoints") if exp_dir else None
        self.saved = None  # the latest checkpoint's path

    def load(self, model, ema, batches_per_epoch):
        """Load cfg.ckpt into model/ema, restore this rank's RNG; returns (TrainState, optimizer state or None)."""
        path = self.cfg.ckpt
        try:
            ckpt = load_checkpoint(path)
        except FileNotFoundError as e:
            raise SetupError(f"--ckpt {path!r} not found") from e
        try:
            if "model" in ckpt:
                load_model_state(model, ckpt, prefer="model")
                load_model_state(ema, ckpt, prefer="ema")
            else:  # a bare state dict (e.g. published EMA weights): initialise both from it, as published
                load_model_state(model, ckpt)
                load_model_state(ema, ckpt)
        except (ValueError, RuntimeError, KeyError) as e:
            raise SetupError(f"cannot load --ckpt {path!r} into {self.cfg.model.name}: {e}") from None
        state = self._position(ckpt.get("step", step_from_filename(path)), ckpt.get("data"), batches_per_epoch)
        self._restore_rng(ckpt.get("rng"), state.step)
        self.logger.info(f"Resumed from {path} at step {state.step}")
        return state, ckpt.get("opt")

    def _position(self, step, data, batches_per_epoch):
        """TrainState at `step`: the saved data position rescaled to this run's batch size, else from the step."""
        if data is not None:
            batch = data["batch"] * data["global_batch_size"] // self.cfg.data.global_batch_size
            return TrainState(step, data["epoch"], batch)
        return TrainState(step, *divmod(step, batches_per_epoch)) if step else TrainState()

    def _restore_rng(self, rngs, step):
        """Every rank's generators as saved; on another number of processes, a seed derived from the step."""
        rank, world = self.strategy.rank, self.strategy.world
        if rngs is not None and len(rngs) == world:
            set_rng_state(rngs[rank], self.device)
        else:
            torch.manual_seed((self.cfg.runtime.global_seed * world + rank) * 1_000_003 + step)

    def restore_optimizer(self, model, opt, saved):
        """Load a checkpoint's optimizer state (either published layout) unless --fresh-optimizer; --lr wins."""
        if saved is not None and not self.cfg.optim.fresh_optimizer:
            try:
                opt_state = import_optimizer_state(saved, model, opt)
            except OptimizerStateMismatch as e:
                raise SetupError(f"cannot resume the optimizer from --ckpt {self.cfg.ckpt!r}: {e}. Pass "
                                 "--fresh-optimizer to load the weights alone with a new AdamW") from None
            self.strategy.load_optimizer_state(model, opt, opt_state)
        for group in opt.param_groups:  # --lr wins over the lr stored in the optimizer state
            group["lr"] = self.cfg.optim.lr

    def save(self, state, model, ema, opt, guard):
        """Write <step:07d>.pt (rank 0, atomically); refuses non-finite weights. Collective; returns the path."""
        guard.check("before writing the checkpoint")
        rngs = distributed.all_gather_object(rng_state(self.device))
        states = self.strategy.full_states(model, ema, opt)
        finite = all_finite(list(states[0].values()) + list(states[1].values())) if self.strategy.is_main else None
        if not distributed.broadcast_object(finite):
            raise NonFiniteError(f"the weights at step {state.step} are non-finite; stopped without saving them. "
                                 f"Try: {ADVICE}")
        if not self.strategy.is_main:
            return None
        cfg = self.cfg
        path = os.path.join(self.folder, f"{state.step:07d}.pt")
        files.save_checkpoint(path, {  # through the module: tests stand in a full disk there
            "model": states[0], "ema": states[1], "opt": export_optimizer_state(states[2]),
            "args": cfg.published_args(), "config": cfg.to_dict(),
            "step": state.step, "epoch": state.epoch, "world_size": self.strategy.world, "rng": rngs,
            "data": {"epoch": state.epoch, "batch": state.batch, "global_batch_size": cfg.data.global_batch_size,
                     "seed": cfg.runtime.global_seed},
        })
        self.logger.info(f"Saved checkpoint to {path}")
        self.saved = path
        return path

