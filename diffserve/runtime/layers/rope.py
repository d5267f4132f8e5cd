"""Rotary position embeddings: frequency builders for FLUX (3 axes from ids) and Wan (a t/h/w grid), and
norm_rope, which applies them (with the q/k RMSNorm) to a q or k projection.

Convention (both FLUX and Wan): channel pairs (2i, 2i+1) of a head rotate by angle pos * theta^(-2i/dim).
cos/sin are kept at half width, (seq, head_dim // 2), float32; the angles are computed in float64 because
positions times frequencies in float32 lose precision for long sequences.
"""

from __future__ import annotations

import torch
from torch import nn

from diffserve.kernels.fused_ops import qk_norm_rope, qk_norm_rope_


def _angle_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64; everywhere else use it.
    return torch.float32 if device.type == "mps" else torch.float64


def rope_cos_sin(
    positions: torch.Tensor, dim: int, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of pos * theta^(-2i/dim), i < dim/2, for 1-D positions: each (len(positions), dim // 2)."""
    if dim % 2:
        raise ValueError(f"rotary dimension must be even, got {dim}")
    dtype = _angle_dtype(positions.device)
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=dtype, device=positions.device) / dim)
    angles = torch.outer(positions.to(dtype), inv_freq)
    return angles.cos().float(), angles.sin().float()


def axes_rope(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float = 10000.0):
    """FLUX: ids (seq, n_axes) of positions; axis a gets axes_dim[a] channels of each head, in order."""
    cos, sin = zip(*(rope_cos_sin(ids[:, a], d, theta) for a, d in enumerate(axes_dim)), strict=True)
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def grid_rope(grid: tuple[int, int, int], axes_dim: tuple[int, int, int], device, theta: float = 10000.0):
    """Wan: tokens laid out frame-major over a (frames, height, width) grid; each axis gets its channels."""
    parts_cos, parts_sin = [], []
    for axis, (n, d) in enumerate(zip(grid, axes_dim, strict=True)):
        cos, sin = rope_cos_sin(torch.arange(n, device=device), d, theta)
        shape = [1, 1, 1, d // 2]
        shape[axis] = n
        parts_cos.append(cos.view(shape).expand(*grid, d // 2))
        parts_sin.append(sin.view(shape).expand(*grid, d // 2))
    seq = grid[0] * grid[1] * grid[2]
    return torch.cat(parts_cos, dim=-1).reshape(seq, -1), torch.cat(parts_sin, dim=-1).reshape(seq, -1)


def norm_rope(
    x: torch.Tensor,
    norm: nn.RMSNorm | None,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    head_dim: int,
    inplace: bool = False,
) -> torch.Tensor:
    """A q or k projection (batch, seq, heads * head_dim) -> (batch, seq, heads, head_dim), RMS-normalised by
    `norm` (over one head when its size is head_dim — FLUX —, over all heads otherwise — Wan) and rotated
    by `rope` (cos, sin), either may be None. One pass on CUDA (fused_ops.qk_norm_rope); x may be a column
    slice of a fused q|k|v projection. inplace=True writes the result back into x (see qk_norm_rope_)."""
    weight, eps, per_head = None, 0.0, True
    if norm is not None:
        weight, eps = norm.weight, norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        per_head = norm.normalized_shape[-1] == head_dim
    cos, sin = rope if rope is not None else (None, None)
    return (qk_norm_rope_ if inplace else qk_norm_rope)(x, weight, eps, cos, sin, head_dim, per_head)
