"""FP8 (e4m3) activation quantisation for the FP8 GEMMs (runtime/layers/fp8.py): per-row (per-token)
dynamic scales, alone or fused into the pass that already writes the GEMM's input.

  quantize_activation(x)        (xq, scale): xq = x / scale in float8_e4m3fn, scale = amax(|row|) / 448
  gelu_quant(y)                 the same of GELU(tanh)(y): the quantisation fused into the GELU that follows
                                an MLP's first GEMM (an FP8 GEMM has no GELU epilogue)
  adaln_quant(x, shift, ...)    fused_ops.adaln's residual + LayerNorm + modulation with its output written
                                quantised: (x', hq, h_scale)
  modulate_quant(x, shift, scale, eps)   (hq, h_scale) of (1 + scale) * LayerNorm(x) + shift
  concat_gelu_quant(a, y)       the same of [a | GELU(tanh)(y)] (one scale per row over both): FLUX's single
                                blocks' [attention | MLP] input of their output projection, never
                                concatenated or written in bf16

Why fused: measured on an H200, a separate amax + scale + cast pass per GEMM input cost ~57 ms per FLUX.1-dev
forward against the ~36 ms that FP8 GEMMs save (issue 17). A kernel that writes a GEMM input holds each
row in registers anyway, so the row's amax, the division and the 1-byte store cost nothing extra, and the
store is half the bf16 one.

Which path runs: the Triton kernels (_triton_fp8_quant.py) when fused_ops would run its own Triton kernels
(fused_ops_enabled(), every tensor on CUDA, the platform runs our Triton, Triton imports, outside
torch.compile — Inductor fuses the reference formulas itself) and the row fits one program (<= 16384
columns); the torch reference everywhere else (the CPU, CI). The reference is the test oracle.

Format: scale (..., 1) float32 beside xq (..., K), so that xq.reshape(-1, K) and scale.reshape(-1, 1) are the
(M, K) operand and the (M, 1) row scales torch._scaled_mm takes. A zero row gets the scale
MIN_AMAX / 448 (not 0: no 0/0) and quantises to zeros. Rounding, the same in both paths, so that for the
same float32 input the kernel and the reference give the same bytes: scale = amax / 448 and 1 / scale by
IEEE (correctly rounded) float32 division, x * (1 / scale) in float32, clamped to +-448, cast to e4m3
rounding to nearest even.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffserve.kernels.fused_ops import _use_triton, adaln

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# amax floor: an all-zero row would give scale 0 and 0/0. 1e-12 (torchao's) keeps scale a normal float32 and
# x / scale finite for every row below it (they quantise to zeros or tiny values, all exact enough).
MIN_AMAX = 1e-12
MAX_TRITON_COLS = 16384  # one row per program, held in registers (as fused_ops.adaln)


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """The row scale for a float32 amax: max(amax, MIN_AMAX) / 448 (so the row's largest value maps to +-448).
    The divisor is a tensor on amax's device: with a Python number, torch's CUDA division multiplies by its
    reciprocal instead, which is not the correctly rounded quotient the kernel computes."""
    return amax.float().clamp_min(MIN_AMAX) / torch.full((), FP8_MAX, device=amax.device)


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 / scale) in float32 (the reciprocal correctly rounded, once per row or channel: a division per
    element made the Triton kernels compute-bound), clamped to the e4m3 range, rounded to float8_e4m3fn
    (nearest even)."""
    return (x.float() * torch.reciprocal(scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_activation_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The formula in torch ops. See `quantize_activation`."""
    scale = scale_from_amax(x.abs().amax(dim=-1, keepdim=True))
    return quantize_with_scale(x, scale), scale


def _kernel_fits(x: torch.Tensor, *others: torch.Tensor) -> bool:
    return _use_triton(x, *others) and x.dim() >= 2 and 0 < x.shape[-1] <= MAX_TRITON_COLS and x.numel() > 0


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(xq, scale) of x (..., K), any float dtype: per-row scale = amax(|x[row]|) / 448 in float32, shape
    (..., 1); xq = x / scale in float8_e4m3fn, shape of x (contiguous). One pass on CUDA (each row loaded
    once: amax, divide, cast, store)."""
    if _kernel_fits(x):
        from diffserve.kernels._triton_fp8_quant import quantize_rows_triton

        return quantize_rows_triton(x, gelu=False)
    return quantize_activation_reference(x)


def gelu_quant_reference(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The formula in torch ops (GELU in y's dtype, as the bf16 blocks compute it). See `gelu_quant`."""
    return quantize_activation_reference(F.gelu(y, approximate="tanh"))


def gelu_quant(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_activation(GELU(tanh)(y)): what an MLP's hidden layer feeds its FP8 output GEMM. One pass
    on CUDA (the GELU in float32, never written in bf16)."""
    if _kernel_fits(y):
        from diffserve.kernels._triton_fp8_quant import quantize_rows_triton

        return quantize_rows_triton(y, gelu=True)
    return gelu_quant_reference(y)


def concat_gelu_quant_reference(a: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The formula in torch ops (GELU in y's dtype, as the bf16 blocks compute it). See `concat_gelu_quant`."""
    return quantize_activation_reference(torch.cat([a, F.gelu(y, approximate="tanh").to(a.dtype)], dim=-1))


def concat_gelu_quant(a: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_activation(torch.cat([a, GELU(tanh)(y)], -1)): a (..., Ka) and y (..., Ky) with the same
    leading dims -> xq (..., Ka + Ky), scale (..., 1). One pass on CUDA (both rows loaded once, the GELU in
    float32, the row's amax over both parts, one store of 1 byte per element): FLUX's single blocks feed
    their output projection this way, where the bf16 path wrote the 12,288-wide GELU output and then read
    it back with the attention output through two accumulating GEMMs."""
    if a.shape[:-1] != y.shape[:-1]:
        raise ValueError(f"concat_gelu_quant: leading dims differ, {tuple(a.shape)} and {tuple(y.shape)}")
    if _kernel_fits(a, y) and 0 < y.shape[-1] <= MAX_TRITON_COLS:
        from diffserve.kernels._triton_fp8_quant import concat_gelu_quant_triton

        return concat_gelu_quant_triton(a, y)
    return concat_gelu_quant_reference(a, y)


def adaln_quant_reference(
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    eps: float,
    upcast: bool = False,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    affine: bool = False,
    store_residual: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The unfused path: fused_ops.adaln (its modulated output rounded to x.dtype, as the bf16 blocks get
    it) then quantize_activation. See `adaln_quant`."""
    x_out, h = adaln(x, shift, scale, eps, upcast, residual, gate, affine, True, store_residual)
    return (x_out, *quantize_activation(h))


def adaln_quant(
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    eps: float,
    upcast: bool = False,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    affine: bool = False,
    store_residual: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(x', hq, h_scale): fused_ops.adaln(...) — x' = x + residual * gate, h = LayerNorm(x') * (1 + scale) +
    shift (affine: LayerNorm(x') * scale + shift) — with h written as float8_e4m3fn hq (batch, seq, dim)
    and its per-token scales h_scale (batch, seq, 1) float32, ready for Fp8Linear(hq, x_scale=h_scale).
    Same arguments, broadcasting and x' as adaln (normalize is implied). On CUDA one pass: h is never
    written in bf16, and is quantised from float32 (one rounding fewer than the reference, which rounds h
    to x.dtype first; in bf16 that is 2^-9 relative, far below e4m3's 2^-4)."""
    tensors = [t for t in (x, shift, scale, residual, gate) if t is not None]
    if _use_triton(*tensors) and x.dim() == 3 and 0 < x.shape[-1] <= MAX_TRITON_COLS and x.numel() > 0:
        from diffserve.kernels._triton_fp8_quant import adaln_quant_triton

        return adaln_quant_triton(x, shift, scale, eps, residual, gate, affine, store_residual)
    return adaln_quant_reference(x, shift, scale, eps, upcast, residual, gate, affine, store_residual)


def modulate_quant(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, upcast: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hq, h_scale) of h = LayerNorm(x) * (1 + scale) + shift (layers.modulation.norm_modulate's function):
    x (batch, seq, dim); shift/scale (batch, 1, dim) per sample or (batch, seq, dim) per token. See
    adaln_quant (this is it without a residual)."""
    _, hq, h_scale = adaln_quant(x, shift, scale, eps, upcast)
    return hq, h_scale


def dequantize(xq: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """xq * scale in `dtype` (for tests and debugging; the GEMMs never dequantise)."""
    return (xq.to(torch.float32) * scale).to(dtype)
