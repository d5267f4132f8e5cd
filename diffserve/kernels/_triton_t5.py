"""Triton kernels behind diffserve.kernels.t5_ops (imported only when Triton is there; the reference
formulas and the dispatch live in t5_ops.py).

Both kernels reproduce the rounding of transformers' T5 modules in 16-bit activations step by step (each
torch op there rounds its result to the activation dtype), so that the fused encoder gives the same states
as the module it replaces, not merely close ones.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from diffserve.kernels._triton_ops import _warps


@triton.jit
def _rms_norm_kernel(
    X, R, W, OUT_X, OUT_H, dim, eps,
    HAS_RES: tl.constexpr, ROUND_NORMED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(X + row * dim + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + row * dim + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(OUT_X.dtype.element_ty)  # the stream as stored
        tl.store(OUT_X + row * dim + cols, x, mask=mask)
    xf = x.to(tl.float32)
    h = xf * libdevice.rsqrt(tl.sum(xf * xf, axis=0) / dim + eps)
    if ROUND_NORMED:  # 16-bit weights: the normalised row is rounded to their dtype before the scaling
        h = h.to(W.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT_H + row * dim + cols, (w * h).to(OUT_H.dtype.element_ty), mask=mask)


def rms_norm_triton(x, residual, weight, eps):
    rows, dim = x.numel() // x.shape[-1], x.shape[-1]
    out_x = torch.empty_like(x) if residual is not None else x
    out_h = torch.empty_like(x)
    block = triton.next_power_of_2(dim)
    _rms_norm_kernel[(rows,)](
        x, residual if residual is not None else x, weight, out_x, out_h, dim, eps,
        HAS_RES=residual is not None, ROUND_NORMED=weight.dtype in (torch.float16, torch.bfloat16),
        BLOCK=block, num_warps=_warps(block),
    )  # fmt: skip
    return out_x, out_h


@triton.jit
def _round(v, dtype: tl.constexpr, ROUND: tl.constexpr):
    # One torch op's result in the activation dtype, back in float32 for the next op.
    if ROUND:
        v = v.to(dtype).to(tl.float32)
    return v


@triton.jit
def _gelu_gate_kernel(A, OUT, d_ff, ROUND: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d_ff
    dt: tl.constexpr = OUT.dtype.element_ty
    x = tl.load(A + row * 2 * d_ff + cols, mask=mask, other=0.0).to(tl.float32)
    lin = tl.load(A + row * 2 * d_ff + d_ff + cols, mask=mask, other=0.0).to(tl.float32)
    # 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3))), op by op as transformers' NewGELU.
    inner = _round(x + _round(0.044715 * _round(x * x * x, dt, ROUND), dt, ROUND), dt, ROUND)
    t = _round(libdevice.tanh(_round(0.7978845608028654 * inner, dt, ROUND)), dt, ROUND)
    gelu = _round(_round(0.5 * x, dt, ROUND) * _round(1.0 + t, dt, ROUND), dt, ROUND)
    tl.store(OUT + row * d_ff + cols, (gelu * lin).to(dt), mask=mask)


def gelu_gate_triton(a, d_ff):
    rows = a.numel() // a.shape[-1]
    out = torch.empty(*a.shape[:-1], d_ff, device=a.device, dtype=a.dtype)
    block = 1024
    _gelu_gate_kernel[(rows, triton.cdiv(d_ff, block))](
        a, out, d_ff, ROUND=a.dtype in (torch.float16, torch.bfloat16), BLOCK=block, num_warps=4
    )
    return out
