"""Stable Diffusion VAE (diffusers AutoencoderKL) for latent-space EqM: geometry, local loading, encode, decode."""
import os

import torch

LATENT_SCALE = 0.18215  # sd-vae-ft-* latents are scaled by this before the model sees them
FACTOR = 8  # sd-vae-ft-* latents have 1/8 of the image's side (a latent folder's manifest records its own)
CHANNELS = 4  # and 4 channels
HUB_IDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


def is_pixel_space(vae):
    """True when --vae says to train/sample directly on pixels."""
    return vae in (None, "none")


def latent_size(image_size, factor=FACTOR):
    """Side of the latents of an image_size-pixel image; a one-line ValueError when factor does not divide it."""
    if image_size % factor:
        raise ValueError(f"--image-size {image_size} must be divisible by {factor} (the VAE downsamples by {factor})")
    return image_size // factor


def load_vae(spec, device="cpu"):
    """AutoencoderKL from --vae: "ema"/"mse" (local Hugging Face cache only) or a local folder."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as e:
        raise RuntimeError("--vae needs the diffusers package: pip install -e '.[vae]' "
                           "(or use --vae none to work in pixel space)") from e
    if spec in HUB_IDS:
        source, kwargs = HUB_IDS[spec], dict(local_files_only=True)
    elif os.path.isdir(spec):
        source, kwargs = spec, {}
    else:
        raise FileNotFoundError(f"--vae {spec!r} is neither 'ema', 'mse', 'none' nor an existing folder")
    try:
        vae = AutoencoderKL.from_pretrained(source, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        hub = HUB_IDS.get(spec, source)
        raise FileNotFoundError(
            f"could not load the VAE {hub!r} from local files ({type(e).__name__}: {str(e).splitlines()[0]}).\n"
            f"Nothing is downloaded at run time. On a machine with internet run\n"
            f"    huggingface-cli download {hub} --local-dir sd-vae-ft-{spec if spec in HUB_IDS else 'x'}\n"
            f"then copy that folder here and pass --vae /path/to/that/folder (or fill the Hugging Face "
            f"cache, HF_HOME). For pixel-space training use --vae none.") from None
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode(vae, x):
    """Images in [-1, 1] (N, 3, H, W) -> scaled latents (N, 4, H/8, W/8) for sd-vae-ft-*, posterior samples."""
    return vae.encode(x).latent_dist.sample().mul_(LATENT_SCALE)


@torch.no_grad()
def decode(vae, z):
    """Scaled latents -> images in about [-1, 1]."""
    return vae.decode(z / LATENT_SCALE).sample
