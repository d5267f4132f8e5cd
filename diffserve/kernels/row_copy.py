"""copy_rows(dst, src): dst.copy_(src) for views whose last dim is contiguous on both sides — one Triton
kernel moving whole rows on CUDA (see _triton_row_copy.py for why), torch's copy_ elsewhere (the CPU, no
Triton, inside torch.compile, DIFFSERVE_FUSED_OPS=0), which gives the same values: a copy is exact."""

from __future__ import annotations

import torch

from diffserve.kernels.fused_ops import _use_triton

_OUTER_GRID = 65535  # CUDA's limit on the grid's second dimension


def copy_rows(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Copy src into dst (same shape, same dtype, at least 2-D); returns dst."""
    if dst.shape != src.shape:
        raise ValueError(f"copy_rows: shapes differ, {tuple(dst.shape)} vs {tuple(src.shape)}")
    if (
        src.dim() < 2
        or src.dtype != dst.dtype
        or src.stride(-1) != 1
        or dst.stride(-1) != 1
        or not _use_triton(dst, src)
    ):
        return dst.copy_(src)
    # Every leading dim but the row dim becomes one "outer" dim when the strides allow, else a loop.
    src3, dst3 = _as_3d(src), _as_3d(dst)
    if src3 is None or dst3 is None or src3.shape[0] > _OUTER_GRID:
        for s, d in zip(src.unbind(0), dst.unbind(0), strict=True):
            copy_rows(d, s)
        return dst
    from diffserve.kernels._triton_row_copy import row_copy_triton

    if src3.numel():
        row_copy_triton(dst3, src3)
    return dst


def _as_3d(t: torch.Tensor) -> torch.Tensor | None:
    """t as (outer, rows, cols) without copying, or None when its leading dims cannot merge."""
    if t.dim() == 2:
        return t.unsqueeze(0)
    if t.dim() == 3:
        return t
    try:
        return t.view(-1, *t.shape[-2:])
    except RuntimeError:
        return None
