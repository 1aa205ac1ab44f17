"""EqM training in parts: setup (builds a run from its TrainConfig), trainer (the loop), checkpointer (train
state, save and resume), strategy (single process / DDP / FSDP) and callbacks (loss log, sample grids)."""
from eqm.training.checkpointer import Checkpointer, SetupError, TrainState
from eqm.training.setup import build_trainer
from eqm.training.trainer import Trainer

__all__ = ["Checkpointer", "SetupError", "TrainState", "Trainer", "build_trainer"]
