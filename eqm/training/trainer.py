"""The EqM training loop: steps over the data, guards against non-finite steps, checkpoints, callbacks.

Everything it runs with is built beforehand (eqm.training.setup): the models, the TrainStep, the data,
the parallel strategy, the Checkpointer and the callbacks. The loop itself knows none of their details.
"""
import os
import time

from eqm import vae as vae_lib
from eqm.guard import ADVICE, NonFiniteError


def step_budget(optim, batches_per_epoch):
    """Steps to train to: --max-steps when set, else --epochs epochs."""
    return optim.max_steps if optim.max_steps is not None else optim.epochs * batches_per_epoch


class Trainer:
    """Runs cfg's training from `state` to the step budget; `fit()` returns the run's summary dict."""

    def __init__(self, cfg, *, model, ema, step_fn, opt, loader, encoder, strategy, checkpointer, guard, state,
                 total_steps, log, callbacks, exp_dir, logger, device):
        self.cfg, self.model, self.ema, self.step_fn, self.opt = cfg, model, ema, step_fn, opt
        self.loader, self.encoder = loader, encoder  # the VAE that encodes each batch; None for pixels and latents
        self.strategy, self.checkpointer, self.guard = strategy, checkpointer, guard
        self.state, self.log, self.callbacks = state, log, [log, *callbacks]
        self.exp_dir, self.logger, self.device = exp_dir, logger, device
        self.start_step, self.skipped, self.total_steps = state.step, 0, total_steps

    @property
    def trained(self):
        """Whether this run took a step (a resumed run may start at its budget)."""
        return self.state.step > self.start_step

    def fit(self):
        """Train to the step budget; returns the summary (steps, seconds, final loss, paths, log)."""
        s, t_start = self.state, time.time()
        self.logger.info(f"Training to step {self.total_steps} ({self.loader.batches_per_epoch} batches/epoch "
                         f"per rank, {self.strategy.world} rank(s))...")
        while s.step < self.total_steps:
            self.loader.set_epoch(s.epoch, s.batch)
            for x, y in self.loader:
                loss = self.step_fn(*self.model_inputs(x, y))
                s.step += 1
                s.batch += 1
                self.after_step(loss)
                if s.step >= self.total_steps:
                    break
            if s.batch >= self.loader.batches_per_epoch:
                s.epoch, s.batch = s.epoch + 1, 0
        if self.trained and s.step % self.cfg.ckpt_every:  # the final state, unless the loop just saved it
            self.save()
        for cb in self.callbacks:
            cb.on_end(self)
        self.strategy.barrier()
        return self.summary(time.time() - t_start)

    def model_inputs(self, x, y):
        """A batch on the device, VAE-encoded unless the data are latents already."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.encoder is not None:
            x = vae_lib.encode(self.encoder, x)
        return x, y

    def after_step(self, loss):
        """Account for the step (skipped or recorded), run the callbacks, checkpoint every --ckpt-every."""
        step = self.state.step
        if self.step_fn.skipped:  # --on-nonfinite skip: the update was not applied
            self.skipped += 1
            max_skips = self.cfg.runtime.max_skips
            self.logger.info(f"warning: skipped step {step}: non-finite loss {loss.item():.4g} or gradient "
                             f"({self.skipped} skipped so far, --max-skips {max_skips})")
            if self.skipped > max_skips:
                raise NonFiniteError(f"more than --max-skips {max_skips} steps had a non-finite loss or "
                                     f"gradient (the last at step {step}). Try: {ADVICE}")
        else:
            self.guard.record(step, loss, self.step_fn.grad_norm)
            self.log.record(loss)
        for cb in self.callbacks:
            cb.on_step(self)
        if step % self.cfg.ckpt_every == 0:
            self.save()
            self.strategy.barrier()

    def save(self):
        return self.checkpointer.save(self.state, self.model, self.ema, self.opt, self.guard)

    def summary(self, seconds):
        """The run's summary dict; rank 0 also logs it."""
        s, steps = self.state, self.state.step - self.start_step
        grids = next((cb.last for cb in self.callbacks if hasattr(cb, "last")), None)
        out = {"steps": s.step, "steps_this_run": steps, "seconds": seconds, "final_loss": self.log.last_loss,
               "skipped_steps": self.skipped, "experiment_dir": self.exp_dir, "checkpoint": self.checkpointer.saved,
               "sample_grid": grids, "log": self.log.history}
        if self.strategy.is_main:
            self.logger.info(
                f"Done: {steps} steps this run (now at step {s.step}) in {seconds:.1f} s "
                f"({steps / max(seconds, 1e-9):.2f} steps/s), final loss {self.log.last_loss:.4f}.\n"
                f"  checkpoint:  {out['checkpoint']}\n  sample grid: {grids}\n"
                f"  log:         {os.path.join(self.exp_dir, 'log.txt')}")
        return out
