"""Samplers: an initial state plus one update rule each, written once and run by eqm.sampling.engine.

Sign convention of the published code: the model predicts f(x) = -grad E, so descent adds eta * f.
`update(k, n, x, state, field)` is a pure function of tensors: k is the update index and n the number of
updates (0-d float tensors, so one compiled step or CUDA graph serves every k and every step count), state
a dict of (N, ...) tensors from `init_state`, field(z) evaluates the (guided) model. It returns
(x_new, new_state, f), f the field at the current point, whose per-sample norm drives adaptive compute.
"""
import math

import torch

SCHEDULES = ("constant", "linear", "cosine")
ODE_FIXED = {"euler": "euler", "midpoint": "midpoint", "heun": "heun2", "rk4": "rk4"}  # name -> torchdiffeq
ODE_ADAPTIVE = ("dopri5",)
ODE_METHODS = tuple(ODE_FIXED) + ODE_ADAPTIVE


def schedule_factor(schedule, k, n):
    """Step-size multiplier at update k of n: constant 1, linear 1 - k/n, cosine (1 + cos(pi k/n)) / 2."""
    u = k / n
    if schedule == "constant":
        return torch.ones_like(k)
    if schedule == "linear":
        return 1 - u
    if schedule == "cosine":
        return 0.5 * (1 + torch.cos(math.pi * u))
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


class Descent:
    """Shared part of the descent samplers: step size eta times a schedule over the n updates."""
    evals_per_step = 1
    fixed_grid = True

    def __init__(self, stepsize=0.003, schedule="constant"):
        if not stepsize > 0:
            raise ValueError(f"stepsize must be positive, got {stepsize}")
        schedule_factor(schedule, torch.zeros(()), torch.ones(()))  # validates the name
        self.stepsize, self.schedule = stepsize, schedule

    def eta(self, k, n):
        return self.stepsize * schedule_factor(self.schedule, k, n)

    def init_state(self, x):
        return {}


class GD(Descent):
    """Gradient descent: x <- x + eta_k f(x)."""
    name = "gd"

    def update(self, k, n, x, state, field):
        f = field(x)
        return x + self.eta(k, n) * f, state, f


class NGD(Descent):
    """Published NAG-GD: g = f(x + eta mu g_prev), x <- x + eta g (g_prev = 0 at the start)."""
    name = "ngd"

    def __init__(self, stepsize=0.003, schedule="constant", mu=0.3):
        super().__init__(stepsize, schedule)
        self.mu = mu

    def init_state(self, x):
        return {"g": torch.zeros_like(x)}

    def update(self, k, n, x, state, field):
        eta = self.eta(k, n)
        g = field(x + (eta * self.mu) * state["g"])
        return x + eta * g, {"g": g}, g


class Adam(Descent):
    """Adam-style descent on the energy: per-coordinate step eta_k * m_hat / (sqrt(v_hat) + eps) along f."""
    name = "adam"

    def __init__(self, stepsize=0.01, schedule="constant", betas=(0.9, 0.999), eps=1e-8):
        super().__init__(stepsize, schedule)
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Adam betas must lie in [0, 1), got {betas}")
        self.betas, self.eps = tuple(betas), eps

    def init_state(self, x):
        return {"m": torch.zeros_like(x), "v": torch.zeros_like(x)}

    def update(self, k, n, x, state, field):
        b1, b2 = self.betas
        f = field(x)
        m = b1 * state["m"] + (1 - b1) * f
        v = b2 * state["v"] + (1 - b2) * f * f
        m_hat, v_hat = m / (1 - b1 ** (k + 1)), v / (1 - b2 ** (k + 1))
        return x + self.eta(k, n) * m_hat / (v_hat.sqrt() + self.eps), {"m": m, "v": v}, f


class Langevin(Descent):
    """Annealed Langevin dynamics: GD plus noise sqrt(2 eta_k T_k) z, temperature T_k = T (1 - k/n) -> 0.

    The noise comes from the global torch generator (seed it for reproducible samples; a compiled step draws
    different, equally distributed noise than the eager one).
    """
    name = "langevin"

    def __init__(self, stepsize=0.003, schedule="constant", temperature=0.05):
        super().__init__(stepsize, schedule)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.temperature = temperature

    def update(self, k, n, x, state, field):
        eta = self.eta(k, n)
        f = field(x)
        temp = self.temperature * (1 - k / n)
        return x + eta * f + (2 * eta * temp).sqrt() * torch.randn_like(x), state, f


class ODE:
    """Integrate dx/dt = f(x) over t in [0, 1] on n equal steps with a torchdiffeq fixed-grid method.

    The step is torchdiffeq's own (its solver's step function), so the engine can compile and graph-capture it.
    """
    name = "ode"
    fixed_grid = True

    def __init__(self, method="rk4"):
        if method not in ODE_FIXED:
            raise ValueError(f"fixed-grid ODE method must be one of {tuple(ODE_FIXED)}, got {method!r}")
        solvers = _torchdiffeq_solvers()
        self.method = method
        # only the solver's step function is used: it takes the field as an argument, so build the solver once
        self.solver = solvers[ODE_FIXED[method]](func=None, y0=torch.zeros(()), rtol=0.0, atol=0.0)
        self.evals_per_step = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}[method]

    def init_state(self, x):
        return {}

    def update(self, k, n, x, state, field):
        def func(t, z, perturb=None):
            return field(z)
        dt = 1 / n
        dy, f = self.solver._step_func(func, k * dt, dt, (k + 1) * dt, x)
        return x + dy, state, f


class AdaptiveODE:
    """dx/dt = f(x) over t in [0, 1] with an adaptive torchdiffeq solver (dopri5, atol/rtol): its step sizes
    depend on the data, so it runs eagerly as one solve (see Engine)."""
    name = "ode"
    fixed_grid = False
    evals_per_step = 1

    def __init__(self, method="dopri5", atol=1e-5, rtol=1e-5):
        if method not in ODE_ADAPTIVE:
            raise ValueError(f"adaptive ODE method must be one of {ODE_ADAPTIVE}, got {method!r}")
        if not (atol > 0 and rtol > 0):
            raise ValueError(f"atol and rtol must be positive, got {atol}, {rtol}")
        _torchdiffeq_solvers()
        self.method, self.atol, self.rtol = method, atol, rtol

    def solve(self, x, field):
        """x(1) from x(0) = x; field(z) counts and masks the evaluations (see Engine._solve)."""
        import torchdiffeq

        t = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
        return torchdiffeq.odeint(lambda t, z: field(z), x, t, method=self.method, atol=self.atol,
                                  rtol=self.rtol)[-1]


def _torchdiffeq_solvers():
    try:
        from torchdiffeq._impl.odeint import SOLVERS
    except ImportError:
        raise ValueError("the ODE sampler needs torchdiffeq: pip install 'eqm-fast[ode]' "
                         "(or pip install torchdiffeq==0.2.5)") from None
    return SOLVERS


SAMPLERS = ("gd", "ngd", "adam", "langevin", "ode")


def make_sampler(name, stepsize=0.003, schedule="constant", mu=0.3, betas=(0.9, 0.999), eps=1e-8,
                 temperature=0.05, method="rk4", atol=1e-5, rtol=1e-5):
    """The sampler `name` (the options a sampler does not use are ignored)."""
    if name == "gd":
        return GD(stepsize, schedule)
    if name == "ngd":
        return NGD(stepsize, schedule, mu)
    if name == "adam":
        return Adam(stepsize, schedule, betas, eps)
    if name == "langevin":
        return Langevin(stepsize, schedule, temperature)
    if name == "ode":
        return AdaptiveODE(method, atol, rtol) if method in ODE_ADAPTIVE else ODE(method)
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")
