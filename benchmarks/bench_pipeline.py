"""Denoising-step time of a whole pipeline, ours vs diffusers', side by side in one process, same weights.

Models (random weights, bf16, full size; tokenizers are diffserve.testing's tiny offline ones, so the
prompt token ids differ from the real tokenizers' but the sequence lengths do not):
  flux: FLUX.1-dev — 12B DiT, CLIP-L, T5-XXL encoder, 16-channel AutoencoderKL — at 1024x1024, 28-step
        schedule shape, guidance 3.5 (one DiT forward per step).
  wan:  Wan2.1-T2V-1.3B — 1.3B DiT, UMT5-XXL encoder, AutoencoderKLWan — at 480x832, 81 frames, guidance
        5.0 (classifier-free guidance: two DiT forwards per step).
Every component is built directly on the GPU in bf16 and initialised there (seconds, no download, no
disk). Our pipeline (diffserve.runtime.pipelines) and diffusers' FluxPipeline/WanPipeline share the text
encoders, VAE and scheduler config; our native DiT takes the diffusers DiT's tensors (load_state_dict
with assign=True), so memory holds one copy of the weights.

Ours runs as the server runs it: projections fused (as loader.load_dit does) and the DiT forward through
CUDA graphs (diffserve.runtime.cuda_graphs; DIFFSERVE_CUDA_GRAPHS=0 turns them off).

Per-step figure (default): ms per denoising step = median of the intervals between consecutive
end-of-step callbacks over --steps steps (default 4), after one untimed warm-up generation per pipeline.
Ours reports a step when the GPU has finished it (stages.StepPacer: an event per step, the host one step
ahead); diffusers' callback_on_step_end is called when the host has queued a step, so its callback
synchronises the GPU. A step is the DiT forward(s), guidance and the scheduler step. Ours also reports
its text-encoding and VAE-decode times.

End-to-end figure (--end-to-end): wall time of a whole generation, text encoding + denoising + VAE decode
+ PIL images, the median of --runs (>= 3) timed generations after one untimed warm-up generation per
pipeline, ours vs diffusers' pipeline on the same components and the same request (FLUX: 1024x1024,
guidance 3.5, --steps default 28, the pipelines' default); the ratio is diffusers' time / ours.

--quantization fp8 (issue 17): our DiT with the default FP8 selection (runtime/layers/fp8.quantize_linears,
after fusing, as `--quantization fp8` loads it); diffusers' pipeline stays bf16.
--step-cache-force F [F ...] (with --end-to-end): ours timed once per forced reuse fraction F
(StepCacheConfig.forced_fraction: round(F x steps) steps reuse the cached tail, spread evenly): random
weights make the cache's own decision meaningless, so speed is measured at fixed fractions (0 runs the
cache's head/tail split with nothing reused). Each row records the DiT forwards computed and reused.

    python benchmarks/bench_pipeline.py [--family flux wan] [--steps 4]
    python benchmarks/bench_pipeline.py --end-to-end --family flux --steps 28
    python benchmarks/bench_pipeline.py --end-to-end --family flux --steps 28 --quantization fp8 \
        --step-cache-force 0 0.25 0.5
    python benchmarks/bench_pipeline.py --tiny [--end-to-end]   # CPU, tiny models: checks this script

Each figure is appended to benchmarks/results.jsonl (benchmarks/record.py); --tiny writes to a temporary
file instead, so CPU figures never mix with GPU results.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import bench_device, results_file, synchronize  # noqa: E402
from pipeline_specs import full_reference, ours_from, tiny_reference  # noqa: E402
from record import RESULTS, blas_workspace, record  # noqa: E402

# fmt: off
REQUESTS = {  # what each family is timed at: diffusers' defaults for these models
    "flux": dict(full=dict(width=1024, height=1024, guidance_scale=3.5), label="FLUX.1-dev 1024x1024",
                 tiny=dict(width=128, height=128, guidance_scale=3.5)),
    "wan": dict(full=dict(width=832, height=480, num_frames=81, guidance_scale=5.0),
                label="Wan2.1-1.3B 480x832x81", tiny=dict(width=64, height=64, num_frames=9, guidance_scale=5.0)),
}
# fmt: on
PROMPT = "a red fox running through fresh snow at dawn, cinematic lighting"


def graphed(pipeline) -> list:
    """Our pipeline's GraphedForward wrappers (FLUX: dit; Wan: dits, one per expert)."""
    return list(getattr(pipeline, "dits", None) or [pipeline.dit])


def step_intervals(run, device: torch.device, sync: bool) -> tuple[list[float], object]:
    """run(tick) generates and calls tick() after every step; returns (ms between consecutive ticks, what
    run returned). sync: each tick first waits for the GPU (for a callback that runs when a step is queued)."""
    stamps: list[float] = []

    def tick():
        if sync:
            synchronize(device)
        stamps.append(time.perf_counter())

    out = run(tick)
    return [(b - a) * 1e3 for a, b in zip(stamps[:-1], stamps[1:], strict=True)], out


def build(family: str, args, device: torch.device, dtype: torch.dtype):
    """(label, request fields, diffusers' pipeline, ours) for a family."""
    spec = REQUESTS[family]
    shape = spec["tiny" if args.tiny else "full"]
    size = f"{shape['width']}x{shape['height']}" + (
        f"x{shape['num_frames']}" if "num_frames" in shape else ""
    )
    label = f"tiny {family} {size}" if args.tiny else spec["label"]
    t0 = time.perf_counter()
    reference = tiny_reference(family, device) if args.tiny else full_reference(family, device, dtype)
    reference.set_progress_bar_config(disable=True)
    ours = ours_from(reference, family, device)
    if args.quantization == "fp8":
        from diffserve.runtime.layers.fp8 import quantize_linears

        # In place, after ours_from fused the projections (as loader.load_dit). ours' unquantised weights
        # stay alive in diffusers' DiT, which shares them.
        for dit in {id(d): d for d in (ours.transformer, getattr(ours, "transformer_2", None)) if d}.values():
            stats = quantize_linears(dit)
            print(f"  fp8: {stats['count']} GEMMs quantised ({stats['bytes_before'] / 1e9:.2f} -> "
                  f"{stats['bytes_after'] / 1e9:.2f} GB of their weights)", flush=True)  # fmt: skip
    synchronize(device)
    print(f"\n{label}: built in {time.perf_counter() - t0:.1f} s", flush=True)
    return label, shape, reference, ours


def runners(reference, ours, shape: dict):
    """run(steps, tick=None) for ours and for diffusers, the same request (prompt, size, guidance, seed)."""
    from diffserve.runtime.api import GenerationRequest

    def run_ours(steps: int, tick=None):
        req = GenerationRequest(PROMPT, num_inference_steps=steps, seed=0, **shape)
        return ours(req, on_step=None if tick is None else (lambda done, total: tick()))

    def run_diffusers(steps: int, tick=None):
        def callback(pipe, i, t, tensors):
            if tick is not None:
                tick()
            return tensors

        return reference(
            PROMPT,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            callback_on_step_end=callback,
            output_type="pil",
            **shape,
        )

    return (("diffserve", run_ours), ("diffusers", run_diffusers))


def ours_impl(args, fraction: float | None = None) -> str:
    """The row's impl: "diffserve", with "+fp8" and "+reuse25%" (a forced reuse fraction) as they apply."""
    impl = "diffserve" + ("+fp8" if args.quantization else "")
    return impl if fraction is None else f"{impl}+reuse{fraction:.0%}"


def run_family(family: str, args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    from diffserve.runtime.layers.attention import get_attention_backend

    label, shape, reference, ours = build(family, args, device, dtype)
    rows = []
    for impl, run in runners(reference, ours, shape):
        impl = ours_impl(args) if impl == "diffserve" else impl
        t = time.perf_counter()
        run(2)  # warm-up: kernels, cuBLAS heuristics, attention backend resolution, graph capture
        synchronize(device)
        warmup_s = time.perf_counter() - t
        # Ours reports a step once the GPU finished it; diffusers' callback needs a sync to mean that.
        sync = impl == "diffusers" or device.type != "cuda"
        ms, result = step_intervals(lambda tick, run=run: run(args.steps, tick), device, sync)
        extra = {}
        if impl.startswith("diffserve"):
            timings = result.timings
            extra = {
                "encode_text_ms": round(timings["encode_text"] * 1e3, 2),
                "decode_ms": round(timings["decode"] * 1e3, 2),
                "attention": get_attention_backend(128, dtype).__name__,
                "cuda_graphs": any(g.replays for g in graphed(ours)),
                "fused_projections": True,
                "quantization": args.quantization,
            }
        row = dict(
            model=label, impl=impl, ms=statistics.median(ms), steps=args.steps, warmup_s=warmup_s, **extra
        )
        rows.append(row)
        print(
            f"  {impl:9s}: {row['ms']:.2f} ms/step (intervals {', '.join(f'{v:.1f}' for v in ms)}), "
            f"warm-up {warmup_s:.1f} s {extra or ''}",
            flush=True,
        )
        if args.record:
            record(
                f"pipeline step: {label}",
                impl,
                row["ms"],
                path=args.results,
                steps=args.steps,
                dtype=str(dtype).replace("torch.", ""),
                **{k: v for k, v in row.items() if k in extra},
            )
    return rows


def end_to_end(family: str, args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Whole generations, ours vs diffusers: median wall time of args.runs after one warm-up each."""
    from diffserve.runtime.layers.attention import get_attention_backend
    from diffserve.runtime.step_cache import StepCacheConfig

    label, shape, reference, ours = build(family, args, device, dtype)
    steps = args.steps or ours.defaults["num_inference_steps"]
    (_, run_ours), (_, run_diffusers) = runners(reference, ours, shape)
    # ours once per forced reuse fraction (None: the pipeline as configured, no step cache), then diffusers
    entries = [(ours_impl(args, f), run_ours, f) for f in (args.step_cache_force or [None])]
    entries.append(("diffusers", run_diffusers, None))
    rows = []
    for impl, run, fraction in entries:
        is_ours = impl.startswith("diffserve")
        if is_ours:
            ours.step_cache = None if fraction is None else StepCacheConfig.forced_fraction(steps, fraction)
        t = time.perf_counter()
        run(steps)  # warm-up: the same request (graphs are captured for its shapes here)
        synchronize(device)
        warmup_s = time.perf_counter() - t
        seconds, stages = [], []
        for _ in range(args.runs):
            synchronize(device)
            t = time.perf_counter()
            result = run(steps)  # PIL images out: the decode's copy to the CPU waits for the GPU
            synchronize(device)
            seconds.append(time.perf_counter() - t)
            if is_ours:
                stages.append(result.timings)
        row = dict(
            model=label,
            impl=impl,
            s=statistics.median(seconds),
            runs_s=[round(v, 4) for v in seconds],
            warmup_s=round(warmup_s, 2),
        )
        if is_ours:
            for stage in ("encode_text", "denoise", "decode"):
                row[f"{stage}_ms"] = round(statistics.median(t[stage] for t in stages) * 1e3, 2)
            row["attention"] = get_attention_backend(128, dtype).__name__
            row["cuda_graphs"] = any(g.replays for g in graphed(ours))
            row["quantization"] = args.quantization
            row["step_cache_forced"] = fraction
            row["dit_forwards"] = dict(result.dit_forwards)  # the last run's: the same every run
        rows.append(row)
        print(
            f"  {impl:9s}: {row['s']:.3f} s per generation ({steps} steps; runs "
            f"{', '.join(f'{v:.3f}' for v in seconds)}), warm-up {warmup_s:.1f} s"
            + (f", DiT forwards {row['dit_forwards']}" if is_ours else ""),
            flush=True,
        )
    ours.step_cache = None
    diffusers_s = rows[-1]["s"]
    for row in rows:  # diffusers / ours: > 1 means ours is faster (diffusers' row: against the first ours)
        ratio = diffusers_s / (row["s"] if row["impl"] != "diffusers" else rows[0]["s"])
        if row["impl"] != "diffusers":
            print(f"  diffusers / {row['impl']}: {ratio:.2f}x", flush=True)
        row.update(steps=steps, diffusers_over_ours=round(ratio, 3))
        if args.record:
            record(
                f"pipeline_{family}_{'tiny_' if args.tiny else ''}end_to_end",
                row["impl"],
                row["s"] * 1e3,
                path=args.results,
                dtype=str(dtype).replace("torch.", ""),
                **shape,
                **{k: v for k, v in row.items() if k not in ("impl", "s")},
            )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | impl | ms / denoising step | vs diffusers |", "|---|---|---:|---:|"]
    base = {r["model"]: r["ms"] for r in rows if r["impl"] == "diffusers"}
    for r in rows:
        ratio = f"{base[r['model']] / r['ms']:.2f}x" if r["model"] in base else ""
        lines.append(f"| {r['model']} | {r['impl']} | {r['ms']:.2f} | {ratio} |")
    return "\n".join(lines)


def markdown_end_to_end(rows: list[dict]) -> str:
    """Seconds per generation; ours' stage split (medians over the runs); diffusers' time / ours."""
    lines = [
        "| model | impl | steps | s / generation (median) | text encoding ms | denoising ms | VAE decode ms "
        "| CUDA graphs | diffusers / ours |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        ours = r["impl"].startswith("diffserve")
        stages = " | ".join(
            f"{r[k]:.1f}" if ours else "" for k in ("encode_text_ms", "denoise_ms", "decode_ms")
        )
        graphs = ("yes" if r["cuda_graphs"] else "no") if ours else ""
        ratio = f"{r['diffusers_over_ours']:.2f}x" if ours else ""
        lines.append(
            f"| {r['model']} | {r['impl']} | {r['steps']} | {r['s']:.3f} | {stages} | {graphs} | {ratio} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", nargs="+", choices=("flux", "wan"), default=["flux", "wan"])
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps (per-step mode: default 4, the median of steps-1 intervals is reported; "
        "--end-to-end: default the pipeline's own, 28 for FLUX.1-dev, 50 for Wan)",
    )
    p.add_argument(
        "--end-to-end", action="store_true", help="time whole generations (text, denoising, decode, PIL)"
    )
    p.add_argument("--runs", type=int, default=3, help="--end-to-end: timed generations (median; at least 3)")
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default=None,
        help="default bfloat16 on the GPU, float32 with --tiny",
    )
    p.add_argument(
        "--quantization", choices=("fp8",), default=None, help="our DiT in FP8 (as --quantization fp8)"
    )
    p.add_argument(
        "--step-cache-force",
        type=float,
        nargs="+",
        default=None,
        metavar="FRACTION",
        help="--end-to-end: time ours at each forced step-cache reuse fraction in [0, 1), e.g. 0 0.25 0.5",
    )
    p.add_argument("--tiny", action="store_true", help="CPU, tiny models: an end-to-end check of the script")
    p.add_argument("--no-record", dest="record", action="store_false", help="do not append to results")
    p.add_argument(
        "--results",
        type=Path,
        default=None,
        help=f"results file (default {RESULTS}; with --tiny a file in the temp dir)",
    )
    args = p.parse_args(argv)
    if args.step_cache_force is not None:
        if not args.end_to_end:
            p.error("--step-cache-force needs --end-to-end")
        bad = [f for f in args.step_cache_force if not 0.0 <= f < 1.0]
        if bad:
            p.error(f"--step-cache-force fractions must be in [0, 1), got {bad}")
    if args.end_to_end:
        if args.runs < 3:
            p.error("--runs must be at least 3 (the median of fewer is not a figure)")
        if args.steps is not None and args.steps < 1:
            p.error("--steps must be at least 1")
    else:
        args.steps = 4 if args.steps is None else args.steps
        if args.steps < 3:
            p.error("--steps must be at least 3 (two intervals between end-of-step callbacks)")
    if args.results is None:
        args.results = results_file(args.tiny, "bench_pipeline", RESULTS)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = bench_device(args.tiny, "bench_pipeline.py")
    if device is None:
        return 2
    dtype = getattr(torch, args.dtype or ("float32" if args.tiny else "bfloat16"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {dtype}, cuBLAS workspace: {blas_workspace()}")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    rows = []
    for family in args.family:
        rows += (end_to_end if args.end_to_end else run_family)(family, args, device, dtype)
        gc.collect()  # the family's models went out of scope: free them before building the next
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print((markdown_end_to_end if args.end_to_end else markdown)(rows))
    if args.record:
        print(f"\nappended {len(rows)} rows to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
