"""Timestep and conditioning embeddings shared by the DiTs.

Parameter names (`linear_1`, `linear_2`) follow diffusers so its checkpoints load unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [cos | sin], float32, shape (*t.shape, dim).

    Frequencies are exp(-ln(max_period) * i / half) for i < half (no frequency shift), the convention of
    FLUX and Wan. Computed in float32 whatever the model dtype: timesteps up to 1000 lose their low bits
    in bf16.
    """
    half = dim // 2
    # Same operation order as the reference implementations, so embeddings match bit for bit.
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t.float().unsqueeze(-1) * torch.exp(exponent)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


_ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class MLPEmbedder(nn.Module):
    """linear_1 -> activation -> linear_2: the timestep, guidance and pooled-text embedders of FLUX and Wan."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int | None = None, act: str = "silu"):
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; expected one of {sorted(_ACTIVATIONS)}")
        self.linear_1 = nn.Linear(in_dim, hidden_dim)
        self.linear_2 = nn.Linear(hidden_dim, out_dim or hidden_dim)
        self._act = _ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self._act(self.linear_1(x)))
