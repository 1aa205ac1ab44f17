"""Latent path: extraction into sharded .npy, memory-mapped read-back, per-rank sharding, and training on it."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from eqm.data import make_source
from eqm.datasets import ImageFolder
from eqm.extract_latents import extract_latents, main, write_manifest
from eqm.latents import LatentDataset, LatentSource, is_latent_dir, read_manifest, shard_name
from eqm.vae import LATENT_SCALE
from test_data import assert_source_contract

IMAGE_SIZE = 16


def make_image_folder(root, per_class=5, seed=0, min_side=40, max_side=90):
    """Two-class ImageFolder of random-size JPEG crops of sklearn's two sample photos."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    for label, photo in enumerate(load_sample_images().images):
        os.makedirs(os.path.join(root, f"class{label}"), exist_ok=True)
        for i in range(per_class):
            h, w = rng.integers(min_side, max_side, size=2)
            y0, x0 = rng.integers(0, photo.shape[0] - h), rng.integers(0, photo.shape[1] - w)
            Image.fromarray(photo[y0:y0 + h, x0:x0 + w]).save(os.path.join(root, f"class{label}", f"{i}.jpg"),
                                                              quality=95)
    return str(root)


def tiny_vae(seed=0):
    """Randomly initialised 3-level AutoencoderKL (downsamples by 4, 4 latent channels), no download."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                                   up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8),
                                   latent_channels=4, norm_num_groups=4, layers_per_block=1).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs"))


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


@pytest.fixture(scope="module")
def extracted(folder, vae, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("latents"))
    extract_latents(folder, out, vae, "tiny", image_size=IMAGE_SIZE, flip_both=True, batch_size=3, shard_size=4,
                    dtype="float32", seed=7, num_workers=0)
    write_manifest(out)
    return out


def encode_directly(folder, vae, shard_size=4, batch_size=3, seed=7):
    """The extraction's latents recomputed by hand: same crops, same per-shard seeding, same batches."""
    ds = ImageFolder(folder, IMAGE_SIZE)
    z, zf = [], []
    for k in range(0, len(ds), shard_size):
        torch.manual_seed(seed * 100003 + k // shard_size)
        for b in range(k, min(len(ds), k + shard_size), batch_size):
            x = torch.stack([ds[i][0] for i in range(b, min(len(ds), k + shard_size, b + batch_size))])
            with torch.no_grad():
                z.append(vae.encode(x).latent_dist.sample() * LATENT_SCALE)
                zf.append(vae.encode(x.flip(-1)).latent_dist.sample() * LATENT_SCALE)
    return torch.cat(z), torch.cat(zf), torch.tensor([label for _, label in ds.samples])


def test_extract_writes_manifest_and_shards(folder, extracted):
    m = read_manifest(extracted)
    assert is_latent_dir(extracted) and not is_latent_dir(folder)
    assert m["count"] == 10 and m["image_size"] == IMAGE_SIZE and m["scale_factor"] == LATENT_SCALE
    assert m["latent_shape"] == [4, IMAGE_SIZE // 4, IMAGE_SIZE // 4] and m["classes"] == ["class0", "class1"]
    assert [s["count"] for s in m["shards"]] == [4, 4, 2] and m["flip_both"] and m["vae"] == "tiny"
    for k, n in enumerate([4, 4, 2]):
        for kind in ("latents", "flip"):
            arr = np.load(os.path.join(extracted, shard_name(kind, k)), mmap_mode="r")
            assert arr.shape == (n, 4, 4, 4) and arr.dtype == np.float32
    assert not [f for f in os.listdir(extracted) if ".tmp" in f]


def test_read_back_equals_direct_encoding(folder, vae, extracted):
    z, zf, labels = encode_directly(folder, vae)
    ds = LatentDataset(extracted)
    idx = np.random.default_rng(0).permutation(len(ds))  # unordered, across shards
    got, y = ds.gather(idx)
    torch.testing.assert_close(got, z[idx], rtol=1e-5, atol=1e-6)
    assert torch.equal(y, labels[idx])
    flip = np.arange(len(idx)) % 2 == 0
    got, _ = ds.gather(idx, flip)
    want = torch.where(torch.from_numpy(flip)[:, None, None, None], zf[idx], z[idx])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (zf - z).abs().mean() > 1e-3  # the flipped copy really is a different latent


def test_resume_redoes_only_missing_shards(folder, vae, extracted, tmp_path):
    out = str(tmp_path / "z")
    kw = dict(image_size=IMAGE_SIZE, flip_both=True, batch_size=3, shard_size=4, dtype="float32", seed=7,
              num_workers=0)
    assert extract_latents(folder, out, vae, "tiny", **kw) == [0, 1, 2]
    os.remove(os.path.join(out, shard_name("shard", 1)))  # as if killed while writing shard 1
    os.remove(os.path.join(out, shard_name("latents", 1)))
    assert write_manifest(out) is None  # incomplete: no manifest
    assert extract_latents(folder, out, vae, "tiny", **kw) == [1]
    write_manifest(out)
    for kind in ("latents", "flip", "labels"):
        assert np.array_equal(np.load(os.path.join(out, shard_name(kind, 1))),
                              np.load(os.path.join(extracted, shard_name(kind, 1))))
    with pytest.raises(ValueError, match="other settings"):
        extract_latents(folder, out, vae, "tiny", **dict(kw, dtype="float16"))


def test_cli_with_local_vae_folder(folder, vae, tmp_path):
    vae.save_pretrained(tmp_path / "vae")
    out = str(tmp_path / "z")
    main(["--data-path", folder, "--vae", str(tmp_path / "vae"), "--image-size", str(IMAGE_SIZE), "--out", out,
          "--shard-size", "6", "--num-workers", "0", "--device", "cpu"])
    m = read_manifest(out)
    assert m["dtype"] == "float16" and not m["flip_both"] and [s["count"] for s in m["shards"]] == [6, 4]
    x, y = LatentDataset(out).gather(np.arange(10))
    assert x.shape == (10, 4, 4, 4) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert y.tolist() == [0] * 5 + [1] * 5


def test_loader_shards_per_rank_deterministic(extracted):
    seen = []
    for rank in range(2):
        source = make_source(extracted)
        assert type(source) is LatentSource and source.latent and source.shape == (4, 4, 4)
        assert source.image_size == IMAGE_SIZE and source.vae_factor == 4 and source.num_classes == 2
        assert_source_contract(source)
        loader = source.loader(2, rank=rank, world_size=2, seed=3)
        assert len(loader) == 2
        loader.set_epoch(0)
        idx, flip = loader.sampler.indices()
        seen.append(set(idx.tolist()))
        batches = list(loader)
        want = LatentDataset(extracted).gather(idx.numpy(), flip.numpy())
        assert torch.equal(torch.cat([x for x, _ in batches]), want[0])
        assert torch.equal(torch.cat([y for _, y in batches]), want[1])
        loader.set_epoch(0)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, loader))  # same seed + epoch, same batches
    assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 5 - 1  # per-rank 5, 2 batches of 2
    with pytest.raises(ValueError, match="--image-size"):
        make_source(extracted, 32)
    with pytest.raises(FileNotFoundError, match="extract_latents"):
        LatentSource(os.path.dirname(extracted))


def test_latent_path_trains(extracted):
    from eqm.models import EqM
    from eqm.objective import eqm_training_losses

    source = LatentSource(extracted)
    loader = source.loader(4, seed=0)
    torch.manual_seed(0)
    model = EqM(input_size=source.shape[-1], patch_size=2, in_channels=source.channels, hidden_size=32, depth=2,
                num_heads=2, num_classes=source.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x_eval, y_eval = LatentDataset(extracted).gather(np.arange(8))
    noise, t = torch.randn_like(x_eval), torch.rand(8)

    def eval_loss():
        with torch.no_grad():
            return eqm_training_losses(model, x_eval, dict(y=y_eval), noise=noise, t=t, train=False)["loss"].mean()

    before, params = eval_loss(), [p.detach().clone() for p in model.parameters()]
    for epoch in range(8):
        loader.set_epoch(epoch)
        for x, y in loader:
            loss = eqm_training_losses(model, x, dict(y=y))["loss"].mean()
            assert torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert any(not torch.equal(p, q) for p, q in zip(params, model.parameters()))
    assert eval_loss() < before


def test_trainer_takes_the_latent_geometry_from_the_manifest(extracted, tmp_path):
    """Latents of a VAE that downsamples by 4, not the sd-vae-ft-* 8: the model's input is the manifest's 4x4."""
    from eqm import train
    from eqm.checkpoint import load_checkpoint

    s = train.main(["--data-path", extracted, "--model", "EqM-Ti/2", "--global-batch-size", "4", "--max-steps", "2",
                    "--log-every", "1", "--sample-every", "0", "--num-workers", "0", "--device", "cpu",
                    "--results-dir", str(tmp_path)])
    ck = load_checkpoint(s["checkpoint"])
    assert s["steps"] == 2 and ck["args"].image_size == IMAGE_SIZE and ck["args"].vae == "tiny"
    assert ck["args"].input_size == 4 and ck["model"]["pos_embed"].shape[1] == (4 // 2) ** 2
