"""A strided copy of contiguous rows (kernels/row_copy.py), imported only when Triton is there.

Why: the all-to-alls of Ulysses sequence parallelism need q, k, v repacked head group by head group, and
the output unpacked back: copies between permuted views whose innermost run (a head group's
heads x head_dim values of one token) is contiguous on both sides. TensorIterator runs such a copy as an
unvectorised element loop; here each program moves a tile of whole rows with vector loads and stores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE = 4096  # elements per program
_MAX_BLOCK_C = 256


@triton.jit
def _row_copy_kernel(
    SRC, DST, rows, cols, src_outer, src_row, dst_outer, dst_row, row_blocks,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    outer = tl.program_id(1).to(tl.int64)
    r = (pid % row_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = (pid // row_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    if EVEN_C:  # a mask constant along each row: the loads and stores vectorise
        inside = (r < rows)[:, None]
    else:
        inside = (r < rows)[:, None] & (c < cols)[None, :]
    x = tl.load(SRC + outer * src_outer + r[:, None] * src_row + c[None, :], mask=inside)
    tl.store(DST + outer * dst_outer + r[:, None] * dst_row + c[None, :], x, mask=inside)


def row_copy_triton(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) for 3-D (outer, rows, cols) views of one dtype, last dim contiguous in both."""
    outer, rows, cols = src.shape
    block_c = min(_MAX_BLOCK_C, triton.next_power_of_2(cols))
    block_r = max(1, _TILE // block_c)
    row_blocks = triton.cdiv(rows, block_r)
    grid = (row_blocks * triton.cdiv(cols, block_c), outer)
    _row_copy_kernel[grid](
        src, dst, rows, cols, src.stride(0), src.stride(1), dst.stride(0), dst.stride(1), row_blocks,
        BLOCK_R=block_r, BLOCK_C=block_c, EVEN_C=cols % block_c == 0,
    )  # fmt: skip
