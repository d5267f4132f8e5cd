"""FP8 (e4m3) attention for the DiTs' long self-attention (`--quantization fp8-attention`, issue 17).

Why: at Wan2.1-1.3B 480x832x81 (32,760 tokens) attention is ~198 of the forward's 283 TFLOP, which FP8 GEMMs
never touch; FlashAttention-3 runs both of its matrix products in e4m3 on Hopper at about twice its bf16
rate.

  quantize_heads(x)                (xq, descale): x (batch, seq, heads, head_dim) in e4m3, one float32 scale
                                   per (batch, head) = amax(|x[b, :, h, :]|) / 448 (FA3's descale layout)
  fp8_attention(q, k, v, scale)    attention of the three quantised: FA3's e4m3 kernel on CUDA, the
                                   emulation below elsewhere (the CPU: CI and the quality measurements)
  emulated_fp8_attention(...)      the same math in float32 torch ops, P quantised as FA3 quantises it

What FA3's FP8 forward computes (hopper/softmax.h, flash_fwd kernels): S = (q8 k8^T) * q_descale * k_descale
in float32; P = exp(S * softmax_scale - running max + 8 * ln 2), i.e. the probabilities times 2^8, cast to
e4m3 for the second product (the 2^8 lifts P's small values above e4m3's subnormal range, 2^-6); the
row sums and the final division in float32; O = (P8 v8) * v_descale / row sum, written in bf16. The
emulation takes the global row max where FA3 takes a running max over key blocks: the rounding of P
differs slightly, the function does not (the tests bound the difference on the GPU).

Scales per (batch, head), dynamic: RMS-normalised q and k would allow a static bound, but v has none, and one
amax pass over q, k and v costs ~1% of the attention it feeds.
"""

from __future__ import annotations

import math

import torch

from diffserve.kernels.fp8_quant import FP8_DTYPE, quantize_with_scale, scale_from_amax
from diffserve.kernels.fused_ops import _use_triton

P_OFFSET = 2.0**8  # FA3's FP8 probabilities are exp(s - max) * 2^8 (Max_offset = 8 in its softmax)
# emulation: queries per chunk, so that its float32 (batch, heads, chunk, keys) scores stay near 256 MB
SCORE_ELEMENTS = 2**26


def quantize_heads_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The formula in torch ops. See `quantize_heads`."""
    scale = scale_from_amax(x.abs().amax(dim=(1, 3)))  # (batch, heads)
    return quantize_with_scale(x, scale[:, None, :, None]).contiguous(), scale


def quantize_heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(xq, descale) of x (batch, seq, heads, head_dim), head_dim contiguous: descale (batch, heads) float32 =
    max(amax over the (batch, head)'s rows, MIN_AMAX) / 448, xq = x / descale as fp8_quant rounds it,
    contiguous. On CUDA two Triton passes (an amax, then the cast); the same bytes as the reference."""
    if x.dim() != 4:
        raise ValueError(f"quantize_heads takes (batch, seq, heads, head_dim), got {tuple(x.shape)}")
    if _use_triton(x) and x.stride(-1) == 1 and x.numel() > 0:
        from diffserve.kernels._triton_fp8_attention import quantize_heads_triton

        return quantize_heads_triton(x)
    return quantize_heads_reference(x)


def emulated_fp8_attention(
    q8: torch.Tensor,
    k8: torch.Tensor,
    v8: torch.Tensor,
    descales: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    scale: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """FA3's FP8 forward (module docstring) in float32 torch ops, queries in chunks (SCORE_ELEMENTS)."""
    q_d, k_d, v_d = (d.float()[:, :, None, None] for d in descales)  # (batch, heads, 1, 1)
    q = q8.float().transpose(1, 2)  # (batch, heads, seq, head_dim)
    kt = k8.float().permute(0, 2, 3, 1)  # (batch, heads, head_dim, seq)
    v = v8.float().transpose(1, 2)
    s_scale = q_d * k_d * scale  # the descales apply to the product, as FA3 applies them
    batch, heads, _, keys = *q.shape[:3], kt.shape[-1]
    chunk = max(1, SCORE_ELEMENTS // max(1, batch * heads * keys))
    out = []
    for start in range(0, q.shape[2], chunk):
        s = (q[:, :, start : start + chunk] @ kt) * s_scale
        p = torch.exp(s - s.amax(dim=-1, keepdim=True)) * P_OFFSET
        rows = p.sum(dim=-1, keepdim=True)
        p8 = p.to(FP8_DTYPE).float()  # values <= 256: in range, rounded to nearest even
        out.append((p8 @ v) * v_d / rows)
    return torch.cat(out, dim=2).transpose(1, 2).to(out_dtype)


def fp8_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, fa3=None
) -> torch.Tensor:
    """softmax(q k^T * scale) v with q, k, v quantised per (batch, head) to e4m3; (batch, seq, heads, head_dim)
    in and out, the output in q's dtype. fa3: FA3's flash_attn_func (CUDA); None: the emulation."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    (q8, q_d), (k8, k_d), (v8, v_d) = quantize_heads(q), quantize_heads(k), quantize_heads(v)
    if fa3 is None:
        return emulated_fp8_attention(q8, k8, v8, (q_d, k_d, v_d), scale, q.dtype)
    out = fa3(q8, k8, v8, softmax_scale=scale, q_descale=q_d, k_descale=k_d, v_descale=v_d)
    out = out[0] if isinstance(out, tuple) else out  # some upstream versions return (out, lse)
    return out if out.dtype == q.dtype else out.to(q.dtype)
