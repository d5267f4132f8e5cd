"""Bandwidth-bound elementwise kernels of the AutoencoderKL decode on CUDA (kl_vae_decode): the residual
add with the convolutions' biases folded in, and nearest 2x upsampling in channels last. Imported only
when Triton is there; the torch fallbacks live with the caller.

Why: an nn.Conv2d with a bias runs cuDNN without it and then adds the (1, C, 1, 1) bias in a separate
broadcast pass that TensorIterator runs as a strided, unvectorised loop (~1/3 of the bandwidth; 6.4 of the
36 ms of a FLUX 1024x1024 decode on an H100). The decode runs its convolutions without bias and adds the
bias where a pass over the output happens anyway: here, in the residual add (out = a + b + bias + bias2,
one rounding), or in the GroupNorm that follows (group_norm's input_bias). PyTorch's nearest upsampling
in NHWC is likewise a gather loop (2.8 ms for 3 calls, 3x its NCHW time): here every input pixel's
channels are loaded once and stored to its four output pixels as contiguous rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffserve.kernels.fused_ops import channels_innermost

_TILE = 4096  # elements per program (rows x columns)
_MAX_BLOCK_C = 256  # channels per upsampling tile
_MAX_BLOCK_COL = 1024


@triton.jit
def _add_kernel(
    A, B, BIAS, BIAS2, Y, rows, cols, channels, col_blocks,
    HAS_B: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS2: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_COL: tl.constexpr, EVEN_COL: tl.constexpr,
):  # fmt: skip
    # The tensor as a (rows, cols) matrix: channels last (N * pixels, C), a column is a channel;
    # contiguous (N * C, pixels), a row is one. Either way the channel comes without a per-element
    # division, and each program loads its few bias values once.
    pid = tl.program_id(0).to(tl.int64)
    r = (pid // col_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    k = (pid % col_blocks) * BLOCK_COL + tl.arange(0, BLOCK_COL)
    if EVEN_COL:  # a mask constant along the rows: the loads and stores vectorise
        inside = (r < rows)[:, None]
    else:
        inside = (r < rows)[:, None] & (k < cols)[None, :]
    offs = r[:, None] * cols + k[None, :]
    y = tl.load(A + offs, mask=inside, other=0.0).to(tl.float32)
    if HAS_B:
        y += tl.load(B + offs, mask=inside, other=0.0).to(tl.float32)
    if CHANNELS_LAST:
        c = k[None, :]
        c_ok = c < cols
    else:
        c = (r % channels)[:, None]
        c_ok = c < channels  # (always: a valid address for the rows past the end)
    if HAS_BIAS:
        y += tl.load(BIAS + c, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_BIAS2:
        y += tl.load(BIAS2 + c, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=inside)


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b (one shape) lay their elements out alike: equal strides where a dimension has more
    than one element (a size-1 dimension's stride is arbitrary, e.g. the batch of a transposed view)."""
    return all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True) if n > 1)


def add_bias(
    a: torch.Tensor,
    b: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    bias2: torch.Tensor | None = None,
) -> torch.Tensor:
    """a (+ b) (+ bias) (+ bias2) in float32, rounded once to a's dtype, in a's memory format: a and b
    (N, C, *spatial) of one shape and strides, contiguous or channels last (dense, channels innermost);
    bias and bias2 (C,)."""
    n, channels = a.shape[0], a.shape[1]
    pixels = a.numel() // max(1, n * channels)
    channels_last = not a.is_contiguous()
    if (channels_last and not channels_innermost(a)) or (
        b is not None and (b.shape != a.shape or not same_layout(a, b))
    ):
        raise ValueError("add_bias: a and b must be one dense layout, contiguous or channels last")
    rows, cols = (n * pixels, channels) if channels_last else (n * channels, pixels)
    block_col = min(_MAX_BLOCK_COL, triton.next_power_of_2(cols))
    block_r = max(1, min(_TILE // block_col, triton.next_power_of_2(rows)))
    col_blocks = triton.cdiv(cols, block_col)
    y = torch.empty_like(a)
    bias, bias2 = (v.contiguous() if v is not None else a for v in (bias, bias2))  # (a: absent, never read)
    _add_kernel[(triton.cdiv(rows, block_r) * col_blocks,)](
        a, a if b is None else b, bias, bias2,
        y, rows, cols, channels, col_blocks,
        HAS_B=b is not None, HAS_BIAS=bias is not a, HAS_BIAS2=bias2 is not a,
        CHANNELS_LAST=channels_last, BLOCK_R=block_r, BLOCK_COL=block_col, EVEN_COL=cols % block_col == 0,
        num_warps=4,
    )  # fmt: skip
    return y


@triton.jit
def _upsample2x_kernel(
    X, Y, channels, pixels, height, width,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr,
):  # fmt: skip
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # input pixels (n, h, w) flattened
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if EVEN_C:  # a mask constant along the rows: the loads and stores vectorise
        inside = (p < pixels)[:, None]
    else:
        inside = (p < pixels)[:, None] & (ch < channels)[None, :]
    x = tl.load(X + p[:, None] * channels + ch[None, :], mask=inside)
    w = p % width
    nh = p // width  # n * height + h: output row 2 * nh (and + 1) of the (n * 2 * height) rows
    out = ((2 * nh) * (2 * width) + 2 * w)[:, None] * channels + ch[None, :]
    row = 2 * width * channels
    tl.store(Y + out, x, mask=inside)
    tl.store(Y + out + channels, x, mask=inside)
    tl.store(Y + out + row, x, mask=inside)
    tl.store(Y + out + row + channels, x, mask=inside)


def upsample_nearest2x_channels_last(x: torch.Tensor) -> torch.Tensor:
    """F.interpolate(x, scale_factor=2.0, mode="nearest") for a dense channels_last x (N, C, H, W): a copy,
    so exact; the output is channels_last."""
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError("upsample_nearest2x_channels_last: x must be 4-D channels_last")
    n, c, h, w = x.shape
    y = torch.empty(n, c, 2 * h, 2 * w, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    pixels = n * h * w
    block_c = min(_MAX_BLOCK_C, triton.next_power_of_2(c))
    block_p = max(1, min(_TILE // block_c, triton.next_power_of_2(pixels)))
    _upsample2x_kernel[(triton.cdiv(pixels, block_p), triton.cdiv(c, block_c))](
        x, y, c, pixels, h, w, BLOCK_P=block_p, BLOCK_C=block_c, EVEN_C=c % block_c == 0, num_warps=4
    )
    return y
