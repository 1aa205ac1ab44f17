"""Data layer: ADM center crop, ImageFolder, deterministic resumable sharding, the sources, VAE loading."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from eqm import data, datasets, vae as vae_lib


def _photo():
    from sklearn.datasets import load_sample_images

    return Image.fromarray(load_sample_images().images[0])  # china.jpg, 640x427


@pytest.mark.parametrize("size", [64, 256])
def test_center_crop_matches_direct_pil(size):
    img = _photo()
    assert img.size == (640, 427)
    if size == 64:  # 427 >= 128 -> halve twice with BOX (427 -> 213 -> 106), then BICUBIC to short side 64
        ref = img.resize((320, 213), Image.BOX).resize((160, 106), Image.BOX)
        ref = ref.resize((round(160 * 64 / 106), 64), Image.BICUBIC)  # 97 x 64
        ref = ref.crop(((97 - 64) // 2, 0, (97 - 64) // 2 + 64, 64))
    else:  # 427 < 512: no BOX step; BICUBIC straight to short side 256
        w = round(640 * 256 / 427)  # 384
        ref = img.resize((w, 256), Image.BICUBIC).crop(((w - 256) // 2, 0, (w - 256) // 2 + 256, 256))
    out = datasets.center_crop_arr(img, size)
    assert out.size == (size, size)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def _make_folder(root, sizes=((40, 30), (33, 50), (64, 64)), classes=("cat", "ant")):
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(root / c / "sub", exist_ok=True)
        for i, (w, h) in enumerate(sizes):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            where = root / c / "sub" if i == 0 else root / c
            Image.fromarray(arr).save(where / f"{i}.png")
    (root / "ant" / "notes.txt").write_text("not an image")
    return root


def test_image_folder(tmp_path):
    root = _make_folder(tmp_path / "imgs")
    ds = datasets.ImageFolder(str(root), 16)
    assert ds.classes == ["ant", "cat"]
    assert len(ds) == 6 and [lbl for _, lbl in ds.samples] == [0, 0, 0, 1, 1, 1]
    x, y = ds[(3, False)]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 1
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.1
    xf, _ = ds[(3, True)]
    torch.testing.assert_close(xf, x.flip(-1))
    ref = np.asarray(datasets.center_crop_arr(Image.open(ds.samples[3][0]).convert("RGB"), 16)).astype(np.float32)
    torch.testing.assert_close(x, torch.from_numpy(ref / 127.5 - 1).permute(2, 0, 1))


def test_missing_and_empty_data_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*--data-path"):
        datasets.ImageFolder(str(tmp_path / "nope"), 8)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images found"):
        datasets.ImageFolder(str(tmp_path / "empty"), 8)


def test_sampler_disjoint_deterministic_resumable():
    n, bs, world = 103, 4, 3
    samplers = [datasets.DistributedIndexSampler(n, bs, r, world, seed=7, flip=True) for r in range(world)]
    for s in samplers:
        s.set_epoch(2)
    shards = [s.indices()[0].tolist() for s in samplers]
    assert all(len(sh) == samplers[0].batches_per_epoch * bs == 32 for sh in shards)
    flat = sum(shards, [])
    assert len(set(flat)) == len(flat)  # disjoint across ranks
    again = datasets.DistributedIndexSampler(n, bs, 1, world, seed=7, flip=True)
    again.set_epoch(2)
    assert again.indices()[0].tolist() == shards[1]
    again.set_epoch(3)
    assert again.indices()[0].tolist() != shards[1]  # a new order each epoch
    again.set_epoch(2, start_batch=5)  # resume: the tail of the same sequence, flips included
    idx, fl = again.indices()
    full_idx, full_fl = samplers[1].indices()
    assert idx.tolist() == full_idx[5 * bs:].tolist() and fl.tolist() == full_fl[5 * bs:].tolist()
    assert 0 < full_fl.float().mean() < 1
    with pytest.raises(ValueError, match="too few"):
        datasets.DistributedIndexSampler(10, 8, 0, 2)


def assert_source_contract(source, batch_size=2, world_size=2):
    """What the trainer relies on, for any DataSource: the loaders' batches match the declared attributes."""
    assert isinstance(source, datasets.DataSource) and source.channels == source.shape[0]
    assert source.vae_factor == source.image_size // source.shape[-1] and source.latent == (source.vae_factor > 1)
    for rank in range(world_size):
        loader = source.loader(batch_size, rank, world_size, seed=0)
        loader.set_epoch(1)
        batches = list(loader)
        assert len(batches) == len(loader) == loader.batches_per_epoch == source.num_items // world_size // batch_size
        x, y = batches[-1]
        assert x.shape == (batch_size, *source.shape) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert 0 <= y.min() and y.max() < source.num_classes


def test_digits_loader():
    source = data.make_source("digits")
    assert_source_contract(source, 64)
    assert (source.shape, source.image_size, source.num_classes, source.num_items) == ((1, 8, 8), 8, 10, 1797)
    loader = source.loader(64, rank=0, world_size=1, seed=0)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(loader) == loader.batches_per_epoch == 1797 // 64
    x, y = batches[0]
    assert x.shape == (64, 1, 8, 8) and y.shape == (64,) and y.dtype == torch.int64
    assert x.min() == -1 and x.max() == 1 and set(y.tolist()) <= set(range(10))
    loader2 = data.make_source("digits", 8).loader(64, rank=0, world_size=1, seed=0)
    loader2.set_epoch(0, start_batch=3)
    torch.testing.assert_close(next(iter(loader2))[0], batches[3][0])
    other = data.make_source("digits").loader(64, rank=0, world_size=1, seed=1)
    other.set_epoch(0)
    assert not torch.equal(next(iter(other))[0], batches[0][0])  # the seed fixes the order
    up = data.make_source("digits", 16)
    assert up.shape == (1, 16, 16) and next(iter(up.loader(64)))[0].shape == (64, 1, 16, 16)
    halves = [data.make_source("digits").loader(32, rank=r, world_size=2, seed=0) for r in range(2)]
    for h in halves:
        h.set_epoch(0)
    assert halves[0].batches_per_epoch == 1797 // 2 // 32
    assert not set(map(tuple, next(iter(halves[0]))[0].flatten(1).tolist())) & set(
        map(tuple, next(iter(halves[1]))[0].flatten(1).tolist()))  # the ranks' shares are disjoint


def test_folder_loader_order_is_reproducible(tmp_path):
    root = _make_folder(tmp_path / "imgs")
    source = data.make_source(str(root), 16, num_classes=1000, num_workers=0)
    assert type(source) is datasets.ImageFolderSource and (source.shape, source.num_classes) == ((3, 16, 16), 1000)
    assert_source_contract(source, 1)
    assert data.make_source(str(root), 16).num_classes == 2  # default: the class folders
    runs = []
    for _ in range(2):
        loader = source.loader(2, 0, 1, seed=3)
        loader.set_epoch(1)
        runs.append(torch.cat([x for x, _ in loader]))
    assert runs[0].shape == (6, 3, 16, 16)
    torch.testing.assert_close(runs[0], runs[1])
    ds = datasets.ImageFolder(str(root), 16)
    sampler = datasets.DistributedIndexSampler(len(ds), 2, seed=3, flip=True)
    sampler.set_epoch(1)
    torch.testing.assert_close(runs[0], torch.stack([ds[(i, f)][0] for i, f in sampler]))  # order and flips
    with pytest.raises(ValueError, match="raise --num-classes"):
        data.make_source(str(root), 16, num_classes=1)
    with pytest.raises(ValueError, match="--image-size"):
        data.make_source(str(root))


def test_missing_dali_is_one_line(tmp_path, monkeypatch):
    from eqm import train

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if DALI were not installed
    root = _make_folder(tmp_path / "imgs")
    with pytest.raises(SystemExit, match="NVIDIA DALI is not installed.*drop --dali"):
        train.main(["--data-path", str(root), "--vae", "none", "--image-size", "16", "--model", "EqM-Ti/4", "--dali",
                    "--num-classes", "2", "--device", "cpu", "--results-dir", str(tmp_path / "res")])
    assert not (tmp_path / "res").exists()


def test_uneven_global_batch_is_one_line(monkeypatch, capsys):
    """--global-batch-size must split evenly over the processes (checked when the flags are parsed)."""
    from eqm import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        train.main(["--data-path", "digits", "--global-batch-size", "63", "--device", "cpu"])
    assert "--global-batch-size 63 is not divisible by the 2 processes" in capsys.readouterr().err


def test_vae_missing_weights_message():
    with pytest.raises(FileNotFoundError, match="huggingface-cli download stabilityai/sd-vae-ft-mse"):
        vae_lib.load_vae("mse")
    with pytest.raises(FileNotFoundError, match="neither"):
        vae_lib.load_vae("/definitely/not/here")


def make_tiny_vae(path):
    """A randomly initialised AutoencoderKL with the SD layout (8x downsampling, 4 latent channels)."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32)
    vae.save_pretrained(str(path))
    return str(path)


def test_tiny_vae_encode_decode(tmp_path):
    vae = vae_lib.load_vae(make_tiny_vae(tmp_path / "vae"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.manual_seed(1)
    z = vae_lib.encode(vae, x)
    torch.manual_seed(1)
    ref = vae.encode(x).latent_dist.sample() * 0.18215
    assert z.shape == (2, 4, 4, 4)
    torch.testing.assert_close(z, ref)
    out = vae_lib.decode(vae, z)
    torch.testing.assert_close(out, vae.decode(z / 0.18215).sample)
    assert out.shape == x.shape
