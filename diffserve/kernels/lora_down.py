"""lora_down(parts, a, out, copy_to=None): a LoRA down-projection t = [part_0 | part_1 ..] @ a^T written into
`out` (an (M, N) view, e.g. the free columns of a K-append layer's wide input: layers/lora.py), and, when
copy_to is given, the one input copied there on the way (the join [x | t] in the same pass over x).

Why a kernel: these products are memory-bound (N = slots x rank is tens of columns, x thousands wide), and
cuBLAS ran them at 1.5-2.6 TB/s of the H200's ~4.8 (benchmarks/lora_down_rates.py, 2026-12-04): ~15 us a
call whatever N, 209 calls in a rank-32 FLUX.1-dev forward. The Triton kernel (_triton_lora_down.py) splits
K over enough programs to fill the GPU and writes t (and the copy of x) where the next GEMM reads it, so no
cat or copy_ pass follows. Elsewhere (the CPU, no Triton, DIFFSERVE_FUSED_OPS=0) torch's matmul runs, with
the values the layers computed before: parity with diffusers on the CPU is unchanged.

Numerics: float32 accumulation, one rounding into out's dtype; cuBLAS does the same in another order, so
the two differ by a rounding of out's dtype at most.
"""

from __future__ import annotations

import torch

from diffserve.kernels.fused_ops import _use_triton

# Wider products (q|k|v's 96 columns of a rank-32 adapter, or several adapters) ran slower in our kernel
# than in cuBLAS (14.3 against 11.4 us at 4096x3072x96, H200): cuBLAS there, unless the kernel also does
# what would be another pass (the join of x, a second output: 20.1 us against a cat's 24.9).
_TRITON_MAX_N = 64


def lora_down(
    parts: list[torch.Tensor],
    a: torch.Tensor,
    out: torch.Tensor,
    copy_to: torch.Tensor | None = None,
    a2: torch.Tensor | None = None,
    out2: torch.Tensor | None = None,
) -> torch.Tensor:
    """out (M, N) = sum_i parts[i] (M, K_i) @ a[:, K_0 + .. + K_{i-1} : .. + K_i]^T, a (N, sum K_i) in the
    parts' dtype; with a2 (N2, K) and out2 (M, N2) also out2 = x @ a2^T in the same pass over x (two layers
    reading the same input, one part). copy_to (M, K_0), one part only: that part copied into it.
    Returns out."""
    k = sum(p.shape[-1] for p in parts)
    m = parts[0].shape[0]
    if (a2 is None) != (out2 is None) or (a2 is not None and len(parts) != 1):
        raise ValueError("lora_down: a2 and out2 go together, with a single part")
    pairs = [(a, out)] + ([(a2, out2)] if a2 is not None else [])
    if any(w.shape[1] != k or o.shape != (m, w.shape[0]) for w, o in pairs) or any(
        p.shape[0] != m for p in parts
    ):
        raise ValueError(
            f"lora_down: parts {[tuple(p.shape) for p in parts]}, "
            + ", ".join(f"a {tuple(w.shape)} out {tuple(o.shape)}" for w, o in pairs)
        )
    if copy_to is not None and (len(parts) != 1 or copy_to.shape != parts[0].shape):
        raise ValueError("lora_down: copy_to takes the shape of a single part")
    tensors = [*parts, *(t for pair in pairs for t in pair)] + ([copy_to] if copy_to is not None else [])
    n = sum(w.shape[0] for w, _ in pairs)
    if (
        len(parts) <= 2
        and (n <= _TRITON_MAX_N or copy_to is not None or a2 is not None)
        and all(t.dim() == 2 and t.stride(-1) == 1 and t.dtype == a.dtype for t in tensors)
        and all(w.is_contiguous() for w, _ in pairs)
        and _use_triton(*tensors)
    ):
        from diffserve.kernels._triton_lora_down import lora_down_triton

        lora_down_triton(parts, a, out, copy_to, a2, out2)
        return out
    for w, o in pairs:
        t, col = None, 0
        for part in parts:
            cols = w[:, col : col + part.shape[1]].t()
            t = part @ cols if t is None else t.addmm_(part, cols)
            col += part.shape[1]
        o.copy_(t)
    if copy_to is not None:
        copy_to.copy_(parts[0])
    return out
