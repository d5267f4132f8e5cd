"""Triton kernel of channel_rms_norm (channel_rms_norm.py): RMS norm over the channels of a channels-last
activation, with the input bias, the scale, the gain, the output bias and SiLU in the same pass. Imported
only when Triton is there; the torch reference lives with the caller."""

from __future__ import annotations

import triton
import triton.language as tl

_TILE = 4096  # elements per program (rows x channels)


@triton.jit
def _channel_rms_kernel(
    X, IN_BIAS, GAMMA, BIAS, Y, rows, scale, eps, channels: tl.constexpr, out_channels: tl.constexpr,
    HAS_IN_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # One row is one pixel's channels, contiguous; an output row may be wider (out_channels), its extra
    # channels written as zeros. Everything in float32, rounded once at the store: the rounding after each
    # step that WanRMS_norm's chain of half-precision ops does cost 5 float32 -> bf16 -> float32
    # conversions per element, which made the kernel compute-bound at ~1 TB/s on an H100.
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < channels
    row_ok = (r < rows)[:, None]
    x = tl.load(X + r[:, None] * channels + c[None, :], mask=row_ok & c_ok[None, :], other=0.0).to(tl.float32)
    if HAS_IN_BIAS:  # the producing conv's bias (zero past the channels, so the padding stays zero)
        x += tl.load(IN_BIAS + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    rnorm = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), eps)  # F.normalize's divisor
    y = x * rnorm[:, None] * (scale * tl.load(GAMMA + c, mask=c_ok, other=0.0).to(tl.float32))[None, :]
    if HAS_BIAS:
        y += tl.load(BIAS + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if SILU:
        y = y * tl.sigmoid(y)
    out_ok = row_ok & (c < out_channels)[None, :]
    tl.store(Y + r[:, None] * out_channels + c[None, :], y.to(Y.dtype.element_ty), mask=out_ok)


def channel_rms_norm_triton(x, gamma, scale, bias, silu, input_bias, out, eps):
    """x (rows, channels) and out (rows, out_channels >= channels): row-major (dense channels last);
    the vectors (channels,)."""
    rows, channels = x.shape
    out_channels = out.shape[1]
    block_c = triton.next_power_of_2(out_channels)
    block_r = max(1, min(_TILE // block_c, triton.next_power_of_2(rows)))
    _channel_rms_kernel[(triton.cdiv(rows, block_r),)](
        x, x if input_bias is None else input_bias, gamma, x if bias is None else bias, out,
        rows, float(scale), float(eps), channels, out_channels,
        HAS_IN_BIAS=input_bias is not None, HAS_BIAS=bias is not None, SILU=silu,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4 if block_c * block_r <= 4096 else 8,
    )  # fmt: skip
    return out
