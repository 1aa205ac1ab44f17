"""What the EqM trainer does besides training: the loss log (log.txt, progress bar, wandb) and EMA sample grids.

A callback has `on_step(trainer)`, called after every optimizer step, and `on_end(trainer)`, called once
after the last one (after the final checkpoint). Both run on every rank (grids gather under FSDP).
"""
import hashlib
import os
import time

import torch
from tqdm import tqdm

from eqm import distributed, vae as vae_lib
from eqm.training.checkpointer import SetupError
from eqm.utils import save_image_grid


class Callback:
    def on_step(self, trainer):
        pass

    def on_end(self, trainer):
        pass


def start_wandb(cfg, exp_dir):
    """wandb.init with the published README's variables (WANDB_KEY, ENTITY, PROJECT); returns the module."""
    try:
        import wandb
    except ImportError:
        raise SetupError("--wandb needs the wandb package: pip install wandb") from None
    if os.environ.get("WANDB_KEY"):
        wandb.login(key=os.environ["WANDB_KEY"])
    name = os.path.basename(exp_dir)
    run_id = str(int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10**8)  # stable per run folder
    wandb.init(project=os.environ.get("PROJECT", "eqm"), entity=os.environ.get("ENTITY"), name=name,
               config=vars(cfg.published_args()), id=run_id, resume="allow")
    return wandb


class LossLog(Callback):
    """Mean loss and steps/s every --log-every steps (and at the last step): log.txt, progress bar, wandb.

    The losses stay on the device between log steps (no host sync per step); `record` adds one."""

    def __init__(self, cfg, device, logger, total_steps, initial_step, exp_dir, is_main):
        self.every, self.device, self.logger, self.total = cfg.log_every, device, logger, total_steps
        self.wandb = start_wandb(cfg, exp_dir) if cfg.wandb and is_main else None
        self.running, self.count = torch.zeros((), device=device), 0
        self.history, self.last_loss, self.t_log = [], float("nan"), time.time()
        self.bar = tqdm(total=total_steps, initial=min(initial_step, total_steps),
                        disable=None if is_main else True, desc="train", dynamic_ncols=True)

    def record(self, loss):
        """Add the loss of a step whose update was applied."""
        self.running += loss.detach()
        self.count += 1

    def on_step(self, trainer):
        self.bar.update(1)
        step = trainer.state.step
        if step % self.every == 0 or step == self.total:
            trainer.guard.check("at the log step")
            self.write(step)

    def write(self, step):
        """Log the mean loss since the last log step (all-reduced over ranks) and the steps/s."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.time()
        # the skip decisions agree on every rank, so count == 0 on all of them or on none
        loss = distributed.all_reduce_mean(self.running / self.count).item() if self.count else float("nan")
        per_sec = self.count / (now - self.t_log)
        self.logger.info(f"(step={step:07d}) Train Loss: {loss:.4f}, Train Steps/Sec: {per_sec:.2f}")
        self.bar.set_postfix(loss=f"{loss:.4f}", it_s=f"{per_sec:.1f}")
        self.history.append({"step": step, "loss": loss, "steps_per_sec": per_sec})
        if self.wandb is not None:
            self.wandb.log({"train loss": loss, "train steps/sec": per_sec}, step=step)
        self.running.zero_()
        self.count, self.t_log, self.last_loss = 0, time.time(), loss

    def on_end(self, trainer):
        self.bar.close()


def grid_inputs(model_cfg, num_classes, seed, device):
    """Fixed noise and labels for the periodic sample grids (the same at every step, so grids compare)."""
    g = torch.Generator().manual_seed(seed)
    n = 10 * num_classes if num_classes <= 10 else 64
    y = torch.arange(n) % num_classes if num_classes <= 10 else torch.randint(num_classes, (n,), generator=g)
    x = torch.randn(n, model_cfg.in_channels, model_cfg.input_size, model_cfg.input_size, generator=g)
    return x.to(device), y.to(device), (num_classes if num_classes <= 10 else 8)


@torch.no_grad()
def sample_grid(ema, vae, grids, inputs, path):
    """Sample with the EMA model from fixed noise (GD, grids: a SamplingConfig) and save one PNG grid;
    None when the samples are non-finite."""
    from eqm.sampling import sample

    x, y, nrow = inputs
    out = sample(ema, x, y, sampler=grids.sampler, steps=grids.steps, stepsize=grids.stepsize,
                 cfg_scale=grids.cfg_scale, cfg_channels=min(3, x.shape[1]))  # the published x[:, :3] rule
    out = out[0] if isinstance(out, tuple) else out
    if not torch.isfinite(out).all():
        return None  # the caller says so; a grid of NaN is not worth a PNG
    if vae is not None:
        out = torch.cat([vae_lib.decode(vae, z) for z in out.split(16)])
    return save_image_grid(out.float(), path, nrow=nrow)


class SampleGrids(Callback):
    """An EMA sample grid PNG every `every` steps and after the last step (made on rank 0)."""

    def __init__(self, cfg, every, vae, num_classes, exp_dir, logger, device):
        self.cfg, self.every, self.vae, self.logger = cfg, every, vae, logger
        self.folder = os.path.join(exp_dir, "samples") if exp_dir else None
        self.inputs = grid_inputs(cfg.model, num_classes, cfg.runtime.global_seed, device)
        self.last = None

    def on_step(self, trainer):
        if self.every and trainer.state.step % self.every == 0:
            self.draw(trainer)

    def on_end(self, trainer):
        step = trainer.state.step
        if trainer.trained and self.every and step % self.every:
            self.draw(trainer)

    def draw(self, trainer):
        """Collective (FSDP gathers the EMA); rank 0 writes samples/<step:07d>.png."""
        trainer.guard.check("before drawing the sample grid")
        step, model = trainer.state.step, trainer.strategy.grid_model(trainer.ema)
        if model is None:
            return
        path = sample_grid(model, self.vae, self.cfg.grids, self.inputs, os.path.join(self.folder, f"{step:07d}.png"))
        if path is None:
            self.logger.info(f"warning: the EMA sample grid at step {step} is non-finite (no PNG written): "
                             f"lower --sample-stepsize {self.cfg.grids.stepsize}")
        else:
            self.logger.info(f"Saved sample grid to {path}")
        self.last = path
