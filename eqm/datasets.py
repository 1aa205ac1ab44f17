"""Data sources behind one interface (DataSource), the resumable per-rank order, ImageFolder and digits.

A DataSource says what its samples are (`shape`, `num_classes`, pixels or `latent`, `vae_factor`) and
hands out a Loader per rank with `loader(batch_size, rank, world_size, seed)`. Contract of a Loader:
  - `set_epoch(epoch, start_batch=0)` fixes the order of that epoch (a function of seed and epoch only) and
    skips the first `start_batch` batches, so a resumed run continues at the same position;
  - `batches_per_epoch` is the number of batches one rank gets per epoch;
  - iterating it yields `(x, y)` batches of `batch_size` for the current epoch, x of shape
    (B, *source.shape): pixels in [-1, 1] (to feed the model or a VAE encoder) or, for a latent source, latents.
This module is the leaf of the data layer: eqm.latents and eqm.dali build on it, eqm.data picks a source.
"""
import os

import numpy as np
import torch
from PIL import Image

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def center_crop_arr(pil_image, image_size):
    """ADM center crop: halve with BOX while the short side is >= 2*size, BICUBIC to size, crop the middle."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size])


def pil_to_tensor(pil_image):
    """PIL RGB image -> (3, H, W) float tensor in [-1, 1]."""
    arr = np.array(pil_image, dtype=np.uint8)  # a writable copy
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/**/<image>; classes are the sorted subfolder names. Items are indexed by (index, flip)."""

    def __init__(self, root, image_size):
        if not os.path.isdir(root):
            raise FileNotFoundError(
                f"data path {root!r} does not exist or is not a folder. Pass --data-path pointing to an "
                "ImageFolder (one subfolder per class, e.g. ImageNet's train/), or --data-path digits "
                "for the built-in 8x8 digits.")
        self.root, self.image_size = root, image_size
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        self.samples = []
        for label, cls in enumerate(self.classes):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, cls), followlinks=True)):
                for f in sorted(files):
                    if f.lower().endswith(IMG_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, f), label))
        if not self.samples:
            raise FileNotFoundError(
                f"no images found under {root!r}: expected class subfolders holding files with extensions "
                f"{', '.join(IMG_EXTENSIONS)}")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        index, flip = key if isinstance(key, tuple) else (key, False)
        path, label = self.samples[index]
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        img = center_crop_arr(img, self.image_size)
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return pil_to_tensor(img), label


def load_digits_tensor(image_size=8):
    """scikit-learn's 8x8 digits as (1797, 1, S, S) floats in [-1, 1] and int64 labels (10 classes)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().div_(8.0).sub_(1.0).unsqueeze(1)  # pixel values 0..16
    if image_size != 8:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear",
                                            align_corners=False).clamp_(-1, 1)
    return x, torch.from_numpy(d.target).long()


class DistributedIndexSampler:
    """Deterministic per-epoch shuffle split across ranks (like DistributedSampler, drop_last=True),
    with random horizontal flips drawn from the same generator, and resumable at a batch position."""

    def __init__(self, num_items, batch_size, rank=0, world_size=1, seed=0, shuffle=True, flip=False):
        if num_items // world_size < batch_size:
            raise ValueError(f"dataset has {num_items} items: too few for {world_size} rank(s) x local batch "
                             f"{batch_size}; lower --global-batch-size")
        self.num_items, self.batch_size = num_items, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.flip = shuffle, flip
        self.per_rank = num_items // world_size
        self.batches_per_epoch = self.per_rank // batch_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def indices(self):
        """(index, flip) tensors for this rank's remaining items of the current epoch."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        n = self.num_items
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        flips = torch.rand(n, generator=g) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        total = self.per_rank * self.world_size
        idx, fl = order[self.rank:total:self.world_size], flips[self.rank:total:self.world_size]
        lo, hi = self.start_batch * self.batch_size, self.batches_per_epoch * self.batch_size
        return idx[lo:hi], fl[lo:hi]

    def __iter__(self):
        idx, fl = self.indices()
        return iter(zip(idx.tolist(), fl.tolist()))

    def __len__(self):
        return len(self.indices()[0])


class Loader:
    """One rank's batches of the current epoch, in the order of a DistributedIndexSampler."""

    def __init__(self, sampler):
        self.sampler = sampler

    @property
    def batches_per_epoch(self):
        return self.sampler.batches_per_epoch

    def set_epoch(self, epoch, start_batch=0):
        """Order of `epoch` (a function of seed and epoch), starting after its first `start_batch` batches."""
        self.sampler.set_epoch(epoch, start_batch)

    def __len__(self):
        return len(self.sampler) // self.sampler.batch_size

    def __iter__(self):
        idx, flip = self.sampler.indices()
        bs = self.sampler.batch_size
        for i in range(0, len(idx) - bs + 1, bs):
            yield self.batch(idx[i:i + bs], flip[i:i + bs])

    def batch(self, idx, flip):
        """(x, y) for global item indices `idx`; `flip[i]` asks for the mirrored item."""
        raise NotImplementedError


class DataSource:
    """What the trainer needs from a data set; subclasses set the attributes and build the loaders."""

    num_classes: int  # labels lie in [0, num_classes)
    shape: tuple  # (C, H, W) of one x the loaders yield
    image_size: int  # pixels per side of the images (before a VAE encoded them, for a latent source)
    latent: bool = False  # x are VAE latents already: no encoder in the training loop
    vae: str = None  # the VAE that encoded them (latent sources)
    vae_factor: int = 1  # image_size // shape[-1]: pixels per latent, 1 for pixels
    num_items: int

    @property
    def channels(self):
        return self.shape[0]

    def _sampler(self, batch_size, rank, world_size, seed, flip):
        return DistributedIndexSampler(self.num_items, batch_size, rank, world_size, seed, shuffle=True, flip=flip)

    def loader(self, batch_size, rank=0, world_size=1, seed=0):
        """A Loader of `batch_size` items per batch over this rank's share; its order is fixed by `seed`."""
        raise NotImplementedError


class TensorLoader(Loader):
    """Batches from in-memory tensors (no workers: indexing is the whole cost)."""

    def __init__(self, x, y, sampler):
        super().__init__(sampler)
        self.x, self.y = x, y

    def batch(self, idx, flip):
        x = self.x[idx]
        if flip.any():
            x[flip] = x[flip].flip(-1)
        return x, self.y[idx]


class DigitsSource(DataSource):
    """scikit-learn's 8x8 digits (1797, 10 classes, never flipped: digits are not mirror-symmetric)."""

    def __init__(self, image_size=8):
        self.x, self.y = load_digits_tensor(image_size)
        self.num_classes, self.num_items = 10, len(self.x)
        self.shape, self.image_size = tuple(self.x.shape[1:]), image_size

    def loader(self, batch_size, rank=0, world_size=1, seed=0):
        return TensorLoader(self.x, self.y, self._sampler(batch_size, rank, world_size, seed, flip=False))


class FolderLoader(Loader):
    """A torch DataLoader (worker processes decode and crop) over an ImageFolder, in the sampler's order."""

    def __init__(self, dataset, sampler, num_workers, pin_memory):
        super().__init__(sampler)
        self.dl = torch.utils.data.DataLoader(dataset, batch_size=sampler.batch_size, sampler=sampler,
                                              num_workers=num_workers, pin_memory=pin_memory, drop_last=True,
                                              # worker seeds from a private generator: the global RNG
                                              # (noise, t) must not depend on when an epoch starts
                                              generator=torch.Generator().manual_seed(sampler.seed))

    def __len__(self):
        return len(self.dl)

    def __iter__(self):
        return iter(self.dl)


class ImageFolderSource(DataSource):
    """An ImageFolder with the ADM center crop and random horizontal flips, decoded by DataLoader workers.

    num_classes: the model's label count (at least the number of class folders); default that number.
    """

    def __init__(self, root, image_size, num_classes=None, flip=True, num_workers=4):
        self.dataset = ImageFolder(root, image_size)
        found = len(self.dataset.classes)
        if num_classes is not None and found > num_classes:
            raise ValueError(f"{root!r} has {found} class folders but --num-classes is {num_classes}; "
                             "raise --num-classes")
        self.num_classes, self.num_items = num_classes or found, len(self.dataset)
        self.shape, self.image_size = (3, image_size, image_size), image_size
        self.flip, self.num_workers = flip, num_workers

    def loader(self, batch_size, rank=0, world_size=1, seed=0):
        sampler = self._sampler(batch_size, rank, world_size, seed, self.flip)
        return FolderLoader(self.dataset, sampler, self.num_workers, torch.cuda.is_available())
