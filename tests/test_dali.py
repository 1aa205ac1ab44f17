"""DALI pipeline: same images, order, flips and per-rank shards as the PIL/DataLoader path (eqm.datasets)."""
import sys

import pytest
import torch

from eqm.datasets import DistributedIndexSampler, FolderLoader, ImageFolder
from test_data import assert_source_contract
from test_latents import make_image_folder

pytest.importorskip("nvidia.dali")
from eqm.dali import DaliSource  # noqa: E402
from eqm.data import make_source  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs"), per_class=6, seed=1)


def both_paths(folder, image_size, batch_size, flip, seed=0, epochs=(0, 1)):
    """Concatenated (x, y) of the DALI loader and the DataLoader path over the same sampler settings."""
    dali = DaliSource(folder, image_size, flip=flip, num_threads=1).loader(batch_size, seed=seed)
    ds = ImageFolder(folder, image_size)
    sampler = DistributedIndexSampler(len(ds), batch_size, seed=seed, flip=flip)
    ref = FolderLoader(ds, sampler, num_workers=0, pin_memory=False)
    out = {"dali": [], "ref": []}
    flips = []
    for epoch in epochs:
        dali.set_epoch(epoch)
        sampler.set_epoch(epoch)
        flips.append(sampler.indices()[1])
        out["dali"] += list(dali)
        out["ref"] += list(ref)
    cat = {k: (torch.cat([x for x, _ in v]), torch.cat([y for _, y in v])) for k, v in out.items()}
    return cat["dali"], cat["ref"], torch.cat(flips)


def test_dali_matches_dataloader_with_flips(folder):
    (x, y), (xr, yr), flips = both_paths(folder, image_size=16, batch_size=4, flip=True)
    assert x.shape == xr.shape == (24, 3, 16, 16) and x.dtype == torch.float32
    assert torch.equal(y, yr) and flips.any() and not flips.all()
    assert x.min() >= -1 and x.max() <= 1
    diff = (x - xr).abs().mean((1, 2, 3))
    corr = torch.corrcoef(torch.stack([x.flatten(), xr.flatten()]))[0, 1]
    # Every image here needs a 2x BOX halving in ADM, which DALI replaces by its antialiased cubic resize.
    print(f"DALI vs PIL: mean abs diff {diff.mean():.4f} (worst image {diff.max():.4f}), corr {corr:.5f}")
    assert diff.mean() < 0.04 and diff.max() < 0.1 and corr > 0.99
    unflipped = (x[flips] - xr[flips].flip(-1)).abs().mean()
    assert unflipped > 3 * diff[flips].mean()  # the flip bit really reached DALI's mirror


def test_dali_geometry_is_exact_without_halving(tmp_path):
    # Short sides in [40, 64) at size 32: ADM does a single BICUBIC resize, so only the filter
    # implementation differs; a one-pixel shift of the resize size or crop window would cost ~0.1.
    folder = make_image_folder(tmp_path, per_class=2, seed=2, min_side=40, max_side=64)
    (x, y), (xr, yr), _ = both_paths(folder, image_size=32, batch_size=2, flip=False, epochs=(0,))
    diff = (x - xr).abs().mean((1, 2, 3))
    print(f"DALI vs PIL without halving: mean abs diff {diff.mean():.4f} (worst {diff.max():.4f})")
    assert torch.equal(y, yr) and diff.max() < 0.01


def test_dali_shards_are_disjoint_across_ranks(folder):
    ds = ImageFolder(folder, 16)
    samples = [(path, i) for i, (path, _) in enumerate(ds.samples)]  # label = file index, to identify files
    seen = []
    for rank in range(2):
        source = make_source(folder, 16, dali=True, flip=False)
        source.num_threads = 1
        assert type(source) is DaliSource and source.shape == (3, 16, 16) and source.num_classes == 2
        assert_source_contract(source, 3)
        source.dataset.samples = samples
        loader = source.loader(3, rank=rank, world_size=2, seed=5)
        loader.set_epoch(0)
        ids = torch.cat([y for _, y in loader])
        assert len(loader) == 2 and ids.tolist() == loader.sampler.indices()[0].tolist()
        seen.append(set(ids.tolist()))
        loader.set_epoch(0, start_batch=1)  # resume mid-epoch: the remaining batch only
        assert torch.cat([y for _, y in loader]).tolist() == ids[3:].tolist()
    assert len(seen[0]) == len(seen[1]) == 6 and not seen[0] & seen[1]


def test_dali_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="--data-path"):
        DaliSource(str(tmp_path / "missing"), 16)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if DALI were not installed
    with pytest.raises(ImportError, match="pip install nvidia-dali"):
        make_source(str(tmp_path), 16, dali=True)
