"""Fused elementwise ops for the DiT blocks: Triton kernels on CUDA, the plain-torch reference elsewhere.

The memory-bound work between the matmuls of a DiT block reads and writes the whole activation several
times when written as torch ops (LayerNorm, then *(1+scale), then +shift, each a pass). Here each op is
one pass:
  adaln(...)          optional gated residual x + y*gate, then LayerNorm * (1 + scale) + shift (or an affine
                      LayerNorm); returns the new residual stream and the modulated input of the next layer
  qk_norm_rope(...)   RMSNorm of q or k (per head, or across all heads) then rotary embedding; reads the
                      (possibly strided) projection output and writes (batch, seq, heads, head_dim)
  linear_gelu(...)    x @ W^T + b followed by GELU(tanh), the GELU done in cuBLASLt's epilogue
  scale_rows(w, g)    a per-sample copy of a weight with each output row scaled by a gate (Wan's folded gates)

Which path runs: the kernels when the tensors are on CUDA, the platform runs our Triton kernels
(Platform.supports_triton_kernels: NVIDIA and AMD GPUs; see set_platform_query), Triton imports and the ops
are enabled (DIFFSERVE_FUSED_OPS=0 or set_fused_ops(False) turns them off). Everywhere else (the CPU, CI,
ROCm without Triton) the reference runs: it is the exact formula the blocks used before, so parity with
diffusers on the CPU is unchanged. Inside torch.compile, qk_norm_rope and linear_gelu stay our kernels
(registered as torch custom ops, opaque to Inductor: measured faster than what Inductor generates for the
same code, and Inductor cannot put a GELU into a cuBLAS epilogue), while adaln goes back to the reference
formula, which Inductor fuses with its neighbours. set_kernels_in_compile(False) hands all of them to Inductor.

Numerics: the kernels compute in float32 and round once at the end; the reference rounds after some
intermediate ops in the activation dtype. In bf16 the two differ by bf16 rounding (~4e-3 relative per
element), which is the tolerance the GPU parity tests use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

ENV_VAR = "DIFFSERVE_FUSED_OPS"
_enabled: bool | None = None
_in_compile = True


def _no_platform_said() -> bool:
    return True


# Whether the current platform runs our Triton kernels (Platform.supports_triton_kernels). kernels never
# import platforms (imports point platforms -> kernels): platforms/interface.py installs the question here
# when it is imported. Until then (a script calling these ops with no platform loaded) CUDA tensors decide.
_platform_runs_triton: Callable[[], bool] = _no_platform_said


def set_platform_query(query: Callable[[], bool]) -> None:
    """Install the platform's answer to "do our Triton kernels run here?", asked at each dispatch."""
    global _platform_runs_triton
    _platform_runs_triton = query


@torch.compiler.assume_constant_result
def _platform_allows_triton() -> bool:
    # A constant to torch.compile: Dynamo calls the query once while tracing instead of tracing through
    # it (the platform's first detection imports modules, which Dynamo refuses to trace).
    return _platform_runs_triton()


def set_fused_ops(enabled: bool | None) -> None:
    """Force the Triton kernels on or off for this process (None: back to the environment's choice)."""
    global _enabled
    _enabled = enabled


def set_kernels_in_compile(enabled: bool) -> None:
    """Whether code traced by torch.compile calls our kernels (custom ops) or the reference formulas."""
    global _in_compile
    _in_compile = enabled


def fused_ops_enabled() -> bool:
    if _enabled is not None:
        return _enabled
    from diffserve import envs

    return envs.get(ENV_VAR)


@functools.cache
def triton_available() -> bool:
    try:
        from diffserve.kernels import _triton_ops  # noqa: F401  (imports triton)
    except Exception:  # ImportError, or a broken Triton install: the reference path still works
        return False
    return True


def _use_fused(*tensors: torch.Tensor, in_compile: bool = False) -> bool:
    """Whether our fused path (not the reference) runs: enabled, every tensor on CUDA, and outside
    torch.compile unless the op is one kept in compiled code (in_compile) and set_kernels_in_compile allows."""
    if not fused_ops_enabled() or (torch.compiler.is_compiling() and not (in_compile and _in_compile)):
        return False
    return all(t.is_cuda for t in tensors)


def _use_triton(*tensors: torch.Tensor, in_compile: bool = False) -> bool:
    return _use_fused(*tensors, in_compile=in_compile) and _platform_allows_triton() and triton_available()


def channels_innermost(t: torch.Tensor) -> bool:
    """Whether t (N, C, *spatial) is dense with its channels innermost in memory (channels_last,
    channels_last_3d; a contiguous (N, C) too), i.e. rows of C channels, one per pixel: the layout the
    VAE kernels read natively."""
    return t.dim() >= 2 and t.movedim(1, -1).is_contiguous()


# ---------------------------------------------------------------- adaLN: residual + norm + modulation


def adaln_reference(
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    eps: float,
    upcast: bool = False,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    affine: bool = False,
    normalize: bool = True,
    store_residual: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The formula in torch ops (the blocks' original code). See `adaln`."""
    if residual is not None:
        x = (x + (residual if gate is None else residual * gate)).to(x.dtype)
    if not normalize:
        return x, None
    x_out = x if store_residual or residual is None else None
    if affine:  # LayerNorm with its own weight (scale) and bias (shift), in float32 when upcast
        w, b = (scale.float(), shift.float()) if upcast else (scale, shift)
        h = F.layer_norm(x.float() if upcast else x, (x.shape[-1],), w, b, eps)
        return x_out, h.to(x.dtype)
    normed = F.layer_norm(x.float() if upcast else x, (x.shape[-1],), eps=eps)
    return x_out, (normed * (1 + scale) + shift).to(x.dtype)


def adaln(
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    eps: float,
    upcast: bool = False,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    affine: bool = False,
    normalize: bool = True,
    store_residual: bool = True,
    out_h: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(x', h) with x' = x + residual * gate (x' = x without residual; gate None means 1) and
    h = LayerNorm(x') * (1 + scale) + shift — or LayerNorm(x') * scale + shift with affine=True (a LayerNorm's
    own weight and bias) — or h = None with normalize=False. store_residual=False (with a residual and
    normalize) returns x' = None and the kernel never writes it: for a residual that is only a per-channel
    offset the caller carries separately (Wan's bias-free residual GEMMs, models/wan.py).

    x, residual: (batch, seq, dim); shift/scale/gate broadcast against them: (batch, 1, dim) per sample,
    (batch, seq, dim) per token, or (dim,) for affine. Any float dtypes: the sum is taken in the promoted
    dtype and returned in x.dtype; upcast=True normalises in float32 (else in x's dtype).
    out_h: h written there (x's shape; e.g. the left columns of a LoRA layer's wide input buffer,
    layers/lora.py) and returned.
    """
    tensors = [t for t in (x, shift, scale, residual, gate) if t is not None]
    if _use_triton(*tensors) and x.dim() == 3 and x.shape[-1] <= 16384:
        from diffserve.kernels._triton_ops import adaln_triton

        return adaln_triton(x, shift, scale, eps, residual, gate, affine, normalize, store_residual, out_h)
    x_out, h = adaln_reference(
        x, shift, scale, eps, upcast, residual, gate, affine, normalize, store_residual
    )
    if out_h is not None and h is not None:
        h = out_h.copy_(h)
    return x_out, h


# ---------------------------------------------------------------- q/k: RMSNorm + rotary embedding


def qk_norm_rope_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    head_dim: int,
    per_head: bool,
) -> torch.Tensor:
    """The formula in torch ops. See `qk_norm_rope`."""
    if weight is not None:
        if per_head:
            x = F.rms_norm(x.unflatten(-1, (-1, head_dim)), (head_dim,), weight, eps)
        else:
            x = F.rms_norm(x, (x.shape[-1],), weight, eps).unflatten(-1, (-1, head_dim))
    else:
        x = x.unflatten(-1, (-1, head_dim))
    if cos is None:
        return x
    # Channel pairs (2i, 2i+1) rotate by the angle whose cos/sin are column i; in float32.
    xr, xi = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    out = torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def _qk_kernel_fits(x, weight, cos, sin, head_dim: int) -> bool:
    """Whether the Triton q/k kernel runs (both the out-of-place and the in-place form): enabled, on CUDA
    (also inside torch.compile, as a custom op), a 3-D x whose row fits a program."""
    tensors = [t for t in (x, weight, cos, sin) if t is not None]
    return (
        _use_triton(*tensors, in_compile=True)
        and x.dim() == 3
        and x.shape[-1] <= 16384
        and head_dim & (head_dim - 1) == 0  # the kernel tiles a head as one power-of-two block
    )


def qk_norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    head_dim: int,
    per_head: bool,
) -> torch.Tensor:
    """x (batch, seq, heads * head_dim) — may be a column slice of a fused q|k|v projection — to
    (batch, seq, heads, head_dim): RMSNorm with `weight` (None: no norm) over each head (per_head) or over
    all heads together, then the rotary embedding cos/sin (seq, head_dim // 2), float32 (None: none)."""
    if _qk_kernel_fits(x, weight, cos, sin, head_dim):
        return torch.ops.diffserve.qk_norm_rope(x, weight, eps, cos, sin, head_dim, per_head)
    return qk_norm_rope_reference(x, weight, eps, cos, sin, head_dim, per_head)


@torch.library.custom_op("diffserve::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    head_dim: int,
    per_head: bool,
) -> torch.Tensor:
    from diffserve.kernels._triton_ops import qk_norm_rope_triton

    return qk_norm_rope_triton(x, weight, eps, cos, sin, head_dim, per_head)


@_qk_norm_rope_op.register_fake
def _(x, weight, eps, cos, sin, head_dim, per_head):
    return x.new_empty(x.shape[0], x.shape[1], x.shape[2] // head_dim, head_dim)


def qk_norm_rope_(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    head_dim: int,
    per_head: bool,
) -> torch.Tensor:
    """qk_norm_rope written back into x (batch, seq, heads * head_dim), e.g. the q or k columns of a fused
    q|k|v projection that attention then reads in place; returns x as (batch, seq, heads, head_dim). Saves
    the new tensor, and lets the caller lay out q, k and v of several streams in one buffer up front."""
    if x.stride(-1) != 1:
        raise ValueError("qk_norm_rope_ needs a last-dim-contiguous x")
    if _qk_kernel_fits(x, weight, cos, sin, head_dim):
        torch.ops.diffserve.qk_norm_rope_(x, weight, eps, cos, sin, head_dim, per_head)
    else:
        x.copy_(qk_norm_rope_reference(x, weight, eps, cos, sin, head_dim, per_head).flatten(-2))
    return x.unflatten(-1, (-1, head_dim))


@torch.library.custom_op("diffserve::qk_norm_rope_", mutates_args=("x",))
def _qk_norm_rope_inplace_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    head_dim: int,
    per_head: bool,
) -> None:
    from diffserve.kernels._triton_ops import qk_norm_rope_triton

    qk_norm_rope_triton(x, weight, eps, cos, sin, head_dim, per_head, out=x)


# ---------------------------------------------------------------- a weight scaled per output row


def scale_rows(weight: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """(batch, out, in): weight (out, in) with row o multiplied by gate[b, 0, o] (gate (batch, 1, out)),
    computed in float32 and rounded once to weight.dtype, as torch.mul of the two computes it. On CUDA one
    Triton pass at memory speed: torch's broadcast multiply of mixed dtypes runs unvectorised, at ~0.9 TB/s
    on an H100 (Wan2.1-1.3B's gate-folded output projections: 2.5 ms per forward, benchmarks/RESULTS.md)."""
    if gate.dim() != 3 or gate.shape[1] != 1 or gate.shape[2] != weight.shape[0]:
        raise ValueError(f"gate must be (batch, 1, {weight.shape[0]}), got {tuple(gate.shape)}")
    if _use_triton(weight, gate) and weight.is_contiguous():
        from diffserve.kernels._triton_ops import scale_rows_triton

        return scale_rows_triton(weight, gate)
    out = torch.empty((gate.shape[0], *weight.shape), device=weight.device, dtype=weight.dtype)
    return torch.mul(weight, gate.transpose(1, 2), out=out)


# ---------------------------------------------------------------- linear + GELU(tanh)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """GELU(tanh)(x @ weight^T + bias). On CUDA eager, one cuBLASLt call with a GELU epilogue (the hidden
    activation, 4x the model width, is written once instead of written, read and written again)."""
    # cuBLASLt, not Triton: no triton_available() check.
    if bias is not None and x.dtype in (torch.bfloat16, torch.float16) and _use_fused(x, in_compile=True):
        return torch.ops.diffserve.linear_gelu(x, weight, bias)
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


@torch.library.custom_op("diffserve::linear_gelu", mutates_args=())
def _linear_gelu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


@_linear_gelu_op.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
