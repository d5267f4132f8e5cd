"""Triton kernels behind diffserve.kernels.fp8_quant (imported only when Triton is there; the reference
formulas and the dispatch live in fp8_quant.py).

One program per token row, as in _triton_ops: the row is loaded once, reduced in registers (float32) and
written once, as float8_e4m3fn, with its float32 scale. The quantisation is the reference's, operation for
operation: scale = max(amax, MIN_AMAX) / 448 and 1 / scale with IEEE division (tl.div_rn; Triton's `/` is
an approximate division), x * (1 / scale), clamp to +-448, cast to e4m3 rounding to nearest even.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffserve.kernels._triton_ops import _last_dim_contiguous, _row_strides, _warps
from diffserve.kernels.fp8_quant import FP8_DTYPE, FP8_MAX, MIN_AMAX

# Kernels may read module globals only as constexprs.
_FP8_MAX = tl.constexpr(FP8_MAX)
_MIN_AMAX = tl.constexpr(MIN_AMAX)


@triton.jit
def _store_quantized(h, mask, OUT_Q, OUT_S, row, dim, cols):
    """h (BLOCK,) float32, zero where masked: store h / scale as e4m3 in row `row` of OUT_Q and the scale."""
    amax = tl.max(tl.abs(h), axis=0)
    scale = tl.div_rn(tl.maximum(amax, _MIN_AMAX), tl.full((), _FP8_MAX, tl.float32))
    inv = tl.div_rn(tl.full((), 1.0, tl.float32), scale)  # one IEEE division per row, then multiplies
    q = tl.minimum(tl.maximum(h * inv, -_FP8_MAX), _FP8_MAX)
    tl.store(OUT_Q + row * dim + cols, q.to(OUT_Q.dtype.element_ty), mask=mask)
    tl.store(OUT_S + row, scale)


@triton.jit
def _quant_rows_kernel(X, OUT_Q, OUT_S, seq, dim, sx_b, sx_s, GELU: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // seq
    s = row % seq
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(X + b * sx_b + s * sx_s + cols, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        # GELU(tanh): 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3); GELU(0) = 0
        # keeps the masked columns out of the amax.
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = x * tl.sigmoid(2.0 * u)
    _store_quantized(x, mask, OUT_Q, OUT_S, row, dim, cols)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as (batch, seq, dim) with the last dim contiguous, without a copy where the strides allow."""
    x = _last_dim_contiguous(x)
    if x.dim() == 3:
        return x
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x.reshape(-1, x.shape[-2], x.shape[-1])  # leading dims merged (a copy only if they must be)


def quantize_rows_triton(x: torch.Tensor, gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows = _as_rows(x)
    batch, seq, dim = rows.shape
    out_q = torch.empty(x.shape, device=x.device, dtype=FP8_DTYPE)
    out_s = torch.empty((*x.shape[:-1], 1), device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(dim)
    _quant_rows_kernel[(batch * seq,)](
        rows, out_q, out_s, seq, dim, rows.stride(0), rows.stride(1), GELU=gelu, BLOCK=block,
        num_warps=_warps(block),
    )  # fmt: skip
    return out_q, out_s


@triton.jit
def _concat_gelu_quant_kernel(
    A, Y, OUT_Q, OUT_S, seq, dim_a, dim_y, sa_b, sa_s, sy_b, sy_s,
    BLOCK_A: tl.constexpr, BLOCK_Y: tl.constexpr,
):  # fmt: skip
    # Row `row` of [a | GELU(y)]: both parts held in registers, one amax over both, stored side by side.
    row = tl.program_id(0).to(tl.int64)
    b = row // seq
    s = row % seq
    ca = tl.arange(0, BLOCK_A)
    ma = ca < dim_a
    a = tl.load(A + b * sa_b + s * sa_s + ca, mask=ma, other=0.0).to(tl.float32)
    cy = tl.arange(0, BLOCK_Y)
    my = cy < dim_y
    y = tl.load(Y + b * sy_b + s * sy_s + cy, mask=my, other=0.0).to(tl.float32)
    u = 0.7978845608028654 * (y + 0.044715 * y * y * y)  # as _quant_rows_kernel; GELU(0) = 0 where masked
    y = y * tl.sigmoid(2.0 * u)
    amax = tl.maximum(tl.max(tl.abs(a), axis=0), tl.max(tl.abs(y), axis=0))
    scale = tl.div_rn(tl.maximum(amax, _MIN_AMAX), tl.full((), _FP8_MAX, tl.float32))
    inv = tl.div_rn(tl.full((), 1.0, tl.float32), scale)
    width = dim_a + dim_y
    qa = tl.minimum(tl.maximum(a * inv, -_FP8_MAX), _FP8_MAX)
    tl.store(OUT_Q + row * width + ca, qa.to(OUT_Q.dtype.element_ty), mask=ma)
    qy = tl.minimum(tl.maximum(y * inv, -_FP8_MAX), _FP8_MAX)
    tl.store(OUT_Q + row * width + dim_a + cy, qy.to(OUT_Q.dtype.element_ty), mask=my)
    tl.store(OUT_S + row, scale)


def concat_gelu_quant_triton(a: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a_rows, y_rows = _as_rows(a), _as_rows(y)
    batch, seq, dim_a = a_rows.shape
    dim_y = y_rows.shape[-1]
    out_q = torch.empty((*a.shape[:-1], dim_a + dim_y), device=a.device, dtype=FP8_DTYPE)
    out_s = torch.empty((*a.shape[:-1], 1), device=a.device, dtype=torch.float32)
    block_a, block_y = triton.next_power_of_2(dim_a), triton.next_power_of_2(dim_y)
    _concat_gelu_quant_kernel[(batch * seq,)](
        a_rows, y_rows, out_q, out_s, seq, dim_a, dim_y,
        a_rows.stride(0), a_rows.stride(1), y_rows.stride(0), y_rows.stride(1),
        BLOCK_A=block_a, BLOCK_Y=block_y, num_warps=_warps(block_a + block_y),
    )  # fmt: skip
    return out_q, out_s


@triton.jit
def _adaln_quant_kernel(
    X, R, GATE, SHIFT, SCALE, OUT_X, OUT_Q, OUT_S,
    seq, dim, sx_b, sx_s, sr_b, sr_s, sg_b, sg_s, ssh_b, ssh_s, ssc_b, ssc_s,
    eps,
    HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, AFFINE: tl.constexpr, STORE_X: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    # _triton_ops._adaln_kernel (normalize=True), with the modulated row quantised instead of stored in bf16.
    row = tl.program_id(0).to(tl.int64)
    b = row // seq
    s = row % seq
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(X + b * sx_b + s * sx_s + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + b * sr_b + s * sr_s + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            r = r * tl.load(GATE + b * sg_b + s * sg_s + cols, mask=mask, other=0.0).to(tl.float32)
        x_out = (x + r).to(OUT_X.dtype.element_ty)
        if STORE_X:
            tl.store(OUT_X + row * dim + cols, x_out, mask=mask)
        x = x_out.to(tl.float32)  # normalise the stream as stored, as the unfused code does
    mean = tl.sum(x, axis=0) / dim
    xc = tl.where(mask, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / dim + eps)
    sh = tl.load(SHIFT + b * ssh_b + s * ssh_s + cols, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(SCALE + b * ssc_b + s * ssc_s + cols, mask=mask, other=0.0).to(tl.float32)
    if not AFFINE:
        sc = sc + 1.0
    _store_quantized(xc * rstd * sc + sh, mask, OUT_Q, OUT_S, row, dim, cols)  # 0 where masked


def adaln_quant_triton(x, shift, scale, eps, residual, gate, affine, store_residual=True):
    batch, seq, dim = x.shape
    x, residual, gate, shift, scale = map(_last_dim_contiguous, (x, residual, gate, shift, scale))
    store_x = residual is not None and store_residual
    out_x = torch.empty_like(x, memory_format=torch.contiguous_format) if store_x else x
    out_q = torch.empty(x.shape, device=x.device, dtype=FP8_DTYPE)
    out_s = torch.empty((batch, seq, 1), device=x.device, dtype=torch.float32)
    dummy = x  # pointer for absent operands (never read: the constexpr flags skip them)
    block = triton.next_power_of_2(dim)
    _adaln_quant_kernel[(batch * seq,)](
        x, residual if residual is not None else dummy, gate if gate is not None else dummy,
        shift, scale, out_x, out_q, out_s,
        seq, dim, x.stride(0), x.stride(1), *_row_strides(residual, batch, seq),
        *_row_strides(gate, batch, seq), *_row_strides(shift, batch, seq), *_row_strides(scale, batch, seq),
        eps,
        HAS_RES=residual is not None, HAS_GATE=gate is not None, AFFINE=affine, STORE_X=store_x,
        BLOCK=block, num_warps=_warps(block),
    )  # fmt: skip
    return (out_x if store_x or residual is None else None), out_q, out_s
