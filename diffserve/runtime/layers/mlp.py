"""The GELU(tanh) feed-forward used by FLUX and Wan blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffserve.kernels.fused_ops import linear_gelu


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class _Proj(nn.Module):
    # Holds `.proj` so parameter names read `net.0.proj.*`, as in diffusers' FeedForward.
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)


class FeedForward(nn.Module):
    """proj_in -> gelu_tanh (fused into proj_in's GEMM on CUDA) -> proj_out; parameter names net.0.proj.*
    and net.2.* (net.1 was dropout)."""

    def __init__(self, dim: int, inner_dim: int, dim_out: int | None = None):
        super().__init__()
        self.net = nn.ModuleList([_Proj(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim_out or dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj_in = self.net[0].proj
        return self.net[2](linear_gelu(x, proj_in.weight, proj_in.bias))
