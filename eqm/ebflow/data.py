"""Data for EBFlow: 2-D toy sets generated in code, scikit-learn digits, a folder of images or a .npy."""
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

TOYS = ("sine", "swirl", "checkerboard", "8gaussians")


@dataclass
class Data:
    """Train/test tensors; n_bins is the number of levels of quantised data (None for continuous)."""
    name: str
    train: torch.Tensor
    test: torch.Tensor
    n_bins: int | None

    @property
    def shape(self):
        return tuple(self.train.shape[1:])


def toy_2d(name, n, seed=0):
    """n samples (n, 2) of a 2-D toy distribution."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=g)
    rn = lambda *s: torch.randn(*s, generator=g)
    if name == "sine":
        x = 8 * r(n) - 4
        return torch.stack([x, 1.5 * torch.sin(1.5 * x) + 0.2 * rn(n)], 1)
    if name == "swirl":
        t = 1.5 * math.pi * (1 + 2 * r(n))
        return torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 4 + 0.1 * rn(n, 2)
    if name == "checkerboard":
        x1 = 4 * r(n) - 2
        x2 = r(n) - 2 * torch.randint(0, 2, (n,), generator=g) + torch.floor(x1) % 2
        return torch.stack([x1, x2], 1) * 2
    if name == "8gaussians":
        k = torch.randint(0, 8, (n,), generator=g).float() * (math.pi / 4)
        return 3 * torch.stack([torch.cos(k), torch.sin(k)], 1) + 0.3 * rn(n, 2)
    raise ValueError(f"unknown toy data {name!r}; choose one of {', '.join(TOYS)}")


def _split(x, n_test, seed):
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    if n_test >= len(x):
        raise ValueError(f"need more than {n_test} examples to hold out a test set, got {len(x)}")
    return x[perm[n_test:]], x[perm[:n_test]]


def _images_to_tensor(a, source):
    if a.dtype.kind not in "ui" or a.min() < 0 or a.max() > 255:
        raise ValueError(f"{source}: expected 8-bit integer pixels in [0, 255], got dtype {a.dtype} "
                         f"range [{a.min()}, {a.max()}]; quantise the data first")
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4 and a.shape[-1] in (1, 3, 4) and a.shape[1] not in (1, 3):
        a = a.transpose(0, 3, 1, 2)
    elif a.ndim not in (2, 4):
        raise ValueError(f"{source}: expected an array (N, D), (N, H, W), (N, H, W, C) or (N, C, H, W), "
                         f"got shape {a.shape}")
    return torch.from_numpy(np.ascontiguousarray(a)).long()


def _load_folder(path):
    from PIL import Image
    exts = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
    files = sorted(f for f in os.listdir(path) if f.lower().endswith(exts))
    if not files:
        raise ValueError(f"no images ({', '.join(exts)}) found in folder {path}")
    imgs = [np.asarray(Image.open(os.path.join(path, f)).convert("RGB")) for f in files]
    sizes = {im.shape for im in imgs}
    if len(sizes) > 1:
        raise ValueError(f"images in {path} have different sizes {sorted(sizes)}; resize them to one size")
    return _images_to_tensor(np.stack(imgs), path)


def load_data(name, n_train=20000, n_test=2000, seed=0):
    """Load `name`: a toy in TOYS, 'digits', a folder of images, or a .npy file of 8-bit images."""
    if name in TOYS:
        return Data(name, toy_2d(name, n_train, seed), toy_2d(name, n_test, seed + 1), None)
    if name == "digits":
        from sklearn.datasets import load_digits
        x = torch.from_numpy(load_digits().images).long().view(-1, 1, 8, 8)
        train, test = _split(x, 297, seed)
        return Data(name, train, test, 17)
    if name.endswith(".npy") and os.path.isfile(name):
        x = _images_to_tensor(np.load(name), name)
    elif os.path.isdir(name):
        x = _load_folder(name)
    else:
        raise ValueError(f"unknown data {name!r}: use one of {', '.join(TOYS)}, 'digits', "
                         f"a folder of images or an existing .npy file")
    train, test = _split(x, max(1, min(n_test, len(x) // 10)), seed)
    return Data(name, train, test, 256)
