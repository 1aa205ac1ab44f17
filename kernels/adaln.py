"""Fused adaLN: LayerNorm (no affine) + modulate, and the gated residual that precedes it.

    adaln_modulate(x, shift, scale)          = LN(x) * (1 + scale) + shift
    gated_residual_adaln(x, gate, y, ...)    = (r, adaln_modulate(r, shift, scale)),  r = x + gate * y

x, y: (N, T, D); shift, scale, gate: (N, D) broadcast over the T tokens. Statistics are fp32.

Cost for E = N*T*D elements of b bytes (conditioning vectors are N*D, negligible):
  adaln forward     reads x, writes h                       2*E*b bytes,  ~8 FLOP/element
  gated forward     reads x, y, writes r, h                 4*E*b bytes,  ~10 FLOP/element
  adaln backward    reads x, dh, writes dx                  3*E*b bytes
(under autocast h, and so dh, are in the autocast dtype: pass out_dtype)
  gated backward    reads r, y, dh, dr, writes dx, dy       6*E*b bytes  (r: the forward's output, saved)
The unfused eager graph (add, layer_norm, mul, add) moves about twice as much.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._dispatch import INTERPRET, num_warps_for, row_block, sm_count, use_reference, use_triton
from .reference import adaln_modulate_reference, gated_residual_adaln_reference


def _backward_math(r, gate, y, scale, dh, dr, eps):
    """Gradients of the gated residual + adaLN in differentiable torch ops (fp32), given the LayerNorm input r
    (x, or x + gate * y with the residual).

    Used by the CPU reference path and whenever create_graph=True, so double backward works.
    Returns dx, dy, dgate, dshift, dscale (the gate terms are None without a residual).
    """
    f = torch.float32
    r = r.to(f)
    mean = r.mean(-1, keepdim=True)
    rstd = torch.rsqrt((r - mean).pow(2).mean(-1, keepdim=True) + eps)
    xhat = (r - mean) * rstd
    dh = dh.to(f)
    g = dh * (1 + scale.to(f).unsqueeze(1))
    dr_total = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True) - g.mean(-1, keepdim=True))
    if dr is not None:
        dr_total = dr_total + dr.to(f)
    dshift, dscale = dh.sum(1), (dh * xhat).sum(1)
    if gate is None:
        return dr_total, None, None, dshift, dscale
    return dr_total, dr_total * gate.to(f).unsqueeze(1), (dr_total * y.to(f)).sum(1), dshift, dscale


# ---------------------------------------------------------------- Triton kernels
@triton.jit
def _adaln_fwd_kernel(
    X,  # (N, T, D) residual stream in
    GATE,  # (N, D) gate (HAS_RES only)
    Y,  # (N, T, D) branch output (HAS_RES only)
    SHIFT,  # (N, D)
    SCALE,  # (N, D)
    R_OUT,  # (N, T, D) x + gate * y (HAS_RES only)
    H_OUT,  # (N, T, D) modulated LayerNorm
    T, D, eps,
    HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program: ROWS consecutive tokens of one sample, so shift/scale/gate are loaded once.
    pid_t, n = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rows = pid_t * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = (rows < T)[:, None] & cmask[None, :]
    offs = n * T * D + rows[:, None] * D + cols[None, :]
    r = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        gate = tl.load(GATE + n * D + cols, mask=cmask, other=0.0).to(tl.float32)
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        r = r + gate[None, :] * y
        tl.store(R_OUT + offs, r, mask=mask)
    mean = tl.sum(r, axis=1) / D
    rc = tl.where(mask, r - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(rc * rc, axis=1) / D + eps)
    shift = tl.load(SHIFT + n * D + cols, mask=cmask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + n * D + cols, mask=cmask, other=0.0).to(tl.float32)
    h = rc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(H_OUT + offs, h, mask=mask)


@triton.jit(do_not_specialize=["SPLIT", "ZERO"])  # one compiled kernel whatever the grid split (also SPLIT = 1)
def _adaln_bwd_kernel(
    X,  # (N, T, D) the LayerNorm input: x, or r = x + gate * y when HAS_RES (the forward's output)
    GATE,  # (N, D) (HAS_RES only)
    Y,  # (N, T, D) (HAS_RES only)
    SCALE,  # (N, D)
    DH,  # (N, T, D) grad of the modulated output
    DR,  # (N, T, D) grad of the residual output (HAS_DR only)
    DX,  # (N, T, D) out: grad of x (= total grad of r)
    DY,  # (N, T, D) out: grad of y (HAS_RES only)
    DSHIFT_P, DSCALE_P, DGATE_P,  # (N, SPLIT, D) fp32 out: per-program partial sums over tokens
    T, D, eps, SPLIT, ZERO,  # ZERO: 0, an opaque one (see below)
    HAS_RES: tl.constexpr, HAS_DR: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    OPAQUE: tl.constexpr,
):
    # Program (s, n) walks token blocks s, s + SPLIT, ... of sample n and keeps the token sums
    # for dshift/dscale in registers; the SPLIT partials are summed afterwards (deterministic).
    # Everything else is short-lived, so that a GPU thread fits in 32 registers (full occupancy, see
    # _launch_backward): sample n's base pointers are scalars and element offsets 32-bit; scale, gate,
    # y and dh are read again from cache where needed instead of held across the block-wide reductions
    # (the first read of dh and scale says evict_last, which also keeps the compiler from merging the
    # two reads into one register-held value). With the residual, three more things keep it at 32:
    # r is read as saved by the forward (not rebuilt from x, gate, y); the dgate sum is added into this
    # program's own slot of DGATE_P after each token block (an L2-resident read-modify-write, no DRAM
    # bytes) instead of a third register accumulator; and the gate and slot column offsets get an
    # opaque zero (tb * ZERO in inline PTX when OPAQUE, i.e. compiled) so that they are recomputed in
    # each step rather than held as 64-bit pointers across it.
    s, n = tl.program_id(0), tl.program_id(1).to(tl.int64)
    X += n * T * D
    Y += n * T * D
    DH += n * T * D
    DR += n * T * D
    DX += n * T * D
    DY += n * T * D
    GATE += n * D
    SCALE += n * D
    DGATE_P += (n * SPLIT + s) * D
    inv_d = 1.0 / D
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc_shift = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
    for tb in range(s, tl.cdiv(T, ROWS), SPLIT):
        rows = tb * ROWS + tl.arange(0, ROWS)
        mask = (rows < T)[:, None] & cmask[None, :]
        offs = rows[:, None] * D + cols[None, :]
        xhat = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(xhat, axis=1) * inv_d
        xhat = tl.where(mask, xhat - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xhat * xhat, axis=1) * inv_d + eps)
        xhat *= rstd[:, None]
        scale1 = 1.0 + tl.load(SCALE + cols, mask=cmask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        g = tl.load(DH + offs, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32) * scale1[None, :]
        c1 = tl.sum(g * xhat, axis=1) * inv_d
        c2 = tl.sum(g, axis=1) * inv_d
        dh = tl.load(DH + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        acc_shift += tl.sum(dh, axis=0)
        acc_scale += tl.sum(dh * xhat, axis=0)
        scale1 = 1.0 + tl.load(SCALE + cols, mask=cmask, other=0.0).to(tl.float32)
        dr = (dh * scale1[None, :] - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DR:
            dr += tl.load(DR + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dr, mask=mask)
        if HAS_RES:
            if OPAQUE:
                zero = tl.inline_asm_elementwise("mul.lo.s32 $0, $1, $2;", "=r,r,r", [tb, ZERO], dtype=tl.int32,
                                                 is_pure=True, pack=1)
                vcols = tl.multiple_of(zero, 16) + cols
            else:
                vcols = cols
            gate = tl.load(GATE + vcols, mask=cmask, other=0.0).to(tl.float32)
            tl.store(DY + offs, dr * gate[None, :], mask=mask)
            dgate = tl.sum(tl.where(mask, dr * tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32), 0.0), axis=0)
            started = cols * 0 + tb > s  # not the first step, which starts the sum (a tensor: no scalar masks)
            dgate += tl.load(DGATE_P + vcols, mask=cmask & started, other=0.0)
            tl.store(DGATE_P + vcols, dgate, mask=cmask)
    p = (n * SPLIT + s) * D + cols
    tl.store(DSHIFT_P + p, acc_shift, mask=cmask)
    tl.store(DSCALE_P + p, acc_scale, mask=cmask)


def _rows_per_program(block_d: int) -> int:
    # ~4K elements per program on a GPU (2 tokens at D=1152); bigger tiles under the
    # interpreter, where each program instance costs milliseconds.
    return max(1, (32768 if INTERPRET else 4096) // block_d)


def _programs_per_sample(n_blocks: int, N: int, slots: int) -> int:
    """Programs per sample for the backward grid (split, N): the fewest whose N * split programs fill the
    GPU's `slots` resident blocks in whole waves to at least 90% (the last wave of a ragged grid would run
    with the GPU partly idle); as many as there are token blocks when even that cannot fill one wave."""
    for split in range(1, n_blocks + 1):
        programs = split * N
        if programs >= 0.9 * slots * triton.cdiv(programs, slots):
            return split
    return n_blocks


def _launch_forward(x, gate, y, shift, scale, eps, out_dtype=None):
    N, T, D = x.shape
    has_res = gate is not None
    x = x.contiguous()
    h_dtype = torch.promote_types(x.dtype, torch.promote_types(shift.dtype, scale.dtype))
    r = None
    if has_res:
        y = y.contiguous()
        r = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, torch.promote_types(gate.dtype, y.dtype)),
                        device=x.device)
        h_dtype = torch.promote_types(r.dtype, h_dtype)
    h = torch.empty(x.shape, dtype=out_dtype or h_dtype, device=x.device)
    block_d = row_block(D)
    rows = _rows_per_program(block_d)
    grid = (triton.cdiv(T, rows), N)
    _adaln_fwd_kernel[grid](
        x, gate.contiguous() if has_res else x, y if has_res else x, shift.contiguous(), scale.contiguous(),
        r if has_res else h, h, T, D, eps,
        HAS_RES=has_res, ROWS=rows, BLOCK_D=block_d, num_warps=num_warps_for(rows * block_d),
    )
    return r, h


def _launch_backward(x, gate, y, scale, dh, dr, eps):
    # x: the LayerNorm input, i.e. the forward's r = x + gate * y when gate is given.
    N, T, D = x.shape
    has_res, has_dr = gate is not None, dr is not None
    x, dh = x.contiguous(), dh.contiguous()
    if T * D >= 2**31:  # the kernel's offsets within one sample are 32-bit
        raise ValueError(f"adaLN backward supports up to 2**31 elements per sample, got T*D = {T * D}")
    block_d = row_block(D)
    # One token per step on a GPU, 4 elements (16 bytes of fp32) per thread. The register cap is what the
    # kernel compiles to without spills on sm_90 and sm_80 (`python -m eqm_kernels.aot --kernel adaln`): 32
    # with or without the residual, i.e. 64 resident warps per SM (full occupancy).
    rows = _rows_per_program(block_d) if INTERPRET else 1
    warps = 1 if INTERPRET else max(1, min(16, block_d // 128))
    regs = 32
    n_blocks = triton.cdiv(T, rows)
    slots = sm_count(x.device) * max(1, 65536 // (regs * 32 * warps))  # blocks resident at once on the GPU
    split = _programs_per_sample(n_blocks, N, slots)
    part = torch.empty((3 if has_res else 2, N, split, D), dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x)
    dy = torch.empty(y.shape, dtype=y.dtype, device=y.device) if has_res else None  # contiguous, like y.contiguous()
    _adaln_bwd_kernel[(split, N)](
        x, gate.contiguous() if has_res else x, y.contiguous() if has_res else x, scale.contiguous(),
        dh, dr.contiguous() if has_dr else dh, dx, dy if has_res else dx,
        part[0], part[1], part[2] if has_res else part[0],
        T, D, eps, split, 0,
        HAS_RES=has_res, HAS_DR=has_dr, ROWS=rows, BLOCK_D=block_d, OPAQUE=not INTERPRET, num_warps=warps,
        **({} if INTERPRET else {"maxnreg": regs}),
    )
    dshift, dscale = part[0].sum(1).to(scale.dtype), part[1].sum(1).to(scale.dtype)
    dgate = part[2].sum(1).to(gate.dtype) if has_res else None
    return dx, dy, dgate, dshift, dscale


def _check(x, shift, scale, gate=None, y=None):
    if x.dim() != 3:
        raise ValueError(f"adaLN expects x of shape (N, T, D), got {tuple(x.shape)}; reshape tokens first")
    N, _, D = x.shape
    for name, v in (("shift", shift), ("scale", scale), ("gate", gate)):
        if v is not None and tuple(v.shape) != (N, D):
            raise ValueError(f"adaLN expects {name} of shape (N, D) = {(N, D)}, got {tuple(v.shape)}")
    if y is not None and y.shape != x.shape:
        raise ValueError(f"gated_residual_adaln expects y shaped like x {tuple(x.shape)}, got {tuple(y.shape)}")


# ---------------------------------------------------------------- custom ops: adaln_modulate
@torch.library.custom_op("eqm::adaln_modulate", mutates_args=())
def _adaln_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
              out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    if not use_triton(x, shift, scale):
        h = adaln_modulate_reference(x, shift, scale, eps)
        return h.to(out_dtype or h.dtype).contiguous()
    return _launch_forward(x, None, None, shift, scale, eps, out_dtype)[1]


@_adaln_op.register_fake
def _(x, shift, scale, eps, out_dtype=None):
    return x.new_empty(x.shape, dtype=out_dtype or torch.promote_types(x.dtype, torch.promote_types(shift.dtype,
                                                                                                     scale.dtype)))


@torch.library.custom_op("eqm::adaln_modulate_backward", mutates_args=())
def _adaln_bwd_op(x: torch.Tensor, scale: torch.Tensor, dh: torch.Tensor, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(x, scale, dh):
        dx, _, _, dshift, dscale = _launch_backward(x, None, None, scale, dh, None, eps)
    else:
        dx, _, _, dshift, dscale = _backward_math(x, None, None, scale, dh, None, eps)
    return dx.to(x.dtype).contiguous(), dshift.to(scale.dtype), dscale.to(scale.dtype)


# Outputs are contiguous whatever the input strides (the fakes must say so for torch.compile).
@_adaln_bwd_op.register_fake
def _(x, scale, dh, eps):
    return x.new_empty(x.shape), scale.new_empty(scale.shape), scale.new_empty(scale.shape)


def _adaln_setup(ctx, inputs, output):
    x, shift, scale, eps, _ = inputs
    ctx.save_for_backward(x, scale)
    ctx.eps, ctx.shift_dtype = eps, shift.dtype


def _adaln_backward(ctx, dh):
    x, scale = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: differentiable ops so a second derivative exists
        dx, _, _, dshift, dscale = _backward_math(x, None, None, scale, dh, None, ctx.eps)
        dx, dscale = dx.to(x.dtype), dscale.to(scale.dtype)
    else:
        dx, dshift, dscale = _adaln_bwd_op(x, scale, dh, ctx.eps)
    return dx, dshift.to(ctx.shift_dtype), dscale, None, None


_adaln_op.register_autograd(_adaln_backward, setup_context=_adaln_setup)


# ---------------------------------------------------------------- custom ops: gated_residual_adaln
@torch.library.custom_op("eqm::gated_residual_adaln", mutates_args=())
def _gated_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
              eps: float, out_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    if not use_triton(x, gate, y, shift, scale):
        r, h = gated_residual_adaln_reference(x, gate, y, shift, scale, eps)
        return r.contiguous(), h.to(out_dtype or h.dtype).contiguous()
    return _launch_forward(x, gate, y, shift, scale, eps, out_dtype)


@_gated_op.register_fake
def _(x, gate, y, shift, scale, eps, out_dtype=None):
    r_dtype = torch.promote_types(x.dtype, torch.promote_types(gate.dtype, y.dtype))
    h_dtype = torch.promote_types(r_dtype, torch.promote_types(shift.dtype, scale.dtype))
    return x.new_empty(x.shape, dtype=r_dtype), x.new_empty(x.shape, dtype=out_dtype or h_dtype)


@torch.library.custom_op("eqm::gated_residual_adaln_backward", mutates_args=())
def _gated_bwd_op(r: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, dh: torch.Tensor,
                  dr: Optional[torch.Tensor], eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # r: the forward's residual output x + gate * y (the gradient of x is that of r, returned in r's dtype)
    if use_triton(r, gate, y, scale, dh):
        grads = _launch_backward(r, gate, y, scale, dh, dr, eps)
    else:
        grads = _backward_math(r, gate, y, scale, dh, dr, eps)
    dx, dy, dgate, dshift, dscale = grads
    return (dx.to(r.dtype).contiguous(), dy.to(y.dtype).contiguous(), dgate.to(gate.dtype), dshift.to(scale.dtype),
            dscale.to(scale.dtype))


@_gated_bwd_op.register_fake
def _(r, gate, y, scale, dh, dr, eps):
    return (r.new_empty(r.shape), y.new_empty(y.shape), gate.new_empty(gate.shape), scale.new_empty(scale.shape),
            scale.new_empty(scale.shape))


def _gated_setup(ctx, inputs, output):
    x, gate, y, shift, scale, eps, _ = inputs
    # r is kept for the backward to read instead of rebuilding it (in the model it is the next block's
    # input, kept anyway); x, gate and y rebuild it for a second derivative or when r was stored in 16 bits.
    ctx.save_for_backward(x, gate, y, scale, output[0])
    ctx.eps, ctx.shift_dtype = eps, shift.dtype


def _gated_backward(ctx, dr, dh):
    x, gate, y, scale, r = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: differentiable ops so a second derivative exists
        r = x.float() + gate.float().unsqueeze(1) * y.float()
        dx, dy, dgate, dshift, dscale = _backward_math(r, gate, y, scale, dh, dr, ctx.eps)
        dy, dgate, dscale = dy.to(y.dtype), dgate.to(gate.dtype), dscale.to(scale.dtype)
    else:
        if r.element_size() < 4:  # r was rounded to 16 bits: the statistics come from r as the forward computed it
            r = x.float() + gate.float().unsqueeze(1) * y.float()
        dx, dy, dgate, dshift, dscale = _gated_bwd_op(r, gate, y, scale, dh, dr, ctx.eps)
    return dx.to(x.dtype), dgate, dy, dshift.to(ctx.shift_dtype), dscale, None, None


_gated_op.register_autograd(_gated_backward, setup_context=_gated_setup)


# ---------------------------------------------------------------- public API
def adaln_modulate(x, shift, scale, eps: float = 1e-6, out_dtype: Optional[torch.dtype] = None):
    """LayerNorm(x) * (1 + scale) + shift over tokens; x (N, T, D), shift/scale (N, D); one fused pass.

    out_dtype: write the result in this dtype (e.g. the autocast dtype of the Linear that reads it, which
    saves that Linear's cast kernel); default: the promoted dtype of the inputs."""
    _check(x, shift, scale)
    if use_reference():
        h = adaln_modulate_reference(x, shift, scale, eps)
        return h if out_dtype is None else h.to(out_dtype)
    return _adaln_op(x, shift, scale, float(eps), out_dtype)


def gated_residual_adaln(x, gate, y, shift, scale, eps: float = 1e-6, out_dtype: Optional[torch.dtype] = None):
    """r = x + gate * y and h = adaln_modulate(r, shift, scale) in one pass; returns (r, h) (h in out_dtype)."""
    _check(x, shift, scale, gate, y)
    if use_reference():
        r, h = gated_residual_adaln_reference(x, gate, y, shift, scale, eps)
        return r, (h if out_dtype is None else h.to(out_dtype))
    return _gated_op(x, gate, y, shift, scale, float(eps), out_dtype)
