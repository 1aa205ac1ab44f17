"""Checkpoints: atomic save, and a safe load (weights_only=True) that also reads the published files.

Format: {"model", "ema", "opt", "args"} as published, plus "step" and "data_state" (whatever the trainer
passes) so a resumed run continues where it stopped. Files from the published code carry a pickled
argparse.Namespace; that class (and only it) is allow-listed, so a file from the internet cannot run code.
"""
import argparse
import glob
import os
import pickle
import warnings
import zipfile

import torch

from eqm.models import config_name
from eqm.utils import atomic_write, remove_stale_temps

SAFE_GLOBALS = [argparse.Namespace]
_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


_PLAIN = (torch.Tensor, str, int, float, bool, type(None), torch.Size, torch.dtype, argparse.Namespace)


def _check_loadable(obj, where="state"):
    """Raise TypeError for values that load_checkpoint (weights_only) would refuse, e.g. numpy arrays."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_loadable(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_loadable(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__name__}, which a weights_only load "
                        f"refuses; store tensors, numbers, strings, lists or dicts instead")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message is one line that says what to do."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist."""


def save_checkpoint(path, state):
    """Write `state` (a dict) to `path` atomically (eqm.utils.atomic_write).

    Temp files of earlier writes that were killed midway are removed first (eqm.utils.remove_stale_temps).
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    _check_loadable(state)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temps(folder, suffix=".pt")
    with atomic_write(path) as f:
        torch.save(state, f)


def checkpoint_kind(ckpt):
    """"eqm", "ebflow" or None (unknown, e.g. a bare state dict of another model) for a loaded checkpoint."""
    if not isinstance(ckpt, dict):
        return None
    a = ckpt.get("args")
    if isinstance(a, dict) and "arch" in a and "loss" in a:
        return "ebflow"
    if isinstance(a, argparse.Namespace) and hasattr(a, "model"):
        return "eqm"
    sd = ckpt.get("ema") if _is_state_dict(ckpt.get("ema")) else ckpt.get("model", ckpt)
    if isinstance(sd, dict) and any(isinstance(k, str) and k.endswith("x_embedder.proj.weight") for k in sd):
        return "eqm"
    return None


_TRAINERS = {"eqm": "EqM (eqm-train)", "ebflow": "EBFlow (python -m eqm.ebflow.train)"}


def load_checkpoint(path, map_location="cpu", kind=None):
    """torch.load with weights_only=True (argparse.Namespace, the published `args`, is allowed).

    Returns a dict. Any file that cannot be used (missing, a folder, empty, truncated, not a torch file,
    unsafe to unpickle, not a dict, or from the other trainer when `kind` is "eqm" or "ebflow") raises
    CheckpointError with a one-line message; a missing file raises CheckpointNotFound (a FileNotFoundError).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        pts = sorted(glob.glob(os.path.join(glob.escape(path), "**", "*.pt"), recursive=True))
        hint = f"e.g. {pts[-1]}" if pts else "it holds no .pt file"
        raise CheckpointError(f"checkpoint {path} is a folder: pass a checkpoint file ({hint})")
    if not os.path.exists(path):
        raise CheckpointNotFound(f"checkpoint not found: {path}")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): its write never finished; "
                              "use an earlier checkpoint")
    if head[:1] != b"\x80" and head != b"PK\x03\x04":  # a torch.save zip, or the legacy pickle format
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (not a torch.save file)")
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({size:,} bytes, no zip directory): "
                              "its write was cut short; use an earlier checkpoint")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # a plain pickle: refused below
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message advises weights_only=False: we never do that
        why = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), None)
        if why is None:
            raise CheckpointError(f"{path} is not a torch.save checkpoint (a plain pickle?)") from None
        why = why.replace("WeightsUnpickler error: ", "").split(". Please")[0]
        raise CheckpointError(f"refusing to load {path}: it holds objects other than tensors, plain containers "
                              f"and argparse.Namespace, which could run code when unpickled ({why})") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch.save file ({first})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint (a dict of weights)")
    found = checkpoint_kind(ckpt)
    if kind is not None and found is not None and found != kind:
        raise CheckpointError(f"{path} is an {_TRAINERS[found]} checkpoint, not an {_TRAINERS[kind]} one")
    return ckpt


def _is_state_dict(d):
    return isinstance(d, dict) and len(d) > 0 and all(isinstance(v, torch.Tensor) for v in d.values())


def _strip_prefixes(sd):
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def describe_state_dict(sd):
    """Model size read from the tensor shapes, e.g. "EqM-S/2 (hidden 384, depth 12, patch 2)"."""
    try:
        w = sd["x_embedder.proj.weight"]
        hidden, patch = w.shape[0], w.shape[-1]
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    except (KeyError, IndexError):
        return "not an EqM state dict"
    name = config_name(depth, hidden, patch)
    size = f"hidden {hidden}, depth {depth}, patch {patch}"
    return f"{name} ({size})" if name.startswith("EqM-") else name


def _mismatch_details(model_sd, sd):
    """Readable description of what differs between the two state dicts (beyond the size)."""
    lines = []
    for key, what in [("pos_embed", "tokens (input_size / patch)"), ("x_embedder.proj.weight", "input channels"),
                      ("y_embedder.embedding_table.weight", "label rows (num_classes + null)"),
                      ("final_layer.linear.weight", "output width (learn_sigma)")]:
        if key in sd and key in model_sd and sd[key].shape != model_sd[key].shape:
            lines.append(f"{key} ({what}): checkpoint {tuple(sd[key].shape)} vs model {tuple(model_sd[key].shape)}")
    missing = sorted(set(model_sd) - set(sd))
    unexpected = sorted(set(sd) - set(model_sd))
    if missing:
        lines.append(f"missing keys: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        lines.append(f"unexpected keys: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    return lines


def select_state_dict(ckpt, prefer="ema"):
    """(state_dict, source) from a full checkpoint, an ema-only file or a bare state dict."""
    if prefer not in ("ema", "model"):
        raise ValueError(f"prefer must be 'ema' or 'model', got {prefer!r}")
    if checkpoint_kind(ckpt) == "ebflow":
        raise ValueError(f"it is an {_TRAINERS['ebflow']} checkpoint, not an EqM one")
    if _is_state_dict(ckpt):
        return ckpt, "state_dict"
    if isinstance(ckpt, dict):
        for key in (prefer, "model" if prefer == "ema" else "ema"):
            if _is_state_dict(ckpt.get(key)):
                return ckpt[key], key
    keys = list(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
    raise ValueError(f"no model weights found: expected 'ema' or 'model' entries or a bare state dict, got {keys}")


def load_model_state(model, path_or_dict, prefer="ema", strict=True):
    """Load weights into `model` from a path or a loaded dict; returns the entry used ("ema", "model", ...).

    Accepts a full checkpoint, an ema-only file ({"ema": ...}) or a bare state dict; strips DDP/compile
    prefixes. A different model size fails with a message naming both sizes.
    """
    ckpt = load_checkpoint(path_or_dict) if isinstance(path_or_dict, (str, os.PathLike)) else path_or_dict
    sd, source = select_state_dict(ckpt, prefer)
    sd = _strip_prefixes(sd)
    model_sd = model.state_dict()
    details = _mismatch_details(model_sd, sd)
    if details and (strict or any(sd[k].shape != model_sd[k].shape for k in set(sd) & set(model_sd))):
        have, want = describe_state_dict(sd), describe_state_dict(model_sd)
        head = (f"checkpoint is {have} but model is {want}" if have != want
                else f"checkpoint and model are both {have} but differ")
        raise ValueError(head + ": " + "; ".join(details))  # one line
    model.load_state_dict(sd, strict=strict)
    return source


#################################################################################
#          Optimizer state: the published layout, both ways                     #
#################################################################################
# The published train.py builds AdamW(model.parameters()): every parameter, the frozen pos_embed first, in
# module order, so its `opt` state dict indexes parameters by that position. make_optimizer does the same.
# Checkpoints written here before that change indexed the trainable parameters only; both layouts load.

_RUNTIME_FLAGS = ("foreach", "fused", "capturable", "differentiable")


class OptimizerStateMismatch(ValueError):
    """A checkpoint's optimizer state that cannot be mapped onto this model's optimizer."""


def export_optimizer_state(opt_state):
    """`opt.state_dict()` as the published AdamW writes it: default runtime flags, CPU `step` counters."""
    groups = [{**g, **{k: None if k in ("foreach", "fused") else False for k in _RUNTIME_FLAGS if k in g}}
              for g in opt_state["param_groups"]]
    state = {i: {k: v.detach().to("cpu", torch.float32) if k == "step" and torch.is_tensor(v) else v
                 for k, v in s.items()} for i, s in opt_state["state"].items()}
    return {"state": state, "param_groups": groups}


def import_optimizer_state(opt_state, model, opt):
    """A checkpoint's optimizer state laid out for `opt` (built over model.parameters()), from either layout.

    Raises OptimizerStateMismatch (one line) when it belongs to another model or optimizer.
    """
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    trainable = [i for i, p in enumerate(params) if p.requires_grad]
    try:
        groups, state = opt_state["param_groups"], opt_state["state"]
        saved = [i for g in groups for i in g["params"]]
    except (KeyError, TypeError):
        raise OptimizerStateMismatch("the checkpoint's optimizer state is not a torch optimizer state dict") from None
    if "betas" not in groups[0] or not all({"exp_avg", "exp_avg_sq"} <= set(s) for s in state.values()):
        raise OptimizerStateMismatch("the checkpoint's optimizer state is not AdamW's (the published optimizer)")
    if len(groups) != 1 or len(opt.param_groups) != 1:
        raise OptimizerStateMismatch(f"the checkpoint's optimizer has {len(groups)} parameter groups; the published "
                                     f"AdamW layout has one")
    if len(saved) == len(params):
        position = dict(zip(saved, range(len(params))))
    elif len(saved) == len(trainable):  # written here before the published layout: trainable parameters only
        position = dict(zip(saved, trainable))
    else:
        raise OptimizerStateMismatch(f"the checkpoint's optimizer holds {len(saved)} parameters; this model has "
                                     f"{len(params)} ({len(trainable)} trainable)")
    new_state = {}
    for i, s in state.items():
        p = params[position[i]]
        for k, v in s.items():
            if torch.is_tensor(v) and v.dim() and v.shape != p.shape:
                raise OptimizerStateMismatch(f"optimizer state {k!r} of {names[position[i]]} has shape "
                                             f"{tuple(v.shape)}, the parameter {tuple(p.shape)} (another model?)")
        new_state[position[i]] = s
    runtime = {k: opt.param_groups[0][k] for k in _RUNTIME_FLAGS if k in opt.param_groups[0]}
    return {"state": new_state, "param_groups": [{**groups[0], **runtime, "params": list(range(len(params)))}]}
