"""One sampling loop for every sampler: eager, compiled (torch.compile of the same step), or CUDA graphs.

A sampler (eqm.sampling.samplers) is an initial state plus an update rule. The Engine owns static buffers
(x, the sampler's state, labels, the adaptive-compute mask, per-sample evaluation counts, the step index)
and one `step` that updates them in place: the eager loop calls it, `compile=True` runs torch.compile of that
very function (gpt-fast style), and on CUDA a block of compiled steps is captured as a CUDA graph and replayed.
Adaptive compute freezes a sample once |f(x)| (L2 over C, H, W) falls below `stop_grad_norm`; the eager loop
then runs the step on the active samples only, the compiled one masks the frozen ones (static shapes).
Inpainting clamps the known pixels after every update (`known=(mask, values)`).
"""
import contextlib

import torch
from tqdm.auto import tqdm

from eqm.execution import autocast, check_precision, model_ops, unwrap
from eqm.fast import compile_fn
from eqm.sampling.field import make_field
from eqm.sampling.samplers import make_sampler


class Engine:
    """Reusable sampler for one model, batch shape and setting; `run(x, y, steps)` -> (x, stats).

    shape: (N, C, H, W); dtype: of the buffers (default float32).
    sampler: a name from SAMPLERS with its options (stepsize, schedule, mu, betas, eps, temperature, method,
        atol, rtol: see make_sampler), or a sampler object.
    field: a callable (x, y) -> f replacing the model's guided field (e.g. a composition); the model is
        still what is put in eval mode while sampling.
    precision: "fp32", "tf32" or "bf16" (eqm.execution.PRECISIONS; bf16: autocast for the model; the TF32 switch
        itself is process-wide, eqm.execution.set_precision). compile: torch.compile the step (backend
        "inductor", or "aot_eager" for quick tests). cuda_graph: capture `block` steps as a CUDA graph
        (default: on for CUDA with compile). An adaptive ODE method (dopri5) picks its steps from the data and
        always runs eagerly.
    """

    def __init__(self, model, shape, device, *, sampler="gd", field=None, cfg_scale=1.0, cfg_channels=3,
                 stop_grad_norm=None, null_label=None, precision="fp32", compile=False, backend="inductor",
                 cuda_graph=None, block=10, dtype=torch.float32, known=None, **options):
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        if stop_grad_norm is not None and stop_grad_norm < 0:
            raise ValueError(f"stop_grad_norm must be >= 0, got {stop_grad_norm}")
        check_precision(precision)
        self.sampler = make_sampler(sampler, **options) if isinstance(sampler, str) else sampler
        self.device = torch.device(device)
        if not self.sampler.fixed_grid:
            compile, cuda_graph = False, False
        self.cuda_graph = (self.device.type == "cuda" and compile) if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs a CUDA device; on CPU leave it at None/False")
        self.model, self.stop, self.precision, self.block = model, stop_grad_norm, precision, block
        if null_label is None and hasattr(unwrap(model), "num_classes"):
            null_label = unwrap(model).num_classes
        self.null_label = null_label
        self.field = field if field is not None else make_field(model, cfg_scale, cfg_channels, null_label)
        kw = dict(device=self.device, dtype=dtype)
        n = shape[0]
        self.x = torch.zeros(shape, **kw)
        self.state = self.sampler.init_state(self.x) if self.sampler.fixed_grid else {}
        self.y = torch.zeros(n, dtype=torch.long, device=self.device)
        self.active = torch.ones(n, dtype=torch.bool, device=self.device)
        self.nfe = torch.zeros(n, dtype=torch.long, device=self.device)
        self.k, self.n = torch.zeros((), **kw), torch.ones((), **kw)  # update index, number of updates
        self.known = None
        if known is not None:
            mask, values = known
            self.known = (mask.to(self.device, torch.bool).expand(shape).clone(),
                          values.to(**kw).expand(shape).clone())
        self.compiled = compile
        self.step_fn = compile_fn(self.step, backend) if compile else self.step
        self.graphs = {}  # number of steps -> captured CUDA graph
        self.pool = torch.cuda.graph_pool_handle() if self.cuda_graph else None  # one memory pool for all graphs

    def eval_field(self, z, y):
        """The field at z in the buffers' dtype (the model under autocast for bf16)."""
        with autocast(self.device, self.precision):
            f = self.field(z, y)
        return f.to(z.dtype)

    def step(self, k, n, x, y, state, active, nfe, known):
        """One update of the buffers in place; frozen samples keep x and their state."""
        x_new, new_state, f = self.sampler.update(k, n, x, state, lambda z: self.eval_field(z, y))
        if known is not None:
            x_new = torch.where(known[0], known[1], x_new)
        evals = self.sampler.evals_per_step
        if self.stop is None:
            x.copy_(x_new)
            for name, v in new_state.items():
                state[name].copy_(v)
            nfe.add_(evals)
        else:
            keep = active & ~(f.flatten(1).norm(dim=1) < self.stop)
            nfe.add_(active.long() * evals)
            kb = keep.view(-1, *([1] * (x.dim() - 1)))
            x.copy_(torch.where(kb, x_new, x))
            for name, v in new_state.items():
                state[name].copy_(torch.where(kb, v, state[name]))
            active.copy_(keep)
        k.add_(1)

    def _buffers(self):
        return self.k, self.n, self.x, self.y, self.state, self.active, self.nfe, self.known

    def _steps(self, count):
        if self.stop is None or self.compiled or self.cuda_graph:  # static shapes: mask the frozen samples
            for _ in range(count):
                self.step_fn(*self._buffers())
            return
        for _ in range(count):  # eager adaptive compute: the same step on the active samples only
            idx = self.active.nonzero().squeeze(1)
            if idx.numel() == 0:
                return
            sub = lambda t: t[idx]  # noqa: E731
            x, y, active, nfe = sub(self.x), sub(self.y), sub(self.active), sub(self.nfe)
            state = {name: sub(v) for name, v in self.state.items()}
            known = None if self.known is None else (sub(self.known[0]), sub(self.known[1]))
            self.step_fn(self.k, self.n, x, y, state, active, nfe, known)
            self.x[idx], self.active[idx], self.nfe[idx] = x, active, nfe
            for name, v in state.items():
                self.state[name][idx] = v

    @contextlib.contextmanager
    def _state_kept(self):
        """Warm-up and capture run steps on the buffers: put the sampling state back afterwards."""
        bufs = [self.x, self.active, self.nfe, self.k, *self.state.values()]
        saved = [b.clone() for b in bufs]
        yield
        for b, v in zip(bufs, saved):
            b.copy_(v)

    def _graph(self, count):
        """CUDA graph of `count` steps, captured on first use after a warm-up on a side stream."""
        if count not in self.graphs:
            with self._state_kept():
                self.graphs[count] = self._capture(count)
        return self.graphs[count]

    def _capture(self, count):
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            self._steps(min(count, 3))  # compile and allocate outside the capture
        torch.cuda.current_stream(self.device).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._steps(count)
        return graph

    def _chunk(self):
        # CPU: check for an all-frozen batch every step (free); CUDA: once per block (each check is a host sync).
        every_step = self.stop is not None and not self.cuda_graph and self.device.type == "cpu"
        return 1 if every_step else self.block

    @torch.no_grad()
    def prepare(self, steps):
        """Compile (and on CUDA capture the block and remainder graphs) for a `steps`-step run, so that
        timing a later run measures no compilation or capture."""
        if not self.sampler.fixed_grid:
            return
        with self._evaluating():
            self.n.fill_(max(steps - 1, 1))
            if not self.cuda_graph:
                with self._state_kept():
                    self._steps(1)
                return
            updates, chunk = steps - 1, self._chunk()
            for count in {min(chunk, updates), updates % chunk} - {0}:
                self._graph(count)

    @contextlib.contextmanager
    def _evaluating(self):
        """The model in eval mode while sampling (no label dropout), its mode restored afterwards."""
        was_training = getattr(self.model, "training", None)
        if was_training is not None:
            self.model.eval()
        try:
            yield
        finally:
            if was_training is not None:
                self.model.train(was_training)

    @torch.no_grad()
    def run(self, x, y, steps=250, progress=False):
        """Sample from start x (N, C, H, W) with labels y (N,), or y None for the null label.

        Returns (final x, stats): stats["nfe"] (N,) the field evaluations spent on each sample while active (a
        CFG evaluation counts once), "total_nfe", "stopped" (N,) bool, "updates" (steps - 1), and
        "evaluated_steps" (updates actually run on the batch).
        """
        if tuple(x.shape) != tuple(self.x.shape):
            raise ValueError(f"this sampler was built for shape {tuple(self.x.shape)}, got {tuple(x.shape)}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if y is None:
            if self.null_label is None:
                raise ValueError("y=None samples the null label: pass null_label= or give the model a num_classes")
            y = torch.full((x.shape[0],), self.null_label, dtype=torch.long)
        self.x.copy_(x)
        self.y.copy_(y)
        if self.known is not None:
            self.x.copy_(torch.where(self.known[0], self.known[1], self.x))
        for v in self.state.values():
            v.zero_()
        self.active.fill_(True)
        self.nfe.zero_()
        self.k.zero_()
        updates = steps - 1
        self.n.fill_(max(updates, 1))
        with self._evaluating():
            done = self._run(updates, progress) if self.sampler.fixed_grid else self._solve(updates)
        stats = {"nfe": self.nfe.clone(), "total_nfe": int(self.nfe.sum()), "stopped": ~self.active,
                 "updates": updates, "evaluated_steps": done}
        return self.x.clone(), stats

    def _run(self, updates, progress):
        chunk = self._chunk()
        bar = tqdm(total=updates, disable=not progress, desc=f"{self.sampler.name} sampling")
        done = 0
        while done < updates:
            count = min(chunk, updates - done)
            if self.cuda_graph:
                self._graph(count).replay()
            else:
                self._steps(count)
            done += count
            bar.update(count)
            if self.stop is not None and not bool(self.active.any()):
                break
        bar.close()
        return done

    def _solve(self, updates):
        """Adaptive ODE: one eager solve; the field counts evaluations and is zero on frozen samples and known
        pixels (so they stay put). `updates` is unused: the solver picks its steps."""
        if updates == 0:
            return 0
        active, nfe, known = self.active, self.nfe, self.known

        def field(z):
            f = self.eval_field(z, self.y)
            nfe.add_(active.long())
            if self.stop is not None:
                active.copy_(active & ~(f.flatten(1).norm(dim=1) < self.stop))
                f = f * active.view(-1, *([1] * (f.dim() - 1)))
            return f if known is None else f.masked_fill(known[0], 0)
        self.x.copy_(self.sampler.solve(self.x, field))
        return int(nfe.max())


def sample(model, x, y, *, sampler="gd", steps=250, stepsize=0.003, return_stats=False, progress=False,
           compile=False, **kw):
    """Sample from start x (N, C, H, W) (not modified) with labels y (N,) (None: the null label).

    sampler: "gd", "ngd", "adam", "langevin" or "ode"; keywords: those of Engine and make_sampler
    (mu, schedule, betas, eps, temperature, method, atol, rtol, cfg_scale, cfg_channels, stop_grad_norm,
    null_label, precision, backend, cuda_graph, block, field, known).
    `steps` sampling steps make steps - 1 updates (250 -> 249), as the published code does.
    With compile=True the Engine (compiled step, captured graphs) is cached on the model per setting, so
    repeated calls with the same batch shape reuse it.
    Returns the final x, or (x, stats) with return_stats (see Engine.run).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    kw.update(sampler=sampler, stepsize=stepsize, compile=compile)
    if compile and kw.get("field") is None and kw.get("known") is None:
        key = (tuple(x.shape), str(x.device), x.dtype, tuple(sorted((k, repr(v)) for k, v in kw.items())),
               model_ops(model))
        per_model = model.__dict__.setdefault("_sampling_engines", {})  # lives and dies with the model
        if key not in per_model:
            per_model[key] = Engine(model, x.shape, x.device, dtype=x.dtype, **kw)
        engine = per_model[key]
    else:
        engine = Engine(model, x.shape, x.device, dtype=x.dtype, **kw)
    out, stats = engine.run(x, y, steps, progress=progress)
    return (out, stats) if return_stats else out
