"""Faults and bad input: every one ends in one clear line (or a guarded run), never a traceback, a hang,
a silently wrong result or a lost run. The README's "Faults and bad input" table lists what each gets."""
import os
import shutil
import socket
import threading
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from eqm import checkpoint, data, sample, train, utils
from model_helpers import batches_through
from eqm.ebflow import train as ebflow_train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--data-path", "digits", "--model", "EqM-Ti/4", "--image-size", "4", "--num-workers", "0",
        "--global-batch-size", "16", "--sample-every", "0"]
FLOW = ["--data", "sine", "--arch", "fc", "--loss", "ssm", "--batch-size", "32", "--n-train", "200",
        "--n-test", "100"]


def run_train(tmp_path, *extra):
    return train.main(TINY + ["--results-dir", str(tmp_path / "res"), *map(str, extra)])


def one_line_exit(capsys, fn, *args):
    """Run a CLI that must fail: returns its one-line message (SystemExit, never another exception)."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert e.value.code != 0
    msg = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert "\n" not in msg.strip() and "Traceback" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def eqm_ckpt(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    s = train.main(TINY + ["--max-steps", "2", "--results-dir", str(tmp_path_factory.mktemp("t"))])
    torch.set_num_threads(n)
    return s["checkpoint"]


@pytest.fixture(scope="module")
def ebflow_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("f") / "run"
    ebflow_train.main(FLOW + ["--steps", "2", "--eval-every", "2", "--out", str(out)])
    return str(out / "ckpt.pt")


# ----------------------------------------------------------------------------------------------- NaN guard

def test_nonfinite_loss_stops_training_before_any_checkpoint(tmp_path, capsys):
    # a huge lr blows the weights up within a few steps; the log step is far away, a checkpoint is due every 2
    msg = one_line_exit(capsys, run_train, tmp_path, "--lr", "1e6", "--max-steps", "40", "--ckpt-every", "2",
                        "--log-every", "1000")
    assert "non-finite training at step" in msg and "before writing the checkpoint" in msg and "--lr" in msg
    ckpts = [f for d in os.listdir(tmp_path / "res") for f in os.listdir(tmp_path / "res" / d / "checkpoints")]
    for f in ckpts:  # checkpoints from before the first bad step are fine; none may hold a NaN
        path = next((tmp_path / "res").glob(f"*/checkpoints/{f}"))
        ck = checkpoint.load_checkpoint(path)
        assert all(torch.isfinite(v).all() for v in [*ck["model"].values(), *ck["ema"].values()])


def _nan_batches(monkeypatch, bad_steps):
    """Make the digits loader yield NaN images at the given (1-based) steps."""
    seen = [0]

    def poison(x, y):
        seen[0] += 1
        return (torch.full_like(x, float("nan")) if seen[0] in bad_steps else x), y
    monkeypatch.setattr(data, "make_source", batches_through(poison))


def test_nonfinite_skip_mode_skips_bounded_times(tmp_path, monkeypatch, capsys):
    _nan_batches(monkeypatch, {2})
    s = run_train(tmp_path, "--max-steps", "4", "--log-every", "2", "--on-nonfinite", "skip", "--max-skips", "1")
    assert s["skipped_steps"] == 1 and all(np.isfinite(e["loss"]) for e in s["log"])
    ck = checkpoint.load_checkpoint(s["checkpoint"])
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    _nan_batches(monkeypatch, {1, 2, 3})
    msg = one_line_exit(capsys, run_train, tmp_path, "--max-steps", "4", "--on-nonfinite", "skip", "--max-skips", "2")
    assert "more than --max-skips 2" in msg


def test_ebflow_nonfinite_stops_with_a_line(tmp_path, capsys):
    msg = one_line_exit(capsys, ebflow_train.main, FLOW + ["--steps", "30", "--lr", "1e8", "--grad-clip", "0",
                                                           "--out", str(tmp_path / "o")])
    assert "non-finite training at step" in msg and "--lr" in msg
    assert not (tmp_path / "o" / "ckpt.pt").exists()


# ---------------------------------------------------------------------------------------- flags at parse time

BAD_FLAGS = {
    "train": [("--grad-clip", "-1"), ("--lr", "-0.0001"), ("--lr", "nan"), ("--cfg-scale", "inf"),
              ("--sample-steps", "0"), ("--sample-stepsize", "0"), ("--sample-stepsize", "-0.01"),
              ("--sample-stepsize", "1e3"), ("--num-workers", "-1"), ("--global-seed", "-5"),
              ("--sample-every", "-1"), ("--dist-timeout", "0"), ("--max-skips", "-1")],
    "sample": [("--stepsize", "0"), ("--stepsize", "-0.003"), ("--stepsize", "nan"), ("--stepsize", "1e6"),
               ("--mu", "-0.3"), ("--cfg-scale", "nan"), ("--stop-grad-norm", "-1"), ("--global-seed", "-1")],
    "ebflow": [("--grad-clip", "-1"), ("--ema", "1.5"), ("--sigma", "0"), ("--eps", "-0.1"), ("--lam", "nan"),
               ("--slices", "0"), ("--n-train", "0"), ("--hidden", "0"), ("--kernel-size", "4")],
    "extract": [("--image-size", "100"), ("--batch-size", "0"), ("--shard-size", "-1"), ("--num-workers", "-2")],
}


@pytest.mark.parametrize("cli,flag,value", [(c, f, v) for c, bad in BAD_FLAGS.items() for f, v in bad])
def test_bad_numeric_flags_rejected_when_parsed(cli, flag, value, capsys):
    if cli == "train":
        parser = train.get_parser()
        call = lambda: train.resolve_args(parser.parse_args(TINY + [flag, value]), parser)  # noqa: E731
    elif cli == "sample":
        parser = sample.get_parser()
        call = lambda: sample.resolve_args(parser.parse_args(["--data-path", "digits", flag, value]),  # noqa: E731
                                           parser, {})
    elif cli == "ebflow":
        call = lambda: ebflow_train.parse_args(FLOW + [flag, value])  # noqa: E731
    else:
        from eqm import extract_latents
        call = lambda: extract_latents.get_args(["--data-path", "x", "--out", "y", flag, value])  # noqa: E731
    with pytest.raises(SystemExit) as e:
        call()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and flag in err[-1] and "unrecognized" not in err[-1], err


def test_bench_flags_rejected(capsys):
    from eqm_bench import ebflow as bench_ebflow
    from eqm_bench import train_step as bench_train_step

    from eqm_bench import vs_published, vs_torchebm

    for fn, argv in [(bench_ebflow.main, ["--dims", "1", "8"]), (bench_ebflow.main, ["--steps", "0"]),
                     (bench_train_step.main, ["--threads", "-2"]), (bench_train_step.main, ["--input-size", "7"]),
                     (vs_torchebm.main, ["--rounds", "0"]), (vs_torchebm.main, ["--cfg-scale", "nan"]),
                     (vs_published.main, ["--published", "x", "--sample-steps", "1"])]:
        with pytest.raises(SystemExit) as e:
            fn(argv)
        assert e.value.code == 2


def test_nan_training_grid_is_not_written(tmp_path, monkeypatch):
    from eqm import sampling

    monkeypatch.setattr(sampling, "sample", lambda model, x, *a, **k: torch.full_like(x, float("nan")))
    s = train.main(TINY[:-2] + ["--results-dir", str(tmp_path / "res"), "--max-steps", "2", "--sample-every", "2",
                                "--sample-steps", "2"])
    assert s["sample_grid"] is None and not os.path.exists(os.path.join(s["experiment_dir"], "samples"))
    assert "sample grid at step 2 is non-finite" in open(os.path.join(s["experiment_dir"], "log.txt")).read()
    assert s["checkpoint"] is not None  # the run itself is fine


def test_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    def full(path, state):
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr(checkpoint, "save_checkpoint", full)
    monkeypatch.setattr(train, "save_checkpoint", full, raising=False)
    msg = one_line_exit(capsys, run_train, tmp_path, "--max-steps", "1")
    assert "No space left on device" in msg and "0000001.pt" in msg


# ---------------------------------------------------------------------------------------------- checkpoints

def _bad_files(tmp_path, good):
    files = {"missing": tmp_path / "nope.pt", "folder": tmp_path / "dir.pt", "empty": tmp_path / "empty.pt",
             "truncated": tmp_path / "trunc.pt", "text": tmp_path / "text.pt", "list": tmp_path / "list.pt",
             "malicious": tmp_path / "evil.pt"}
    files["folder"].mkdir()
    files["empty"].write_bytes(b"")
    raw = open(good, "rb").read()
    files["truncated"].write_bytes(raw[: len(raw) // 2])
    files["text"].write_text("step: 1000\n")
    torch.save([1, 2, 3], files["list"])
    torch.save({"model": {}, "x": Evil()}, files["malicious"])
    return files


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("cli", ["train", "sample", "ebflow"])
def test_every_bad_checkpoint_gets_one_line(cli, tmp_path, eqm_ckpt, ebflow_ckpt, capsys):
    files = _bad_files(tmp_path, eqm_ckpt)
    files["other trainer"] = ebflow_ckpt if cli != "ebflow" else eqm_ckpt
    if cli == "train":  # the sampler takes its model from the checkpoint; the trainer from --model
        from eqm.models import EqM_models
        files["other model"] = tmp_path / "ti2.pt"
        checkpoint.save_checkpoint(files["other model"], {"ema": EqM_models["EqM-Ti/2"](
            input_size=4, in_channels=1, num_classes=10).state_dict()})
    for what, path in files.items():
        if cli == "train":
            args = (tmp_path / what.replace(" ", "_"), "--max-steps", "1", "--ckpt", str(path))
            msg = one_line_exit(capsys, run_train, *args)
        elif cli == "sample":
            msg = one_line_exit(capsys, sample.main, ["--ckpt", str(path), "--folder", str(tmp_path / "s"),
                                                      "--num-fid-samples", "1", "--num-sampling-steps", "2"])
        else:
            msg = one_line_exit(capsys, ebflow_train.main, FLOW + ["--steps", "3", "--resume", str(path),
                                                                   "--out", str(tmp_path / "o" / what)])
        assert str(path) in msg and "weights_only=False" not in msg, (what, msg)
        expect = {"missing": "not found", "folder": "is a folder", "empty": "empty", "truncated": "truncated",
                  "text": "not a PyTorch checkpoint", "list": "holds a list", "malicious": "refusing to load",
                  "other trainer": "EBFlow" if cli != "ebflow" else "EqM",
                  "other model": "checkpoint is EqM-Ti/2 (hidden 192, depth 6, patch 2) but model is EqM-Ti/4"}[what]
        assert expect in msg, (what, msg)


def test_ebflow_resume_into_another_flow_is_one_line(tmp_path, ebflow_ckpt, capsys):
    msg = one_line_exit(capsys, ebflow_train.main, FLOW[:2] + ["--arch", "coupling"] + FLOW[4:] +
                        ["--steps", "3", "--resume", ebflow_ckpt, "--out", str(tmp_path / "o")])
    assert "holds another flow" in msg and "--arch fc" in msg


def test_stale_temp_files_cleaned_on_next_write(tmp_path):
    dead = tmp_path / ".tmp-999999999-abc.pt"  # pid beyond pid_max: its writer is gone
    legacy = tmp_path / ".tmp-x1y2.pt"
    alive = tmp_path / f".tmp-{os.getppid()}-live.pt"  # a writer still running
    for f in (dead, legacy, alive):
        f.write_bytes(b"partial")
    checkpoint.save_checkpoint(tmp_path / "0000002.pt", {"step": 2})
    assert sorted(os.listdir(tmp_path)) == sorted(["0000002.pt", alive.name])


def test_stale_latent_shard_temps_cleaned_on_next_run(tmp_path):
    from eqm import extract_latents

    out = tmp_path / "lat"
    out.mkdir()
    # temps of this rank's shards go even when their pid is alive (a reused pid; only this rank writes them)
    stale = [out / ".tmp-4242-ab_1-latents_00000.npy", out / f".tmp-{os.getppid()}-x-labels_00001.npy",
             out / ".tmp-7-q-shard_00000.json"]
    for f in stale:
        f.write_bytes(b"x" * 100)
    keep = [out / ".tmp-4242-ab_1-latents_00002.npy", out / "latents_00001.npy"]  # another rank's; a finished file
    for f in keep:
        f.write_bytes(b"x")
    removed = utils.remove_stale_temps(str(out), [extract_latents.shard_name(kind, k) for k in (0, 1)
                                                  for kind in extract_latents.KINDS])
    assert sorted(removed) == sorted(map(str, stale)) and sorted(os.listdir(out)) == sorted(f.name for f in keep)


def test_killed_atomic_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "shard_00000.json"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with utils.atomic_write(path, "w") as f:
            f.write("half of the new")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == [path.name] and path.read_text() == "old"
    with utils.atomic_write(path, "w") as f:
        f.write("new")
        assert path.read_text() == "old" and os.path.basename(f.name).startswith(f".tmp-{os.getpid()}-")
    assert os.listdir(tmp_path) == [path.name] and path.read_text() == "new"


# ------------------------------------------------------------------------------------------- output folders

def test_run_folder_index_never_reused_after_deletion(tmp_path):
    for name in ("000-EqM-Ti-4", "001-EqM-Ti-4", "002-EqM-Ti-4"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        (tmp_path / name / "checkpoints" / "0000100.pt").write_bytes(b"newer run")
    shutil.rmtree(tmp_path / "001-EqM-Ti-4")  # deleting an old run must not make the next one reuse 002
    exp = train.new_experiment_dir(str(tmp_path), "EqM-Ti/4")
    assert os.path.basename(exp) == "003-EqM-Ti-4" and os.listdir(os.path.join(exp, "checkpoints")) == []
    assert (tmp_path / "002-EqM-Ti-4" / "checkpoints" / "0000100.pt").read_bytes() == b"newer run"


def test_runs_started_together_get_their_own_folders(tmp_path):
    go, got = threading.Barrier(8), []

    def claim():
        go.wait()
        got.append(train.new_experiment_dir(str(tmp_path), "EqM-Ti/4"))
    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 8
    assert utils.claim_run_dir(str(tmp_path), "x").endswith("008-x")


def test_sampling_refuses_to_mix_with_older_samples(tmp_path, eqm_ckpt, capsys):
    common = ["--ckpt", eqm_ckpt, "--folder", str(tmp_path / "s"), "--num-sampling-steps", "2"]
    sample.main(common + ["--num-fid-samples", "3"])
    msg = one_line_exit(capsys, sample.main, common + ["--num-fid-samples", "2"])
    assert "--overwrite" in msg and "already holds" in msg
    s = sample.main(common + ["--num-fid-samples", "2", "--overwrite"])
    assert sorted(os.listdir(tmp_path / "s")) == ["000000.png", "000001.png", "grid.png"]
    assert np.load(s["npz"])["arr_0"].shape[0] == 2
    shutil.rmtree(tmp_path / "s")  # the npz beside the folder is an earlier run's output too
    msg = one_line_exit(capsys, sample.main, common + ["--num-fid-samples", "2"])
    assert "s.npz" in msg


def test_ebflow_refuses_another_runs_out_folder(tmp_path, capsys):
    out = str(tmp_path / "o")
    ebflow_train.main(FLOW + ["--steps", "2", "--eval-every", "2", "--out", out])
    before = open(os.path.join(out, "log.csv")).read()
    msg = one_line_exit(capsys, ebflow_train.main, FLOW + ["--steps", "2", "--out", out])
    assert "already holds a run" in msg and open(os.path.join(out, "log.csv")).read() == before
    ebflow_train.main(FLOW + ["--steps", "2", "--eval-every", "2", "--out", out, "--overwrite"])


def test_nan_samples_are_never_written(tmp_path, eqm_ckpt, capsys):
    ck = checkpoint.load_checkpoint(eqm_ckpt)
    ck["ema"] = {k: torch.full_like(v, float("nan")) for k, v in ck["ema"].items()}  # what main's trainer saved
    bad = tmp_path / "nan.pt"
    torch.save(ck, bad)
    msg = one_line_exit(capsys, sample.main, ["--ckpt", str(bad), "--folder", str(tmp_path / "s"),
                                              "--num-fid-samples", "2", "--num-sampling-steps", "2"])
    assert "non-finite" in msg and not any(f.endswith(".png") for f in os.listdir(tmp_path / "s"))


# --------------------------------------------------------------------------------------------- distributed

def _failing_peer(rank, port, out, how):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from eqm import distributed

    distributed.setup("cpu", timeout_min=0.05)  # 3 s
    if rank == 1:
        if how == "dies":
            os._exit(1)
        time.sleep(60)  # frozen
        return
    t = time.time()
    try:
        distributed.barrier()
        line = "no error"
    except RuntimeError as e:
        line = distributed.peer_failure_message(e, 0.05)
    with open(out, "w") as f:
        f.write(f"{time.time() - t}\n{line}")
    os._exit(0)  # leaving the group would wait for the frozen peer


@pytest.mark.parametrize("how", ["freezes", "dies"])
def test_a_rank_that_freezes_or_dies_fails_the_others_within_the_timeout(tmp_path, how):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "rank0.txt")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_failing_peer, args=(r, port, out, how)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        procs[0].join(60)
    finally:
        for p in procs:
            p.kill()
    waited, line = open(out).read().split("\n", 1)
    assert "another process died or froze" in line and "--dist-timeout" in line, line
    assert float(waited) < 30
