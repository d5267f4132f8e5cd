"""Wan2.1-I2V-14B, one denoising step with classifier-free guidance (two DiT forwards: prompt and negative
prompt, the same latents and image context), ours vs diffusers eager, one run, same random bf16 weights
(issue 18's target: <= 4.5 s a step at 480x832x81; diffusers eager measured 3,199 ms a forward = 6.40 s).

Inputs as WanImageToVideoPipeline gives them at 480x832x81: latents (1, 36, 21, 60, 104) = 16 noise + 4 mask +
16 first-frame channels (32,760 video tokens after the 1x2x2 patch), 512 UMT5 text states, 257 CLIP ViT-H
states (width 1280). Ours runs as the server runs it: fused projections, our kernels and attention selection
(FA3 where it works), replayed as a CUDA graph (GraphedForward). diffusers runs eagerly with its default
attention (PyTorch SDPA) and, when the fa3-fwd wheel imports, again with its _flash_3 backend.

Memory: diffusers' model (~16.4B parameters, 32.8 GB bf16); ours shares its tensors except the fused
projections (q|k|v, text k|v, image k|v: ~14.7 GB more), plus activations: ~55-60 GB peak on the GPU.

--quantization fp8 | fp8-attention also times ours after quantising it in place as the loader does
(runtime/layers/fp8.quantize_linears; fp8-attention also switches the attention to FP8), row
"diffserve+<quantization>".

    python benchmarks/bench_wan_i2v.py            # GPU: full size, bf16, rows in results.jsonl
    python benchmarks/bench_wan_i2v.py --tiny     # CPU check of the script (tiny config, temporary file)
    python benchmarks/bench_wan_i2v.py --profile --out-dir DIR   # also a kernel table of ours' bf16 step
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dit import enable_diffusers_fa3  # noqa: E402
from dit_specs import _attn, _lin, wan_flops  # noqa: E402
from harness import (  # noqa: E402
    bench_device,
    free,
    init_weights_,
    native_twin,
    on_device,
    rel_err,
    results_file,
    time_ms,
)
from record import RESULTS, record  # noqa: E402

# fmt: off
FULL = dict(
    config=dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280, added_kv_proj_dim=5120,
                rope_max_seq_len=1024),
    shape=dict(height=480, width=832, frames=81, text_tokens=512, image_tokens=257),
    label="Wan2.1-I2V-14B 480x832x81",
)
TINY = dict(
    config=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=12,
                out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                image_dim=24, added_kv_proj_dim=32, rope_max_seq_len=64),
    shape=dict(height=64, width=64, frames=9, text_tokens=512, image_tokens=9),  # the DiT splits at 512
    label="tiny Wan I2V 64x64x9",
)
# fmt: on
GUIDANCE = 5.0  # WanImageToVideoPipeline's default


def i2v_flops(c: dict, n_vid: int, n_txt: int, n_img: int) -> int:
    """One forward (batch 1): the text-to-video count (dit_specs.wan_flops) plus the image context: its
    embedder (LayerNorm, image_dim -> image_dim -> width MLP) and, per block, its k|v projection and the
    video tokens' attention to it."""
    d = c["attention_head_dim"] * c["num_attention_heads"]
    per_block = _lin(n_img, c["added_kv_proj_dim"], 2 * d) + _attn(
        n_vid, n_img, c["attention_head_dim"], c["num_attention_heads"]
    )
    embed = _lin(n_img, c["image_dim"], c["image_dim"]) + _lin(n_img, c["image_dim"], d)
    return wan_flops(c, 1, n_vid, n_txt) + c["num_layers"] * per_block + embed


def step_inputs(config: dict, shape: dict, device, dtype):
    """(prompt branch, negative branch, video tokens): the forwards' keyword arguments of one CFG step."""
    gen = torch.Generator(device=device).manual_seed(1)

    def rand(*s):
        return torch.randn(*s, device=device, dtype=dtype, generator=gen)

    frames = (shape["frames"] - 1) // 4 + 1
    lh, lw = shape["height"] // 8, shape["width"] // 8
    latents = rand(1, config["in_channels"], frames, lh, lw)
    image = rand(1, shape["image_tokens"], config["image_dim"])
    common = dict(hidden_states=latents, timestep=torch.full((1,), 900.0, device=device),
                  encoder_hidden_states_image=image, return_dict=False)  # fmt: skip
    cond = dict(common, encoder_hidden_states=rand(1, shape["text_tokens"], config["text_dim"]))
    uncond = dict(common, encoder_hidden_states=rand(1, shape["text_tokens"], config["text_dim"]))
    return cond, uncond, frames * (lh // 2) * (lw // 2)


def cfg_step(model, cond: dict, uncond: dict) -> torch.Tensor:
    out, neg = model(**cond)[0], model(**uncond)[0]
    return neg + GUIDANCE * (out - neg)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny config on the CPU (checks the script)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--no-diffusers-fa3", action="store_true", help="skip diffusers with its _flash_3 backend")
    p.add_argument("--quantization", choices=("fp8", "fp8-attention"), help="also ours quantised")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--profile", action="store_true", help="kernel table of ours' bf16 CFG step (GPU)")
    p.add_argument("--out-dir", type=Path, default=Path("."), help="where --profile writes")
    args = p.parse_args(argv)
    device = bench_device(args.tiny, "bench_wan_i2v")
    if device is None:
        return 1
    import diffusers

    from diffserve.runtime.cuda_graphs import GraphedForward
    from diffserve.runtime.loader import quantize_dit

    dtype = torch.float32 if args.tiny else torch.bfloat16
    spec = TINY if args.tiny else FULL
    config, shape = spec["config"], spec["shape"]
    label = spec["label"] + ", one CFG step (2 forwards)"
    benchmark = "wan21_i2v_14b_480x832x81_cfg_step" if not args.tiny else "wan_i2v_tiny_cfg_step"
    out_file = results_file(args.tiny, "bench_wan_i2v", args.results)

    ref = on_device(device, dtype, lambda: diffusers.WanTransformer3DModel(**config))
    init_weights_(ref)
    ours = native_twin(ref, "wan")  # shares ref's tensors until fuse_projections
    cond, uncond, n_vid = step_inputs(config, shape, device, dtype)
    flops = 2 * i2v_flops(config, n_vid, shape["text_tokens"], shape["image_tokens"])

    variants = [("diffusers", "native")]
    if device.type == "cuda" and not args.no_diffusers_fa3:
        try:
            print(enable_diffusers_fa3())
            variants.append(("diffusers+fa3", "_flash_3"))
        except ImportError as e:
            print(f"diffusers+fa3 skipped: the fa3-fwd wheel does not import ({e})")
    rows = []
    with torch.inference_mode():
        for impl, backend in variants:
            ref.set_attention_backend(backend)
            rows.append(
                (impl, *time_ms(lambda: cfg_step(ref, cond, uncond), device, args.warmup, args.iters))
            )
        ref.set_attention_backend("native")
        ours.fuse_projections()  # as the loader does
        graphed = GraphedForward(ours)  # as the pipelines run it (the plain module off CUDA)
        rows.append(
            ("diffserve", *time_ms(lambda: cfg_step(graphed, cond, uncond), device, args.warmup, args.iters))
        )
        if args.profile and device.type == "cuda":
            from profile_kernels import profile_forward

            profile_forward(
                lambda: cfg_step(graphed, cond, uncond),
                args.out_dir / "profile_wan_i2v_diffserve.txt",
                title=f"{label} diffserve (CUDA graphs), {flops / 1e12:.4g} TFLOP/step",
                iters=2,
            )
        if args.quantization:
            del graphed  # its graphs read the bf16 layers that quantisation replaces
            quantize_dit(ours, args.quantization, "wan", device)
            graphed = GraphedForward(ours)
            step = time_ms(lambda: cfg_step(graphed, cond, uncond), device, args.warmup, args.iters)
            rows.append((f"diffserve+{args.quantization}", *step))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    ref_out, ref_ms = rows[0][3], rows[0][1]
    for impl, ms, warm_s, out in rows:
        err = rel_err(out, ref_out)
        print(
            f"{label}: {impl} {ms / 1e3:.3f} s a step ({flops / ms / 1e9:.1f} TFLOP/s), warm-up {warm_s:.1f} s, "
            f"{ref_ms / ms:.2f}x diffusers, rel err {err:.2e}"
        )
        record(
            benchmark, impl, ms, flops / ms / 1e9, path=out_file, video_tokens=n_vid,
            text_tokens=shape["text_tokens"], image_tokens=shape["image_tokens"], forwards=2,
            dtype=str(dtype).replace("torch.", ""), rel_err=round(err, 6),
            quantization=impl.partition("+")[2] if impl.startswith("diffserve+") else None,
            **({"peak_gib": round(peak, 1)} if peak is not None else {}),
        )  # fmt: skip
    if peak is not None:
        print(f"peak GPU memory allocated {peak:.1f} GiB")
    print(f"rows in {out_file}")
    free(device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
