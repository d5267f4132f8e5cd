"""Qwen-Image DiT on the GPU, ours against diffusers' QwenImageTransformer2DModel with the same random
full-size weights (60 blocks, 3,072 wide; bf16), in one run:

  * one forward at 1024^2 (4,096 image + 128 text tokens) and 1328^2 (6,889 + 128): diffusers eager, ours
    eager, ours as a CUDA graph (what the pipeline runs);
  * the denoising loop of a 1024^2 generation, 50 steps with true CFG (two forwards a step, the
    renormalised combination, Euler flow-matching steps): ours (graphs, the adaLN schedule up front) and
    diffusers' loop body.

  * --quantization fp8: also the forward with our DiT in FP8 (layers/fp8.quantize_linears' default
    selection after fusing, as `--quantization fp8` loads it), after the bf16 rows;
  * --end-to-end (instead of the above): whole generations at 1024^2, 50 steps, true CFG (a negative
    prompt, true_cfg_scale 4): Qwen2.5-VL-7B text encoder (full config, random weights) + the 20B DiT +
    the Qwen-Image VAE decode to PIL, diffusers' QwenImagePipeline and ours on the very same components
    (our DiT shares diffusers' tensors), built on the GPU. Median of --runs after one warm-up each: ours
    bf16, diffusers, then ours with FP8 at each --step-cache-force fraction (forced reuse: random weights
    make the cache's own decision meaningless). The tokenizer is diffserve.testing's tiny offline one:
    prompt ids differ from the real tokenizer's.

    python benchmarks/bench_qwen_image.py [--quantization fp8]   # GPU; rows to benchmarks/results.jsonl
    python benchmarks/bench_qwen_image.py --end-to-end --step-cache-force 0 0.5
    python benchmarks/bench_qwen_image.py --tiny [--end-to-end]  # CPU check, tiny config (a temporary file)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import bench_device, free, init_weights_, native_twin, rel_err, results_file, time_ms  # noqa: E402
from record import RESULTS, record  # noqa: E402

FULL = dict(num_layers=60, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584)
TINY = dict(
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    axes_dims_rope=(4, 6, 6),
)


def tflop(cfg: dict, img: int, txt: int) -> float:
    """Per-token matmul FLOPs (q|k|v, out, 4x MLP: 12 d^2 per stream token, x2 for multiply-add) plus
    4 L^2 d attention, per block; embeddings and adaLN are small and left out."""
    d = cfg["attention_head_dim"] * cfg["num_attention_heads"]
    tokens = img + txt
    return cfg["num_layers"] * (2 * 12 * d * d * tokens + 4 * tokens * tokens * d) / 1e12


def inputs(cfg: dict, side: int, txt: int, device, dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = w = side // 16
    return dict(
        hidden_states=torch.randn(1, h * w, 64, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(1, txt, cfg["joint_attention_dim"], generator=g).to(device, dtype),
        timestep=torch.tensor([0.5], device=device, dtype=dtype),
        img_shapes=((1, h, w),),
    )


def _out_file(args) -> Path:
    """--results; under --tiny without one, a temporary file (CPU figures never mix with GPU results)."""
    return results_file(args.tiny and args.results == RESULTS, "bench_qwen_image", args.results)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny config on the CPU (checks the script)")
    ap.add_argument("--sizes", default="1024,1328", help="square sides for the forward (default 1024,1328)")
    ap.add_argument("--txt", type=int, default=128, help="text tokens (default 128)")
    ap.add_argument("--steps", type=int, default=50, help="denoising steps of the loop (default 50)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--quantization", choices=("fp8",), default=None, help="also time our DiT in FP8")
    ap.add_argument("--end-to-end", action="store_true", help="whole generations, ours vs diffusers")
    ap.add_argument("--runs", type=int, default=3, help="--end-to-end: timed generations (median)")
    ap.add_argument(
        "--step-cache-force",
        type=float,
        nargs="+",
        default=[0.0, 0.5],
        metavar="F",
        help="--end-to-end: ours in FP8 timed at each forced step-cache reuse fraction in [0, 1) "
        "(default 0 0.5; none: --step-cache-force with no value is refused, use --no-fp8-runs)",
    )
    ap.add_argument("--no-fp8-runs", action="store_true", help="--end-to-end: bf16 ours and diffusers only")
    args = ap.parse_args(argv)
    if any(not 0.0 <= f < 1.0 for f in args.step_cache_force):
        ap.error(f"--step-cache-force fractions must be in [0, 1), got {args.step_cache_force}")
    device = bench_device(args.tiny, "bench_qwen_image")
    if device is None:
        return 1
    if args.end_to_end:
        return end_to_end(args, device)
    import diffusers

    from diffserve.runtime.cuda_graphs import GraphedForward

    out_file = _out_file(args)
    cfg = TINY if args.tiny else FULL
    dtype = torch.float32 if args.tiny else torch.bfloat16
    sizes = [64, 96] if args.tiny else [int(s) for s in args.sizes.split(",")]
    steps = min(args.steps, 3) if args.tiny else args.steps
    from harness import on_device

    ref = on_device(
        device, dtype, lambda: diffusers.QwenImageTransformer2DModel(**cfg)
    )  # bf16 from the start
    init_weights_(ref)
    # built on the meta device and given diffusers' tensors (no CPU init of 20B parameters, one copy)
    ours = native_twin(ref, "qwen-image")
    ours.fuse_projections()
    graphed = GraphedForward(ours)
    rows = []
    # no device here: record() writes the GPU's name (or "cpu"), as every other bench row has it
    common = dict(dtype=str(dtype).replace("torch.", ""), txt_tokens=args.txt)
    with torch.inference_mode():
        for side in sizes:
            x = inputs(cfg, side, args.txt, device, dtype)
            ref_in = dict(x, img_shapes=[list(x["img_shapes"])])
            flop = tflop(cfg, x["hidden_states"].shape[1], args.txt)
            ms_ref, _, expected = time_ms(
                lambda ref_in=ref_in: ref(**ref_in, return_dict=False)[0], device, args.warmup, args.iters
            )
            for impl, fn in (("ours-eager", ours), ("ours-graph", graphed)):
                ms, _, got = time_ms(
                    lambda fn=fn, x=x: fn(**x, return_dict=False)[0], device, args.warmup, args.iters
                )
                rows.append(record("qwen_image_dit_forward", impl, ms, flop / (ms / 1e3), out_file, size=side,
                                   rel_err_vs_diffusers_eager=rel_err(got, expected), diffusers_ms=ms_ref, **common))  # fmt: skip
            rows.append(record("qwen_image_dit_forward", "diffusers-eager", ms_ref, flop / (ms_ref / 1e3), out_file,
                               size=side, **common))  # fmt: skip
            free(device)

        # The denoising loop at the first size: 2 forwards a step (true CFG), the renormalised combination.
        from diffusers import FlowMatchEulerDiscreteScheduler

        side = sizes[0]
        x = inputs(cfg, side, args.txt, device, dtype)
        neg = torch.randn_like(x["encoder_hidden_states"])

        def loop(forward, schedule):
            sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
            sched.set_timesteps(steps, device=device, mu=0.8)
            latents = x["hidden_states"].clone()
            for i, t in enumerate(sched.timesteps):
                step = dict(x, hidden_states=latents, timestep=t.expand(1).to(dtype) / 1000)
                cond = forward(step, x["encoder_hidden_states"], None if schedule is None else schedule[i])
                unc = forward(step, neg, None if schedule is None else schedule[i])
                comb = unc + 4.0 * (cond - unc)
                pred = comb * (cond.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
                latents = sched.step(pred, t, latents, return_dict=False)[0]
            return latents

        def ours_fw(step, states, adaln):
            return graphed(**dict(step, encoder_hidden_states=states, adaln=adaln), return_dict=False)[0]

        def ref_fw(step, states, adaln):
            step = dict(step, encoder_hidden_states=states, img_shapes=[list(step["img_shapes"])])
            return ref(**step, return_dict=False)[0]

        sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
        sched.set_timesteps(steps, device=device, mu=0.8)
        schedule = ours.adaln_schedule(sched.timesteps.to(dtype) / 1000, 1)
        ms_ours, _, got = time_ms(lambda: loop(ours_fw, schedule), device, 1, 1 if not args.tiny else 2)
        ms_ref, _, expected = time_ms(lambda: loop(ref_fw, None), device, 1, 1 if not args.tiny else 2)
        for impl, ms in (("ours-graph", ms_ours), ("diffusers-eager", ms_ref)):
            rows.append(record("qwen_image_denoise_true_cfg", impl, ms, None, out_file, size=side, steps=steps,
                               rel_err_vs_diffusers_eager=rel_err(got, expected), **common))  # fmt: skip
        if args.quantization == "fp8":
            from diffserve.runtime.layers.fp8 import quantize_linears

            stats = quantize_linears(ours)  # in place, after fusing (as loader.load_dit)
            print(f"fp8: {stats['count']} GEMMs quantised", flush=True)
            graphed = GraphedForward(ours)
            for side in sizes:
                x = inputs(cfg, side, args.txt, device, dtype)
                ref_in = dict(x, img_shapes=[list(x["img_shapes"])])
                flop = tflop(cfg, x["hidden_states"].shape[1], args.txt)
                expected = ref(**ref_in, return_dict=False)[0]
                ms, _, got = time_ms(
                    lambda x=x: graphed(**x, return_dict=False)[0], device, args.warmup, args.iters
                )
                rows.append(record("qwen_image_dit_forward", "ours-fp8-graph", ms, flop / (ms / 1e3), out_file,
                                   size=side, rel_err_vs_diffusers_eager=rel_err(got, expected),
                                   quantized_gemms=stats["count"], **common))  # fmt: skip
                free(device)
    for r in rows:
        print(
            f"{r['benchmark']:32s} {r['impl']:16s} {r.get('size')}^2 {r['ms']:10.2f} ms  tflops {r['tflops']}"
        )
    print(f"rows in {out_file}")
    return 0


# Qwen2.5-VL-7B-Instruct (Qwen-Image's text_encoder/config.json): the decoder and the vision tower.
TEXT_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
               rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
               tie_word_embeddings=False)  # fmt: skip
VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                 patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                 fullatt_block_indexes=[7, 15, 23, 31])  # fmt: skip
PROMPT = "a red fox running through fresh snow at dawn, cinematic lighting, highly detailed fur"
NEGATIVE = "blurry, low quality, distorted"


def full_pipeline(device: torch.device, dtype: torch.dtype):
    """diffusers' QwenImagePipeline at full size with random weights, every component built on the GPU."""
    import diffusers
    import transformers
    from harness import on_device
    from pipeline_specs import keep_fp32_like_diffusers

    from diffserve.testing.tiny_qwen import SPECIAL_TOKENS, make_tiny_qwen_pipeline, qwen_tokenizer

    tok = qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    te_config = transformers.Qwen2_5_VLConfig(
        text_config=dict(TEXT_7B, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=VISION_7B,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    dit = on_device(device, dtype, lambda: diffusers.QwenImageTransformer2DModel(**FULL))
    init_weights_(dit)
    keep_fp32_like_diffusers(dit)
    tiny = make_tiny_qwen_pipeline()  # for its scheduler config (Qwen-Image's) only
    return diffusers.QwenImagePipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(tiny.scheduler.config),
        vae=on_device(device, dtype, lambda: diffusers.AutoencoderKLQwenImage()),
        text_encoder=on_device(
            device, dtype, lambda: transformers.Qwen2_5_VLForConditionalGeneration(te_config)
        ),
        tokenizer=tok,
        transformer=dit,
    )


def end_to_end(args, device: torch.device) -> int:
    """Whole 1024^2 true-CFG generations: ours (bf16), diffusers, ours FP8 + forced step-cache reuse."""
    import statistics
    import time

    from harness import synchronize
    from pipeline_specs import ours_from

    from diffserve.runtime.api import GenerationRequest
    from diffserve.runtime.step_cache import StepCacheConfig

    out_file = _out_file(args)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    side = 64 if args.tiny else 1024
    steps = min(args.steps, 3) if args.tiny else args.steps
    t0 = time.perf_counter()
    if args.tiny:
        from diffserve.testing.tiny_qwen import make_tiny_qwen_pipeline

        torch.manual_seed(0)
        reference = make_tiny_qwen_pipeline().to(device)
    else:
        reference = full_pipeline(device, dtype)
    reference.set_progress_bar_config(disable=True)
    ours = ours_from(reference, "qwen-image", device)
    synchronize(device)
    build_s = time.perf_counter() - t0
    print(f"built in {build_s:.1f} s", flush=True)

    def run_ours():
        req = GenerationRequest(PROMPT, negative_prompt=NEGATIVE, width=side, height=side,
                                num_inference_steps=steps, seed=0, extra={"true_cfg_scale": 4.0})  # fmt: skip
        return ours(req)

    def run_diffusers():
        return reference(PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, width=side, height=side,
                         num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                         output_type="pil")  # fmt: skip

    entries = [("diffserve", run_ours, None, None), ("diffusers", run_diffusers, None, None)]
    if not args.no_fp8_runs:
        entries += [("diffserve+fp8", run_ours, "fp8", f) for f in args.step_cache_force]
    rows, quantized = [], None
    for impl, run, quant, fraction in entries:
        if quant == "fp8" and quantized is None:
            from diffserve.runtime.layers.fp8 import quantize_linears

            # a fresh pipeline of ours (its bf16 rows are done; its graphs go with it), quantised before its
            # first forward, as the loader does; diffusers' DiT keeps the bf16 tensors both fused from
            del ours
            free(device)
            ours = ours_from(reference, "qwen-image", device)
            quantized = quantize_linears(ours.transformer)["count"]
        is_ours = impl.startswith("diffserve")
        if fraction is not None:
            impl = f"{impl}+reuse{fraction:.0%}"
        if is_ours:
            ours.step_cache = None if fraction is None else StepCacheConfig.forced_fraction(steps, fraction)
        synchronize(device)
        t = time.perf_counter()
        run()  # warm-up (graph capture for these shapes)
        synchronize(device)
        warmup_s = time.perf_counter() - t
        seconds, stages, result = [], [], None
        for _ in range(args.runs):
            synchronize(device)
            t = time.perf_counter()
            result = run()  # PIL out: the decode's copy to the host waits for the GPU
            synchronize(device)
            seconds.append(time.perf_counter() - t)
            if is_ours:
                stages.append(result.timings)
        row = dict(impl=impl, s=statistics.median(seconds), runs_s=[round(v, 4) for v in seconds],
                   warmup_s=round(warmup_s, 2))  # fmt: skip
        if is_ours:
            for stage in ("encode_text", "denoise", "decode"):
                row[f"{stage}_ms"] = round(statistics.median(s[stage] for s in stages) * 1e3, 2)
            row.update(quantization=quant, quantized_gemms=quantized if quant else None,
                       step_cache_forced=fraction, dit_forwards=dict(result.dit_forwards))  # fmt: skip
        if device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        row["_pixels"] = np.asarray(result.images[0].convert("RGB"), dtype=np.float64)
        rows.append(row)
        print(f"  {impl:24s} {row['s']:.3f} s per generation (runs {row['runs_s']}), warm-up {warmup_s:.1f} s"
              + (f", DiT forwards {row['dit_forwards']}" if is_ours else ""), flush=True)  # fmt: skip
    ours.step_cache = None
    diffusers_s = next(r["s"] for r in rows if r["impl"] == "diffusers")
    diffusers_px = next(r["_pixels"] for r in rows if r["impl"] == "diffusers")
    for row in rows:
        # the same seed and request: the first image's mean |pixel difference| from diffusers' (0-255)
        row["pixels_mean_abs_diff_vs_diffusers"] = round(
            float(np.abs(row.pop("_pixels") - diffusers_px).mean()), 3
        )
        row["diffusers_over_ours"] = round(diffusers_s / row["s"], 3) if row["impl"] != "diffusers" else None
        record(
            "qwen_image_end_to_end",
            row.pop("impl"),
            row.pop("s") * 1e3,
            None,
            out_file,
            size=side,
            steps=steps,
            true_cfg_scale=4.0,
            dtype=str(dtype).replace("torch.", ""),
            build_s=round(build_s, 1),
            **row,
        )
    print(f"rows in {out_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
