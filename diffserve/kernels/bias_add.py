"""The VAE decodes' bandwidth-bound glue, with its torch fallbacks: residual adds with convolution biases
folded in, and nearest 2x upsampling. The Triton kernels (_triton_bias_add.py) run on CUDA when Triton
imports and the layout is one they read; torch's ops everywhere else, which are what diffusers runs.

Both VAE walks (kl_vae_decode for AutoencoderKL, wan_vae_walk for AutoencoderKLWan) run their
convolutions without bias on CUDA, because a biased conv there is cuDNN followed by a broadcast add that
PyTorch runs as a strided, unvectorised loop; the bias rides along to the next pass over the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffserve.kernels.fused_ops import _use_triton, channels_innermost


def _dense(t: torch.Tensor) -> bool:
    """Contiguous, or dense with the channels innermost (channels_last, channels_last_3d)."""
    return t.is_contiguous() or channels_innermost(t)


def add(a: torch.Tensor, b=None, bias=None, bias2=None) -> torch.Tensor:
    """a (+ b) (+ bias) (+ bias2), biases (C,) per channel of (N, C, *spatial) tensors: one vectorised
    Triton pass on CUDA, in float32 with one rounding; torch's adds elsewhere (a + b alone is exactly
    diffusers' residual add)."""
    if bias is None and bias2 is None:
        return a if b is None else a + b
    tensors = [t for t in (a, b, bias, bias2) if t is not None]
    if _use_triton(*tensors) and _dense(a):
        from diffserve.kernels._triton_bias_add import add_bias, same_layout

        if b is None or same_layout(a, b):
            return add_bias(a, b, bias, bias2)
    out = a if b is None else a + b
    for v in (bias, bias2):
        out = out if v is None else out + v.view(-1, *[1] * (a.dim() - 2))
    return out


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    """F.interpolate(x, scale_factor=2.0, mode="nearest") of (N, C, H, W) (the same as "nearest-exact" at
    an integer factor): a copy, exact either way."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and _use_triton(x):
        from diffserve.kernels._triton_bias_add import upsample_nearest2x_channels_last

        return upsample_nearest2x_channels_last(x)  # (64-bit indexing: no size limit)
    if x.shape[0] >= 64 or x.numel() * 2 > 2**31:  # diffusers' guards: PyTorch's NHWC kernel fails there
        x = x.contiguous()
    return F.interpolate(x, scale_factor=2.0, mode="nearest")
