"""Start-up cost of the compiled paths, cold (empty compile cache) against warm (a second run), in fresh processes.

    OMP_NUM_THREADS=1 python bench/compile_start.py                      # EqM-Ti/2, throughput.py's CPU size
    OMP_NUM_THREADS=1 python bench/compile_start.py --rounds 3 --what train sample

Each measurement is its own Python process (one compile, as a second run of eqm-train or eqm-sample would do):
a cold one gets an empty cache folder, a warm one the folder the cold one of its round filled. Rounds interleave
cold and warm. Reported per process: seconds to the first step (compile included), the steady step, and where
torch spent the compile (dynamo trace, AOTAutograd, inductor; from torch._dynamo.utils.compile_times).
`--child` runs one measurement in this process (what the parent starts).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

T_START = time.perf_counter()


def child(args):
    import torch

    t_import = time.perf_counter() - T_START
    from eqm import compiling
    from eqm.fast import EMA, TrainStep, make_optimizer
    from eqm.models import EqM_models
    from eqm.sampling import Engine

    torch.manual_seed(0)
    model = EqM_models[args.model](input_size=args.input_size, num_classes=1000)
    shape = (model.in_channels, args.input_size, args.input_size)
    out = {"import_s": t_import, "load_1min": os.getloadavg()[0]}
    t0 = time.perf_counter()
    if args.what == "train":
        x, y = torch.randn(args.batch_size, *shape), torch.randint(0, 1000, (args.batch_size,))
        step = TrainStep(model, make_optimizer(model), ema=EMA(model), precision=args.precision, compile=True)
        fn = lambda: step(x, y)  # noqa: E731
    else:
        x, y = torch.randn(args.sample_batch_size, *shape), torch.randint(0, 1000, (args.sample_batch_size,))
        eng = Engine(model, x.shape, "cpu", sampler="ngd", stepsize=0.0017, mu=0.3, cfg_scale=args.cfg_scale,
                     precision=args.precision, compile=True)
        fn = lambda: eng.run(x, y, steps=2)  # noqa: E731
    fn()
    out["first_s"] = time.perf_counter() - t0
    times = []
    for _ in range(3):
        t1 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t1)
    out["step_s"] = statistics.median(times)
    out["phases"] = compiling.compile_phases()
    out["cache"] = compiling.cache_counters()
    print("RESULT " + json.dumps(out), flush=True)


def run_child(args, what, cache_dir):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--what", what, "--model", args.model,
           "--input-size", str(args.input_size), "--batch-size", str(args.batch_size),
           "--sample-batch-size", str(args.sample_batch_size), "--precision", args.precision]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"the {what} run failed:\n{proc.stderr[-3000:]}")
    res = json.loads(line[len("RESULT "):])
    res["wall_s"] = wall
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="EqM-Ti/2")
    p.add_argument("--input-size", type=int, default=16, help="latent side (throughput.py's CPU default: 16)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sample-batch-size", type=int, default=8)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--what", nargs="+", default=["train", "sample"], choices=["train", "sample"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.what = args.what[0]
        return child(args)
    rows = {w: {"cold": [], "warm": []} for w in args.what}
    for r in range(args.rounds):
        for what in args.what:
            cache = tempfile.mkdtemp(prefix="eqm-compile-")
            try:
                for kind in ("cold", "warm"):
                    res = run_child(args, what, cache)
                    rows[what][kind].append(res)
                    print(f"round {r} {what:<6} {kind}: wall {res['wall_s']:6.1f} s, "
                          f"first step {res['first_s']:6.1f} s, "
                          f"steady step {res['step_s']:.3f} s, load {res['load_1min']:.1f}; " +
                          ", ".join(f"{k} {v:.1f}" for k, v in res["phases"].items()) + f"; {res['cache']}", flush=True)
            finally:
                shutil.rmtree(cache, ignore_errors=True)
    for what, kinds in rows.items():
        med = {k: statistics.median(r["first_s"] for r in v) for k, v in kinds.items()}
        print(f"{what}: first step cold {med['cold']:.1f} s, warm {med['warm']:.1f} s (medians of {args.rounds})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "load": os.getloadavg()}, f, indent=2)


if __name__ == "__main__":
    main()
