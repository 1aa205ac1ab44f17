"""The data layer's front door: `make_source` picks the DataSource for a --data-path (see eqm.datasets).

    source = make_source(data_path, image_size, num_classes=1000)
    loader = source.loader(batch_size, rank, world_size, seed)     # batch_size per rank
    loader.set_epoch(epoch, start_batch); for x, y in loader: ...

Sources: the built-in digits, a latent folder from eqm-extract-latents (no VAE in the loop), or an
ImageFolder read by DataLoader workers or, with dali=True, by NVIDIA DALI.
"""
from eqm.dali import DaliSource
from eqm.datasets import DigitsSource, ImageFolderSource
from eqm.latents import LatentSource, is_latent_dir

BUILTIN = ("digits",)  # --data-path names that need no folder


def make_source(data_path, image_size=None, *, num_classes=None, dali=False, device="cpu", num_workers=4,
                flip=True):
    """The DataSource for `data_path`: "digits", a latent folder, or an ImageFolder (DALI with `dali`).

    image_size: pixels per side (a latent folder's own size when None); num_classes: the model's label
    count, at least the data's (default: the data's); device: where DALI decodes; flip: random mirroring
    (never for digits).
    """
    if data_path == "digits":
        return DigitsSource(8 if image_size is None else image_size)
    if is_latent_dir(data_path):  # written by `python -m eqm.extract_latents`
        return LatentSource(data_path, image_size, num_classes, flip)
    if image_size is None:
        raise ValueError(f"{data_path!r} is an image folder: pass its --image-size")
    if dali:  # needs the optional nvidia-dali package
        return DaliSource(data_path, image_size, num_classes, flip, device=device)
    return ImageFolderSource(data_path, image_size, num_classes, flip, num_workers)
