"""The LoRA products of layers/lora.py: lora_down (below) and lora_up (y += t B^T in one pass over y, at the
end).

lora_down(parts, a, out, copy_to=None): a LoRA down-projection t = [part_0 | part_1 ..] @ a^T written into
`out` (an (M, N) view, e.g. the free columns of a K-append layer's wide input: layers/lora.py), and, when
copy_to is given, the one input copied there on the way (the join [x | t] in the same pass over x).

Why a kernel: these products are memory-bound (N = slots x rank is tens of columns, x thousands wide), and
what costs is the passes around them: cuBLAS writes t where it likes, so the layers then copied t beside x
or joined [x | t] with a cat (another read and write of x). The Triton kernel (_triton_low_rank.py) writes
t where the next GEMM reads it, makes the join in the pass that reads x (20.1 us against 25.1 for matmul +
cat at 4096x3072x32, the join reloading x: _triton_low_rank.py), and splits K over enough programs to fill the GPU; alone it runs at about cuBLAS's
speed (12.4 against 11.9 us; all H200, CUDA graphs, benchmarks/lora_down_rates.py, 2026-12-04). It runs
for N up to 64 (_TRITON_MAX_N). Elsewhere (the CPU, no Triton, DIFFSERVE_FUSED_OPS=0) torch's matmul
runs, with the values the layers computed before: parity with diffusers on the CPU is unchanged.

Numerics: float32 accumulation, one rounding into out's dtype; cuBLAS does the same in another order, so
the two differ by a rounding of out's dtype at most.
"""

from __future__ import annotations

import torch

from diffserve.kernels.fused_ops import _use_triton

# Wider products (q|k|v's 96 columns of a rank-32 adapter, or several adapters) go to cuBLAS: it ran them
# faster (11.4 against 14.3 us at 4096x3072x96, H200).
_TRITON_MAX_N = 64


def lora_down(
    parts: list[torch.Tensor], a: torch.Tensor, out: torch.Tensor, copy_to: torch.Tensor | None = None
) -> torch.Tensor:
    """out (M, N) = sum_i parts[i] (M, K_i) @ a[:, K_0 + .. + K_{i-1} : .. + K_i]^T, a (N, sum K_i) in
    the parts' dtype; copy_to (M, K_0), one part only: that part copied into it. Returns out."""
    if _triton_takes(parts, a, out, copy_to):
        from diffserve.kernels._triton_low_rank import lora_down_triton

        lora_down_triton(parts, a, out, copy_to)
        return out
    if len(parts) == 1 and copy_to is None:  # cuBLAS writes rows of any stride: no copy of t after
        return torch.mm(parts[0], a.t(), out=out)
    t, col = None, 0
    for part in parts:
        cols = a[:, col : col + part.shape[1]].t()
        t = part @ cols if t is None else t.addmm_(part, cols)
        col += part.shape[1]
    if copy_to is not None:
        copy_to.copy_(parts[0])
    return out.copy_(t)


def lora_downs(jobs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> None:
    """lora_down([x], a, out, copy_to) for each job (x, a, out, copy_to), two jobs a launch where the Triton
    kernel takes them together: each one it takes alone, with the same A shape and dtype, both joins or
    neither. FLUX's dual blocks pair each image-stream layer with its text-stream twin: a 512-row pass
    alone costs 6.4-12.9 us of mostly fixed cost for 3-13 MB (H200, benchmarks/lora_down_rates.py)."""
    jobs = [(job, _triton_takes([job[0]], *job[1:])) for job in jobs]
    while jobs:
        (x, a, out, copy_to), triton = jobs.pop(0)
        mate = next((j for j, ok in jobs if triton and ok and _mates(a, copy_to, j[1], j[3])), None)
        if mate is None:
            lora_down([x], a, out, copy_to)
            continue
        jobs = [(j, ok) for j, ok in jobs if j is not mate]
        from diffserve.kernels._triton_low_rank import lora_down_triton

        lora_down_triton([x], a, out, copy_to, pair=mate)


def _mates(a, copy_to, a2, copy_to2) -> bool:
    """Whether two jobs the Triton kernel takes alone can share one launch (lora_downs)."""
    return a.shape == a2.shape and a.dtype == a2.dtype and (copy_to is None) == (copy_to2 is None)


def _triton_takes(parts, a, out, copy_to) -> bool:
    """Whether lora_down runs these on the Triton kernel, after their shapes are checked (ValueError)."""
    k = sum(p.shape[-1] for p in parts)
    m = parts[0].shape[0]
    if a.shape[1] != k or out.shape != (m, a.shape[0]) or any(p.shape[0] != m for p in parts):
        raise ValueError(
            f"lora_down: parts {[tuple(p.shape) for p in parts]}, a {tuple(a.shape)}, out {tuple(out.shape)}"
        )
    if copy_to is not None and (len(parts) != 1 or copy_to.shape != parts[0].shape):
        raise ValueError("lora_down: copy_to takes the shape of a single part")
    tensors = [*parts, a, out] + ([copy_to] if copy_to is not None else [])
    return (
        len(parts) <= 2
        and a.shape[0] <= _TRITON_MAX_N
        and all(t.dim() == 2 and t.stride(-1) == 1 and t.dtype == a.dtype for t in tensors)
        and a.is_contiguous()
        and _use_triton(*tensors)
    )


def lora_up(y: torch.Tensor, t: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """y (M, N) += t (M, R) @ bt (R, N), in place, one rounding of y's dtype: a LoRA up-projection onto a
    layer's output. On CUDA one Triton pass over y (cuBLAS's addmm_ took ~29 us for FLUX.1-dev's
    4608 x 3072 outputs, twice the time reading and writing y needs; H200 profile, 2026-12-04); torch's
    addmm_ elsewhere. Returns y."""
    if t.shape != (y.shape[0], bt.shape[0]) or bt.shape[1] != y.shape[1]:
        raise ValueError(f"lora_up: y {tuple(y.shape)}, t {tuple(t.shape)}, bt {tuple(bt.shape)}")
    if (
        y.dim() == 2
        and y.stride(-1) == 1
        and t.stride(-1) == 1
        and y.dtype == t.dtype == bt.dtype
        and _use_triton(y, t, bt)
    ):
        from diffserve.kernels._triton_low_rank import lora_up_triton

        lora_up_triton(y, t, bt.contiguous())
        return y
    return y.addmm_(t, bt)
