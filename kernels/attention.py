"""Non-causal flash attention, forward and backward, layout (B, H, N, Dh).

softmax(q k^T / sqrt(Dh)) v with an online softmax over key blocks; the forward saves the per-row
logsumexp so the backward recomputes the probabilities block by block instead of storing them.
Any N (masked tails); any Dh up to 256, as two power-of-two column tiles (72 -> 64 + 16).
fp32 / fp16 / bf16 inputs, fp32 accumulation, tensor cores throughout: fp32 inputs run on TF32,
which torch allows with set_float32_matmul_precision("high") (the published setting, the CLIs'
default). With "highest" (exact fp32) CUDA fp32 inputs go to torch's SDPA instead: an exact-fp32
Triton dot runs on FMA units, and 3xTF32 spills at these tile sizes.

Cost for B*H heads of N tokens and head dim Dh:
  forward   4*B*H*N^2*Dh FLOP  (two matmuls), reads q, k, v and writes o: 4*B*H*N*Dh elements
  backward 10*B*H*N^2*Dh FLOP  (five matmuls incl. the recomputed scores; dq and dk/dv run as two
            kernels, so the scores are computed twice: 12*B*H*N^2*Dh executed)
At EqM-XL/2 (N=256, Dh=72) attention is matmul-bound but small: under 5% of the model's FLOPs.
"""
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._dispatch import INTERPRET, use_reference, use_triton
from .reference import attention_reference

LOG2E = 1.4426950408889634


def _backward_math(q, k, v, do, scale):
    """dq, dk, dv in differentiable fp32 torch ops, recomputed from q, k, v (twice-differentiable path)."""
    f = torch.float32
    q, k, v, do = q.to(f), k.to(f), v.to(f), do.to(f)
    p = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)
    dv = p.transpose(-2, -1) @ do
    dp = do @ v.transpose(-2, -1)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))  # rowsum(dp * p) = rowsum(do * o)
    return (ds @ k) * scale, (ds.transpose(-2, -1) @ q) * scale, dv


# ---------------------------------------------------------------- Triton kernels
# The head dim is split in two column tiles, D_A (a power of two) + D_B (a power of two, or 0), so
# that a head dim like 72 runs as 64 + 16 columns (10% padding) instead of one 128-column tile (44%).
# Strides come in units of ALIGN elements (ALIGN * element size = 16 bytes when the host found every
# stride and base pointer so aligned, else 1): the compiler can then prove 16-byte aligned rows and
# emits 16-byte, pipelined (cp.async) tile loads even when a head starts at h * 72 elements.
@triton.jit
def _load_cols(base, rows, stride, N, C0: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
               UPCAST: tl.constexpr):
    # tile[r, c] = base[rows[r] * stride + C0 + c], zero outside rows < N and columns < HEAD_DIM
    cols = C0 + tl.arange(0, BLOCK)
    mask = (rows < N)[:, None]
    if C0 + BLOCK > HEAD_DIM:
        mask = mask & (cols < HEAD_DIM)[None, :]
    tile = tl.load(base + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)
    if UPCAST:  # the interpreter's tl.dot is wrong for bf16
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _store_cols(base, rows, stride, N, val, C0: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    cols = C0 + tl.arange(0, BLOCK)
    mask = (rows < N)[:, None]
    if C0 + BLOCK > HEAD_DIM:
        mask = mask & (cols < HEAD_DIM)[None, :]
    tl.store(base + rows[:, None] * stride + cols[None, :], val, mask=mask)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V,  # (B, H, N, Dh), last dim contiguous, other strides (in ALIGN units) below
    O,  # (B, H, N, Dh) contiguous out
    LSE,  # (B, H, N) fp32 out: natural-log logsumexp of the scaled scores per query row
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, N, qk_scale,  # qk_scale = scale * log2(e): the softmax runs in base 2
    HEAD_DIM: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_base = Q + (b * sqb + h * sqh) * ALIGN
    k_base, v_base = K + (b * skb + h * skh) * ALIGN, V + (b * svb + h * svh) * ALIGN
    q_a = _load_cols(q_base, rows, sqn * ALIGN, N, 0, D_A, HEAD_DIM, UPCAST)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, D_A], dtype=tl.float32)
    if D_B > 0:
        q_b = _load_cols(q_base, rows, sqn * ALIGN, N, D_A, D_B, HEAD_DIM, UPCAST)
        acc_b = tl.zeros([BLOCK_M, D_B], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        keys = tl.multiple_of(start, BLOCK_N) + tl.arange(0, BLOCK_N)
        k_a = _load_cols(k_base, keys, skn * ALIGN, N, 0, D_A, HEAD_DIM, UPCAST)
        s = tl.dot(q_a, tl.trans(k_a), input_precision=PRECISION)
        if D_B > 0:
            k_b = _load_cols(k_base, keys, skn * ALIGN, N, D_A, D_B, HEAD_DIM, UPCAST)
            s = tl.dot(q_b, tl.trans(k_b), s, input_precision=PRECISION)
        s = tl.where((keys < N)[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_a = _load_cols(v_base, keys, svn * ALIGN, N, 0, D_A, HEAD_DIM, UPCAST)
        p = p.to(v_a.dtype)
        acc_a = tl.dot(p, v_a, acc_a * alpha[:, None], input_precision=PRECISION)
        if D_B > 0:
            v_b = _load_cols(v_base, keys, svn * ALIGN, N, D_A, D_B, HEAD_DIM, UPCAST)
            acc_b = tl.dot(p, v_b, acc_b * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    tl.store(LSE + bh.to(tl.int64) * N + rows, (m_i + tl.log2(l_i)) / 1.4426950408889634, mask=rows < N)
    o_base = O + bh.to(tl.int64) * N * HEAD_DIM
    _store_cols(o_base, rows, HEAD_DIM, N, acc_a / l_i[:, None], 0, D_A, HEAD_DIM)
    if D_B > 0:
        _store_cols(o_base, rows, HEAD_DIM, N, acc_b / l_i[:, None], D_A, D_B, HEAD_DIM)


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, N, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # delta = rowsum(do * o), (B*H, N) fp32; o and do are contiguous (B, H, N, Dh).
    pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _load_cols(O + bh * N * HEAD_DIM, rows, HEAD_DIM, N, 0, BLOCK_D, HEAD_DIM, False).to(tl.float32)
    do = _load_cols(DO + bh * N * HEAD_DIM, rows, HEAD_DIM, N, 0, BLOCK_D, HEAD_DIM, False).to(tl.float32)
    tl.store(DELTA + bh * N + rows, tl.sum(o * do, axis=1), mask=rows < N)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V,  # (B, H, N, Dh) strided like the forward
    DO,  # (B, H, N, Dh) contiguous
    LSE, DELTA,  # (B, H, N) fp32
    DK, DV,  # (B, H, N, Dh) contiguous out
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, N, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program owns a block of keys and loops over all query blocks: no atomics, deterministic.
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    bh = bh.to(tl.int64)
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_base, v_base = K + (b * skb + h * skh) * ALIGN, V + (b * svb + h * svh) * ALIGN
    q_base, do_base = Q + (b * sqb + h * sqh) * ALIGN, DO + bh * N * HEAD_DIM
    k_a = _load_cols(k_base, keys, skn * ALIGN, N, 0, D_A, HEAD_DIM, UPCAST)
    v_a = _load_cols(v_base, keys, svn * ALIGN, N, 0, D_A, HEAD_DIM, UPCAST)
    dk_a = tl.zeros([BLOCK_N, D_A], dtype=tl.float32)
    dv_a = tl.zeros([BLOCK_N, D_A], dtype=tl.float32)
    if D_B > 0:
        k_b = _load_cols(k_base, keys, skn * ALIGN, N, D_A, D_B, HEAD_DIM, UPCAST)
        v_b = _load_cols(v_base, keys, svn * ALIGN, N, D_A, D_B, HEAD_DIM, UPCAST)
        dk_b = tl.zeros([BLOCK_N, D_B], dtype=tl.float32)
        dv_b = tl.zeros([BLOCK_N, D_B], dtype=tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = tl.multiple_of(start, BLOCK_M) + tl.arange(0, BLOCK_M)
        rmask = rows < N
        q_a = _load_cols(q_base, rows, sqn * ALIGN, N, 0, D_A, HEAD_DIM, UPCAST)
        do_a = _load_cols(do_base, rows, HEAD_DIM, N, 0, D_A, HEAD_DIM, UPCAST)
        lse = tl.load(LSE + bh * N + rows, mask=rmask, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + bh * N + rows, mask=rmask, other=0.0)
        s = tl.dot(q_a, tl.trans(k_a), input_precision=PRECISION)
        dp = tl.dot(do_a, tl.trans(v_a), input_precision=PRECISION)
        if D_B > 0:
            q_b = _load_cols(q_base, rows, sqn * ALIGN, N, D_A, D_B, HEAD_DIM, UPCAST)
            do_b = _load_cols(do_base, rows, HEAD_DIM, N, D_A, D_B, HEAD_DIM, UPCAST)
            s = tl.dot(q_b, tl.trans(k_b), s, input_precision=PRECISION)
            dp = tl.dot(do_b, tl.trans(v_b), dp, input_precision=PRECISION)
        p = tl.exp2(s * qk_scale - lse[:, None])
        p = tl.where(rmask[:, None] & (keys < N)[None, :], p, 0.0)
        ds = (p * (dp - delta[:, None])).to(q_a.dtype)
        p = p.to(do_a.dtype)
        dv_a = tl.dot(tl.trans(p), do_a, dv_a, input_precision=PRECISION)
        dk_a = tl.dot(tl.trans(ds), q_a, dk_a, input_precision=PRECISION)
        if D_B > 0:
            dv_b = tl.dot(tl.trans(p), do_b, dv_b, input_precision=PRECISION)
            dk_b = tl.dot(tl.trans(ds), q_b, dk_b, input_precision=PRECISION)
    out = bh * N * HEAD_DIM
    _store_cols(DK + out, keys, HEAD_DIM, N, dk_a * sm_scale, 0, D_A, HEAD_DIM)
    _store_cols(DV + out, keys, HEAD_DIM, N, dv_a, 0, D_A, HEAD_DIM)
    if D_B > 0:
        _store_cols(DK + out, keys, HEAD_DIM, N, dk_b * sm_scale, D_A, D_B, HEAD_DIM)
        _store_cols(DV + out, keys, HEAD_DIM, N, dv_b, D_A, D_B, HEAD_DIM)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA,  # as in _attn_bwd_dkdv_kernel
    DQ,  # (B, H, N, Dh) contiguous out
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, N, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program owns a block of queries and loops over all key blocks.
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    bh = bh.to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    q_base, do_base = Q + (b * sqb + h * sqh) * ALIGN, DO + bh * N * HEAD_DIM
    k_base, v_base = K + (b * skb + h * skh) * ALIGN, V + (b * svb + h * svh) * ALIGN
    q_a = _load_cols(q_base, rows, sqn * ALIGN, N, 0, D_A, HEAD_DIM, UPCAST)
    do_a = _load_cols(do_base, rows, HEAD_DIM, N, 0, D_A, HEAD_DIM, UPCAST)
    dq_a = tl.zeros([BLOCK_M, D_A], dtype=tl.float32)
    if D_B > 0:
        q_b = _load_cols(q_base, rows, sqn * ALIGN, N, D_A, D_B, HEAD_DIM, UPCAST)
        do_b = _load_cols(do_base, rows, HEAD_DIM, N, D_A, D_B, HEAD_DIM, UPCAST)
        dq_b = tl.zeros([BLOCK_M, D_B], dtype=tl.float32)
    lse = tl.load(LSE + bh * N + rows, mask=rmask, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * N + rows, mask=rmask, other=0.0)
    for start in range(0, N, BLOCK_N):
        keys = tl.multiple_of(start, BLOCK_N) + tl.arange(0, BLOCK_N)
        k_a = _load_cols(k_base, keys, skn * ALIGN, N, 0, D_A, HEAD_DIM, UPCAST)
        v_a = _load_cols(v_base, keys, svn * ALIGN, N, 0, D_A, HEAD_DIM, UPCAST)
        s = tl.dot(q_a, tl.trans(k_a), input_precision=PRECISION)
        dp = tl.dot(do_a, tl.trans(v_a), input_precision=PRECISION)
        if D_B > 0:
            k_b = _load_cols(k_base, keys, skn * ALIGN, N, D_A, D_B, HEAD_DIM, UPCAST)
            v_b = _load_cols(v_base, keys, svn * ALIGN, N, D_A, D_B, HEAD_DIM, UPCAST)
            s = tl.dot(q_b, tl.trans(k_b), s, input_precision=PRECISION)
            dp = tl.dot(do_b, tl.trans(v_b), dp, input_precision=PRECISION)
        p = tl.exp2(s * qk_scale - lse[:, None])
        p = tl.where((keys < N)[None, :], p, 0.0)
        ds = (p * (dp - delta[:, None])).to(k_a.dtype)
        dq_a = tl.dot(ds, k_a, dq_a, input_precision=PRECISION)
        if D_B > 0:
            dq_b = tl.dot(ds, k_b, dq_b, input_precision=PRECISION)
    out = DQ + bh * N * HEAD_DIM
    _store_cols(out, rows, HEAD_DIM, N, dq_a * sm_scale, 0, D_A, HEAD_DIM)
    if D_B > 0:
        _store_cols(out, rows, HEAD_DIM, N, dq_b * sm_scale, D_A, D_B, HEAD_DIM)


def _tuned(fn, blocks, key):
    """Autotuner over (BLOCK_M, BLOCK_N, warps, stages, widest head tile) blocks: a config is tried only
    at head tiles (D_A + D_B) up to its last entry, the widest at which it compiles without spills."""
    pairs = [(triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s), d) for m, n, w, s, d in blocks]

    def prune(configs, nargs, **kwargs):
        tile = kwargs["D_A"] + kwargs["D_B"]
        return [c for c, d in pairs if tile <= d] or [pairs[-1][0]]

    return triton.autotune([c for c, _ in pairs], key=key, prune_configs_by={"early_config_prune": prune})(fn)


# Autotune configs (BLOCK_M, BLOCK_N, warps, stages, widest head tile) per input width and GPU generation
# (sm_90 and later, or sm_80-89), pruned with `python -m eqm_kernels.aot`: each one compiles within the limits
# and without spills at head dims 64, 72 (64 + 16 tiles) and, where its last entry says 128, 128.
_CONFIGS_16 = {"fwd": [(128, 64, 8, 3, 128), (64, 64, 4, 3, 128), (128, 32, 4, 3, 80), (64, 32, 4, 2, 128)],
               "dkdv": [(64, 64, 8, 2, 128), (32, 64, 4, 3, 128), (32, 32, 4, 3, 128)],
               "dq": [(128, 64, 8, 2, 80), (128, 32, 4, 2, 80), (64, 64, 4, 2, 128), (64, 32, 4, 3, 128)]}
_FWD_32 = [(128, 64, 8, 3, 80), (64, 64, 4, 3, 80), (128, 32, 4, 3, 80), (64, 32, 4, 2, 128)]
_CONFIGS = {
    (16, 90): _CONFIGS_16,
    (16, 80): _CONFIGS_16,
    (32, 90): {"fwd": _FWD_32,
               "dkdv": [(32, 64, 8, 2, 128), (32, 64, 8, 3, 128), (32, 64, 4, 3, 80), (64, 64, 8, 2, 64),
                        (16, 32, 4, 2, 128)],
               "dq": [(128, 64, 8, 2, 80), (128, 32, 8, 2, 128), (64, 64, 4, 2, 128), (64, 32, 4, 3, 128)]},
    (32, 80): {"fwd": _FWD_32,
               "dkdv": [(64, 32, 8, 2, 128), (32, 32, 8, 2, 128), (16, 32, 4, 2, 128), (32, 32, 4, 2, 128)],
               "dq": [(128, 32, 8, 2, 80), (64, 32, 4, 3, 128)]},
}
_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}

if INTERPRET:
    # Small blocks under the interpreter, so that masked tails and the loops get exercised.
    _TUNED = {key: _KERNELS for key in _CONFIGS}
    _FIXED = {"BLOCK_M": 32, "BLOCK_N": 32}
else:
    # EQM_AUTOTUNE=0 (GPU tests): the last config of each list only (it fits every head tile), no benchmarking.
    _KEY = ["N", "HEAD_DIM", "ALIGN", "PRECISION"]
    _ONE = os.environ.get("EQM_AUTOTUNE") == "0"
    _TUNED = {key: {name: _tuned(fn, cfgs[name][-1:] if _ONE else cfgs[name], _KEY) for name, fn in _KERNELS.items()}
              for key, cfgs in _CONFIGS.items()}
    _FIXED = {}


def _kernels(t):
    """The kernels for t's width on this GPU's generation (the interpreter: the plain kernels)."""
    if INTERPRET:
        return _KERNELS
    arch = triton.runtime.driver.active.get_current_target().arch
    return _TUNED[(8 * t.element_size(), 90 if arch >= 90 else 80)]


def _split_head_dim(dh):
    """(D_A, D_B): power-of-two column tiles covering dh, D_B = 0 when one tile fits (72 -> 64 + 16)."""
    d_a = max(16, 1 << (dh.bit_length() - 1))
    rest = dh - d_a
    return d_a, 0 if rest <= 0 else max(16, triton.next_power_of_2(rest))


def _align(*ts):
    """Elements per 16 bytes when every stride and base pointer of ts is 16-byte aligned, else 1."""
    n = 16 // ts[0].element_size()
    ok = all(s % n == 0 for t in ts for s in t.stride()[:3]) and all(t.data_ptr() % 16 == 0 for t in ts)
    return n if ok else 1


def _meta(q, k, v):
    d_a, d_b = _split_head_dim(q.shape[-1])
    align = _align(q, k, v)
    return {"HEAD_DIM": q.shape[-1], "D_A": d_a, "D_B": d_b, "ALIGN": align, "UPCAST": INTERPRET,
            "PRECISION": "tf32", **_FIXED}


def _strides(align, *ts):
    return [s // align for t in ts for s in t.stride()[:3]]


def _grid(blocks_key, N, B, H):
    return lambda meta: (triton.cdiv(N, meta[blocks_key]), B * H)


def _lastdim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_forward(q, k, v, scale):
    B, H, N, Dh = q.shape
    q, k, v = _lastdim_contiguous(q), _lastdim_contiguous(k), _lastdim_contiguous(v)
    o = torch.empty((B, H, N, Dh), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    meta = _meta(q, k, v)
    _kernels(q)["fwd"][_grid("BLOCK_M", N, B, H)](
        q, k, v, o, lse, *_strides(meta["ALIGN"], q, k, v), H, N, scale * LOG2E, **meta)
    return o, lse


def _launch_backward(q, k, v, o, lse, do, scale):
    B, H, N, Dh = q.shape
    q, k, v = _lastdim_contiguous(q), _lastdim_contiguous(k), _lastdim_contiguous(v)
    do = do.contiguous()
    meta = _meta(q, k, v)
    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    block_m = 32 if INTERPRET else 64
    _attn_bwd_delta_kernel[(triton.cdiv(N, block_m), B * H)](o, do, delta, N, HEAD_DIM=Dh, BLOCK_M=block_m,
                                                            BLOCK_D=triton.next_power_of_2(Dh))
    dq, dk, dv = (torch.empty((B, H, N, Dh), dtype=t.dtype, device=q.device) for t in (q, k, v))
    args = (*_strides(meta["ALIGN"], q, k, v), H, N, scale * LOG2E, scale)
    tuned = _kernels(q)
    tuned["dkdv"][_grid("BLOCK_N", N, B, H)](q, k, v, do, lse, delta, dk, dv, *args, **meta)
    tuned["dq"][_grid("BLOCK_M", N, B, H)](q, k, v, do, lse, delta, dq, *args, **meta)
    return dq, dk, dv


# ---------------------------------------------------------------- custom ops
@torch.library.custom_op("eqm::attention", mutates_args=())
def _attn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(q, k, v):
        return _launch_forward(q, k, v, scale)
    s = (q @ k.transpose(-2, -1)).float() * scale
    lse = torch.logsumexp(s, dim=-1)
    return (torch.exp(s - lse.unsqueeze(-1)).to(v.dtype) @ v), lse


@_attn_op.register_fake
def _(q, k, v, scale):
    B, H, N, Dh = q.shape
    return q.new_empty((B, H, N, Dh)), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("eqm::attention_backward", mutates_args=())
def _attn_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                 do: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(q, k, v, o, do):
        return _launch_backward(q, k, v, o, lse, do, scale)
    dq, dk, dv = _backward_math(q, k, v, do, scale)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@_attn_bwd_op.register_fake
def _(q, k, v, o, lse, do, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attn_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale


def _attn_backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: differentiable ops so a second derivative exists
        dq, dk, dv = _backward_math(q, k, v, do, ctx.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None
    return *_attn_bwd_op(q, k, v, o, lse, do, ctx.scale), None


_attn_op.register_autograd(_attn_backward, setup_context=_attn_setup)


def attention(q, k, v, scale: Optional[float] = None):
    """Non-causal softmax attention on (B, H, N, Dh) tensors (scale defaults to Dh**-0.5)."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention expects q, k, v of one shape (B, H, N, Dh), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] > 256:
        raise ValueError(f"attention supports head dims up to 256, got {q.shape[-1]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention expects one dtype for q, k, v, got {q.dtype}, {k.dtype}, {v.dtype}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if use_reference():
        return attention_reference(q, k, v, scale)
    if q.dtype == torch.float32 and q.is_cuda and torch.get_float32_matmul_precision() == "highest":
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    return _attn_op(q, k, v, scale)[0]
