"""nn.Linear for the DiT blocks: the same parameters and state-dict names, its forward through
kernels.gemm.linear (an algorithm timed per shape on CUDA; exactly F.linear elsewhere)."""

from __future__ import annotations

import torch
from torch import nn

from diffserve.kernels import gemm


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemm.linear(x, self.weight, self.bias)
