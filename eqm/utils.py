"""Small helpers shared by the CLIs: image conversion, grids, logging, run folders, atomic file writes."""
import contextlib
import glob
import logging
import math
import os
import re
import tempfile

import numpy as np
import torch
from PIL import Image


def to_uint8(x):
    """(N, C, H, W) float in [-1, 1] -> (N, H, W, 3) uint8 numpy, as the ADM evaluator expects."""
    x = torch.clamp(127.5 * x.detach().float() + 128.0, 0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        raise ValueError(f"cannot turn {x.shape[1]}-channel tensors into RGB images")
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images, nrow=None, pad=2, min_tile=48):
    """Tile (N, H, W, 3) uint8 images into one uint8 array; tiny tiles are upscaled (nearest) for viewing."""
    n, h, w, _ = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol = math.ceil(n / nrow)
    scale = max(1, math.ceil(min_tile / max(h, w)))
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    return grid


def save_image_grid(x, path, nrow=None):
    """Save a (N, C, H, W) tensor in [-1, 1] (or (N, H, W, 3) uint8 array) as one PNG grid."""
    images = x if isinstance(x, np.ndarray) else to_uint8(x)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(make_grid(images, nrow=nrow)).save(path)
    return path


def create_logger(logging_dir=None, rank=0, name="eqm"):
    """Logger writing to stdout and `logging_dir/log.txt` on rank 0; silent on other ranks."""
    logger = logging.getLogger(f"{name}.{rank}.{logging_dir}")
    logger.handlers.clear()
    logger.propagate = False
    if rank != 0:
        logger.addHandler(logging.NullHandler())
        return logger
    logger.setLevel(logging.INFO)
    fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    handlers = [logging.StreamHandler()]
    if logging_dir is not None:
        handlers.append(logging.FileHandler(os.path.join(logging_dir, "log.txt")))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    return logger


def format_config(args, keys=None):
    """One line per resolved option, for printing at start-up."""
    d = vars(args)
    keys = keys or sorted(d)
    width = max(len(k) for k in keys)
    return "\n".join(f"  {k:<{width}} = {d[k]}" for k in keys)


def os_error_line(err):
    """One line for an OSError from the file system (read-only folder, full disk, ...)."""
    where = f": {err.filename}" if getattr(err, "filename", None) else ""
    return f"{err.strerror or err}{where} (check that the folder is writable and the disk has space)"


def claim_run_dir(results_dir, name):
    """Create and return results_dir/<index:03d>-<name> with index = 1 + the largest index there.

    os.mkdir is atomic, so two runs started together get different folders, and an index is never
    taken from a count of entries, so deleting an old run never makes a new one reuse a newer run's folder.
    """
    os.makedirs(results_dir, exist_ok=True)
    used = [int(m.group(1)) for m in (re.match(r"(\d+)-", e) for e in os.listdir(results_dir)) if m]
    index = max(used, default=-1) + 1
    while True:
        path = os.path.join(results_dir, f"{index:03d}-{name}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            index += 1


def find_outputs(folder, pattern=r"\d{6}\.png|grid\.png"):
    """Files in `folder` that an earlier sampling run wrote (sorted); [] for a missing or clean folder."""
    if not os.path.isdir(folder):
        return []
    return sorted(f for f in os.listdir(folder) if re.fullmatch(pattern, f))


TEMP_PREFIX = ".tmp-"  # temp files of atomic writes: .tmp-<pid>-<random>-<final name>, beside the final file


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path beside `path` to write; when the block ends it is fsynced and renamed onto `path`.

    Readers see the old file or the new one, never half of one. On an error the temp file is removed;
    one left by a killed process is removed later by remove_stale_temps.
    """
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=f"-{name}")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """open() for writing that replaces `path` atomically (see atomic_path) when the block ends."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def remove_stale_temps(folder, names=None, suffix=""):
    """Delete the temp files that killed atomic writes left in `folder`; returns their paths.

    names: the final file names whose temps to delete, all of them (the caller is their only writer).
    Otherwise every temp ending in `suffix` whose writer is no longer running on this machine: a temp
    of a live writer is kept, so two processes may write into one folder.
    """
    pattern = os.path.join(glob.escape(folder), TEMP_PREFIX)
    if names is not None:
        temps = [t for n in names for t in glob.glob(f"{pattern}*-{glob.escape(n)}")]
    else:
        temps = glob.glob(f"{pattern}*{glob.escape(suffix)}")
    removed = []
    for tmp in temps:
        m = re.match(rf"{re.escape(TEMP_PREFIX)}(\d+)-", os.path.basename(tmp))
        if names is None and m and (int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1)))):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
            removed.append(tmp)
    return removed
