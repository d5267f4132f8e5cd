"""The elementwise work of a T5 / UMT5 encoder layer as single passes (Triton on CUDA), with the torch
formulas of transformers' modules as the reference everywhere else:

  rms_norm(x, residual, weight, eps)  optional residual add (x + residual, the new stream), then T5's
                                      RMSNorm (no mean, no bias; the statistics in float32); returns
                                      (stream, normalised input of the next projection)
  gelu_gate(a, d_ff)                  the gated-GELU feed-forward's middle: a = [wi_0(x) | wi_1(x)] from one
                                      GEMM, out = gelu_new(wi_0(x)) * wi_1(x)

The kernels round after every step where the torch ops do (16-bit activations), so they give what the
module gives: a T5-XXL forward runs ~5 torch ops per norm and ~9 per gate, each a pass over the row.
Same switches as fused_ops (DIFFSERVE_FUSED_OPS=0 runs the reference on CUDA too).
"""

from __future__ import annotations

import math

import torch

from diffserve.kernels.fused_ops import _use_triton


def rms_norm_reference(x, residual, weight, eps):
    if residual is not None:
        x = x + residual
    h = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        h = h.to(weight.dtype)
    return x, weight * h


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation, written as the op sequence T5 v1.1 / UMT5 checkpoints use ("gelu_new")."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def gelu_gate_reference(a: torch.Tensor, d_ff: int) -> torch.Tensor:
    return gelu_new(a[..., :d_ff]) * a[..., d_ff:]


def _rows_fit(*tensors) -> bool:
    return all(t is None or t.is_contiguous() for t in tensors)


def rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, or x when residual is None; RMSNorm of it times weight), in x's dtype."""
    if _use_triton(x, weight) and _rows_fit(x, residual, weight) and x.dtype == weight.dtype:
        from diffserve.kernels._triton_t5 import rms_norm_triton

        return rms_norm_triton(x, residual, weight, eps)
    return rms_norm_reference(x, residual, weight, eps)


def gelu_gate(a: torch.Tensor, d_ff: int) -> torch.Tensor:
    """gelu_new(a[..., :d_ff]) * a[..., d_ff:] for a = (..., 2 * d_ff)."""
    if a.shape[-1] != 2 * d_ff:
        raise ValueError(f"gelu_gate needs (..., 2 * {d_ff}) inputs, got {tuple(a.shape)}")
    if _use_triton(a) and _rows_fit(a):
        from diffserve.kernels._triton_t5 import gelu_gate_triton

        return gelu_gate_triton(a, d_ff)
    return gelu_gate_reference(a, d_ff)
