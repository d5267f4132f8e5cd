"""Triton kernel of channel_rms_norm (channel_rms_norm.py): RMS norm over the channels of a channels-last
activation, with the input bias, the scale, the gain, the output bias and SiLU in the same pass. Imported
only when Triton is there; the torch reference lives with the caller."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE = 4096  # elements per program (rows x channels)


@triton.jit
def _channel_rms_kernel(
    X, IN_BIAS, GAMMA, BIAS, Y, rows, channels, scale, eps,
    HAS_IN_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, ROUND: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # One row is one pixel's channels, contiguous. ROUND: round to the output dtype after every step, as
    # WanRMS_norm's chain of half-precision tensor ops does (normalise in float32, round, * scale, round,
    # * gamma, round, + bias, round, SiLU), so that the decode keeps diffusers' numbers.
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < channels
    inside = (r < rows)[:, None] & c_ok[None, :]
    offs = r[:, None] * channels + c[None, :]
    x = tl.load(X + offs, mask=inside, other=0.0).to(tl.float32)
    if HAS_IN_BIAS:  # the producing conv's bias, rounded as a biased conv's output would be
        x += tl.load(IN_BIAS + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        if ROUND:
            x = x.to(Y.dtype.element_ty).to(tl.float32)
        x = tl.where(inside, x, 0.0)
    norm = tl.sqrt_rn(tl.sum(x * x, axis=1))
    y = tl.div_rn(x, tl.maximum(norm, eps)[:, None])  # F.normalize, IEEE-rounded as torch's
    if ROUND:
        y = y.to(Y.dtype.element_ty).to(tl.float32)
    y = y * scale
    if ROUND:
        y = y.to(Y.dtype.element_ty).to(tl.float32)
    gamma = tl.load(GAMMA + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        # As explicit FMAs: written as y * gamma, round, + bias, the compiler contracts the multiply and
        # the add into one FMA across the rounding (measured on an H100: 23% of bf16 results off by one
        # ulp from torch's two rounded ops).
        y = tl.fma(y, gamma, 0.0)
        if ROUND:
            y = y.to(Y.dtype.element_ty).to(tl.float32)
        y = tl.fma(y, 1.0, tl.load(BIAS + c, mask=c_ok, other=0.0).to(tl.float32)[None, :])
    else:
        y = y * gamma
    if SILU:
        if ROUND:
            y = y.to(Y.dtype.element_ty).to(tl.float32)
        y = y / (1.0 + tl.exp(-y))
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=inside)


def channel_rms_norm_triton(x, gamma, scale, bias, silu, input_bias, out, eps):
    """x and out: (rows, channels) row-major views (dense channels last); the vectors (channels,)."""
    rows, channels = x.shape
    block_c = triton.next_power_of_2(channels)
    block_r = max(1, min(_TILE // block_c, triton.next_power_of_2(rows)))
    _channel_rms_kernel[(triton.cdiv(rows, block_r),)](
        x, x if input_bias is None else input_bias, gamma, x if bias is None else bias, out,
        rows, channels, float(scale), float(eps),
        HAS_IN_BIAS=input_bias is not None, HAS_BIAS=bias is not None, SILU=silu,
        ROUND=out.dtype in (torch.float16, torch.bfloat16), BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=4 if block_c * block_r <= 4096 else 8,
    )  # fmt: skip
    return out
