"""GroupNorm, optionally followed by SiLU, as one op: Triton kernels on CUDA, F.group_norm elsewhere.

The VAE decoders of FLUX, SD3 and our bundled model are chains of GroupNorm -> SiLU -> conv. PyTorch's
GroupNorm gives each (sample, group) one thread block for its statistics: at batch 1 with 32 groups that
is 32 blocks on a 132-SM H100, each reducing up to 4M elements, which was half of the FLUX decode time.
The kernels (_triton_group_norm.py) split every group over many programs, and fold the SiLU into the
normalising pass, so the whole op is three passes over memory.

Which path runs is decided as for the other fused ops (fused_ops.py: DIFFSERVE_FUSED_OPS, set_fused_ops,
set_kernels_in_compile): the kernels when every tensor is on CUDA, Triton imports and x is a
float16/bfloat16/float32 (N, C, *spatial); otherwise F.group_norm then F.silu, which is exactly what
nn.GroupNorm followed by nn.SiLU computes, so CPU results stay bit-identical to diffusers'. Inside
torch.compile the kernels run as a custom op (opaque to Inductor).

Layout: the output has x's memory format. A contiguous x is read as it is, and so is one laid out
channels last ((N, *spatial, C) in memory: torch.channels_last, channels_last_3d), which the kernels read
natively; any other layout is made contiguous first. Channels last matters for the VAE decode on CUDA:
kl_vae_decode runs the whole decoder in it, so that cuDNN runs its NHWC convolutions without transposing
every input and output, and the residual adds see two tensors of one layout.

input_bias: GroupNorm(x + input_bias) for a per-channel vector, without a pass that writes x + input_bias.
On CUDA a conv's bias is a separate broadcast pass over its output; kl_vae_decode runs convs without bias
and hands the bias of one that feeds a GroupNorm to it here, where the kernels add it in float32 for free.

Numerics: the kernels compute in float32 and round once; the reference rounds the normalised value to
x's dtype before SiLU. In bf16 the two differ by about one bf16 rounding per element.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffserve.kernels.fused_ops import _use_triton, channels_innermost

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def group_norm_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool = False,
    input_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """nn.GroupNorm then nn.SiLU, in torch ops (what diffusers' blocks run), of x + input_bias if given
    (added in x's dtype, as a biased conv's output would be)."""
    if input_bias is not None:
        x = x + input_bias.view(-1, *[1] * (x.dim() - 2))
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def _kernel_fits(x: torch.Tensor, num_groups: int, weight, bias, input_bias=None) -> bool:
    tensors = [t for t in (x, weight, bias, input_bias) if t is not None]
    return (
        _use_triton(*tensors, in_compile=True)
        and x.dim() >= 2
        and x.numel() > num_groups  # (numel == groups: F.group_norm raises, so the reference must run)
        and x.dtype in _KERNEL_DTYPES
        and num_groups > 0
        and x.shape[1] % num_groups == 0
        and all(t.shape == (x.shape[1],) for t in (weight, bias, input_bias) if t is not None)
    )


def _channels_last(x: torch.Tensor) -> bool:
    """Whether x is dense with its channels innermost (and not also contiguous, as when spatial is 1)."""
    return not x.is_contiguous() and channels_innermost(x)


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool = False,
    input_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.group_norm(x + input_bias, num_groups, weight, bias, eps) (x alone when input_bias is None),
    then SiLU when `silu`; x (N, C, *spatial), any number of spatial dims (images, videos), input_bias
    (C,); returned in x's dtype (and, from the kernels, x's memory format)."""
    if _kernel_fits(x, num_groups, weight, bias, input_bias):
        return torch.ops.diffserve.group_norm(x, num_groups, weight, bias, eps, silu, input_bias)
    return group_norm_reference(x, num_groups, weight, bias, eps, silu, input_bias)


@torch.library.custom_op("diffserve::group_norm", mutates_args=())
def _group_norm_op(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool,
    input_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    from diffserve.kernels import _triton_group_norm as kernels

    if _channels_last(x):
        return kernels.group_norm_channels_last(x, num_groups, weight, bias, eps, silu, input_bias)
    return kernels.group_norm_triton(x.contiguous(), num_groups, weight, bias, eps, silu, input_bias)


@_group_norm_op.register_fake
def _(x, num_groups, weight, bias, eps, silu, input_bias=None):
    # The layout the kernels write: x's strides when channels last (empty_like preserves a dense x's),
    # else contiguous.
    return torch.empty_like(x) if _channels_last(x) else x.new_empty(x.shape)
