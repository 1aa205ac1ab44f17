"""Small helpers shared by the CLIs: image conversion, grids, logging, EMA."""
import logging
import math
import os
import re

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
