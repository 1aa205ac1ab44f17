"""Two-process gloo DDP: training shards the data and keeps parameters in sync; torchrun sampling matches 1 process."""
import os
import socket
import subprocess
import sys

import numpy as np
import torch
import torch.multiprocessing as mp

ARGS = ["--data-path", "digits", "--model", "EqM-Ti/4", "--image-size", "8", "--global-batch-size", "16",
        "--max-steps", "3", "--log-every", "1", "--sample-every", "0", "--device", "cpu"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from eqm import data, train
    from eqm.training import setup
    from model_helpers import batches_through

    seen, model_ref = [], {}

    def record(x, y):
        seen.append(x.clone())
        return x, y

    train_step = setup.TrainStep

    def recording_train_step(model, *a, **k):
        model_ref["model"] = model
        return train_step(model, *a, **k)

    data.make_source = batches_through(record)
    setup.TrainStep = recording_train_step
    summary = train.main(ARGS + ["--results-dir", os.path.join(out, "res")])
    torch.save({"seen": torch.cat(seen), "params": {k: v.detach().clone() for k, v in
                                                    model_ref["model"].state_dict().items()},
                "summary": {k: v for k, v in summary.items() if k != "log"}, "log": summary["log"]},
               os.path.join(out, f"rank{rank}.pt"))


def test_ddp_two_processes_gloo(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    # each rank saw 3 steps x 8 images; the two shares are disjoint (digits holds no duplicate images)
    assert r0["seen"].shape == r1["seen"].shape == (24, 1, 8, 8)
    rows0 = {tuple(v.tolist()) for v in r0["seen"].flatten(1)}
    rows1 = {tuple(v.tolist()) for v in r1["seen"].flatten(1)}
    assert len(rows0) == len(rows1) == 24 and not rows0 & rows1
    # parameters identical on both ranks after training, and equal to the checkpoint rank 0 wrote
    for k in r0["params"]:
        torch.testing.assert_close(r0["params"][k], r1["params"][k], rtol=0, atol=0)
    from eqm.checkpoint import load_checkpoint

    ck = load_checkpoint(r0["summary"]["checkpoint"])
    assert ck["step"] == 3 and ck["world_size"] == 2 and len(ck["rng"]) == 2
    for k in ck["model"]:
        torch.testing.assert_close(ck["model"][k], r0["params"][k], rtol=0, atol=0)
    assert [e["loss"] for e in r0["log"]] == [e["loss"] for e in r1["log"]]  # losses are all-reduced


def test_torchrun_sampling_matches_single_process(tmp_path):
    from eqm import sample, train

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ckpt = train.main(ARGS + ["--results-dir", str(tmp_path / "res")])["checkpoint"]
        common = ["--ckpt", ckpt, "--num-fid-samples", "7", "--global-batch-size", "4", "--num-sampling-steps", "3"]
        single = np.load(sample.main(common + ["--folder", str(tmp_path / "one")])["npz"])
    finally:
        torch.set_num_threads(n)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "eqm.sample", *common, "--folder", str(tmp_path / "two"), "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = np.load(tmp_path / "two.npz")
    assert two["arr_0"].shape == (7, 8, 8, 3)
    np.testing.assert_array_equal(two["arr_0"], single["arr_0"])
    np.testing.assert_array_equal(two["labels"], single["labels"])


def _train_worker(rank, world, port, argv):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from eqm import train

    train.main(argv)


def _two_process_run(out, *extra, steps=3):
    argv = [a for a in ARGS if a not in ("--max-steps", "3", "--sample-every", "0")]
    argv += ["--max-steps", str(steps), "--sample-every", str(steps), "--sample-steps", "2", "--results-dir", str(out),
             *map(str, extra)]
    mp.spawn(_train_worker, args=(2, _free_port(), argv), nprocs=2, join=True)
    (exp,) = os.listdir(out)
    return os.path.join(out, exp)


def _assert_same_training_state(a, b):
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-5, atol=1e-6)
    assert a["opt"]["param_groups"][0]["params"] == b["opt"]["param_groups"][0]["params"]
    for i, s in a["opt"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(s[k], b["opt"]["state"][i][k], rtol=1e-5, atol=1e-7)


def test_fsdp_trains_like_ddp_and_checkpoints_interchange(tmp_path):
    from PIL import Image

    from eqm import train
    from eqm.checkpoint import load_checkpoint

    ddp_dir, fsdp_dir = _two_process_run(tmp_path / "ddp"), _two_process_run(tmp_path / "fsdp", "--fsdp")
    ddp, fsdp = (load_checkpoint(os.path.join(d, "checkpoints", "0000003.pt")) for d in (ddp_dir, fsdp_dir))
    # sharded training gives the replicated run's weights, EMA and optimizer state, saved unsharded
    _assert_same_training_state(fsdp, ddp)
    assert fsdp["model"]["blocks.0.attn.qkv.weight"].shape == ddp["model"]["blocks.0.attn.qkv.weight"].shape
    grids = [np.asarray(Image.open(os.path.join(d, "samples", "0000003.png")), dtype=int) for d in (ddp_dir, fsdp_dir)]
    assert np.abs(grids[0] - grids[1]).max() <= 1  # EMA grid from the gathered weights
    # a DDP checkpoint resumes under FSDP (sharded optimizer state loaded) as it does under DDP
    ddp_ckpt = os.path.join(ddp_dir, "checkpoints", "0000003.pt")
    resumed = [_two_process_run(tmp_path / f"resume_{name}", "--ckpt", ddp_ckpt, *extra, steps=5)
               for name, extra in (("ddp", []), ("fsdp", ["--fsdp"]))]
    a, b = (load_checkpoint(os.path.join(d, "checkpoints", "0000005.pt")) for d in resumed)
    assert a["step"] == b["step"] == 5
    _assert_same_training_state(b, a)
    # and an FSDP checkpoint resumes in one plain process
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = [a for a in ARGS if a not in ("--max-steps", "3")]
        s = train.main(argv + ["--max-steps", "4", "--ckpt", os.path.join(fsdp_dir, "checkpoints", "0000003.pt"),
                               "--results-dir", str(tmp_path / "single")])
    finally:
        torch.set_num_threads(n)
    assert s["steps"] == 4 and s["steps_this_run"] == 1 and np.isfinite(s["final_loss"])


def test_explicit_cuda_index_is_kept_in_one_process(monkeypatch):
    """--device cuda:1 without torchrun runs on cuda:1 (under torchrun the local rank picks the GPU)."""
    from eqm import distributed
    picked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", picked.append)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.setup("cuda:1").device == torch.device("cuda", 1)
    assert distributed.setup("cuda").device == torch.device("cuda", 0)
    assert picked == [torch.device("cuda", 1), torch.device("cuda", 0)]
