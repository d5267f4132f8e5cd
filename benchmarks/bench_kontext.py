"""FLUX.1 Kontext DiT forward, ours vs diffusers eager, one run, same random weights (issue 18's target:
>= 1.5x diffusers at 1024^2: 4,096 generated + 4,096 reference image tokens + 512 text tokens).

The Kontext forward is FLUX.1-dev's over a longer image stream: the reference image's latent tokens follow
the generated ones, with position ids (1, row, col). Models, weights and FLOP rules: bench_dit.py's helpers.

Ours is timed as the pipelines run it, replayed as a CUDA graph (GraphedForward: "diffserve"), and eagerly
("diffserve-eager", what rows of this benchmark before 2026-12-04's second H200 session called "diffserve").

    python benchmarks/bench_kontext.py            # GPU: full size, bf16, rows in results.jsonl
    python benchmarks/bench_kontext.py --tiny     # CPU check of the script (tiny config, temporary file)
    python benchmarks/bench_kontext.py --profile --out-dir DIR   # also a kernel table of ours as served
    python benchmarks/bench_kontext.py --quantization fp8-attention   # also ours quantised: "diffserve+fp8-attention"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dit import build_pair  # noqa: E402
from dit_specs import FULL, TINY, flux_flops, make_inputs  # noqa: E402
from harness import bench_device, rel_err, results_file, time_ms  # noqa: E402
from record import RESULTS, record  # noqa: E402


def kontext_inputs(config: dict, shape: dict, device, dtype):
    """FLUX inputs with the reference's tokens appended: a same-size reference (a square input resized to
    1024x1024 by FluxKontextPipeline), ids (1, row, col)."""
    inputs, n_img, n_txt, _ = make_inputs("flux", config, shape, 1, device, dtype)
    ref_ids = inputs["img_ids"].clone()
    ref_ids[:, 0] = 1
    gen = torch.Generator(device=device).manual_seed(2)
    reference = torch.randn(inputs["hidden_states"].shape, device=device, dtype=dtype, generator=gen)
    inputs["hidden_states"] = torch.cat([inputs["hidden_states"], reference], dim=1)
    inputs["img_ids"] = torch.cat([inputs["img_ids"], ref_ids])
    return inputs, 2 * n_img, n_txt, flux_flops(config, 1, 2 * n_img, n_txt)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny config on the CPU (checks the script)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--quantization", choices=("fp8", "fp8-attention"), help="also ours quantised")
    p.add_argument("--profile", action="store_true", help="kernel table of ours as served (GPU)")
    p.add_argument("--out-dir", type=Path, default=Path("."), help="where --profile writes")
    args = p.parse_args(argv)
    device = bench_device(args.tiny, "bench_kontext")
    if device is None:
        return 1
    dtype = torch.float32 if args.tiny else torch.bfloat16
    spec = (TINY if args.tiny else FULL)["flux"]
    shape = dict(spec["shape"], height=1024, width=1024) if not args.tiny else spec["shape"]
    label = f"FLUX.1 Kontext {shape['width']}x{shape['height']} + reference" + (
        " (tiny)" if args.tiny else ""
    )
    benchmark = "flux_kontext_1024x1024" if not args.tiny else "flux_kontext_tiny"
    out_file = results_file(args.tiny, "bench_kontext", args.results)
    ref, ours = build_pair("flux", spec["config"], device, dtype)
    ours.fuse_projections()
    inputs, n_img, n_txt, flops = kontext_inputs(spec["config"], shape, device, dtype)
    from diffserve.runtime.cuda_graphs import GraphedForward
    from diffserve.runtime.loader import quantize_dit

    rows = []
    with torch.inference_mode():
        for impl, model in (
            ("diffusers", ref),
            ("diffserve-eager", ours),
            ("diffserve", GraphedForward(ours)),
        ):
            ms, warm_s, out = time_ms(
                lambda m=model: m(**inputs, return_dict=False)[0], device, args.warmup, args.iters
            )
            rows.append((impl, ms, out))
            print(f"{label}: {impl} {ms:.2f} ms ({flops / ms / 1e9:.1f} TFLOP/s), warm-up {warm_s:.1f} s")
        if args.profile and device.type == "cuda":
            from profile_kernels import profile_forward

            profile_forward(
                lambda m=model: m(**inputs, return_dict=False)[0],
                args.out_dir / "profile_flux_kontext_diffserve.txt",
                title=f"{label} diffserve (CUDA graph), {flops / 1e12:.4g} TFLOP/forward",
            )
        if args.quantization:
            del model  # its graphs read the bf16 layers that quantisation replaces
            quantize_dit(ours, args.quantization, "flux", device)
            model = GraphedForward(ours)
            impl = f"diffserve+{args.quantization}"
            ms, warm_s, out = time_ms(
                lambda: model(**inputs, return_dict=False)[0], device, args.warmup, args.iters
            )
            rows.append((impl, ms, out))
            print(f"{label}: {impl} {ms:.2f} ms ({flops / ms / 1e9:.1f} TFLOP/s), warm-up {warm_s:.1f} s")
    (_, ref_ms, ref_out), *ours_rows = rows
    for impl, ms, out in rows:
        err = rel_err(out, ref_out)
        record(
            benchmark, impl, ms, flops / ms / 1e9, path=out_file, image_tokens=n_img, text_tokens=n_txt,
            dtype=str(dtype).replace("torch.", ""), **({"rel_err": round(err, 6)} if impl != "diffusers" else {}),
            quantization=impl.partition("+")[2] or None,
        )  # fmt: skip
    for impl, ms, out in ours_rows:
        print(f"{impl}: speedup {ref_ms / ms:.2f}x, rel err {rel_err(out, ref_out):.2e}")
    print(f"rows in {out_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
