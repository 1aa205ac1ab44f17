"""ImageFolder JPEGs through NVIDIA DALI (decode, ADM center crop, random flip, normalise) as a DataSource.

Same images as the DataLoader path (eqm.datasets.ImageFolderSource) up to one documented difference in resampling:

- Geometry is identical. ADM's `center_crop_arr` halves the image with BOX while its shorter side is
  >= 2 * image_size, then resizes with BICUBIC so the shorter side is image_size (long side rounded),
  then crops the centre with floor((L - image_size) / 2) offsets. The pipeline computes the same output
  size and crop offsets from the JPEG header with DALI arithmetic.
- Resampling differs: DALI does one antialiased cubic resize (INTERP_CUBIC, antialias=True, which
  matches PIL's single-step BICUBIC to ~0.4/255) instead of PIL's BOX halvings followed by BICUBIC.
  On photo crops that need a halving the two agree to a mean abs diff of ~0.015 on the [-1, 1] scale
  (worst image ~0.05, correlation 0.999); images that need none agree to ~0.001 (tests/test_dali.py).
- EXIF orientation is ignored, as PIL's `Image.open` does.

The file order and the flips come from eqm.datasets' DistributedIndexSampler (a function of seed and epoch,
split across ranks, resumable at a batch), so DALI and the DataLoader yield the same images in the same
order with the same flips; DALI only replaces decoding and augmentation. The flip bit travels through
the reader's label (label * 2 + flip).

On GPU the JPEGs are decoded with `mixed` (nvJPEG, whose IDCT may differ from libjpeg-turbo by a grey
level) and resized on the device; on CPU all operators run on the CPU with `device_id=None`, where the
decoder output is bit-identical to PIL's.
"""
import os

import torch

from eqm.datasets import ImageFolderSource, Loader


def _import_dali():
    try:
        import nvidia.dali as dali
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "NVIDIA DALI is not installed: `pip install nvidia-dali-cuda120` (or `pip install -e .[dali]`), "
            "or drop --dali to use the torch DataLoader path."
        ) from e
    return dali


def _adm_center_crop(jpegs, image, image_size):
    """DALI graph: resize to ADM's output size (BOX halvings + rounding emulated) and crop its centre window."""
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    s = image_size
    shape = fn.peek_image_shape(jpegs, adjust_orientation=False, dtype=types.INT32)  # (H, W, C)
    h, w = shape[0], shape[1]
    short = dmath.min(h, w)
    halvings = 0  # ADM halves while the short side is >= 2s: k = #{j >= 0 : short >= s * 2^(j+1)}
    for j in range(16):  # enough for sides up to image_size * 2^16
        halvings = halvings + fn.cast(short >= s * 2 ** (j + 1), dtype=types.INT32)
    div = dmath.pow(2, halvings)
    h2, w2 = h // div, w // div
    scale = s / fn.cast(dmath.min(h2, w2), dtype=types.FLOAT)
    # Python's round() is half-to-even; exact x.5 sizes are rare enough that floor(x + 0.5) is kept.
    new_h = fn.cast(dmath.floor(fn.cast(h2, dtype=types.FLOAT) * scale + 0.5), dtype=types.INT32)
    new_w = fn.cast(dmath.floor(fn.cast(w2, dtype=types.FLOAT) * scale + 0.5), dtype=types.INT32)
    image = fn.resize(image, resize_x=fn.cast(new_w, dtype=types.FLOAT), resize_y=fn.cast(new_h, dtype=types.FLOAT),
                      interp_type=types.INTERP_CUBIC, antialias=True)
    anchor = fn.stack((new_h - s) // 2, (new_w - s) // 2)  # ints: floor division, as in ADM (floats would round)
    return fn.slice(image, anchor, [s, s], axes=[0, 1], out_of_bounds_policy="trim_to_shape")


def _build_pipeline(paths, labels, image_size, batch_size, device_id, num_threads, seed):
    dali = _import_dali()
    from nvidia.dali import fn, types

    @dali.pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                       prefetch_queue_depth=2)
    def pipeline():
        jpegs, coded = fn.readers.file(files=paths, labels=labels, random_shuffle=False, name="reader")
        image = fn.decoders.image(jpegs, device="cpu" if device_id is None else "mixed",
                                  output_type=types.RGB, adjust_orientation=False)
        image = _adm_center_crop(jpegs, image, image_size)
        image = fn.crop_mirror_normalize(image, mirror=coded[0] % 2, dtype=types.FLOAT, output_layout="CHW",
                                         mean=[127.5] * 3, std=[127.5] * 3)
        return image, coded // 2

    return pipeline()


class DaliLoader(Loader):
    """(x, y) batches in a DistributedIndexSampler's order: x float32 (B, 3, S, S) in [-1, 1] on the DALI
    device (CPU, or the GPU with `mixed` decoding), y int64 (B,)."""

    def __init__(self, samples, image_size, sampler, device="cpu", num_threads=None):
        super().__init__(sampler)
        device = torch.device(device)
        if device.type == "cuda":
            self.device_id = device.index if device.index is not None else torch.cuda.current_device()
        elif device.type == "cpu":
            self.device_id = None
        else:
            raise ValueError(f"DALI runs on 'cpu' or 'cuda' devices, got {device}")
        self.num_threads = num_threads or max(1, min(8, (os.cpu_count() or 2) // max(1, sampler.world_size)))
        self.samples, self.image_size = samples, image_size

    def __iter__(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        idx, flip = self.sampler.indices()
        if len(idx) < self.sampler.batch_size:
            return
        paths = [os.fspath(self.samples[i][0]) for i in idx.tolist()]
        coded = [2 * int(self.samples[i][1]) + int(f) for i, f in zip(idx.tolist(), flip.tolist())]
        s = self.sampler
        pipe = _build_pipeline(paths, coded, self.image_size, s.batch_size, self.device_id, self.num_threads,
                               seed=s.seed * 1009 + s.epoch * 31 + s.rank)
        pipe.build()
        it = DALIGenericIterator([pipe], ["x", "y"], reader_name="reader", last_batch_policy=LastBatchPolicy.DROP)
        for batch in it:
            yield batch[0]["x"], batch[0]["y"].view(-1).long()


class DaliSource(ImageFolderSource):
    """The ImageFolderSource's images, order and flips, decoded and augmented by DALI on `device`."""

    def __init__(self, root, image_size, num_classes=None, flip=True, device="cpu", num_threads=None):
        _import_dali()
        super().__init__(root, image_size, num_classes, flip)
        self.device, self.num_threads = device, num_threads

    def loader(self, batch_size, rank=0, world_size=1, seed=0):
        sampler = self._sampler(batch_size, rank, world_size, seed, self.flip)
        return DaliLoader(self.dataset.samples, self.image_size, sampler, self.device, self.num_threads)
