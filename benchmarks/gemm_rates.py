"""The matmuls of one DiT forward, each timed alone at its shape: what the GEMM share of a profile is made
of, and how far each shape is from the bf16 ceiling.

For every distinct (M, K, N) of FLUX.1-dev 1024x1024 and Wan2.1-1.3B 480x832x81 (batch 1), with its count
per forward, this times (CUDA events, median of --iters after --warmup):
  linear      F.linear(x, W, b) — what the blocks call (cuBLAS/cuBLASLt as torch picks)
  lt          the same with torch.backends.cuda.preferred_blas_library("cublaslt")
  autotune    (--autotune, the largest shapes only) torch.compile(mode="max-autotune-no-cudagraphs") of the same call: Inductor
              benchmarks its Triton GEMM templates against cuBLAS and keeps the fastest
GELU shapes run through cuBLASLt's GELU epilogue (torch._addmm_activation), as the blocks do. The text
stream's small GEMMs (M=512) of FLUX's dual blocks are also timed running on a second CUDA stream beside
the image stream's GEMM of the same layer (`--pairs`), which shows what overlapping the two streams buys.

    python benchmarks/gemm_rates.py [--family flux wan] [--autotune] [--pairs]

Prints a table per family (ms per forward = count x us); nothing is recorded (the DiT figures are in
bench_dit.py): this is a diagnosis tool.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import time_ms  # noqa: E402

CEILING = 798.0  # TFLOP/s, bf16 dense matmul on the H100 (shared/DESIGN.md)

# (label, M, K, N, gelu, count per forward)
SHAPES = {
    "flux": [
        ("dual img qkv", 4096, 3072, 9216, False, 19),
        ("dual img out", 4096, 3072, 3072, False, 19),
        ("dual img ff-in", 4096, 3072, 12288, True, 19),
        ("dual img ff-out", 4096, 12288, 3072, False, 19),
        ("dual txt qkv", 512, 3072, 9216, False, 19),
        ("dual txt out", 512, 3072, 3072, False, 19),
        ("dual txt ff-in", 512, 3072, 12288, True, 19),
        ("dual txt ff-out", 512, 12288, 3072, False, 19),
        ("single qkv", 4608, 3072, 9216, False, 38),
        ("single mlp-in", 4608, 3072, 12288, True, 38),
        ("single out (attn part)", 4608, 3072, 3072, False, 38),
        ("single out (mlp part)", 4608, 12288, 3072, False, 38),
        ("adaLN dual (GEMV)", 1, 3072, 18432, False, 38),
        ("adaLN single (GEMV)", 1, 3072, 9216, False, 38),
    ],
    "wan": [
        ("self qkv", 32760, 1536, 4608, False, 30),
        ("self out", 32760, 1536, 1536, False, 30),
        ("cross q", 32760, 1536, 1536, False, 30),
        ("cross kv", 512, 1536, 3072, False, 30),
        ("cross out", 32760, 1536, 1536, False, 30),
        ("ffn in", 32760, 1536, 8960, True, 30),
        ("ffn out", 32760, 8960, 1536, False, 30),
    ],
    # issue 18: Wan2.1-I2V-14B 480x832x81 (one forward; a CFG step is two) and FLUX.1 Kontext 1024^2 + reference
    "wan14b-i2v": [
        ("self qkv", 32760, 5120, 15360, False, 40),
        ("self out", 32760, 5120, 5120, False, 40),
        ("cross q", 32760, 5120, 5120, False, 40),
        ("cross text kv", 512, 5120, 10240, False, 40),
        ("cross image kv", 257, 5120, 10240, False, 40),
        ("cross out", 32760, 5120, 5120, False, 40),
        ("ffn in", 32760, 5120, 13824, True, 40),
        ("ffn out", 32760, 13824, 5120, False, 40),
    ],
    "flux-kontext": [
        ("dual img qkv", 8192, 3072, 9216, False, 19),
        ("dual img out", 8192, 3072, 3072, False, 19),
        ("dual img ff-in", 8192, 3072, 12288, True, 19),
        ("dual img ff-out", 8192, 12288, 3072, False, 19),
        ("dual txt qkv", 512, 3072, 9216, False, 19),
        ("dual txt out", 512, 3072, 3072, False, 19),
        ("dual txt ff-in", 512, 3072, 12288, True, 19),
        ("dual txt ff-out", 512, 12288, 3072, False, 19),
        ("single qkv+mlp-in", 8704, 3072, 21504, False, 38),
        ("single out (attn part)", 8704, 3072, 3072, False, 38),
        ("single out (mlp part)", 8704, 12288, 3072, False, 38),
    ],
}
# The shapes --autotune tries (the largest share of each forward; each takes ~20 s to autotune).
AUTOTUNED = {"dual img ff-in", "single qkv", "single mlp-in", "single out (mlp part)", "ffn in", "self qkv"}
# FLUX dual-block pairs timed side by side on two streams: (image label, text label)
PAIRS = [(f"dual img {n}", f"dual txt {n}") for n in ("qkv", "out", "ff-in", "ff-out")]


def timed_us(fn, warmup: int, iters: int) -> float:
    """Median microseconds of fn on the GPU (harness.time_ms: CUDA events, after the warm-up calls)."""
    return time_ms(fn, torch.device("cuda"), warmup, iters)[0] * 1e3


def make(m: int, k: int, n: int, dtype=torch.bfloat16):
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) * k**-0.5
    b = torch.randn(n, device="cuda", dtype=dtype)
    return x, w, b


def call(x, w, b, gelu: bool):
    if gelu:
        return torch._addmm_activation(b, x, w.t(), use_gelu=True)
    return F.linear(x, w, b)


def rate(m: int, k: int, n: int, us: float) -> float:
    return 2 * m * k * n / (us * 1e-6) / 1e12


def time_shape(label: str, m: int, k: int, n: int, gelu: bool, args) -> dict:
    x, w, b = make(m, k, n)
    row = {"label": label, "shape": f"{m}x{k}x{n}", "m": m, "k": k, "n": n}
    row["linear"] = timed_us(lambda: call(x, w, b, gelu), args.warmup, args.iters)
    default = torch.backends.cuda.preferred_blas_library()
    try:
        torch.backends.cuda.preferred_blas_library("cublaslt")
        row["lt"] = timed_us(lambda: call(x, w, b, gelu), args.warmup, args.iters)
    finally:
        torch.backends.cuda.preferred_blas_library(default)
    if args.autotune and label in AUTOTUNED:
        torch._dynamo.reset()
        fn = torch.compile(
            lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh") if gelu else F.linear(x, w, b),
            mode="max-autotune-no-cudagraphs",
        )
        row["autotune"] = timed_us(lambda: fn(x, w, b), args.warmup, args.iters)
    return row


def time_pair(img: tuple, txt: tuple, side: torch.cuda.Stream, args) -> tuple[float, ...]:
    """(image alone, text alone, in sequence, on two streams) in us; img/txt = (m, k, n, gelu)."""
    im, tx = make(*img[:3]), make(*txt[:3])

    def seq():
        call(*im, img[3])
        call(*tx, txt[3])

    def two_streams():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call(*tx, txt[3])
        call(*im, img[3])
        torch.cuda.current_stream().wait_stream(side)

    return tuple(
        timed_us(fn, args.warmup, args.iters)
        for fn in (lambda: call(*im, img[3]), lambda: call(*tx, txt[3]), seq, two_streams)
    )


def run_family(family: str, args) -> None:
    rows = []
    for label, m, k, n, gelu, count in SHAPES[family]:
        rows.append({**time_shape(label, m, k, n, gelu, args), "count": count})
    modes = [m for m in ("linear", "lt", "autotune") if any(m in r for r in rows)]
    print(f"\n{family}: GEMMs of one forward (bf16, batch 1; us per call, TFLOP/s)")
    print("| GEMM | M x K x N | per fwd | " + " | ".join(f"{m} us | {m} TFLOP/s" for m in modes) + " |")
    print("|---|---|---:|" + "---:|---:|" * len(modes))
    totals = dict.fromkeys(modes, 0.0)
    ideal = 0.0
    for r in rows:
        cells = []
        for mode in modes:
            us = r.get(mode, r["linear"])  # shapes not autotuned count at their default time
            totals[mode] += us * r["count"] / 1e3
            cells.append(f"{us:.1f} | {rate(r['m'], r['k'], r['n'], us):.0f}")
        ideal += 2 * r["m"] * r["k"] * r["n"] * r["count"] / (CEILING * 1e12) * 1e3
        print(f"| {r['label']} | {r['shape']} | {r['count']} | " + " | ".join(cells) + " |")
    print("ms per forward, all GEMMs: " + ", ".join(f"{m} {t:.2f}" for m, t in totals.items()))
    print(f"the same FLOPs at {CEILING:.0f} TFLOP/s: {ideal:.2f} ms")
    best = sum(min(r.get(m, r["linear"]) for m in modes) * r["count"] for r in rows) / 1e3
    print(f"best mode per shape: {best:.2f} ms")

    if family == "flux" and args.pairs:
        side = torch.cuda.Stream()
        by_label = {label: (m, k, n, gelu) for label, m, k, n, gelu, _ in SHAPES["flux"]}
        print(
            "\nFLUX dual block: image GEMM alone, text GEMM alone, both in sequence, both on two streams (us)"
        )
        for img_label, txt_label in PAIRS:
            times = time_pair(by_label[img_label], by_label[txt_label], side, args)
            print(f"  {img_label[9:]:7s}: " + "  ".join(f"{t:8.1f}" for t in times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", nargs="+", choices=tuple(SHAPES), default=list(SHAPES))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--autotune", action="store_true", help="also Inductor max-autotune per shape (minutes)")
    p.add_argument("--pairs", action="store_true", help="FLUX text/image GEMMs on two streams")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gemm_rates.py needs a CUDA GPU", file=sys.stderr)
        return 2
    print(torch.cuda.get_device_name(0), torch.__version__)
    for family in args.family:
        run_family(family, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
