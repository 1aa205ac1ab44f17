"""Encode an ImageFolder once with the VAE into sharded .npy latents (see eqm/latents.py for the layout).

    python -m eqm.extract_latents --data-path /data/imagenet/train --vae ema --image-size 256 \
        --out /data/imagenet256_latents --flip-both
    torchrun --nproc_per_node=8 -m eqm.extract_latents ...     # each rank encodes shards k % world == rank

Images get the ADM center crop (eqm.datasets.ImageFolder); latents are one posterior sample times 0.18215, as the
reference training draws per step (fast-DiT stores one sample too). A shard's files are written to a
temporary name and renamed, and shard_XXXXX.json is written last, so an interrupted run resumes by
skipping finished shards. The manifest (latents.json) appears only when every shard is done.
"""
import argparse
import contextlib
import hashlib
import json
import os

import numpy as np
import torch
from tqdm import tqdm

from eqm import vae as vae_lib
from eqm.datasets import ImageFolder
from eqm.latents import FORMAT, MANIFEST, shard_name
from eqm.utils import atomic_path, atomic_write, remove_stale_temps


def _write_json(path, obj):
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1)


KINDS = ("latents", "flip", "labels", "shard")  # the files of one shard


def _list_digest(samples, root):
    h = hashlib.sha1()
    for p, label in samples:
        h.update(f"{os.path.relpath(p, root)}\t{label}\n".encode())
    return h.hexdigest()


def _shards_to_do(out, mine, config):
    """The shards of `mine` not finished yet; a clear error when finished ones were made with other settings."""
    todo = []
    for k in mine:
        done = os.path.join(out, shard_name("shard", k))
        if not os.path.isfile(done):
            todo.append(k)
            continue
        with open(done) as f:
            prev = json.load(f)["config"]
        if prev != config:
            diff = sorted(key for key in config if prev.get(key) != config[key])
            raise ValueError(f"{out!r} holds shards extracted with other settings ({', '.join(diff)} differ); "
                             "use a new --out folder or delete that one")
    return todo


def _encode_shard(batches, encode_views, out, k, n, dtype, bar):
    """Encode shard k's n images into latents_k (and flip_k when encode_views returns two views), written
    in place at temp names and renamed at the end; returns (labels, latent_shape)."""
    labels = np.empty(n, dtype=np.int64)
    with contextlib.ExitStack() as stack:
        arrays, pos = None, 0
        for x, y in batches:
            zs = encode_views(x)
            if arrays is None:  # the latent shape is known at the first batch
                arrays = [np.lib.format.open_memmap(
                    stack.enter_context(atomic_path(os.path.join(out, shard_name(kind, k)))), mode="w+",
                    dtype=dtype, shape=(n, *zs[0].shape[1:])) for kind in ("latents", "flip")[:len(zs)]]
            for arr, z in zip(arrays, zs):
                arr[pos:pos + len(z)] = z
            labels[pos:pos + len(y)] = y.numpy()
            pos += len(y)
            bar.update(len(y))
        for arr in arrays:
            arr.flush()  # written back before atomic_path renames the file
        del arr, arrays
    return labels, list(zs[0].shape[1:])


@torch.no_grad()
def extract_latents(data_path, out, vae, vae_name, image_size=256, flip_both=False, batch_size=64,
                    shard_size=10000, dtype="float16", seed=0, rank=0, world_size=1, num_workers=4,
                    device="cpu", encode=None):
    """Encode this rank's shards of `data_path` into `out`; returns the list of shard indices it wrote.

    `vae` is a diffusers AutoencoderKL (or anything `encode(vae, x)` accepts), `vae_name` is recorded in
    the manifest. Shard k holds images [k * shard_size, (k + 1) * shard_size) of the sorted file list.
    """
    encode = encode or vae_lib.encode

    def encode_views(x):
        x = x.to(device, non_blocking=True)
        return [encode(vae, v).float().cpu().numpy() for v in ([x, x.flip(-1)] if flip_both else [x])]

    dataset = ImageFolder(data_path, image_size)
    n = len(dataset)
    os.makedirs(out, exist_ok=True)
    config = dict(format=FORMAT, image_size=image_size, vae=vae_name, scale_factor=vae_lib.LATENT_SCALE,
                  dtype=dtype, flip_both=flip_both, shard_size=shard_size, seed=seed, count=n,
                  classes=dataset.classes, files_sha1=_list_digest(dataset.samples, data_path))
    mine = range(rank, (n + shard_size - 1) // shard_size, world_size)
    remove_stale_temps(out, [shard_name(kind, k) for k in mine for kind in KINDS])  # only this rank writes them
    todo = _shards_to_do(out, mine, config)
    bar = tqdm(total=sum(min(shard_size, n - k * shard_size) for k in todo), desc=f"encode rank {rank}",
               unit="img", disable=rank != 0 or not todo)
    for k in todo:
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(lo, hi)), batch_size=batch_size,
                                             num_workers=num_workers, pin_memory=torch.device(device).type == "cuda")
        batches = iter(loader)  # creating the iterator draws from the global RNG: seed after it
        torch.manual_seed(seed * 100003 + k)  # posterior samples depend only on (seed, shard): resumable
        labels, latent_shape = _encode_shard(batches, encode_views, out, k, hi - lo, dtype, bar)
        with atomic_write(os.path.join(out, shard_name("labels", k))) as f:
            np.save(f, labels)
        _write_json(os.path.join(out, shard_name("shard", k)),  # last: marks the shard finished
                    dict(index=k, count=hi - lo, latent_shape=latent_shape, config=config))
    bar.close()
    return todo


def write_manifest(out):
    """Write latents.json from the shard markers once every shard is finished; returns it (or None)."""
    markers = sorted(f for f in os.listdir(out) if f.startswith("shard_") and f.endswith(".json"))
    shards = []
    for f in markers:
        with open(os.path.join(out, f)) as fh:
            shards.append(json.load(fh))
    if not shards:
        return None
    config = shards[0]["config"]
    num_shards = (config["count"] + config["shard_size"] - 1) // config["shard_size"]
    if sorted(s["index"] for s in shards) != list(range(num_shards)):
        return None
    manifest = dict(config, latent_shape=shards[0]["latent_shape"], num_classes=len(config["classes"]),
                    shards=[dict(index=s["index"], count=s["count"]) for s in sorted(shards, key=lambda s: s["index"])])
    _write_json(os.path.join(out, MANIFEST), manifest)
    return manifest


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-path", required=True, help="ImageFolder root (one subfolder per class)")
    p.add_argument("--out", required=True, help="output folder for latents_*.npy, labels_*.npy and latents.json")
    p.add_argument("--vae", default="ema", help="ema | mse (sd-vae-ft-*, from the local Hugging Face cache) "
                                                "or a local AutoencoderKL folder")
    p.add_argument("--image-size", type=int, default=256, help="ADM center-crop size in pixels")
    p.add_argument("--flip-both", action="store_true", help="also store latents of the flipped images "
                                                            "(training then flips by picking one at random)")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE forward, per rank")
    p.add_argument("--shard-size", type=int, default=10000, help="images per .npy shard")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                   help="storage dtype (float16 halves disk and page-cache use)")
    p.add_argument("--seed", type=int, default=0, help="seed of the posterior samples")
    p.add_argument("--num-workers", type=int, default=4, help="decode workers per rank")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    from eqm import distributed, validate as V

    distributed.add_timeout_arg(p)
    V.apply_types(p, dict(image_size=V.positive_int, batch_size=V.positive_int, shard_size=V.positive_int,
                          seed=V.seed, num_workers=V.nonneg_int))
    args = p.parse_args(argv)
    try:
        vae_lib.latent_size(args.image_size)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None):
    from eqm import distributed

    args = get_args(argv)
    distributed.run_job("eqm-extract-latents", lambda info: _run(args, info), args.device, args.dist_timeout,
                        expected=(FileNotFoundError, ValueError))


def _run(args, info):
    from eqm import distributed

    try:
        vae = vae_lib.load_vae(args.vae, info.device)
    except RuntimeError as e:
        raise ValueError(str(e)) from None
    extract_latents(args.data_path, args.out, vae, args.vae, image_size=args.image_size, flip_both=args.flip_both,
                    batch_size=args.batch_size, shard_size=args.shard_size, dtype=args.dtype, seed=args.seed,
                    rank=info.rank, world_size=info.world_size, num_workers=args.num_workers, device=info.device)
    distributed.barrier()
    if info.is_main:
        manifest = write_manifest(args.out)
        if manifest is None:
            raise ValueError(f"some shards of {args.out!r} are missing after extraction; re-run the same command")
        print(f"wrote {manifest['count']} latents {manifest['latent_shape']} in {len(manifest['shards'])} shards "
              f"to {args.out}")


if __name__ == "__main__":
    main()
