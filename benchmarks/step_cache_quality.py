"""Step caching's quality on the bundled (trained) model: cached against uncached output, same prompts and
seeds, through diffserve's own runner.

For each threshold (and each --forced reuse fraction), over --count held-out prompts (diffserve.bundled.data,
the "heldout" split: (colour, shape) pairs never seen in training):
  * PSNR of the cached pictures against the uncached ones (uint8 pixels): pooled (from the mean squared
    error over all pictures: the figure the threshold is chosen on), the median picture's, the worst
    picture's, and how many pictures fall under 30 dB;
  * the fraction of DiT forwards reused (GenerationResult.dit_forwards: cached / (computed + cached));
  * the pixel judge's accuracy (diffserve.bundled.judge via evaluate.score) with and without caching, in
    percent: colour, shape, and the mean over every attribute the captions state;
  * the denoising loop's time (CPU, shared cores: indicative only; speed is measured on the GPU).

    python benchmarks/step_cache_quality.py [--count 32] [--thresholds 0.1 0.15 0.2] [--forced 0.25 0.5]
        [--steps N] [--size N] [--warmup-steps 6] [--last-steps 1] [--max-skips 2] [--head-blocks 1]
        [--json out.json]     (policy options left out: StepCacheConfig's defaults)
    python benchmarks/step_cache_quality.py --tiny   # the tiny random FLUX model: checks this script only
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def mse(a, b) -> float:
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(np.mean(diff**2))


def psnr(mse_value: float) -> float:
    """PSNR in dB of 8-bit pictures with this mean squared error (inf when identical)."""
    return math.inf if mse_value == 0 else 10 * math.log10(255.0**2 / mse_value)


def run(runner, examples, seeds, size: int, steps: int, threshold: float) -> dict:
    from diffserve.runtime.api import GenerationRequest

    images, computed, cached, denoise = [], 0, 0, 0.0
    for example, seed in zip(examples, seeds, strict=True):
        req = GenerationRequest(
            prompt=example.caption,
            width=size,
            height=size,
            num_inference_steps=steps,
            seed=seed,
            extra={"step_cache_threshold": threshold},
        )
        result = runner.generate(req)
        images.append(result.images[0])
        computed += result.dit_forwards["computed"]
        cached += result.dit_forwards["cached"]
        denoise += result.timings["denoise"]
    return dict(images=images, computed=computed, cached=cached, denoise_s=denoise)


def judge_scores(examples, images) -> dict:
    from diffserve.bundled.evaluate import score

    accuracy = score(examples, images)["accuracy"]
    return {
        "colour": 100 * accuracy["colour"],
        "shape": 100 * accuracy["shape"],
        "all": 100 * statistics.fmean(accuracy.values()),
    }


def compare(setting: str, got: dict, base: dict, examples) -> dict:
    """One table row: `got` (run()'s result) against the uncached `base` over the same prompts and seeds."""
    errors = [mse(a, b) for a, b in zip(got["images"], base["images"], strict=True)]
    psnrs = [psnr(e) for e in errors]
    return dict(
        setting=setting,
        reused=got["cached"] / (got["computed"] + got["cached"]),
        psnr=psnr(statistics.fmean(errors)),
        psnr_median=statistics.median(psnrs),
        psnr_min=min(psnrs),
        under_30db=sum(p < 30 for p in psnrs),
        judge=judge_scores(examples, got["images"]),
        denoise_s=got["denoise_s"],
    )


def print_table(rows: list[dict], count: int) -> None:
    print("| setting | reused | PSNR pooled / median / min (dB) | < 30 dB | judge colour / shape / all (%) "
          "| denoise s |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in rows:
        j = r["judge"]
        print(
            f"| {r['setting']} | {r['reused']:.1%} | {r['psnr']:.1f} / {r['psnr_median']:.1f} / "
            f"{r['psnr_min']:.1f} | {r['under_30db']}/{count} | "
            f"{j['colour']:.1f} / {j['shape']:.1f} / {j['all']:.1f} | {r['denoise_s']:.1f} |"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="default: the bundled model")
    p.add_argument("--tiny", action="store_true", help="the tiny random FLUX model (checks the script)")
    p.add_argument("--count", type=int, default=32)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--thresholds", type=float, nargs="*", default=[0.05, 0.1, 0.15, 0.2, 0.3])
    p.add_argument(
        "--forced", type=float, nargs="*", default=[], help="forced reuse fractions, e.g. 0.25 0.5"
    )
    p.add_argument("--steps", type=int, help="default: the model's")
    p.add_argument("--size", type=int, help="default: the model's")
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--last-steps", type=int, default=None)
    p.add_argument("--max-skips", type=int, default=None)
    p.add_argument("--head-blocks", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the table here")
    args = p.parse_args(argv)

    from diffserve.bundled import data
    from diffserve.runtime.runner import load_runner
    from diffserve.runtime.step_cache import StepCacheConfig

    torch.manual_seed(0)
    model = args.model
    if args.tiny:
        from diffserve.testing import make_tiny_model

        model = str(make_tiny_model("flux", Path(tempfile.mkdtemp()) / "model"))
    runner = load_runner(model, device=args.device, dtype="float32")
    size = args.size or (64 if args.tiny else runner.defaults["width"])
    steps = args.steps or runner.defaults["num_inference_steps"]
    policy = {
        k: v
        for k, v in dict(
            warmup_steps=args.warmup_steps,
            last_steps_computed=args.last_steps,
            max_consecutive_skips=args.max_skips,
            head_blocks=args.head_blocks,
        ).items()
        if v is not None
    }
    examples = data.make_examples(args.seed, args.count, "heldout")
    seeds = [args.seed + i for i in range(args.count)]

    pipeline = runner.pipeline
    pipeline.step_cache = None
    base = run(runner, examples, seeds, size, steps, 0.0)
    base_judge = judge_scores(examples, base["images"])
    rows = [dict(setting="uncached", reused=0.0, psnr=math.inf, psnr_median=math.inf, psnr_min=math.inf,
                 under_30db=0, judge=base_judge, denoise_s=base["denoise_s"])]  # fmt: skip
    settings = [(f"threshold {t:g}", StepCacheConfig(threshold=t, **policy), t) for t in args.thresholds]
    settings += [
        (f"forced {f:.0%}", StepCacheConfig.forced_fraction(steps, f, **policy), StepCacheConfig().threshold)
        for f in args.forced
    ]
    for name, config, threshold in settings:
        pipeline.step_cache = config
        rows.append(compare(name, run(runner, examples, seeds, size, steps, threshold), base, examples))
    pipeline.step_cache = None

    print(f"# {model or 'bundled model'}: {args.count} held-out prompts, {size}x{size}, {steps} steps, "
          f"policy {policy or 'StepCacheConfig defaults'}")  # fmt: skip
    print_table(rows, len(examples))
    if args.json:
        meta = dict(model=model, count=args.count, size=size, steps=steps, policy=policy)
        Path(args.json).write_text(json.dumps(dict(meta, rows=rows), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
