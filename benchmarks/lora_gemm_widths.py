"""What a LoRA layer's K-append GEMM costs over its base GEMM (layers/lora.py): FLUX.1-dev 1024^2's GEMMs with K
grown by 0-128 low-rank columns (input and weight views of wider buffers, rows of whole 128-byte lines, as
the layers hold them), and the same GEMMs split along N into 2-4 calls (one per q|k|v member, or halves of the
MLP input), timed under CUDA graphs in three interleaved rounds (median of the rounds: a clock ramp shows up
as spread, not as one width's cost). Three input copies per timing, so most of x comes from memory.

    python benchmarks/lora_gemm_widths.py [--record]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import record  # noqa: E402

# (label, M, K, N, GELU epilogue, extra K columns to time, N splits to time at K + 0 and the layer's width)
SHAPES = [
    ("dual img q|k|v", 4096, 3072, 9216, False, (32, 64, 96, 128), (3,)),
    ("single q|k|v", 4608, 3072, 9216, False, (32, 64, 96, 128), (3,)),
    ("dual txt q|k|v", 512, 3072, 9216, False, (96,), (3,)),
    ("dual img MLP in", 4096, 3072, 12288, True, (32, 64, 96, 128), (2, 4)),
    ("single MLP in", 4608, 3072, 12288, True, (32, 64, 96, 128), (2, 4)),
    ("dual img out", 4096, 3072, 3072, False, (32, 64, 96, 128), ()),
    ("dual img MLP out", 4096, 12288, 3072, False, (32, 64, 96, 128), ()),
]
LAYER_WIDTH = {"dual img q|k|v": 96, "single q|k|v": 96, "dual txt q|k|v": 96}  # else 32: one rank-32 adapter


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--record", action="store_true", help="append rows to benchmarks/results.jsonl")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("lora_gemm_widths.py: needs a CUDA GPU")
        return 1
    from triton.testing import do_bench_cudagraph

    for shape in SHAPES:
        _time_shape(*shape, record_rows=args.record, bench=do_bench_cudagraph)
    return 0


def _time_shape(label, m, k, n, gelu, extras, splits, record_rows: bool, bench) -> None:
    from diffserve.kernels.fused_ops import linear_gelu
    from diffserve.runtime.layers.lora import _aligned, _linear

    bf16 = torch.bfloat16
    width = _aligned(k + max(extras))
    xs = [torch.randn(m, width, device="cuda", dtype=bf16) for _ in range(3)]
    w = torch.randn(n, width, device="cuda", dtype=bf16) * 0.02
    b = torch.randn(n, device="cuda", dtype=bf16)
    y = torch.empty(m, n, device="cuda", dtype=bf16)

    def gemm(x, cols, rows=slice(None)):
        if gelu:  # no out= for the GELU GEMM: each part is a new tensor (a lower bound for a split)
            return linear_gelu(x[:, :cols], w[rows, :cols], b[rows])
        return _linear(x[:, :cols], w[rows, :cols], b[rows], y[:, rows])

    cases = {f"K+{e}": (lambda x, c=k + e: gemm(x, c)) for e in (0, *extras)}
    for parts in splits:
        step = n // parts
        for e in (0, LAYER_WIDTH.get(label, 32)):
            cases[f"K+{e} /{parts}"] = lambda x, c=k + e, s=step, p=parts: [
                gemm(x, c, slice(i * s, (i + 1) * s)) for i in range(p)
            ]
    rounds = {name: [] for name in cases}
    for _ in range(3):
        for name, fn in cases.items():
            rounds[name].append(bench(lambda f=fn: [f(x) for x in xs]) * 1e3 / len(xs))
    us = {name: sorted(t)[1] for name, t in rounds.items()}
    print(
        f"{label} {m}x{k}x{n}: "
        + ", ".join(f"{name} {u:.1f} ({100 * (u / us['K+0'] - 1):+.1f}%)" for name, u in us.items()),
        flush=True,
    )
    if record_rows:
        for name, u in us.items():
            flops = 2 * m * n * (k + int(name.split()[0][2:]))
            record(
                f"lora_gemm_{label.replace(' ', '_')}_{m}x{k}x{n}", name, u / 1e3, flops / (u * 1e-6) / 1e12
            )


if __name__ == "__main__":
    raise SystemExit(main())
