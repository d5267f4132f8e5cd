"""Triton kernels behind diffserve.kernels.fp8_attention.quantize_heads (imported only when Triton is there).

Two passes over x (batch, seq, heads, head_dim), each program a (SEQ_BLOCK, head_dim) tile of one (batch,
head): the amax (a float32 atomic max per (batch, head); |x| >= 0, so the float order is the integer
order and the atomic is exact), then the cast with fp8_quant's rounding: scale = max(amax, MIN_AMAX) / 448
and its reciprocal by IEEE division (tl.div_rn), x * (1 / scale) in float32, clamped to +-448, cast to e4m3
(nearest even). The output is contiguous, as FA3 reads it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffserve.kernels.fp8_quant import FP8_DTYPE, FP8_MAX, MIN_AMAX

_FP8_MAX = tl.constexpr(FP8_MAX)
_MIN_AMAX = tl.constexpr(MIN_AMAX)
SEQ_BLOCK = 64


@triton.jit
def _amax_kernel(X, AMAX, seq, heads, sx_b, sx_s, sx_h, DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // heads, bh % heads
    rows = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, DIM)
    mask = rows[:, None] < seq
    x = tl.load(
        X + b * sx_b + h * sx_h + rows[:, None].to(tl.int64) * sx_s + cols[None, :], mask=mask, other=0.0
    )
    tl.atomic_max(AMAX + bh, tl.max(tl.max(tl.abs(x.to(tl.float32)), axis=1), axis=0))


@triton.jit
def _cast_kernel(X, AMAX, OUT, SCALE, seq, heads, sx_b, sx_s, sx_h, DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // heads, bh % heads
    blk = tl.program_id(1)
    rows = blk * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, DIM)
    mask = rows[:, None] < seq
    scale = tl.div_rn(tl.maximum(tl.load(AMAX + bh), _MIN_AMAX), tl.full((), _FP8_MAX, tl.float32))
    inv = tl.div_rn(tl.full((), 1.0, tl.float32), scale)
    x = tl.load(
        X + b * sx_b + h * sx_h + rows[:, None].to(tl.int64) * sx_s + cols[None, :], mask=mask, other=0.0
    )
    q = tl.minimum(tl.maximum(x.to(tl.float32) * inv, -_FP8_MAX), _FP8_MAX)
    out = OUT + ((b * seq + rows[:, None].to(tl.int64)) * heads + h) * DIM + cols[None, :]
    tl.store(out, q.to(OUT.dtype.element_ty), mask=mask)
    if blk == 0:
        tl.store(SCALE + bh, scale)


def quantize_heads_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seq, heads, dim = x.shape
    if dim & (dim - 1):  # tl.arange needs a power of two; DiT heads are 64 or 128
        from diffserve.kernels.fp8_attention import quantize_heads_reference

        return quantize_heads_reference(x)
    amax = torch.zeros(batch * heads, dtype=torch.float32, device=x.device)
    out = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(batch, heads, dtype=torch.float32, device=x.device)
    grid = (batch * heads, triton.cdiv(seq, SEQ_BLOCK))
    strides = (x.stride(0), x.stride(1), x.stride(2))
    _amax_kernel[grid](x, amax, seq, heads, *strides, DIM=dim, BLOCK_S=SEQ_BLOCK)
    _cast_kernel[grid](x, amax, out, scale, seq, heads, *strides, DIM=dim, BLOCK_S=SEQ_BLOCK)
    return out, scale
