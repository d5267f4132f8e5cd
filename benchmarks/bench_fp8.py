"""FP8 (e4m3, row-wise scales) GEMMs against bf16 at the DiTs' image-token shapes, and what the activation
quantisation costs alone and fused (issue 17).

For each GEMM shape of FLUX.1-dev 1024x1024 (4,096 image tokens; 4,608 joint tokens in the single blocks)
and Wan2.1-1.3B 480x832x81 (32,760 tokens), batch 1, with its count per forward, this times (CUDA events,
median of --iters CUDA-graph replays of --reps back-to-back calls, after --warmup calls: the DiTs run in
CUDA graphs, and eager timing of a ~10-100 us pass measures the host's launch overhead instead):
  bf16          F.linear(x, W, b) in bf16 — what the blocks run today
  fp8           Fp8Linear(x): quantize_activation (one Triton pass) + torch._scaled_mm — end to end
  fp8-gemm      Fp8Linear(xq, x_scale=s): torch._scaled_mm alone on a pre-quantised input — what the layer
                costs once a fused kernel (adaln_quant, gelu_quant) writes its input
  quant         quantize_activation(x) alone
  fp8-gemm-acc  fp8-gemm with use_fast_accum=False (Hopper's periodic FP32 promotion; slower, more exact)
and the relative error of bf16 and fp8 against a float32 GEMM of the same bf16 inputs. Then, per family,
the modulated-LayerNorm pass that writes the next GEMM's input (residual + gate + adaLN, FLUX's common
form): fused_ops.adaln in bf16, adaln then a separate quantize_activation, and adaln_quant (one pass), and
GELU + quantisation separate vs gelu_quant. Finally the DiTs' weight memory in bf16 and with the default FP8
selection (meta-device models: no GPU needed for that part).

    python3 benchmarks/bench_fp8.py [--family flux wan] [--iters 50] [--warmup 10] [--with-text] [--no-record]
    python3 benchmarks/bench_fp8.py --tiny        # CPU, tiny shapes: a check that the script runs

Appends one row per (shape, variant) to benchmarks/results.jsonl (record.py's format; --tiny rows go to a
temporary file) and prints a table with the per-forward totals (count x time).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent))  # run from a checkout without `pip install -e .`
from harness import bench_device, free, rel_err, results_file, time_ms  # noqa: E402
from record import RESULTS, blas_workspace, record  # noqa: E402

# (label, M, K, N, count per forward). FLUX.1-dev: dim 3,072, MLP 12,288; the single blocks' fused
# q|k|v|mlp-in projection (3,072 -> 3 x 3,072 + 12,288 = 21,504) and output projection of [attention | MLP]
# (15,360 -> 3,072) run over the joint 512 + 4,096 tokens. Wan2.1-1.3B: dim 1,536, FFN 8,960; self-attention
# out, cross-attention q and cross-attention out share the 1,536 -> 1,536 shape (3 a block).
SHAPES = {
    "flux": [
        ("dual img qkv", 4096, 3072, 9216, 19),
        ("dual img out", 4096, 3072, 3072, 19),
        ("dual img ff-in", 4096, 3072, 12288, 19),
        ("dual img ff-out", 4096, 12288, 3072, 19),
        ("single qkv|mlp-in", 4608, 3072, 21504, 38),
        ("single out", 4608, 15360, 3072, 38),
    ],
    "wan": [
        ("self qkv", 32760, 1536, 4608, 30),
        ("dim x dim (self out, cross q, cross out)", 32760, 1536, 1536, 90),
        ("ffn in", 32760, 1536, 8960, 30),
        ("ffn out", 32760, 8960, 1536, 30),
    ],
}
# The FLUX text stream's GEMMs (512 rows), with --with-text: the issue measured no FP8 gain there.
TEXT_SHAPES = [
    ("dual txt qkv", 512, 3072, 9216, 19),
    ("dual txt ff-in", 512, 3072, 12288, 19),
    ("dual txt ff-out", 512, 12288, 3072, 19),
]
# Rows x width of the modulated LayerNorm that writes a GEMM input, and the MLP hidden width (GELU).
PASSES = {"flux": (4096, 3072, 12288), "wan": (32760, 1536, 8960)}
MODELS = {"flux": "FLUX.1-dev 1024x1024", "wan": "Wan2.1-1.3B 480x832x81"}
TINY_SHAPES = {
    "flux": [("dual img qkv", 64, 64, 192, 2), ("single out", 72, 320, 64, 2)],
    "wan": [("ffn out", 96, 160, 32, 2)],
}
TINY_PASSES = {"flux": (64, 64, 256), "wan": (96, 32, 160)}
VARIANTS = ("bf16", "fp8", "fp8-gemm", "quant", "fp8-gemm-acc")


def timed(fn, device, args) -> tuple[float, object]:
    """(median ms per call, fn's output). On the GPU (unless --eager) `args.reps` back-to-back calls are
    captured in one CUDA graph and the replays timed, as the DiTs run (in CUDA graphs): no host launch
    overhead, which would otherwise dominate the ~10-100 us passes. Eagerly: harness.time_ms, one call per
    pair of CUDA events."""
    result = fn()
    if device.type != "cuda" or not args.graph:
        return time_ms(fn, device, args.warmup, args.iters)[0], result
    for _ in range(2):
        fn()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(args.reps):
            fn()
    ms = time_ms(graph.replay, device, max(1, args.warmup // args.reps), args.iters)[0] / args.reps
    del graph
    return ms, result


def _slug(label: str) -> str:
    return label.split(" (")[0].replace(" ", "_").replace("|", "_").replace("-", "_")


def gemm_rows(family: str, shapes, device, dtype, args, record_row) -> list[dict]:
    """Time every variant at every shape; returns one dict per shape (us per variant, errors)."""
    out = []
    gen = torch.Generator(device=device).manual_seed(0)
    for shape in shapes:
        out.append(_gemm_row(family, shape, gen, device, dtype, args, record_row))
        free(device)  # this shape's tensors went with _gemm_row's frame
    return out


def _gemm_row(family: str, shape, gen, device, dtype, args, record_row) -> dict:
    from diffserve.kernels.fp8_quant import quantize_activation
    from diffserve.runtime.layers.fp8 import Fp8Linear

    label, m, k, n, count = shape
    x = torch.randn(m, k, device=device, dtype=dtype, generator=gen)
    w = torch.randn(n, k, device=device, dtype=dtype, generator=gen) * k**-0.5
    b = torch.randn(n, device=device, dtype=dtype, generator=gen) * 0.1
    layer = torch.nn.Linear(k, n, device=device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    fp8 = Fp8Linear.from_linear(layer, use_fast_accum=True)
    fp8_acc = Fp8Linear.from_linear(layer, use_fast_accum=False)
    xq, xs = quantize_activation(x)
    calls = {
        "bf16": lambda: F.linear(x, w, b),
        "fp8": lambda: fp8(x),
        "fp8-gemm": lambda: fp8(xq, x_scale=xs),
        "quant": lambda: quantize_activation(x),
        "fp8-gemm-acc": lambda: fp8_acc(xq, x_scale=xs),
    }
    reference = F.linear(x.float(), w.float(), b.float())
    flops = 2 * m * k * n
    row = {"label": label, "m": m, "k": k, "n": n, "count": count}
    for variant in args.variants:
        ms, result = timed(calls[variant], device, args)
        err = None if variant == "quant" else rel_err(result, reference)
        row[variant] = ms * 1e3
        row[f"{variant}_err"] = err
        record_row(
            f"fp8_gemm_{family}_{_slug(label)}_{m}x{k}x{n}",
            variant,
            ms,
            None if variant == "quant" else flops / ms / 1e9,
            model=MODELS[family],
            shape=label,
            m=m,
            k=k,
            n=n,
            count_per_forward=count,
            dtype=str(dtype).replace("torch.", ""),
            rel_err_vs_float32=err,
            use_fast_accum=None if variant in ("bf16", "quant") else variant != "fp8-gemm-acc",
        )
    return row


def pass_rows(family: str, rows: int, dim: int, hidden: int, device, dtype, args, record_row) -> list[tuple]:
    """The passes that write a GEMM input: modulated LayerNorm (with FLUX's residual + gate) and GELU."""
    from diffserve.kernels.fp8_quant import adaln_quant, gelu_quant, quantize_activation
    from diffserve.kernels.fused_ops import adaln

    gen = torch.Generator(device=device).manual_seed(1)
    x, res = (torch.randn(1, rows, dim, device=device, dtype=dtype, generator=gen) for _ in range(2))
    gate, shift, scale = (torch.randn(1, 1, dim, device=device, dtype=dtype, generator=gen) for _ in range(3))
    y = torch.randn(1, rows, hidden, device=device, dtype=dtype, generator=gen)

    def adaln_then_quant():
        _, h = adaln(x, shift, scale, 1e-6, residual=res, gate=gate)
        return quantize_activation(h)

    def gelu_then_quant():
        return quantize_activation(F.gelu(y, approximate="tanh"))

    cases = [
        (f"fp8_adaln_{family}_{rows}x{dim}", "adaln-bf16", lambda: adaln(x, shift, scale, 1e-6, residual=res, gate=gate)),
        (f"fp8_adaln_{family}_{rows}x{dim}", "adaln+quant", adaln_then_quant),
        (f"fp8_adaln_{family}_{rows}x{dim}", "adaln_quant", lambda: adaln_quant(x, shift, scale, 1e-6, residual=res, gate=gate)),
        (f"fp8_gelu_{family}_{rows}x{hidden}", "gelu+quant", gelu_then_quant),
        (f"fp8_gelu_{family}_{rows}x{hidden}", "gelu_quant", lambda: gelu_quant(y)),
    ]  # fmt: skip
    out = []
    for bench, impl, fn in cases:
        ms, _ = timed(fn, device, args)
        out.append((bench, impl, ms * 1e3))
        record_row(bench, impl, ms, None, model=MODELS[family], m=rows, k=dim if "adaln" in bench else hidden,
                   dtype=str(dtype).replace("torch.", ""))  # fmt: skip
    return out


def weight_memory() -> list[tuple[str, float, float, int]]:
    """(model, bf16 GB, with FP8 GB, layers) of the full-size DiTs with the default selection (meta device:
    the stats are computed from shapes; fused or not, the bytes are the same)."""
    from diffserve.runtime.layers.fp8 import quantize_linears
    from diffserve.runtime.models.flux import FluxConfig, FluxTransformer
    from diffserve.runtime.models.wan import WanConfig, WanTransformer

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            models = {
                "FLUX.1-dev": FluxTransformer(
                    FluxConfig(num_layers=19, num_single_layers=38, guidance_embeds=True)
                ),
                "Wan2.1-1.3B": WanTransformer(WanConfig(num_attention_heads=12, ffn_dim=8960, num_layers=30)),
            }
    finally:
        torch.set_default_dtype(previous)
    out = []
    for name, model in models.items():
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        stats = quantize_linears(model)
        after = total - stats["bytes_before"] + stats["bytes_after"]
        out.append((name, total / 1e9, after / 1e9, stats["count"]))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", nargs="+", choices=("flux", "wan"), default=["flux", "wan"])
    p.add_argument("--iters", type=int, default=50, help="timed calls per variant (median reported)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls first")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--eager", dest="graph", action="store_false", help="time eager calls, not graph replays")
    p.add_argument("--reps", type=int, default=10, help="calls captured back to back in each timed graph")
    p.add_argument("--with-text", action="store_true", help="also FLUX's 512-row text-stream GEMMs")
    p.add_argument("--no-passes", dest="passes", action="store_false", help="skip the adaLN / GELU passes")
    p.add_argument("--tiny", action="store_true", help="CPU, tiny shapes: an end-to-end check of the script")
    p.add_argument("--no-record", dest="record", action="store_false", help="do not append to results")
    p.add_argument(
        "--results",
        type=Path,
        default=None,
        help="where rows are appended (default: results.jsonl; --tiny: a temp file)",
    )
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = bench_device(args.tiny, "bench_fp8.py")
    if device is None:
        return 1
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        print(
            "bench_fp8.py needs FP8 tensor cores (compute capability 8.9+: L40S, H100, H200, B200)",
            file=sys.stderr,
        )
        return 1
    dtype = torch.bfloat16
    path = args.results or results_file(args.tiny, "bench_fp8", RESULTS)
    command = " ".join(["python3", "benchmarks/bench_fp8.py", *(argv if argv is not None else sys.argv[1:])])
    graph = device.type == "cuda" and args.graph
    common = {
        "torch": torch.__version__,
        "command": command,
        "batch": 1,
        "iters": args.iters,
        "cuda_graph": graph,
    }

    def record_row(benchmark, impl, ms, tflops, **extra):
        if args.record:
            record(benchmark, impl, ms, tflops, path=path, **common, **extra)

    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"median of {args.iters} " + (f"CUDA graph replays of {args.reps} calls" if graph else "calls")
          + f" after {args.warmup} warm-up calls; BLAS workspace: {blas_workspace()}")  # fmt: skip
    for family in args.family:
        shapes = (TINY_SHAPES if args.tiny else SHAPES)[family]
        if family == "flux" and args.with_text and not args.tiny:
            shapes = shapes + TEXT_SHAPES
        rows = gemm_rows(family, shapes, device, dtype, args, record_row)
        shown = [v for v in VARIANTS if v in args.variants]
        print(f"\n{MODELS[family]}: GEMMs (us per call; TFLOP/s in brackets; rel. err vs float32)")
        print(f"| shape | M x K x N | count | {' | '.join(shown)} | fp8 / bf16 | err bf16 | err fp8 |")
        print("|---|---|---:|" + "---:|" * len(shown) + "---:|---:|---:|")
        totals = dict.fromkeys(shown, 0.0)
        for r in rows:
            flops = 2 * r["m"] * r["k"] * r["n"]
            cells = []
            for v in shown:
                totals[v] += r[v] * r["count"] / 1e3
                cells.append(f"{r[v]:.1f}" if v == "quant" else f"{r[v]:.1f} ({flops / r[v] / 1e6:.0f})")
            ratio = f"{r['fp8'] / r['bf16']:.2f}" if "fp8" in r and "bf16" in r else "-"
            errs = [f"{r[f'{v}_err']:.2e}" if r.get(f"{v}_err") is not None else "-" for v in ("bf16", "fp8")]
            print(f"| {r['label']} | {r['m']}x{r['k']}x{r['n']} | {r['count']} | {' | '.join(cells)} | {ratio} | "
                  f"{errs[0]} | {errs[1]} |")  # fmt: skip
        print("| per forward (ms) | | | " + " | ".join(f"{totals[v]:.2f}" for v in shown) + " | | | |")
        if args.passes:
            m, dim, hidden = (TINY_PASSES if args.tiny else PASSES)[family]
            print(f"\n{MODELS[family]}: the passes that write a GEMM input (us per call)")
            for bench, impl, us in pass_rows(family, m, dim, hidden, device, dtype, args, record_row):
                print(f"  {bench:32s} {impl:12s} {us:9.1f}")
    print("\nDiT weight memory, bf16 -> default FP8 selection (image-token GEMMs of the blocks):")
    for name, before, after, count in weight_memory():
        print(f"  {name:12s} {before:6.2f} GB -> {after:6.2f} GB ({count} linear layers in FP8)")
    if args.record:
        print(f"\nrows appended to {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
