"""The parts of the training loop on their own: the one EMA, the resume arithmetic, the strategies, and the
short-function rule of eqm/ (no function over 60 lines, argument-parser builders aside)."""
import ast
import logging
import pathlib

import pytest
import torch

from eqm.config import TrainConfig
from eqm.ema import EMA, warmup_decay
from eqm.training.checkpointer import Checkpointer
from eqm.training.strategy import FSDP, Single, make_strategy
from eqm.training.trainer import step_budget

MAX_LINES = 60
PARSER_BUILDERS = {"get_parser", "parse_args", "add_sampler_options", "add_transport_args", "add_reliability_args"}


def test_no_long_functions_in_eqm():
    root = pathlib.Path(__file__).resolve().parents[1]
    long = []
    for path in sorted((root / "eqm").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in PARSER_BUILDERS:
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions longer than 60 lines: " + ", ".join(long)


class WithBuffer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
        self.register_buffer("seen", torch.tensor(0))


def test_ema_averages_trainable_parameters_and_copies_buffers():
    model = WithBuffer()
    ema = EMA(model)
    before = {n: p.clone() for n, p in ema.model.named_parameters()}
    with torch.no_grad():
        model.lin.weight.add_(1.0)
        model.frozen.add_(5.0)  # not trainable: the average leaves it alone
        model.seen.fill_(7)
    ema.update(0.75)
    got = dict(ema.model.named_parameters())
    torch.testing.assert_close(got["lin.weight"], 0.75 * before["lin.weight"] + 0.25 * model.lin.weight)
    torch.testing.assert_close(got["lin.bias"], before["lin.bias"])
    torch.testing.assert_close(got["frozen"], before["frozen"])
    assert int(ema.model.seen) == 7
    assert not any(p.requires_grad for p in ema.model.parameters()) and not ema.model.training


def test_warmup_decay():
    assert warmup_decay(0.999, 0) == pytest.approx(0.1) and warmup_decay(0.999, 90) == pytest.approx(0.91)
    assert warmup_decay(0.999, 10 ** 6) == 0.999


def _cfg(argv):
    from eqm import train

    parser = train.get_parser()
    return train.resolve_config(parser.parse_args(["--data-path", "digits", *argv]), parser)


def test_resume_position_rescales_to_the_new_batch_size():
    cfg = _cfg(["--global-batch-size", "32"])
    ck = Checkpointer(cfg, None, Single(), torch.device("cpu"), logging.getLogger("test"))
    state = ck._position(40, {"epoch": 3, "batch": 10, "global_batch_size": 64}, batches_per_epoch=56)
    assert (state.step, state.epoch, state.batch) == (40, 3, 20)  # 10 batches of 64 = 20 of 32
    state = ck._position(130, None, batches_per_epoch=56)  # a published checkpoint: from the step alone
    assert (state.step, state.epoch, state.batch) == (130, 2, 18)


def test_step_budget_and_strategies():
    assert step_budget(_cfg([]).optim, 28) == 1500  # the digits budget
    assert step_budget(_cfg(["--epochs", "2"]).optim, 28) == 56
    assert isinstance(make_strategy(True, 0, 1), Single) and not make_strategy(True, 0, 1).ddp
    assert make_strategy(False, 1, 2).ddp and not make_strategy(False, 1, 2).is_main
    fsdp = make_strategy(True, 0, 2)
    assert isinstance(fsdp, FSDP) and not fsdp.ddp
    assert isinstance(_cfg([]), TrainConfig)
