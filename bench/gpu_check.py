"""Validate a GPU machine end to end, the day one is lent: one command, one report.

    python bench/gpu_check.py [--report gpu_check.md] [--quick]

Runs, each as its own process, and records pass/fail, seconds and the output's tail:
  1. the kernel compile check for this GPU's architecture (python -m eqm_kernels.aot)
  2. the kernel and fused-model tests, compiled on CUDA (tests/conftest.py interprets only without a GPU)
  3. bench/kernel_ops.py at EqM-XL/2 shapes (Triton against torch.compile and SDPA)
  4. bench/throughput.py at EqM-XL/2
  5. CUDA-graph sampling against the plain loop, and the DALI GPU decode tests
  6. 2-GPU nccl DDP / FSDP tests (skipped with fewer than 2 GPUs)
Nothing here has been run on a GPU yet: run it whenever a GPU machine is at hand and keep the report.
"""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def steps(arch, gpus, quick):
    """(name, command) for every check."""
    py = sys.executable
    xl = ["--model", "EqM-XL/2"] if not quick else ["--model", "EqM-B/2"]
    out = [
        ("compile check", [py, "-m", "eqm_kernels.aot", "--arch", str(arch)]),
        ("kernel + fused-model tests (compiled)", [py, "-m", "pytest", "-q", "tests/test_kernels_adaln.py",
                                                  "tests/test_kernels_attention.py", "tests/test_kernels_eqm_loss.py",
                                                  "tests/test_fused_model.py"]),
        ("bench/kernel_ops.py at EqM-XL/2 shapes", [py, "bench/kernel_ops.py", "--dtype", "bf16"]),
        ("bench/throughput.py", [py, "bench/throughput.py", *xl]),
        ("CUDA-graph sampler = plain loop, DALI decode", [py, "-m", "pytest", "-q", "tests/test_graph_sampler.py",
                                                         "tests/test_dali.py"]),
    ]
    if gpus >= 2:
        out.append(("2-GPU nccl DDP / FSDP", [py, "-m", "pytest", "-q", "tests/test_ddp.py"]))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--report", default="gpu_check.md", help="markdown report written here")
    p.add_argument("--quick", action="store_true", help="EqM-B/2 instead of EqM-XL/2 for the throughput run")
    args = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU visible; this script validates a GPU machine (run it on one)")
    major, minor = torch.cuda.get_device_capability()
    arch = 90 if major >= 9 else 80
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    lines = [f"# GPU check: {torch.cuda.get_device_name()} (sm_{major}{minor}), {torch.cuda.device_count()} GPU(s), "
             f"torch {torch.__version__}", ""]
    failed = 0
    for name, cmd in steps(arch, torch.cuda.device_count(), args.quick):
        t0 = time.time()
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        ok = res.returncode == 0
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name} ({time.time() - t0:.0f} s)", flush=True)
        tail = (res.stdout + res.stderr)[-4000:]
        lines += [f"## {'ok' if ok else 'FAIL'}: {name} ({time.time() - t0:.0f} s)", "", f"`{' '.join(cmd)}`", "",
                  "```", tail.rstrip(), "```", ""]
    with open(args.report, "w") as f:
        f.write("\n".join(lines))
    print(f"report: {args.report}; {failed} check(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
