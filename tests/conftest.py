import os

import pytest  # noqa: E402
import torch  # noqa: E402  (importing torch does not import triton)

# Must be set before triton is first imported: without a GPU the kernel tests run in the Triton
# interpreter on CPU; with one they run the compiled kernels on CUDA.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """Small ops on a shared 2-core machine: a second OpenMP thread only adds contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def aot_eager_compiles(monkeypatch):
    """Every eqm compile (training step, sampling engine) goes through backend "aot_eager": the same dynamo
    graphs without inductor's slow CPU code generation. Returns the list of functions compiled."""
    from eqm import fast
    from eqm.sampling import engine

    compiled, compile_fn = [], fast.compile_fn

    def aot_eager(fn, backend="inductor"):
        compiled.append(fn)
        return compile_fn(fn, "aot_eager")

    monkeypatch.setattr(fast, "compile_fn", aot_eager)
    monkeypatch.setattr(engine, "compile_fn", aot_eager)
    return compiled
