"""The compile check (kernels.aot): its PTX/ptxas readers, its pass/fail rule, and one real sm_90 compile."""
import os
import subprocess
import sys

from eqm_kernels.aot import Variant, inspect_copies, inspect_ptx, parse_ptxas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readers():
    log = "ptxas info    : Used 168 registers, used 1 barriers, 380 bytes cmem[0]\n    8 bytes stack frame, " \
          "12 bytes spill stores, 16 bytes spill loads"
    assert parse_ptxas(log) == (168, 28)
    ptx = "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 ...;\n ld.global.v4.b32 { %r1 }, [ %rd1 + 0 ];\n"
    assert inspect_ptx(ptx) == ("wgmma", "no", 16)
    assert inspect_ptx("mma.sync.aligned.m16n8k16 ...;\ncp.async.cg.shared.global [ %r1 ], [ %rd2 ], 0x10;")[:2] == \
        ("mma.sync", "cp.async")
    copy = "ttg.async_copy_global_to_local %a, %b mask %m other %o {contiguity = %d : i32} : tensor<%sx!tt.ptr<bf16>"
    # a 64x64 bf16 tile over 4 warps: 32 elements per thread, so 16-byte copies are expected
    assert inspect_copies(copy.replace("%d", "8").replace("%s", "64x64"), warps=4) == (16, True)
    assert inspect_copies(copy.replace("%d", "1").replace("%s", "64x64"), warps=4) == (2, False)
    # a 64x16 tile over 8 warps: 4 elements (8 bytes) per thread is the whole share
    assert inspect_copies(copy.replace("%d", "4").replace("%s", "64x16"), warps=8) == (8, True)


def test_problems():
    good = Variant("attn_fwd", "", "", shared=65536, regs=128, warps=8, mma="wgmma", load_bytes=16,
                   pipelined="cp.async", has_dot=True)
    assert good.problems(90) == []
    assert good.problems(80) == []
    assert Variant(**{**good.__dict__, "shared": 200000}).problems(80)  # over sm_80's 163 KB
    assert Variant(**{**good.__dict__, "spill": 4}).problems(90)
    assert Variant(**{**good.__dict__, "regs": 255, "warps": 16}).problems(90)  # 255 x 512 threads > 64K
    assert Variant(**{**good.__dict__, "pipelined": "no"}).problems(90)
    assert Variant(**{**good.__dict__, "loads_ok": False}).problems(90)
    assert Variant(**{**good.__dict__, "mma": "fma"}).problems(90)
    assert Variant(**{**good.__dict__, "error": "compile error: x"}).problems(90)


def test_attention_compiles_for_sm90():
    """Every bf16 attention variant at EqM-B/2 shapes compiles for an H100 within its limits (no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "eqm_kernels.aot", "--arch", "90", "--precision", "bf16",
                          "--model", "EqM-B/2", "--kernel", "attention"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("attn_")]
    assert {ln.split()[0] for ln in lines} == {"attn_fwd", "attn_bwd_delta", "attn_bwd_dkdv", "attn_bwd_dq"}
    assert all(" ok" in ln for ln in lines)
    dots = [ln for ln in lines if "bwd_delta" not in ln]
    assert all(("mma wgmma" in ln or "mma mma.sync" in ln) and "pipe cp.async" in ln for ln in dots)
    assert any("HEAD_DIM=64 D_A=64 D_B=0 ALIGN=8" in ln for ln in dots)  # q/k/v views proven 16-byte aligned
