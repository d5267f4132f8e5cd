"""VAE decodes, diffusers vs diffserve, same VAE and latents, one process:
  --family wan (default)  Wan2.1's AutoencoderKLWan, 81 frames at 480x832: vae.decode vs decode_wan_latents
                          (whole frames, and strips of the high-resolution part)
  --family flux           FLUX.1's AutoencoderKL, 1024x1024: vae.decode vs decode_kl_latents (fused
                          GroupNorm+SiLU Triton kernels, channels_last on CUDA); --tiles does not apply

Figures: ms per decode (median of --iters after one warm-up, CUDA events), peak GPU memory during the
decode (torch.cuda.max_memory_allocated after a reset; it includes the VAE's weights and the latents, ~0.5 GB
in bf16, so it is what the process needs), and the relative error of ours against diffusers' output.

--memory-report writes the largest allocations live at diffusers' peak (torch.cuda.memory history, with
the Python frames that made them) to --out-dir, to show what the peak is made of.

    python benchmarks/bench_vae.py [--family wan|flux] [--dtype bfloat16] [--tiles 1 2] [--memory-report]
    python benchmarks/bench_vae.py --tiny      # CPU, tiny VAE: checks this script end to end
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import rel_err  # noqa: E402
from record import RESULTS, record  # noqa: E402

FULL = dict(config=dict(), latents=(1, 16, 21, 60, 104), label="Wan2.1 VAE 480x832x81")  # diffusers' defaults
TINY = dict(
    config=dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
    latents=(1, 4, 3, 4, 12),
    label="tiny Wan VAE 32x96x9",
)


BENCHMARK = {"wan": "wan2.1_480x832x81", "flux": "flux1_1024x1024"}  # results.jsonl names
FLUX_LATENTS = dict(full=(1, 16, 128, 128), tiny=(1, 4, 8, 8))


def build_flux_vae(tiny: bool, device, dtype):
    """FLUX.1's AutoencoderKL (pipeline_specs.FLUX_VAE) or a tiny one, random weights."""
    import diffusers
    from harness import init_weights_, on_device
    from pipeline_specs import FLUX_VAE

    config = dict(FLUX_VAE)
    if tiny:
        config.update(block_out_channels=(16, 32), norm_num_groups=8, latent_channels=4)
        config.update(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    vae = on_device(device, dtype, lambda: diffusers.AutoencoderKL(**config))
    init_weights_(vae)
    return vae


def build_vae(config: dict, device, dtype):
    import diffusers

    with torch.device(device):
        vae = diffusers.AutoencoderKLWan(**config).to(dtype).eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():  # random weights that keep activations in range: N(0, 0.02) kernels, norms near 1
        for name, p in vae.named_parameters():
            if "gamma" in name or name.endswith("norm.weight"):
                p.normal_(1.0, 0.02, generator=gen)
            else:
                p.normal_(0.0, 0.02 if p.ndim > 1 else 0.01, generator=gen)
    return vae


def timed(fn, device, iters: int):
    """(median ms, peak GB, output) over iters calls after one warm-up."""
    out = fn()
    del out
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        out = fn()
        if device.type == "cuda":
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) < iters:
            del out
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak, out


def memory_report(fn, path: Path, top: int = 25) -> None:
    """The largest blocks allocated during one call of fn that were live at its peak, with their frames."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")
    try:
        out = fn()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    del out
    live: dict[int, tuple[int, list]] = {}
    current = best = 0
    at_peak: dict[int, tuple[int, list]] = {}
    for event in snapshot["device_traces"][0]:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], event.get("frames", []))
            current += event["size"]
            if current > best:
                best, at_peak = current, dict(live)
        elif event["action"] == "free_completed" and event["addr"] in live:
            current -= live.pop(event["addr"])[0]
    lines = [f"# live allocations at the peak of one call ({best / 2**30:.2f} GB above the start)", ""]
    for size, frames in sorted(at_peak.values(), key=lambda sf: -sf[0])[:top]:
        where = [
            f"{f['filename'].rsplit('/', 2)[-1]}:{f['line']} {f['name']}"
            for f in frames
            if "torch/" not in f["filename"] or "nn/modules" in f["filename"]
        ][:4]
        lines.append(f"{size / 2**20:10.1f} MiB  " + " <- ".join(where))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=("wan", "flux"), default="wan", help="which VAE (see above)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--tiles", type=int, nargs="+", default=[1, 2], help="strip counts to run for ours")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--memory-report", action="store_true", help="what diffusers' peak is made of (GPU)")
    p.add_argument("--profile", action="store_true", help="kernel table of ours with the first --tiles")
    p.add_argument(
        "--fp32-reference",
        action="store_true",
        help="also hold every output to diffusers' decode with a float32 copy of the VAE",
    )
    p.add_argument("--out-dir", type=Path, default=Path("."))
    p.add_argument("--no-record", dest="record", action="store_false")
    p.add_argument("--results", type=Path, default=None)
    args = p.parse_args(argv)
    if args.results is None:
        args.results = Path(tempfile.gettempdir()) / "bench_vae_tiny.jsonl" if args.tiny else RESULTS

    from diffserve.runtime.kl_vae_decode import decode_kl_latents
    from diffserve.runtime.vae_decode import decode_wan_latents

    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_vae.py needs a CUDA GPU (use --tiny for a CPU check of the script)", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    if args.family == "flux":
        shape = FLUX_LATENTS["tiny" if args.tiny else "full"]
        spec = dict(
            latents=shape, label=f"{'tiny ' if args.tiny else ''}FLUX.1 VAE {8 * shape[-1]}x{8 * shape[-2]}"
        )
        vae = build_flux_vae(args.tiny, device, dtype)
        args.tiles = [1]  # one "ours" row: decode_kl_latents has no strip mode

        def ours(tiles):
            return decode_kl_latents(vae, latents)
    else:
        spec = TINY if args.tiny else FULL
        vae = build_vae(spec["config"], device, dtype)

        def ours(tiles):
            return decode_wan_latents(vae, latents, tiles=tiles)

    latents = torch.randn(spec["latents"], device=device, generator=torch.Generator(device).manual_seed(1))
    latents = latents.to(dtype)
    print(
        f"{spec['label']}, latents {tuple(latents.shape)}, {args.dtype}, torch {torch.__version__}",
        flush=True,
    )

    rows = []
    with torch.inference_mode():
        ms, peak, reference = timed(lambda: vae.decode(latents, return_dict=False)[0], device, args.iters)
        rows.append(dict(impl="diffusers", ms=ms, peak_gb=peak, rel_err=0.0))
        print(f"  diffusers        {ms:9.1f} ms  peak {peak or 0:6.2f} GB", flush=True)
        for tiles in args.tiles:
            ms, peak, out = timed(lambda t=tiles: ours(t), device, args.iters)
            err = rel_err(out, reference)
            impl = f"ours-tiles{tiles}" if args.family == "wan" else "ours"
            rows.append(
                dict(impl=impl, ms=ms, peak_gb=peak, rel_err=err, out=out if args.fp32_reference else None)
            )
            print(
                f"  {impl:16s} {ms:9.1f} ms  peak {peak or 0:6.2f} GB  rel err {err:.2e}",
                flush=True,
            )
            del out
        rows[0]["out"] = reference if args.fp32_reference else None
        del reference
        for r in rows:
            r["rel_err_fp32"] = None
        if args.fp32_reference:  # how far each bf16 result is from the float32 decode
            vae32 = copy.deepcopy(vae).float()
            exact = vae32.decode(latents.float(), return_dict=False)[0]
            del vae32
            for r in rows:
                r["rel_err_fp32"] = rel_err(r.pop("out"), exact)
                print(f"  {r['impl']:16s} rel err vs float32 {r['rel_err_fp32']:.2e}", flush=True)
            del exact
        if args.memory_report and device.type == "cuda":
            memory_report(
                lambda: vae.decode(latents, return_dict=False)[0], args.out_dir / "vae_memory_diffusers.txt"
            )
            memory_report(
                lambda: ours(args.tiles[0]),
                args.out_dir / f"vae_memory_ours_tiles{args.tiles[0]}.txt",
            )
        if args.profile and device.type == "cuda":
            from profile_kernels import profile_forward

            profile_forward(
                lambda: ours(args.tiles[0]),
                args.out_dir / f"profile_vae_{args.family}_tiles{args.tiles[0]}.txt",
                title=f"{spec['label']} ours tiles={args.tiles[0]}",
                iters=1,
            )
    lines = [
        "| impl | ms | peak GB | rel err vs diffusers | rel err vs float32 |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
        fp32 = "-" if r.get("rel_err_fp32") is None else f"{r['rel_err_fp32']:.2e}"
        lines.append(f"| {r['impl']} | {r['ms']:.1f} | {peak} | {r['rel_err']:.2e} | {fp32} |")
        if args.record:
            record(
                f"vae_decode_{'tiny_' if args.tiny else ''}{BENCHMARK[args.family]}",
                r["impl"],
                r["ms"],
                path=args.results,
                dtype=args.dtype,
                peak_gb=None if r["peak_gb"] is None else round(r["peak_gb"], 2),
                rel_err_vs_diffusers=r["rel_err"],
                rel_err_vs_float32=r.get("rel_err_fp32"),
                latents=list(spec["latents"]),
                torch=torch.__version__,
            )
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
