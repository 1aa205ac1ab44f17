"""Latent folders written by `python -m eqm.extract_latents`: their layout, and a DataSource reading them (mmap).

Layout of a latent directory (the fast-DiT recipe: encode once, no VAE in the training loop):
  latents.json                manifest: image_size, latent_shape, vae, scale_factor, dtype, count, classes, shards
  latents_00000.npy           (n, 4, h, w) scaled latents (vae sample * 0.18215) of the ADM-cropped images
  flip_00000.npy              same for the horizontally flipped images (only with --flip-both)
  labels_00000.npy            (n,) int64 class labels
  shard_00000.json            written last: marks the shard complete (extraction resumes after it)
"""
import json
import os

import numpy as np
import torch

from eqm.datasets import DataSource, Loader

MANIFEST = "latents.json"
FORMAT = "eqm-latents-v1"


def shard_name(kind, k):
    return f"{kind}_{k:05d}" + (".json" if kind == "shard" else ".npy")


def is_latent_dir(path):
    """True when `path` is a folder written by eqm.extract_latents (it holds latents.json)."""
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, MANIFEST))


def read_manifest(path):
    """The manifest dict of a latent directory, with a clear error when it is not one."""
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path!r} has no {MANIFEST}: not a finished latent directory. Run "
                                f"`python -m eqm.extract_latents --data-path <ImageFolder> --out {path}` first.")
    with open(file) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{file} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


class LatentDataset:
    """All shards of a latent directory, memory-mapped; `gather(idx, flip)` returns a batch."""

    def __init__(self, path):
        self.path, self.manifest = path, read_manifest(path)
        m = self.manifest
        self.latents, self.flipped, labels, counts = [], [], [], []
        for shard in m["shards"]:
            k = shard["index"]
            self.latents.append(np.load(os.path.join(path, shard_name("latents", k)), mmap_mode="r"))
            if m["flip_both"]:
                self.flipped.append(np.load(os.path.join(path, shard_name("flip", k)), mmap_mode="r"))
            labels.append(np.load(os.path.join(path, shard_name("labels", k))))
            counts.append(len(labels[-1]))
            if self.latents[-1].shape != (counts[-1], *m["latent_shape"]):
                raise ValueError(f"shard {k} of {path!r} has latents of shape {self.latents[-1].shape}, expected "
                                 f"{(counts[-1], *m['latent_shape'])}; re-run eqm.extract_latents")
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.labels = torch.from_numpy(np.concatenate(labels).astype(np.int64))
        if len(self.labels) != m["count"]:
            raise ValueError(f"{path!r}: shards hold {len(self.labels)} latents, manifest says {m['count']}")

    def __len__(self):
        return len(self.labels)

    def gather(self, idx, flip=None):
        """Latents (float32 tensor) and labels for global indices `idx`; `flip[i]` picks the flipped copy."""
        idx = np.asarray(idx, dtype=np.int64)
        flip = np.zeros(len(idx), dtype=bool) if flip is None else np.asarray(flip, dtype=bool)
        if flip.any() and not self.flipped:
            raise ValueError(f"{self.path!r} was extracted without --flip-both: no flipped latents stored")
        out = np.empty((len(idx), *self.manifest["latent_shape"]), dtype=np.float32)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        for s in np.unique(shard):
            for f, arrays in ((False, self.latents), (True, self.flipped)):
                sel = np.nonzero((shard == s) & (flip == f))[0]
                if len(sel):
                    local = idx[sel] - self.offsets[s]
                    order = np.argsort(local)  # sorted reads are kinder to the page cache
                    out[sel[order]] = arrays[s][local[order]]
        return torch.from_numpy(out), self.labels[torch.from_numpy(idx)]


class LatentLoader(Loader):
    """(x, y) batches of latents in the order of a DistributedIndexSampler (index, flip) for this rank."""

    def __init__(self, dataset, sampler):
        super().__init__(sampler)
        self.dataset = dataset

    def batch(self, idx, flip):
        return self.dataset.gather(idx.numpy(), flip.numpy())


def vae_factor(manifest):
    """Pixels per latent side of a latent folder, as its manifest records it (8 for the sd-vae-ft-* VAEs)."""
    return manifest["image_size"] // manifest["latent_shape"][-1]


class LatentSource(DataSource):
    """A latent folder: no VAE in the training loop. Flips pick the stored flipped latents, so they need a
    folder extracted with --flip-both (otherwise no flipping happens).

    image_size / num_classes: what the run expects; a clear error when the folder disagrees.
    """

    latent = True

    def __init__(self, path, image_size=None, num_classes=None, flip=True):
        self.dataset = LatentDataset(path)
        m = self.dataset.manifest
        if image_size is not None and image_size != m["image_size"]:
            raise ValueError(f"--image-size {image_size} but the latents in {path!r} were extracted at "
                             f"{m['image_size']}; pass --image-size {m['image_size']} or re-extract")
        n_cls = len(m["classes"])
        if num_classes is not None and n_cls > num_classes:
            raise ValueError(f"{path!r} has {n_cls} classes but --num-classes is {num_classes}; raise --num-classes")
        self.num_classes, self.num_items = num_classes or n_cls, len(self.dataset)
        self.shape, self.image_size = tuple(m["latent_shape"]), m["image_size"]
        self.vae, self.vae_factor = m["vae"], vae_factor(m)
        self.flip = flip and m["flip_both"]

    def loader(self, batch_size, rank=0, world_size=1, seed=0):
        return LatentLoader(self.dataset, self._sampler(batch_size, rank, world_size, seed, self.flip))
