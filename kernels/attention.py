"""Non-causal flash attention, forward and backward, layout (B, H, N, Dh).

softmax(q k^T / sqrt(Dh)) v with an online softmax over key blocks; the forward saves the per-row
logsumexp so the backward recomputes the probabilities block by block instead of storing them.
Any N (masked tails); any Dh up to 256 (the block is the next power of two, masked: 72 -> 128).
fp32 / fp16 / bf16 inputs, fp32 accumulation (fp32 inputs use exact fp32 dots, not tf32).

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

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------- reference
def attention_reference(q, k, v, scale: Optional[float] = None):
    """softmax(q k^T * scale) v in plain PyTorch, same dtype as the inputs (scale defaults to Dh**-0.5)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)
    return p @ v


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
@triton.jit
def _load_tile(base, rows, stride_n, cols, N, HEAD_DIM, UPCAST: tl.constexpr):
    tile = tl.load(base + rows[:, None] * stride_n + cols[None, :],
                   mask=(rows < N)[:, None] & (cols < HEAD_DIM)[None, :], other=0.0)
    if UPCAST:  # the interpreter's tl.dot is wrong for bf16
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _attn_fwd_kernel(
    Q, K, V,  # (B, H, N, Dh), last dim contiguous, any other strides
    O,  # (B, H, N, Dh) contiguous out
    LSE,  # (B, H, N) fp32 out: natural-log logsumexp of the scaled scores per query row
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, N, HEAD_DIM, qk_scale,  # qk_scale = scale * log2(e): the softmax runs in base 2
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * sqb + h * sqh, rows, sqn, cols_d, N, HEAD_DIM, UPCAST)
    k_base, v_base = K + b * skb + h * skh, V + b * svb + h * svh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, keys, skn, cols_d, N, HEAD_DIM, UPCAST)
        v = _load_tile(v_base, keys, svn, cols_d, N, HEAD_DIM, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where((keys < N)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    rmask = rows < N
    tl.store(LSE + bh.to(tl.int64) * N + rows, (m_i + tl.log2(l_i)) / 1.4426950408889634, mask=rmask)
    o_ptr = O + bh.to(tl.int64) * N * HEAD_DIM + rows[:, None] * HEAD_DIM + cols_d[None, :]
    tl.store(o_ptr, acc, mask=rmask[:, None] & (cols_d < HEAD_DIM)[None, :])


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, N, HEAD_DIM, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # delta = rowsum(do * o), (B*H, N) fp32; o and do are contiguous (B, H, N, Dh).
    pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < N)[:, None] & (cols < HEAD_DIM)[None, :]
    offs = bh * N * HEAD_DIM + rows[:, None] * HEAD_DIM + cols[None, :]
    o = tl.load(O + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * N + rows, tl.sum(o * do, axis=1), mask=rows < N)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V,  # (B, H, N, Dh) strided like the forward
    DO,  # (B, H, N, Dh) contiguous
    LSE, DELTA,  # (B, H, N) fp32
    DK, DV,  # (B, H, N, Dh) contiguous out
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, N, HEAD_DIM, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program owns a block of keys and loops over all query blocks: no atomics, deterministic.
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    bh = bh.to(tl.int64)
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + b * skb + h * skh, keys, skn, cols_d, N, HEAD_DIM, UPCAST)
    v = _load_tile(V + b * svb + h * svh, keys, svn, cols_d, N, HEAD_DIM, UPCAST)
    q_base, do_base = Q + b * sqb + h * sqh, DO + bh * N * HEAD_DIM
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < N
        q = _load_tile(q_base, rows, sqn, cols_d, N, HEAD_DIM, UPCAST)
        do = _load_tile(do_base, rows, HEAD_DIM, cols_d, N, HEAD_DIM, UPCAST)
        lse = tl.load(LSE + bh * N + rows, mask=rmask, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + bh * N + rows, mask=rmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        p = tl.where(rmask[:, None] & (keys < N)[None, :], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    out = bh * N * HEAD_DIM + keys[:, None] * HEAD_DIM + cols_d[None, :]
    mask = (keys < N)[:, None] & (cols_d < HEAD_DIM)[None, :]
    tl.store(DK + out, dk * sm_scale, mask=mask)
    tl.store(DV + out, dv, mask=mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA,  # as in _attn_bwd_dkdv_kernel
    DQ,  # (B, H, N, Dh) contiguous out
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, N, HEAD_DIM, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program owns a block of queries and loops over all key blocks.
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    bh = bh.to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    cols_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * sqb + h * sqh, rows, sqn, cols_d, N, HEAD_DIM, UPCAST)
    do = _load_tile(DO + bh * N * HEAD_DIM, rows, HEAD_DIM, cols_d, N, HEAD_DIM, UPCAST)
    lse = tl.load(LSE + bh * N + rows, mask=rmask, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * N + rows, mask=rmask, other=0.0)
    k_base, v_base = K + b * skb + h * skh, V + b * svb + h * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, keys, skn, cols_d, N, HEAD_DIM, UPCAST)
        v = _load_tile(v_base, keys, svn, cols_d, N, HEAD_DIM, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        p = tl.where((keys < N)[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    out = bh * N * HEAD_DIM + rows[:, None] * HEAD_DIM + cols_d[None, :]
    tl.store(DQ + out, dq * sm_scale, mask=rmask[:, None] & (cols_d < HEAD_DIM)[None, :])


def _configs(blocks):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in blocks]


if INTERPRET or os.environ.get("EQM_AUTOTUNE") == "0":
    # Autotune needs a GPU (and compiles every config per shape: EQM_AUTOTUNE=0 skips it for GPU tests).
    # One config; under the interpreter small blocks, so that masked tails and the loops get exercised.
    _fwd, _dkdv, _dq = _attn_fwd_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel
    _FIXED = {"BLOCK_M": 32, "BLOCK_N": 32} if INTERPRET else {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4}
else:
    _KEY = ["N", "HEAD_DIM", "PRECISION"]
    _fwd = triton.autotune(_configs([(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3),
                                     (64, 32, 4, 2)]), key=_KEY)(_attn_fwd_kernel)
    _dkdv = triton.autotune(_configs([(64, 128, 8, 2), (32, 128, 4, 2), (64, 64, 4, 2), (32, 64, 4, 3)]),
                            key=_KEY)(_attn_bwd_dkdv_kernel)
    _dq = triton.autotune(_configs([(128, 64, 8, 2), (128, 32, 4, 2), (64, 64, 4, 2), (64, 32, 4, 3)]),
                          key=_KEY)(_attn_bwd_dq_kernel)
    _FIXED = {}


def _meta(q):
    return {
        "BLOCK_D": max(16, triton.next_power_of_2(q.shape[-1])),
        "UPCAST": INTERPRET,
        "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",  # tf32 is ignored for 16-bit inputs
        **_FIXED,
    }


def _strides(*ts):
    return [s for t in ts for s in t.stride()[:3]]


def _grid(blocks_key, N, B, H):
    return lambda meta: (triton.cdiv(N, meta[blocks_key]), B * H)


def _lastdim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_forward(q, k, v, scale):
    B, H, N, Dh = q.shape
    q, k, v = _lastdim_contiguous(q), _lastdim_contiguous(k), _lastdim_contiguous(v)
    o = torch.empty((B, H, N, Dh), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    _fwd[_grid("BLOCK_M", N, B, H)](q, k, v, o, lse, *_strides(q, k, v), H, N, Dh, scale * LOG2E, **_meta(q))
    return o, lse


def _launch_backward(q, k, v, o, lse, do, scale):
    B, H, N, Dh = q.shape
    q, k, v = _lastdim_contiguous(q), _lastdim_contiguous(k), _lastdim_contiguous(v)
    do = do.contiguous()
    meta = _meta(q)
    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    block_m = 32 if INTERPRET else 64
    _attn_bwd_delta_kernel[(triton.cdiv(N, block_m), B * H)](o, do, delta, N, Dh, BLOCK_M=block_m,
                                                            BLOCK_D=meta["BLOCK_D"])
    dq, dk, dv = (torch.empty((B, H, N, Dh), dtype=t.dtype, device=q.device) for t in (q, k, v))
    args = (*_strides(q, k, v), H, N, Dh, scale * LOG2E, scale)
    _dkdv[_grid("BLOCK_N", N, B, H)](q, k, v, do, lse, delta, dk, dv, *args, **meta)
    _dq[_grid("BLOCK_M", N, B, H)](q, k, v, do, lse, delta, dq, *args, **meta)
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
    return _attn_op(q, k, v, scale)[0]
