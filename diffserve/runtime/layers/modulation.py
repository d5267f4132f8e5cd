"""adaLN modulation pieces shared by FLUX and Wan blocks.

Each elementwise step is one function backed by diffserve.kernels.fused_ops.adaln: one Triton pass on CUDA
(residual, norm and modulation together), the plain torch formula on the CPU and under torch.compile.
Dtype rule: inputs may mix the activation dtype with float32 modulation tensors (Wan keeps its modulation
in float32); ordinary type promotion decides the compute dtype, and results return in x.dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from diffserve.kernels.fused_ops import adaln, scale_rows


def norm_modulate(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    upcast: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm without affine over the last dim, then x * (1 + scale) + shift; result in x.dtype.

    upcast=True normalises in float32 (Wan's checkpoints expect it); FLUX normalises in the activation
    dtype. shift/scale broadcast against x: (batch, 1, dim) or per token (batch, seq, dim). out: where the
    result goes (adaln's out_h).
    """
    return adaln(x, shift, scale, eps, upcast, out_h=out)[1]


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """x + y * gate (gate None: x + y), result in x.dtype (computed in float32 when gate is float32)."""
    return adaln(x, None, None, 0.0, residual=y, gate=gate, normalize=False)[0]


def residual_norm_modulate(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    upcast: bool = False,
    affine: bool = False,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x', h): x' = gated_residual(x, y, gate) and h = norm_modulate(x', shift, scale) — or, with affine,
    h = layer_norm(x', weight=scale, bias=shift) — in one pass over the tokens. out: where h goes."""
    return adaln(x, shift, scale, eps, upcast, residual=y, gate=gate, affine=affine, out_h=out)


def offset_norm_modulate(
    x: torch.Tensor,
    offset: torch.Tensor | None,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    upcast: bool = False,
    affine: bool = False,
) -> torch.Tensor:
    """norm_modulate (affine: an affine LayerNorm) of x + offset, where offset (batch, 1, dim) is the part
    of the residual stream a caller keeps as a per-channel vector (see linear_residual_). One pass that
    never writes x + offset."""
    return adaln(x, shift, scale, eps, upcast, residual=offset, affine=affine, store_residual=False)[1]


def linear_residual_(
    x: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor | None = None
) -> torch.Tensor:
    """x += (inp @ weight^T) * gate, in place, as ONE GEMM that accumulates into x (beta = 1; an
    out-of-place addmm would first copy x), the per-channel gate (batch, 1, out) folded into a per-sample
    copy of the weight (one pass over the weight). The bias is left out: the caller adds gate * bias to its
    offset vector instead (offset_norm_modulate). Replaces a GEMM plus a gated-residual pass over the
    activations (read y, read x, write x) — worth it when the tokens far outnumber the weight's rows, as in
    Wan's video blocks (32,760 x 1,536 activations vs a 1,536 x 1,536 weight). x, inp: (batch, seq, out/in),
    contiguous. Returns x."""
    if gate is None:
        x.view(-1, x.shape[-1]).addmm_(inp.reshape(-1, inp.shape[-1]), weight.t())
        return x
    # weight (bf16) x gate (float32) in float32, rounded once into the weight's dtype: one kernel.
    return x.baddbmm_(inp, scale_rows(weight, gate).transpose(1, 2))


def clip_fp16(x: torch.Tensor) -> torch.Tensor:
    """FLUX's residual stream overflows float16 in late blocks; clamp to the finite range as the reference
    does. A no-op for other dtypes."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class AdaLNProjection(nn.Module):
    """Projects the (already SiLU'd) conditioning vector to `n` modulation vectors of size dim.

    Stored as `.linear` to match diffusers' AdaLayerNormZero / AdaLayerNormContinuous parameter names.
    """

    def __init__(self, dim: int, n: int, cond_dim: int | None = None):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(cond_dim or dim, n * dim)

    def forward(self, cond: torch.Tensor, projected: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """projected: this layer's linear(cond) when the caller computed it already (FLUX projects every
        block's conditioning in one GEMV up front)."""
        if projected is None:
            projected = self.linear(cond)
        # (batch, n*dim) -> n tensors of (batch, 1, dim), ready to broadcast over tokens.
        return projected.unsqueeze(1).chunk(self.n, dim=-1)
