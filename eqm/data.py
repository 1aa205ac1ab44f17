"""Training data: ImageFolder with the ADM center crop, built-in sklearn digits, and a resumable loader.

The training loop only calls `build_loader(args, rank, world_size, seed)`; other sources (latent shards,
DALI) plug in behind it. Contract of the returned pair `(loader, sampler)`:
  - `sampler.set_epoch(epoch, start_batch=0)` fixes the order of that epoch (a function of seed and epoch
    only) and skips the first `start_batch` batches, so a resumed run continues at the same position;
  - `sampler.batches_per_epoch` is the number of batches one rank gets per epoch;
  - iterating `loader` yields `(x, y)` CPU batches of the local batch size for the current epoch, x in
    [-1, 1] of shape (B, C, H, W) (pixels or images to VAE-encode, or latents if `loader.latents`);
  - `loader.channels`, `loader.image_size`, `loader.num_classes`, `loader.num_items`, `loader.latents`.
"""
import os

import numpy as np
import torch
from PIL import Image

from eqm.latents import is_latent_dir

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
BUILTIN = ("digits",)


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


class TensorLoader:
    """Batches from in-memory tensors in the sampler's order (no workers: indexing is the whole cost)."""

    def __init__(self, x, y, sampler, num_classes):
        self.x, self.y, self.sampler = x, y, sampler
        self.channels, self.image_size = x.shape[1], x.shape[-1]
        self.num_classes, self.num_items, self.latents = num_classes, len(x), False

    def __len__(self):
        return len(self.sampler) // self.sampler.batch_size

    def __iter__(self):
        idx, fl = self.sampler.indices()
        bs = self.sampler.batch_size
        for i in range(0, len(idx), bs):
            b, f = idx[i:i + bs], fl[i:i + bs]
            x = self.x[b]
            if f.any():
                x[f] = x[f].flip(-1)
            yield x, self.y[b]


class FolderLoader:
    """DataLoader over an ImageFolder driven by a DistributedIndexSampler."""

    def __init__(self, dataset, sampler, num_workers, pin_memory, num_classes):
        self.sampler = sampler
        self.dl = torch.utils.data.DataLoader(dataset, batch_size=sampler.batch_size, sampler=sampler,
                                              num_workers=num_workers, pin_memory=pin_memory, drop_last=True,
                                              # worker seeds from a private generator: the global RNG
                                              # (noise, t) must not depend on when an epoch starts
                                              generator=torch.Generator().manual_seed(sampler.seed))
        self.channels, self.image_size = 3, dataset.image_size
        self.num_classes, self.num_items, self.latents = num_classes, len(dataset), False

    def __len__(self):
        return len(self.dl)

    def __iter__(self):
        return iter(self.dl)


def build_loader(args, rank=0, world_size=1, seed=0):
    """Loader for args.data_path ("digits" or an ImageFolder), this rank's share, order fixed by `seed`."""
    if args.global_batch_size % world_size:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by the "
                         f"world size {world_size}")
    local_bs = args.global_batch_size // world_size
    if args.data_path == "digits":
        x, y = load_digits_tensor(args.image_size)
        sampler = DistributedIndexSampler(len(x), local_bs, rank, world_size, seed, shuffle=True, flip=False)
        loader = TensorLoader(x, y, sampler, num_classes=10)
    elif is_latent_dir(args.data_path):  # written by `python -m eqm.extract_latents`: no VAE in the loop
        from eqm.latents import build_latent_loader

        loader, sampler = build_latent_loader(args.data_path, local_bs, rank, world_size, seed, flip=True,
                                              image_size=args.image_size, num_classes=args.num_classes)
    else:
        dataset = ImageFolder(args.data_path, args.image_size)
        if len(dataset.classes) > args.num_classes:
            raise ValueError(f"{args.data_path!r} has {len(dataset.classes)} class folders but --num-classes is "
                             f"{args.num_classes}; raise --num-classes")
        if getattr(args, "dali", False):
            from eqm.dali import build_dali_loader

            device = "cuda" if torch.cuda.is_available() and getattr(args, "device", None) != "cpu" else "cpu"
            return build_dali_loader(args.data_path, args.image_size, local_bs, rank, world_size, seed, device=device,
                                     num_classes=args.num_classes, samples=dataset.samples)
        sampler = DistributedIndexSampler(len(dataset), local_bs, rank, world_size, seed, shuffle=True, flip=True)
        loader = FolderLoader(dataset, sampler, args.num_workers, torch.cuda.is_available(), args.num_classes)
    return loader, sampler
