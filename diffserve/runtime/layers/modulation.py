"""adaLN modulation pieces shared by FLUX and Wan blocks.

Each elementwise step is one function, so a fused kernel can later replace it without touching the blocks.
Dtype rule: inputs may mix the activation dtype with float32 modulation tensors (Wan keeps its modulation
in float32); ordinary type promotion decides the compute dtype, and results return in x.dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def norm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, upcast: bool = False
) -> torch.Tensor:
    """LayerNorm without affine over the last dim, then x * (1 + scale) + shift; result in x.dtype.

    upcast=True normalises in float32 (Wan's checkpoints expect it); FLUX normalises in the activation
    dtype. shift/scale broadcast against x: (batch, 1, dim) or per token (batch, seq, dim).
    """
    normed = F.layer_norm(x.float() if upcast else x, (x.shape[-1],), eps=eps)
    return (normed * (1 + scale) + shift).to(x.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate, result in x.dtype (computed in float32 when gate is float32)."""
    return (x + y * gate).to(x.dtype)


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

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # (batch, n*dim) -> n tensors of (batch, 1, dim), ready to broadcast over tokens.
        return self.linear(cond).unsqueeze(1).chunk(self.n, dim=-1)
