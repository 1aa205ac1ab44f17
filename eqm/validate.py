"""argparse `type=` functions that check a numeric flag when it is parsed.

A bad value gets argparse's one line (`prog: error: argument --lr: must be > 0, got -1`) before anything
starts, instead of a traceback, a hang or a wrong result hours into a run.
"""
import argparse
import math


def _number(kind, text):
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")


def number(kind=float, lo=None, hi=None, lo_open=False, hi_open=False, hint=""):
    """A type function for a finite `kind` (int or float) within [lo, hi] (open ends with lo_open/hi_open)."""

    def parse(text):
        v = _number(kind, text)
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}{hint}")
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo}, got {text}{hint}")
        if hi is not None and (v > hi or (hi_open and v == hi)):
            raise argparse.ArgumentTypeError(f"must be {'<' if hi_open else '<='} {hi}, got {text}{hint}")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its "invalid <name> value" fallback
    return parse


positive_int = number(int, lo=1)
nonneg_int = number(int, lo=0)
seed = number(int, lo=0, hi=2 ** 31 - 1)
finite_float = number(float)
positive_float = number(float, lo=0, lo_open=True)
nonneg_float = number(float, lo=0)
unit_interval = number(float, lo=0, hi=1)
# GD step sizes: the published ones are 0.0017 and 0.003; eta >= 1 jumps past the data and diverges
step_size = number(float, lo=0, hi=1, lo_open=True, hint=" (the published step sizes are 0.0017-0.003)")


def apply_types(parser, types):
    """Give the parser's options the `type=` functions in `types` ({dest: fn}); every dest must exist."""
    actions = {a.dest: a for a in parser._actions}
    missing = sorted(set(types) - set(actions))
    if missing:
        raise KeyError(f"{parser.prog} has no options {missing}")
    for dest, fn in types.items():
        actions[dest].type = fn
    return parser
