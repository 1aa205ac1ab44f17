"""GD / NAG-GD sampling from static buffers: the same samples as eqm.samplers.sample, without per-step
Python, allocation or launch overhead.

One step function updates preallocated tensors in place (x, the NAG momentum g, labels, the
adaptive-compute mask and the per-sample evaluation count). Frozen samples (adaptive compute) are
masked instead of gathered, so every step has the same shapes. On CUDA a block of K steps is
captured once as a CUDA graph and replayed; on CPU (and inside the CUDA graph) the step runs under
torch.compile(fullgraph=True).
"""
import contextlib

import torch
from tqdm.auto import tqdm

from eqm.fast import autocast, compile_fn, unwrap
from eqm.samplers import SAMPLERS, make_field


class GraphSampler:
    """Reusable sampler for one model, batch shape and setting; call `run(x, y, steps)`.

    shape: (N, C, H, W) of the batch; the sampler keywords are those of eqm.samplers.sample.
    precision: "fp32" (matches the plain loop) or "bf16" (autocast for the model).
    compile: torch.compile the step (backend "inductor", or "aot_eager" for quick tests).
    cuda_graph: capture `block` steps as a CUDA graph (default: on for CUDA tensors).
    With stop_grad_norm, the loop leaves early once every sample is frozen (checked per block).
    """

    def __init__(self, model, shape, device, *, sampler="gd", stepsize=0.003, mu=0.3, cfg_scale=1.0,
                 cfg_channels=3, stop_grad_norm=None, null_label=None, precision="fp32", compile=True,
                 backend="inductor", cuda_graph=None, block=10):
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.device = torch.device(device)
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs a CUDA device; on CPU leave it at None/False")
        self.model, self.sampler, self.stepsize, self.mu = model, sampler, stepsize, mu
        self.stop_grad_norm, self.precision, self.block = stop_grad_norm, precision, block
        self.null_label = unwrap(model).num_classes if null_label is None else null_label
        self.field = make_field(model, cfg_scale, cfg_channels, self.null_label)
        n = shape[0]
        self.x = torch.zeros(shape, device=self.device)
        self.g = torch.zeros(shape, device=self.device)
        self.y = torch.zeros(n, dtype=torch.long, device=self.device)
        self.active = torch.ones(n, dtype=torch.bool, device=self.device)
        self.nfe = torch.zeros(n, dtype=torch.long, device=self.device)
        self.step_fn = compile_fn(self.step, backend) if compile else self.step
        self.graphs = {}  # number of steps -> captured CUDA graph
        self.pool = torch.cuda.graph_pool_handle() if self.cuda_graph else None  # one memory pool for all graphs

    def step(self, x, g, y, active, nfe):
        """One update of the buffers in place; the frozen samples keep x and g unchanged."""
        eta = self.stepsize
        z = x + (eta * self.mu) * g if self.sampler == "ngd" else x
        with autocast(self.device, self.precision):
            f = self.field(z, y)
        f = f.float()
        x_new = x + eta * f
        if self.stop_grad_norm is None:
            x.copy_(x_new)
            g.copy_(f)
            nfe.add_(1)
            return
        done = active & (f.flatten(1).norm(dim=1) < self.stop_grad_norm)
        keep = (active & ~done).view(-1, *([1] * (x.dim() - 1)))
        nfe.add_(active.long())
        x.copy_(torch.where(keep, x_new, x))
        g.copy_(torch.where(keep, f, g))
        active.copy_(active & ~done)

    def _steps(self, k):
        for _ in range(k):
            self.step_fn(self.x, self.g, self.y, self.active, self.nfe)

    @contextlib.contextmanager
    def _state_kept(self):
        """Warm-up and capture run steps on the buffers: put the sampling state back afterwards."""
        bufs = (self.x, self.g, self.active, self.nfe)
        saved = [b.clone() for b in bufs]
        yield
        for b, v in zip(bufs, saved):
            b.copy_(v)

    def _graph(self, k):
        """CUDA graph of k steps, captured on first use after a warm-up on a side stream."""
        if k not in self.graphs:
            with self._state_kept():
                self.graphs[k] = self._capture(k)
        return self.graphs[k]

    def _capture(self, k):
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            self._steps(min(k, 3))  # compile and allocate outside the capture
        torch.cuda.current_stream(self.device).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._steps(k)
        return graph

    def _chunk(self):
        # CPU: check for an all-frozen batch every step (free); CUDA: once per block (one sync).
        return self.block if (self.cuda_graph or self.stop_grad_norm is None) else 1

    @torch.no_grad()
    def prepare(self, steps):
        """Compile (and on CUDA capture the block and remainder graphs) for a `steps`-step run, so that
        timing a later run measures no compilation or capture."""
        if not self.cuda_graph:
            with self._state_kept():
                self._steps(1)
            return
        updates, chunk = steps - 1, self._chunk()
        for k in {min(chunk, updates), updates % chunk} - {0}:
            self._graph(k)

    @torch.no_grad()
    def run(self, x, y, steps=250, progress=False):
        """Sample from start x (N, C, H, W) with labels y (N,): (final x, stats) as eqm.samplers.sample."""
        if tuple(x.shape) != tuple(self.x.shape):
            raise ValueError(f"this sampler was built for shape {tuple(self.x.shape)}, got {tuple(x.shape)}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.x.copy_(x)
        self.g.zero_()
        self.y.copy_(y)
        self.active.fill_(True)
        self.nfe.zero_()
        was_training = self.model.training
        self.model.eval()  # sampling never drops labels (train-mode label dropout), as the plain sampler's callers set
        try:
            return self._run(steps, progress)
        finally:
            self.model.train(was_training)

    def _run(self, steps, progress):
        updates, chunk = steps - 1, self._chunk()
        bar = tqdm(total=updates, disable=not progress, desc=f"{self.sampler} sampling (static buffers)")
        done = 0
        while done < updates:
            k = min(chunk, updates - done)
            if self.cuda_graph:
                self._graph(k).replay()
            else:
                self._steps(k)
            done += k
            bar.update(k)
            if self.stop_grad_norm is not None and not bool(self.active.any()):
                break
        bar.close()
        stats = {"nfe": self.nfe.clone(), "total_nfe": int(self.nfe.sum()), "stopped": ~self.active,
                 "updates": updates, "evaluated_steps": done}
        return self.x.clone(), stats


def sample_fast(model, x, y, *, sampler="gd", steps=250, stepsize=0.003, mu=0.3, cfg_scale=1.0, cfg_channels=3,
                stop_grad_norm=None, null_label=None, return_stats=False, progress=False, precision="fp32",
                compile=True, backend="inductor", cuda_graph=None, block=10):
    """eqm.samplers.sample from static buffers (same arguments and results), compiled and graph-captured.

    The GraphSampler (compiled step, captured graphs) is cached per model and setting, so repeated
    calls with the same batch shape reuse it. Extra keywords: see GraphSampler.
    stats (return_stats) also has "evaluated_steps": steps actually run (the whole batch is
    evaluated each step; "nfe" counts the evaluations spent on samples still active).
    """
    if y is None:
        label = unwrap(model).num_classes if null_label is None else null_label
        y = torch.full((x.shape[0],), label, dtype=torch.long, device=x.device)
    key = (tuple(x.shape), str(x.device), sampler, stepsize, mu, cfg_scale, cfg_channels, stop_grad_norm,
           null_label, precision, compile, backend, cuda_graph, block, unwrap(model).fused)
    per_model = model.__dict__.setdefault("_graph_samplers", {})  # lives and dies with the model
    if key not in per_model:
        per_model[key] = GraphSampler(model, x.shape, x.device, sampler=sampler, stepsize=stepsize, mu=mu,
                                      cfg_scale=cfg_scale, cfg_channels=cfg_channels,
                                      stop_grad_norm=stop_grad_norm, null_label=null_label, precision=precision,
                                      compile=compile, backend=backend, cuda_graph=cuda_graph, block=block)
    out, stats = per_model[key].run(x, y, steps, progress=progress)
    return (out, stats) if return_stats else out
