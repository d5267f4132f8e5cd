"""Shared by the kernel tests: the skip mark of tests that need Triton on a CUDA GPU, and the relative error
they hold results to."""

from __future__ import annotations

import pytest
import torch

from diffserve.kernels.fused_ops import triton_available

needs_cuda_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_available()), reason="needs a CUDA GPU with Triton"
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64; the shapes must match."""
    assert a.shape == b.shape
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
