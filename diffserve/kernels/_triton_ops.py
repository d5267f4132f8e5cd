"""Triton kernels behind diffserve.kernels.fused_ops (imported only when Triton is there; the reference
formulas and the dispatch live in fused_ops.py).

Each program handles one token row, so every kernel is a single pass over the activations: the row is
loaded once, reduced in registers (float32) and written once. Rows of a DiT are 1,536-5,120 wide, which
fits a program's registers; the grids have thousands of rows, which fills the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _warps(block: int) -> int:
    # Rows up to 2,048 wide get 2 warps: on an H100, Wan's 1,536-wide offset norm ran in 70 us with 2 warps
    # against 78 with 4 (its other adaLN forms were flat). Wider rows: 4 and 8 warps measured the same.
    # _triton_t5's RMSNorm shares this; the T5-XXL/UMT5-XXL encoders the pipelines load are 4,096 wide, so
    # the 2-warp bound was measured for the adaLN kernel only.
    return 2 if block <= 2048 else 8 if block <= 8192 else 16


def _row_strides(t: torch.Tensor | None, batch: int, seq: int) -> tuple[int, int]:
    """(batch stride, seq stride) in elements of a modulation tensor broadcast to (batch, seq, dim); the
    last dim must be contiguous. (dim,) tensors broadcast over both."""
    if t is None:
        return 0, 0
    t = t.expand(batch, seq, t.shape[-1])
    return t.stride(0), t.stride(1)


def _last_dim_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


@triton.jit
def _adaln_kernel(
    X, R, GATE, SHIFT, SCALE, OUT_X, OUT_H,
    seq, dim, sx_b, sx_s, sr_b, sr_s, sg_b, sg_s, ssh_b, ssh_s, ssc_b, ssc_s, sh_row,
    eps,
    HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, NORMALIZE: tl.constexpr, AFFINE: tl.constexpr,
    STORE_X: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    b = row // seq
    s = row % seq
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(X + b * sx_b + s * sx_s + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + b * sr_b + s * sr_s + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            r = r * tl.load(GATE + b * sg_b + s * sg_s + cols, mask=mask, other=0.0).to(tl.float32)
        x_out = (x + r).to(OUT_X.dtype.element_ty)
        if STORE_X:
            tl.store(OUT_X + row * dim + cols, x_out, mask=mask)
        x = x_out.to(tl.float32)  # normalise the stream as stored, as the unfused code does
    if NORMALIZE:
        mean = tl.sum(x, axis=0) / dim
        xc = tl.where(mask, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / dim + eps)
        sh = tl.load(SHIFT + b * ssh_b + s * ssh_s + cols, mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(SCALE + b * ssc_b + s * ssc_s + cols, mask=mask, other=0.0).to(tl.float32)
        if not AFFINE:
            sc = sc + 1.0
        tl.store(OUT_H + row * sh_row + cols, (xc * rstd * sc + sh).to(OUT_H.dtype.element_ty), mask=mask)


def adaln_triton(x, shift, scale, eps, residual, gate, affine, normalize, store_residual=True, out_h=None):
    """out_h: where h goes (x's shape, rows of its own stride: the left columns of a wider buffer; the rows
    of all batches evenly spaced), else a new tensor."""
    batch, seq, dim = x.shape
    x, residual, gate, shift, scale = map(_last_dim_contiguous, (x, residual, gate, shift, scale))
    store_x = residual is not None and store_residual
    out_x = torch.empty_like(x, memory_format=torch.contiguous_format) if store_x else x
    if normalize and out_h is None:
        out_h = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    sh_row = dim if out_h is None else out_h.stride(1)
    if out_h is not None and (out_h.stride(2) != 1 or out_h.stride(0) != seq * sh_row):
        raise ValueError("out_h: rows with a unit column stride, evenly spaced across the batch")
    dummy = x  # pointer for absent operands (never read: the constexpr flags skip them)
    block = triton.next_power_of_2(dim)
    _adaln_kernel[(batch * seq,)](
        x, residual if residual is not None else dummy, gate if gate is not None else dummy,
        shift if shift is not None else dummy, scale if scale is not None else dummy,
        out_x, out_h if out_h is not None else dummy,
        seq, dim, x.stride(0), x.stride(1), *_row_strides(residual, batch, seq),
        *_row_strides(gate, batch, seq), *_row_strides(shift, batch, seq), *_row_strides(scale, batch, seq),
        sh_row, eps,
        HAS_RES=residual is not None, HAS_GATE=gate is not None, NORMALIZE=normalize, AFFINE=affine,
        STORE_X=store_x, BLOCK=block, num_warps=_warps(block),
    )  # fmt: skip
    return (out_x if store_x or residual is None else None), out_h


@triton.jit
def _qk_norm_rope_kernel(
    X, W, COS, SIN, OUT,
    seq, heads, sx_b, sx_s, so_b, so_s, eps,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_NORM: tl.constexpr, PER_HEAD: tl.constexpr, HAS_ROPE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    b = row // seq
    s = row % seq
    # The row as a (heads, head_dim) tile, loaded contiguously (16-byte vectors); the channel pairs
    # (2i, 2i+1) are separated in registers by a reshape + split, not by strided loads.
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HEAD_DIM)[None, :]
    mask = h < heads
    x = tl.load(X + b * sx_b + s * sx_s + h * HEAD_DIM + d, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        if PER_HEAD:
            rstd = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]
            w = tl.load(W + d).to(tl.float32)
        else:
            rstd = tl.rsqrt(tl.sum(tl.sum(x * x, axis=1), axis=0) / (heads * HEAD_DIM) + eps)
            w = tl.load(W + h * HEAD_DIM + d, mask=mask, other=0.0).to(tl.float32)
        x = x * rstd * w
    if HAS_ROPE:
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_H, HALF, 2)))
        i = tl.arange(0, HALF)[None, :]
        c = tl.load(COS + s * HALF + i)
        sn = tl.load(SIN + s * HALF + i)
        x = tl.reshape(tl.join(x_even * c - x_odd * sn, x_even * sn + x_odd * c), (BLOCK_H, HEAD_DIM))
    tl.store(OUT + b * so_b + s * so_s + h * HEAD_DIM + d, x.to(OUT.dtype.element_ty), mask=mask)


def qk_norm_rope_triton(x, weight, eps, cos, sin, head_dim, per_head, out=None):
    """out: where to write (batch, seq, heads * head_dim), last dim contiguous — x itself for the in-place
    form (each program loads its whole row before storing it); None: a new (batch, seq, heads, head_dim)."""
    if out is None:
        x = _last_dim_contiguous(x)
    batch, seq, width = x.shape
    heads = width // head_dim
    if cos is not None:
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
    weight = weight.contiguous() if weight is not None else None
    if out is None:
        out = torch.empty(batch, seq, heads, head_dim, device=x.device, dtype=x.dtype)
    block_h = triton.next_power_of_2(heads)
    _qk_norm_rope_kernel[(batch * seq,)](
        x, weight if weight is not None else x, cos if cos is not None else x, sin if sin is not None else x,
        out, seq, heads, x.stride(0), x.stride(1), out.stride(0), out.stride(1), eps,
        HEAD_DIM=head_dim, HALF=head_dim // 2, BLOCK_H=block_h,
        HAS_NORM=weight is not None, PER_HEAD=per_head, HAS_ROPE=cos is not None,
        num_warps=4 if block_h * head_dim <= 2048 else 8,
    )  # fmt: skip
    return out


@triton.jit
def _scale_rows_kernel(W, G, OUT, n_out, n_in, sg_b, sg_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)  # batch * n_out + output row
    b = row // n_out
    o = row % n_out
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_in
    g = tl.load(G + b * sg_b + o * sg_o).to(tl.float32)
    w = tl.load(W + o.to(tl.int64) * n_in + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row.to(tl.int64) * n_in + cols, (w * g).to(OUT.dtype.element_ty), mask=mask)


def scale_rows_triton(weight, gate):
    n_out, n_in = weight.shape
    out = torch.empty((gate.shape[0], n_out, n_in), device=weight.device, dtype=weight.dtype)
    block = 1024
    _scale_rows_kernel[(gate.shape[0] * n_out, triton.cdiv(n_in, block))](
        weight, gate, out, n_out, n_in, gate.stride(0), gate.stride(2), BLOCK=block, num_warps=4
    )
    return out
