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

_ADD_BLOCK = 2048
_TILE = 4096  # elements per upsampling tile (pixels x channels)
_MAX_BLOCK_C = 256


@triton.jit
def _add_kernel(
    A, B, BIAS, BIAS2, Y, numel, channels, inner,
    HAS_B: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS2: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    start = tl.program_id(0).to(tl.int64) * BLOCK
    lanes = tl.arange(0, BLOCK)
    offs = start + lanes
    inside = offs < numel
    y = tl.load(A + offs, mask=inside, other=0.0).to(tl.float32)
    if HAS_B:
        y += tl.load(B + offs, mask=inside, other=0.0).to(tl.float32)
    # Element i's channel is (i // inner) % channels (inner: 1 channels last, the pixel count contiguous).
    # From the block's phase in its period, in 32 bits; inner == 1 is specialised away by Triton.
    phase = (start % (inner * channels)).to(tl.int32)
    c = ((phase + lanes) // inner) % channels  # always a valid channel: no mask, an L1-resident gather
    if HAS_BIAS:
        y += tl.load(BIAS + c).to(tl.float32)
    if HAS_BIAS2:
        y += tl.load(BIAS2 + c).to(tl.float32)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=inside)


def _channel_inner(x: torch.Tensor) -> int | None:
    """Elements between consecutive channels in x's memory: 1 when dense channels last, the pixel count
    when contiguous, None otherwise."""
    if x.is_contiguous():
        return x[0, 0].numel() if x.dim() > 2 else 1
    if x.dim() >= 3 and x.movedim(1, -1).is_contiguous():
        return 1
    return None


def add_bias(
    a: torch.Tensor,
    b: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    bias2: torch.Tensor | None = None,
) -> torch.Tensor:
    """a (+ b) (+ bias) (+ bias2) in float32, rounded once to a's dtype, in a's memory format: a and b
    (N, C, *spatial) of one shape and layout (contiguous or channels last), bias and bias2 (C,)."""
    inner = _channel_inner(a)
    if inner is None or (b is not None and (b.shape != a.shape or b.stride() != a.stride())):
        raise ValueError("add_bias: a and b must be one dense layout, contiguous or channels last")
    channels = a.shape[1]
    if inner * channels + _ADD_BLOCK >= 2**31:  # the 32-bit channel arithmetic
        raise ValueError("add_bias: a channel period past 2**31 elements")
    y = torch.empty_like(a)
    numel = a.numel()
    _add_kernel[(triton.cdiv(numel, _ADD_BLOCK),)](
        a, b if b is not None else a, bias if bias is not None else a, bias2 if bias2 is not None else a,
        y, numel, channels, inner,
        HAS_B=b is not None, HAS_BIAS=bias is not None, HAS_BIAS2=bias2 is not None,
        BLOCK=_ADD_BLOCK, num_warps=4,
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
