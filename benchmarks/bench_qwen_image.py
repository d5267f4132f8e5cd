"""Qwen-Image DiT on the GPU, ours against diffusers' QwenImageTransformer2DModel with the same random
full-size weights (60 blocks, 3,072 wide; bf16), in one run:

  * one forward at 1024^2 (4,096 image + 128 text tokens) and 1328^2 (6,889 + 128): diffusers eager, ours
    eager, ours as a CUDA graph (what the pipeline runs);
  * the denoising loop of a 1024^2 generation, 50 steps with true CFG (two forwards a step, the
    renormalised combination, Euler flow-matching steps): ours (graphs, the adaLN schedule up front) and
    diffusers' loop body.

    python benchmarks/bench_qwen_image.py            # GPU; rows to benchmarks/results.jsonl
    python benchmarks/bench_qwen_image.py --tiny     # CPU check with a tiny config (a temporary file)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import bench_device, free, init_weights_, rel_err, results_file, time_ms  # noqa: E402
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny config on the CPU (checks the script)")
    ap.add_argument("--sizes", default="1024,1328", help="square sides for the forward (default 1024,1328)")
    ap.add_argument("--txt", type=int, default=128, help="text tokens (default 128)")
    ap.add_argument("--steps", type=int, default=50, help="denoising steps of the loop (default 50)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    device = bench_device(args.tiny, "bench_qwen_image")
    if device is None:
        return 1
    import diffusers

    from diffserve.runtime.cuda_graphs import GraphedForward
    from diffserve.runtime.models.qwen_image import QwenImageTransformer

    out_file = results_file(args.tiny, "bench_qwen_image", args.results)
    cfg = TINY if args.tiny else FULL
    dtype = torch.float32 if args.tiny else torch.bfloat16
    sizes = [64, 96] if args.tiny else [int(s) for s in args.sizes.split(",")]
    steps = min(args.steps, 3) if args.tiny else args.steps
    with torch.device(device):
        ref = diffusers.QwenImageTransformer2DModel(**cfg).to(dtype).eval()
    init_weights_(ref)
    ours = QwenImageTransformer.from_config(dict(ref.config)).to(device, dtype).eval()
    ours.load_state_dict(ref.state_dict())
    ours.fuse_projections()
    graphed = GraphedForward(ours)
    rows = []
    common = dict(device=str(device), dtype=str(dtype).replace("torch.", ""), txt_tokens=args.txt)
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
    for r in rows:
        print(
            f"{r['benchmark']:32s} {r['impl']:16s} {r.get('size')}^2 {r['ms']:10.2f} ms  tflops {r['tflops']}"
        )
    print(f"rows in {out_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
