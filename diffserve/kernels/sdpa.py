"""PyTorch scaled_dot_product_attention: runs everywhere torch runs; the terminal fallback."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffserve.kernels.base import AttentionBackend


class SDPABackend(AttentionBackend):
    name = "torch_sdpa"

    @staticmethod
    def forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, causal: bool = False
    ) -> torch.Tensor:
        # SDPA wants (batch, heads, seq, dim); transposes are views, SDPA handles the strides.
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=scale
        )
        return out.transpose(1, 2)
