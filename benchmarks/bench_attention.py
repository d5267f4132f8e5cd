"""Attention kernels on the GPU: the backend the platform selects by default vs torch SDPA.

Default shape: Wan2.1-1.3B self-attention at 480p x 81 frames (L = 21*30*52 = 32,760 tokens, 12 heads,
head_dim 128). FLOPs per call = 4 * L * S * d * heads (QK^T and PV, 2 FLOPs per multiply-add; S = L keys
for self-attention, the context's length for the cross-attention shapes).

    python benchmarks/bench_attention.py [--shape wan1.3b|wan14b|wan14b-i2v|flux-kontext] [--record]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import record  # noqa: E402

SHAPES = {
    "wan1.3b": (32760, 12, 128),
    "wan14b": (75600, 40, 128),
    "wan14b-i2v": (32760, 40, 128),  # Wan2.1-I2V-14B 480x832x81 self-attention (issue 18)
    "flux-kontext": (8704, 24, 128),  # FLUX.1 Kontext 1024^2: 4,096 + 4,096 reference + 512 text tokens
    # Wan2.1-I2V-14B's cross-attention: the video tokens' queries against 512 text and 257 image keys
    "wan14b-i2v-text": (32760, 40, 128, 512),
    "wan14b-i2v-image": (32760, 40, 128, 257),
}


def time_ms(fn, warmup=3, iters=10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="wan1.3b")
    parser.add_argument("--record", action="store_true", help="append to benchmarks/results.jsonl")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from diffserve.kernels.sdpa import SDPABackend
    from diffserve.platforms import current_platform
    from diffserve.runtime.layers.attention import attention, get_attention_backend

    L, heads, d, *kv = SHAPES[args.shape]
    S = kv[0] if kv else L  # keys and values (self-attention: L)
    dtype = torch.bfloat16
    chosen = get_attention_backend(d, dtype)
    print(f"platform={current_platform.name} selected={chosen.name} device={torch.cuda.get_device_name(0)}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, L, heads, d, device="cuda", dtype=dtype, generator=gen)
    k, v = (torch.randn(1, S, heads, d, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    flops = 4 * L * S * d * heads

    out = attention(q, k, v)
    ref = SDPABackend.forward(q.float(), k.float(), v.float())  # fp32 SDPA as the reference
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    del ref
    rows = []
    for impl, fn in (
        (f"diffserve.attention[{chosen.name}]", lambda: attention(q, k, v)),
        ("torch_sdpa", lambda: SDPABackend.forward(q, k, v)),
    ):
        ms = time_ms(fn)
        tflops = flops / ms / 1e9
        rows.append((impl, ms, tflops))
        if args.record:
            record(
                f"attention_{args.shape}_L{L}" + (f"_S{S}" if S != L else "") + f"_h{heads}_d{d}",
                impl,
                ms,
                tflops,
                rel_err_vs_fp32_sdpa=rel if impl.startswith("diffserve") else None,
            )
    print(
        f"\n| impl | ms | TFLOP/s |  (L={L}, S={S}, heads={heads}, d={d}, bf16; rel err vs fp32 SDPA {rel:.2e})"
    )
    print("|---|---|---|")
    for impl, ms, tflops in rows:
        print(f"| {impl} | {ms:.3f} | {tflops:.1f} |")


if __name__ == "__main__":
    main()
