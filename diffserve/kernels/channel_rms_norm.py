"""RMS norm over the channels of a (N, C, *spatial) activation, optionally followed by SiLU, as one op.

The Wan VAE decoder (AutoencoderKLWan, Wan2.1) is a chain of RMS norm -> SiLU -> causal 3D convolution at
up to 480x832 pixels x 4 frames x 96-384 channels per step. diffusers' WanRMS_norm runs it as eight passes
over the activation (a float32 copy, the norm's reduction, the division, the rounding back, * scale,
* gamma, + bias, then SiLU): ~0.6 of the 2.1 s an 81-frame 480p decode took on an H100. Here it is one
pass: each pixel's channels are one row, read once, normalised and written once.

Which path runs is decided as for the other fused ops (fused_ops.py): the Triton kernel when every tensor
is on CUDA, Triton imports and x is dense with channels innermost (channels_last / channels_last_3d);
otherwise the reference, which is WanRMS_norm's own sequence of torch ops (so the CPU result is
diffusers' bit for bit). The kernel rounds to the activation dtype after each step as that sequence
does, so in bf16 the two differ only where float32 summation order moves a rounding.

input_bias: the norm of x + input_bias, for a convolution run without its bias (a separate broadcast pass
on CUDA): the bias is added here, in the pass that reads the output anyway.
out: where to write (a dense channels-last tensor of x's shape, e.g. frames of a causal convolution's
input buffer, so that no copy follows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffserve.kernels.fused_ops import _use_triton

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _channels_innermost(t: torch.Tensor) -> bool:
    return t.dim() >= 2 and t.movedim(1, -1).is_contiguous()


def channel_rms_norm_reference(
    x: torch.Tensor,
    gamma: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    silu: bool = False,
    input_bias: torch.Tensor | None = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """WanRMS_norm (channel first) then SiLU, in the torch ops diffusers runs; gamma, bias, input_bias (C,)."""
    shape = (-1, *[1] * (x.dim() - 2))
    if input_bias is not None:
        x = x + input_bias.view(shape)
    upcast = x.dtype in (torch.float16, torch.bfloat16)
    y = F.normalize(x.float() if upcast else x, dim=1, eps=eps).to(x.dtype) * scale * gamma.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return F.silu(y) if silu else y


def channel_rms_norm(
    x: torch.Tensor,
    gamma: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    silu: bool = False,
    input_bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """F.normalize(x + input_bias, dim=1) * scale * gamma + bias, then SiLU if `silu`, rounded as
    WanRMS_norm rounds; x (N, C, *spatial); gamma, bias, input_bias (C,) or None. Written to `out` (x's
    shape and dtype) when given, else to a new tensor in x's memory format."""
    vectors = [t for t in (gamma, bias, input_bias) if t is not None]
    dense_out = out is None or (_channels_innermost(out) and out.shape == x.shape and out.dtype == x.dtype)
    if (
        _use_triton(x, *vectors)
        and x.dtype in _KERNEL_DTYPES
        and _channels_innermost(x)
        and dense_out
        and all(v.numel() == x.shape[1] for v in vectors)
    ):
        from diffserve.kernels._triton_channel_rms_norm import channel_rms_norm_triton

        y = torch.empty_like(x) if out is None else out
        channels = x.shape[1]
        # (N, C, *spatial) with channels innermost is (pixels, C) row-major in memory.
        rows_in = x.movedim(1, -1).reshape(-1, channels)
        rows_out = y.movedim(1, -1).reshape(-1, channels)
        vec = [None if v is None else v.reshape(-1).contiguous() for v in (gamma, bias, input_bias)]
        channel_rms_norm_triton(rows_in, vec[0], scale, vec[1], silu, vec[2], rows_out, eps)
        return y
    y = channel_rms_norm_reference(x, gamma.reshape(-1), scale, bias, silu, input_bias, eps)
    if out is None:
        return y
    out.copy_(y)
    return out
