"""Builds an EqM training run from its TrainConfig: execution choices, data, VAE, models, optimizer, resume.

`build_trainer(cfg, dist_info)` returns a ready eqm.training.Trainer. The order of the steps below is part
of the behaviour: the models are initialised right after the seed is set, so a run is reproducible.
"""
import dataclasses
import os
import sys
from typing import NamedTuple
from copy import deepcopy

import torch

from eqm import compiling, data as data_lib, distributed, runtime, vae as vae_lib
from eqm.ema import EMA
from eqm.execution import Execution, resolve_execution, set_precision, use_execution
from eqm.fast import TrainStep, make_optimizer
from eqm.guard import NonFiniteGuard
from eqm.training.callbacks import LossLog, SampleGrids
from eqm.training.checkpointer import Checkpointer, SetupError, TrainState
from eqm.training.strategy import make_strategy
from eqm.training.trainer import Trainer, step_budget
from eqm.utils import claim_run_dir, create_logger, format_config


#################################################################################
#        Execution choices: precision, kernels, compile (made here only)        #
#################################################################################

def resolve_runtime(rt, world, device):
    """The RuntimeConfig with its run-time choices made by eqm.execution: ops (--fused), precision ("auto"
    probed; rank 0's choice for all ranks, then set) and, over several processes, compile (one process keeps
    "auto": eqm.compiling decides by timing the first steps); --fsdp off in a single process."""
    if rt.fsdp and world == 1:
        print("note: --fsdp with a single process has nothing to shard: training unsharded "
              "(launch with torchrun --nproc_per_node N to shard)", file=sys.stderr)
    try:
        execution = resolve_execution(device, ops=rt.fused, compile=rt.compile, precision=rt.precision)
    except ValueError as e:
        raise SetupError(str(e)) from None
    precision = distributed.broadcast_object(execution.precision)
    set_precision(precision)
    return dataclasses.replace(rt, fused=execution.ops == "triton", precision=precision, fsdp=rt.fsdp and world > 1,
                               compile=rt.compile if world == 1 else execution.compile)


class RunExecution(NamedTuple):
    """How the training step runs: `step` the Execution the TrainStep is built with, `compile_blocks` whether FSDP
    compiles the blocks, `auto_compile` for one process the setting eqm.compiling.AutoCompile applies ("auto",
    True or False: the step starts eager and compiles when told or when it pays), else None."""
    step: Execution
    compile_blocks: bool
    auto_compile: object


def apply_runtime(model, rt, world):
    """Set the resolved execution on `model`; returns its RunExecution."""
    one_process = world == 1
    execution = Execution("triton" if rt.fused else "reference", bool(rt.compile) and not rt.fsdp and not one_process,
                          rt.precision)
    use_execution(model, execution)
    auto_compile = ("auto" if rt.compile is None else rt.compile) if one_process else None
    return RunExecution(execution, bool(rt.compile), auto_compile)


#################################################################################
#                                 The pieces                                    #
#################################################################################

def open_data(data, num_classes, rank, world, seed, device):
    """(source, loader of this rank's share): the one call into the data layer (eqm.data.make_source)."""
    try:
        source = data_lib.make_source(data.data_path, data.image_size, num_classes=num_classes, dali=data.dali,
                                      device=device, num_workers=data.num_workers)
        loader = source.loader(data.global_batch_size // world, rank, world, seed)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise SetupError(str(e)) from None
    if source.num_classes > num_classes:
        raise SetupError(f"the data has {source.num_classes} classes but --num-classes is {num_classes}")
    return source, loader


def new_experiment_dir(results_dir, model_name):
    """A new run folder of its own (claimed atomically, see claim_run_dir) with a checkpoints/ subfolder."""
    exp = claim_run_dir(results_dir, model_name.replace("/", "-"))
    os.makedirs(os.path.join(exp, "checkpoints"))
    return exp


def fit_to_data(cfg, source):
    """The config with the model's input channels of the data: the images' (pixels, latents) or the VAE's."""
    channels = source.channels if cfg.data.vae == "none" or source.latent else vae_lib.CHANNELS
    return cfg.replace(model=dataclasses.replace(cfg.model, in_channels=channels))


def load_vae(cfg, source, device, logger):
    """(vae or None, cfg). Latents train without a VAE, then without sample grids (they decode)."""
    if cfg.data.vae == "none":
        return None, cfg
    try:
        return vae_lib.load_vae(cfg.data.vae, device), cfg
    except (FileNotFoundError, RuntimeError) as e:
        if not source.latent:
            raise SetupError(str(e)) from None
        logger.info(f"warning: {e}\nTraining on the latents without sample grids (they need the VAE decoder).")
        return None, cfg.replace(sample_every=0)


def build_models(cfg, world, device, logger):
    """(model, ema) on the device, their execution set (apply_runtime), the CPU threads chosen for them."""
    model = cfg.model.build().to(device)
    execution = apply_runtime(model, cfg.runtime, world)
    ema = deepcopy(model).requires_grad_(False)
    logger.info(f"EqM Parameters: {sum(p.numel() for p in model.parameters()):,}")
    threads = runtime.configure_threads(model, cfg.data.global_batch_size // world, cfg.runtime.threads, device)
    logger.info(f"Precision {cfg.runtime.precision} ({runtime.precision_reason(device)}); {threads} CPU thread(s)")
    return model, ema, execution


def make_step(cfg, model, ema, opt, strategy, execution, steps_left, device, logger):
    """The TrainStep of the EqM objective (EMA update included); in one process inside eqm.compiling.AutoCompile
    (compiles when told, or once timed eager steps show it pays for the steps left); then the CPU thread governor."""
    o, ob, m = cfg.optim, cfg.objective, cfg.model
    step_fn = TrainStep(model, opt, execution=execution.step, ema=EMA(model, ema), ema_decay=o.ema_decay,
                        ddp=strategy.ddp, grad_clip=o.grad_clip or None, a=ob.ct_a, lam=ob.ct_lam,
                        ct_shape=ob.ct_shape, model_kwargs=dict(return_act=ob.disp), check_finite=True,
                        skip_nonfinite=cfg.runtime.on_nonfinite == "skip")
    if execution.auto_compile is not None:
        key = compiling.compile_key("train", model, (cfg.data.global_batch_size, m.in_channels, m.input_size,
                                                     m.input_size), step_fn.precision, device)
        step_fn = compiling.AutoCompile(step_fn, step_fn.use_compiled, total_steps=steps_left, key=key, device=device,
                                        compile=execution.auto_compile, log=logger.info)
    return runtime.ThreadGovernor(step_fn, enabled=device.type == "cpu" and strategy.world == 1)


def build_trainer(cfg, info):
    """Everything a run needs, in order (see the module docstring); returns the Trainer."""
    rank, world, device = info.rank, info.world_size, info.device
    cfg = cfg.replace(runtime=resolve_runtime(cfg.runtime, world, device))
    torch.manual_seed(cfg.runtime.global_seed * world + rank)
    source, loader = open_data(cfg.data, cfg.model.num_classes, rank, world, cfg.runtime.global_seed, device)
    exp_dir = distributed.broadcast_object(new_experiment_dir(cfg.results_dir, cfg.model.name) if rank == 0 else None)
    logger = create_logger(exp_dir, rank)
    vae, cfg = load_vae(fit_to_data(cfg, source), source, device, logger)
    logger.info("Resolved configuration:\n" + format_config(cfg.published_args()))
    if rank == 0:
        print(f"Experiment directory: {exp_dir}", flush=True)
    model, ema, execution = build_models(cfg, world, device, logger)
    strategy = make_strategy(cfg.runtime.fsdp, rank, world)
    checkpointer = Checkpointer(cfg, exp_dir, strategy, device, logger)
    state, saved_opt = checkpointer.load(model, ema, loader.batches_per_epoch) if cfg.ckpt else (TrainState(), None)
    strategy.wrap(model, ema, compile_blocks=execution.compile_blocks, grids=bool(cfg.sample_every))
    opt = make_optimizer(model, lr=cfg.optim.lr)
    checkpointer.restore_optimizer(model, opt, saved_opt)
    total = step_budget(cfg.optim, loader.batches_per_epoch)
    step_fn = make_step(cfg, model, ema, opt, strategy, execution, total - state.step, device, logger)
    model.train()  # enables label dropout for classifier-free guidance
    ema.eval()
    log = LossLog(cfg, device, logger, total, state.step, exp_dir, strategy.is_main)
    grids = SampleGrids(cfg, cfg.sample_every, vae, source.num_classes, exp_dir, logger, device)
    return Trainer(cfg, model=model, ema=ema, step_fn=step_fn, opt=opt, loader=loader,
                   encoder=None if source.latent else vae, strategy=strategy,
                   checkpointer=checkpointer, guard=NonFiniteGuard(device), state=state, total_steps=total,
                   log=log, callbacks=[grids], exp_dir=exp_dir, logger=logger, device=device)
