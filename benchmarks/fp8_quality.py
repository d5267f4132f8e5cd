"""FP8's quality on the bundled (trained) model: `--quantization fp8` against the exact model, alone and with
the step cache, same prompts and seeds, through diffserve's own runner (the CPU path by default: the same
code as the GPU's, torch._scaled_mm's CPU implementation and the reference quantisation formulas).

Over --count held-out prompts (diffserve.bundled.data's "heldout" split), each setting against the exact
uncached pictures, with step_cache_quality.py's measures (it holds the shared code): PSNR pooled / median
/ worst and how many pictures fall under 30 dB, the fraction of DiT forwards reused, and the pixel judge's
colour / shape / all-attribute accuracy with and without. Settings:
  exact                         the model as loaded (float32 on the CPU), uncached: the reference
  fp8                           the DiT loaded with quantization="fp8" (RuntimeConfig, as the CLI flag)
  exact + step cache T          StepCacheConfig's defaults at threshold T (the default threshold)
  fp8 + step cache T            both
  fp8 + step cache T vs fp8     the last against fp8 uncached: what the cache adds on top of FP8
  fp8-attention                 (--fp8-attention) quantization="fp8-attention": the attention in FP8 too (on
                                the CPU the emulation of FA3's e4m3 forward, kernels/fp8_attention.py)

    python benchmarks/fp8_quality.py [--count 32] [--threshold T] [--fp8-attention] [--threads 1] [--record]
    python benchmarks/fp8_quality.py --tiny    # the tiny random FLUX model: checks this script only

--record appends one row per setting to benchmarks/results.jsonl (record.py; --tiny: a temporary file).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import results_file  # noqa: E402
from record import RESULTS, record  # noqa: E402
from step_cache_quality import compare, judge_scores, print_table, run  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="default: the bundled model")
    p.add_argument("--tiny", action="store_true", help="the tiny random FLUX model (checks the script)")
    p.add_argument("--count", type=int, default=32)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--threshold", type=float, default=None, help="step cache threshold (default: the policy's)"
    )
    p.add_argument("--steps", type=int, help="default: the model's")
    p.add_argument("--size", type=int, help="default: the model's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on the CPU, bfloat16 on a GPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--fp8-attention", action="store_true", help="also the fp8-attention setting")
    p.add_argument("--json", help="write the table here")
    p.add_argument("--record", action="store_true", help="append the rows to the results file")
    p.add_argument("--results", type=Path, default=None, help=f"results file (default {RESULTS})")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffserve.bundled import data
    from diffserve.runtime.config import RuntimeConfig
    from diffserve.runtime.runner import load_runner
    from diffserve.runtime.step_cache import StepCacheConfig

    torch.manual_seed(0)
    model = args.model
    if args.tiny:
        from diffserve.testing import make_tiny_model

        model = str(make_tiny_model("flux", Path(tempfile.mkdtemp()) / "model"))
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    exact = load_runner(RuntimeConfig(model=model, device=args.device, dtype=dtype))
    fp8 = load_runner(RuntimeConfig(model=model, device=args.device, dtype=dtype, quantization="fp8"))
    size = args.size or (64 if args.tiny else exact.defaults["width"])
    steps = args.steps or exact.defaults["num_inference_steps"]
    cache = StepCacheConfig() if args.threshold is None else StepCacheConfig(threshold=args.threshold)
    examples = data.make_examples(args.seed, args.count, "heldout")
    seeds = [args.seed + i for i in range(args.count)]

    def generate(runner, cached: bool) -> dict:
        runner.pipeline.step_cache = cache if cached else None
        try:
            return run(runner, examples, seeds, size, steps, cache.threshold if cached else 0.0)
        finally:
            runner.pipeline.step_cache = None

    base = generate(exact, cached=False)
    quantized = generate(fp8, cached=False)
    t = f"{cache.threshold:g}"
    rows = [
        dict(setting="exact", reused=0.0, psnr=math.inf, psnr_median=math.inf, psnr_min=math.inf,
             under_30db=0, judge=judge_scores(examples, base["images"]), denoise_s=base["denoise_s"]),
        compare("fp8", quantized, base, examples),
        compare(f"exact + step cache {t}", generate(exact, cached=True), base, examples),
    ]  # fmt: skip
    both = generate(fp8, cached=True)
    rows += [
        compare(f"fp8 + step cache {t}", both, base, examples),
        compare(f"fp8 + step cache {t} vs fp8", both, quantized, examples),
    ]
    if args.fp8_attention:
        attn = load_runner(
            RuntimeConfig(model=model, device=args.device, dtype=dtype, quantization="fp8-attention")
        )
        rows.append(compare("fp8-attention", generate(attn, cached=False), base, examples))

    print(f"# {model or 'bundled model'} on {args.device} ({dtype}): {args.count} held-out prompts, "
          f"{size}x{size}, {steps} steps; step cache {cache}")  # fmt: skip
    print_table(rows, len(examples))
    if args.json:
        meta = dict(model=model, device=args.device, dtype=dtype, count=args.count, size=size, steps=steps)
        Path(args.json).write_text(json.dumps(dict(meta, rows=rows), indent=1) + "\n")
    if args.record:
        path = args.results or results_file(args.tiny, "fp8_quality", RESULTS)
        for r in rows:
            record(
                f"fp8_quality_{'tiny' if args.tiny else 'bundled'}_{args.device}",
                r["setting"],
                1e3 * r["denoise_s"] / args.count,  # denoising ms per generation (shared CPU: indicative)
                path=path,
                model=model or "bundled",
                dtype=dtype,
                prompts=args.count,
                size=size,
                steps=steps,
                step_cache_threshold=cache.threshold,
                reused=round(r["reused"], 4),
                **{
                    k: None if math.isinf(r[k]) else round(r[k], 2)
                    for k in ("psnr", "psnr_median", "psnr_min")
                },
                under_30db=r["under_30db"],
                judge={k: round(v, 2) for k, v in r["judge"].items()},
            )
        print(f"\nappended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
