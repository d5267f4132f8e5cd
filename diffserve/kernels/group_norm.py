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

Layout: the kernels read a contiguous (N, C, *spatial) tensor and write a contiguous one. Other layouts
are made contiguous first — what F.group_norm does on CUDA too, and it matters: in a VAE decoder the
residual stream turns channels_last after the mid block's attention (its output is a transposed view),
so every resnet's first norm gets a channels_last input. The output is contiguous, as F.group_norm's is
on CUDA, so the convolutions after it see the layouts they see under diffusers.

Numerics: the kernels compute in float32 and round once; the reference rounds the normalised value to
x's dtype before SiLU. In bf16 the two differ by about one bf16 rounding per element.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffserve.kernels.fused_ops import _use_triton

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def group_norm_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool = False,
) -> torch.Tensor:
    """nn.GroupNorm then nn.SiLU, in torch ops (what diffusers' blocks run)."""
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def _kernel_fits(x: torch.Tensor, num_groups: int, weight, bias) -> bool:
    tensors = [t for t in (x, weight, bias) if t is not None]
    return (
        _use_triton(*tensors, in_compile=True)
        and x.dim() >= 2
        and x.numel() > num_groups  # (numel == groups: F.group_norm raises, so the reference must run)
        and x.dtype in _KERNEL_DTYPES
        and num_groups > 0
        and x.shape[1] % num_groups == 0
        and all(t.shape == (x.shape[1],) for t in (weight, bias) if t is not None)
    )


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool = False,
) -> torch.Tensor:
    """F.group_norm(x, num_groups, weight, bias, eps), then SiLU when `silu`; x (N, C, *spatial), any
    number of spatial dims (images, videos); returned in x's dtype."""
    if _kernel_fits(x, num_groups, weight, bias):
        return torch.ops.diffserve.group_norm(x, num_groups, weight, bias, eps, silu)
    return group_norm_reference(x, num_groups, weight, bias, eps, silu)


@torch.library.custom_op("diffserve::group_norm", mutates_args=())
def _group_norm_op(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    silu: bool,
) -> torch.Tensor:
    from diffserve.kernels._triton_group_norm import group_norm_triton

    return group_norm_triton(x.contiguous(), num_groups, weight, bias, eps, silu)


@_group_norm_op.register_fake
def _(x, num_groups, weight, bias, eps, silu):
    return x.new_empty(x.shape)  # contiguous, whatever x's layout: as the kernel writes it
