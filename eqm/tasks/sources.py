"""Image sources for the tasks, in [-1, 1] model space: digits, photo patches, corrupted digits, files."""
import os

import numpy as np
import torch

SOURCES = ("digits", "photo-patches", "noisy-digits", "shuffled-digits", "inverted-digits")


def digits(image_size=8):
    """scikit-learn's digits (1797, 1, S, S) and their labels."""
    from eqm.datasets import load_digits_tensor

    return load_digits_tensor(image_size)


def photo_patches(n=1797, size=8, seed=0):
    """n random size x size grayscale patches of scikit-learn's two sample photos (china, flower),
    each patch linearly stretched to [-1, 1] as digits are (ink 1, paper -1 differ, but the range is the same)."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [img.mean(-1) for img in load_sample_images().images]
    out = np.empty((n, size, size), dtype=np.float32)
    for i in range(n):
        p = photos[i % len(photos)]
        r, c = rng.integers(0, p.shape[0] - size), rng.integers(0, p.shape[1] - size)
        patch = p[r:r + size, c:c + size]
        lo, hi = patch.min(), patch.max()
        out[i] = (patch - lo) / max(hi - lo, 1e-6) * 2 - 1
    return torch.from_numpy(out).unsqueeze(1)


def corrupted_digits(kind, seed=0):
    """Digits made out-of-distribution: "noisy" (+ N(0, 0.5^2), clamped), "shuffled" (pixels permuted, one
    permutation per image), "inverted" (ink and paper swapped)."""
    x, _ = digits()
    g = torch.Generator().manual_seed(seed)
    if kind == "noisy":
        return (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    if kind == "shuffled":
        flat = x.flatten(1)
        idx = torch.argsort(torch.rand(flat.shape, generator=g), dim=1)
        return flat.gather(1, idx).view_as(x)
    if kind == "inverted":
        return -x
    raise ValueError(f"unknown corruption {kind!r}")


def load_source(name, image_size=8):
    """(images, labels or None) for a name in SOURCES, a .npy/.npz array (N, C, H, W) in model space, or an
    image file (read as grayscale for 1-channel models is up to the caller: returned as RGB in [-1, 1])."""
    if name == "digits":
        return digits(image_size)
    if name == "photo-patches":
        return photo_patches(size=image_size), None
    if name.endswith("-digits") and name in SOURCES:
        return corrupted_digits(name[: -len("-digits")]), None
    if not os.path.exists(name):
        raise ValueError(f"input {name!r}: not one of {', '.join(SOURCES)} and no such file")
    if name.endswith((".npy", ".npz")):
        arr = np.load(name)
        arr = arr[arr.files[0]] if hasattr(arr, "files") else arr
        x = torch.from_numpy(np.asarray(arr, dtype=np.float32))
        if x.dim() != 4:
            raise ValueError(f"input {name!r}: expected an (N, C, H, W) array in model space, "
                             f"got shape {tuple(x.shape)}")
        return x, None
    from PIL import Image

    img = np.asarray(Image.open(name).convert("RGB").resize((image_size, image_size)), dtype=np.float32)
    return torch.from_numpy(img / 127.5 - 1).permute(2, 0, 1).unsqueeze(0), None
