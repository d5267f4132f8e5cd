"""Where a forward's GPU time goes: torch.profiler over a few calls, kernels grouped by kind, written as text.

Used by bench_dit.py --profile and bench_vae.py --profile. Kinds (by kernel name): GEMM (cuBLAS/CUTLASS
kernels, Inductor's Triton matmul templates), attention (flash/fmha), ours (diffserve's Triton kernels),
Triton (Inductor-generated pointwise/reduction kernels), copy (cat/copy/memcpy/memset), convolution
(cuDNN), other (ATen elementwise, norms, ...). "busy" is the union of kernel intervals over the span from
the first kernel's start to the last one's end: 100% minus busy is time the GPU waited for the host.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

KINDS = ("gemm", "attention", "ours", "triton", "convolution", "copy", "other")


def kind(name: str) -> str:
    n = name.lower()
    if n.startswith(("_adaln", "_qk_norm_rope", "_lora_down", "_lora_up")):
        return "ours"
    if "flash" in n or "fmha" in n or "attention" in n:
        return "attention"
    if n.startswith("triton_tem"):  # Inductor's matmul templates (max-autotune)
        return "gemm"
    if any(k in n for k in ("gemm", "cutlass", "nvjet", "xmma", "cublas", "sm90_")):
        return "gemm"
    if "conv" in n or "cudnn" in n or "implicit_convolve" in n:
        return "convolution"
    if n.startswith("triton_"):
        return "triton"
    if any(k in n for k in ("copy", "cat", "memcpy", "memset")):
        return "copy"
    return "other"


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def profile_forward(fn, path: Path, title: str, iters: int = 3, top: int = 30) -> dict:
    """Profile `iters` calls of fn (already warm), write the table to path, print the summary; return it."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    intervals = []
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        start, end = e.time_range.start, e.time_range.end
        per_name[e.name][0] += end - start
        per_name[e.name][1] += 1
        intervals.append((start, end))
    if not intervals:
        print("profile: no GPU kernels recorded")
        return {}
    total = sum(t for t, _ in per_name.values())
    span = max(b for _, b in intervals) - min(a for a, _ in intervals)
    busy = _union_us(intervals)
    by_kind = dict.fromkeys(KINDS, 0.0)
    for name, (t, _) in per_name.items():
        by_kind[kind(name)] += t
    ms = lambda us: us / iters / 1e3  # noqa: E731  (per forward)
    lines = [
        f"# {title}",
        f"# torch.profiler over {iters} forwards; figures per forward",
        f"kernel time {ms(total):.2f} ms, span {ms(span):.2f} ms, GPU busy {100 * busy / span:.1f}% of the span",
        "",
        "| kind | ms | % of kernel time |",
        "|---|---:|---:|",
        *(f"| {k} | {ms(v):.2f} | {100 * v / total:.1f} |" for k, v in by_kind.items() if v),
        "",
        f"| top {top} kernels | kind | ms | calls | % |",
        "|---|---|---:|---:|---:|",
    ]
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])
    for name, (t, n) in ranked[:top]:
        short = name if len(name) <= 110 else name[:107] + "..."
        lines.append(f"| `{short}` | {kind(name)} | {ms(t):.3f} | {n // iters} | {100 * t / total:.1f} |")
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print("\n".join(lines[: 8 + sum(1 for v in by_kind.values() if v)]))
    print(f"profile written to {path}")
    return {
        "kernel_ms": ms(total),
        "span_ms": ms(span),
        "busy": busy / span,
        **{k: ms(v) for k, v in by_kind.items()},
    }


def bench_fused_ops(family: str, tokens: int, dim: int, heads: int, out: Path) -> None:
    """Each fused op at the family's full-size shape: our Triton kernel, the torch reference eager, and the
    reference under torch.compile (what Inductor makes of it). Median us (triton.testing.do_bench) and the
    bandwidth over the fewest bytes the op must move (inputs read once, outputs written once)."""
    from triton.testing import do_bench

    from diffserve.kernels import fused_ops as fo

    dev, bf16 = "cuda", torch.bfloat16
    hd = dim // heads
    wan = family == "wan"
    x, y = (torch.randn(1, tokens, dim, device=dev, dtype=bf16) for _ in range(2))
    mod_dtype = torch.float32 if wan else bf16
    shift, scale, gate = (torch.randn(1, 1, dim, device=dev, dtype=mod_dtype) for _ in range(3))
    qkv = torch.randn(1, tokens, 3 * dim, device=dev, dtype=bf16)
    weight = torch.randn(dim if wan else hd, device=dev, dtype=bf16)
    angles = torch.rand(tokens, hd // 2, device=dev) * 50
    cos, sin = angles.cos(), angles.sin()
    act = x.numel() * 2  # bytes of one activation
    cases = {
        "norm_modulate": (lambda f: f(x, shift, scale, 1e-6, wan), 2 * act),
        "residual+norm_modulate": (lambda f: f(x, shift, scale, 1e-6, wan, residual=y, gate=gate), 4 * act),
        "gated_residual": (lambda f: f(x, None, None, 0.0, residual=y, gate=gate, normalize=False), 3 * act),
        "qk_norm_rope": (lambda f: f(qkv[..., :dim], weight, 1e-6, cos, sin, hd, not wan), 2 * act),
    }
    refs = {"qk_norm_rope": (fo.qk_norm_rope, fo.qk_norm_rope_reference)}
    lines = [f"# fused ops, {family} shapes: {tokens} tokens x {dim}, bf16", "",
             "| op | ours (Triton) us | GB/s | torch eager us | torch.compile us | GB/s |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, (call, nbytes) in cases.items():
        fast_fn, ref_fn = refs.get(name, (fo.adaln, fo.adaln_reference))
        compiled = torch.compile(ref_fn)
        fo.set_fused_ops(True)
        t_fast = do_bench(lambda c=call, f=fast_fn: c(f), return_mode="median")
        t_ref = do_bench(lambda c=call, f=ref_fn: c(f), return_mode="median")
        t_cmp = do_bench(lambda c=call, f=compiled: c(f), return_mode="median")
        fo.set_fused_ops(None)
        lines.append(
            f"| {name} | {t_fast * 1e3:.1f} | {nbytes / t_fast / 1e6:.0f} | {t_ref * 1e3:.1f} | "
            f"{t_cmp * 1e3:.1f} | {nbytes / t_cmp / 1e6:.0f} |"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
