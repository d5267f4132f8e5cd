"""RMS norm over the channels of a (N, C, *spatial) activation, optionally followed by SiLU, as one op.

The Wan VAE decoder (AutoencoderKLWan, Wan2.1) is a chain of RMS norm -> SiLU -> causal 3D convolution at
up to 480x832 pixels x 4 frames x 96-384 channels per step. diffusers' WanRMS_norm runs it as eight passes
over the activation (a float32 copy, the norm's reduction, the division, the rounding back, * scale,
* gamma, + bias, then SiLU): ~0.6 of the 2.1 s an 81-frame 480p decode took on an H100. Here it is one
pass: each pixel's channels are one row, read once, normalised and written once.

Which path runs is decided as for the other fused ops (fused_ops.py): the Triton kernel when every tensor
is on CUDA, Triton imports and x is dense with channels innermost (channels_last / channels_last_3d);
otherwise the reference, which is WanRMS_norm's own sequence of torch ops (so the CPU result is
diffusers' bit for bit).

Numerics: the kernel computes in float32 and rounds once; the reference rounds to the activation dtype
after each of its ops. In bf16 the two differ by about one bf16 rounding per element, and a whole decode
is as far from the float32 decode as diffusers' bf16 one (benchmarks/RESULTS.md, "Wan VAE decode").

input_bias: the norm of x + input_bias, for a convolution run without its bias (a separate broadcast pass
on CUDA): the bias is added here, in the pass that reads the output anyway.
out: where to write, e.g. frames of a causal convolution's input buffer, so that no copy follows. It may
have more channels than x (a convolution whose input channels are padded to a size cuDNN runs faster):
those are written as zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffserve.kernels.fused_ops import _use_triton, channels_innermost

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
    """F.normalize(x + input_bias, dim=1) * scale * gamma + bias, then SiLU if `silu`; x (N, C, *spatial);
    gamma, bias, input_bias (C,) or None. Written to `out` when given ((N, C' >= C, *spatial) in x's dtype,
    channels C.. C' set to zero), else to a new tensor in x's memory format."""
    vectors = [t for t in (gamma, bias, input_bias) if t is not None]
    if out is not None and (
        out.dtype != x.dtype
        or out.shape[0] != x.shape[0]
        or out.shape[2:] != x.shape[2:]
        or out.shape[1] < x.shape[1]
    ):
        raise ValueError(
            f"channel_rms_norm: out {tuple(out.shape)} {out.dtype} cannot hold x {tuple(x.shape)} {x.dtype}"
        )
    if (
        _use_triton(x, *vectors)
        and x.dtype in _KERNEL_DTYPES
        and channels_innermost(x)
        and (out is None or channels_innermost(out))
        and all(v.numel() == x.shape[1] for v in vectors)
    ):
        from diffserve.kernels._triton_channel_rms_norm import channel_rms_norm_triton

        y = torch.empty_like(x) if out is None else out
        # (N, C, *spatial) with channels innermost is (pixels, C) row-major in memory.
        rows_in = x.movedim(1, -1).reshape(-1, x.shape[1])
        rows_out = y.movedim(1, -1).reshape(-1, y.shape[1])
        vec = [None if v is None else v.reshape(-1).contiguous() for v in (gamma, bias, input_bias)]
        channel_rms_norm_triton(rows_in, vec[0], scale, vec[1], silu, vec[2], rows_out, eps)
        return y
    y = channel_rms_norm_reference(x, gamma.reshape(-1), scale, bias, silu, input_bias, eps)
    if out is None:
        return y
    out[:, : x.shape[1]].copy_(y)
    out[:, x.shape[1] :].zero_()
    return out
