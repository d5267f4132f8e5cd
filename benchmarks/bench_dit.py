"""One DiT forward, ours vs diffusers, side by side in one process with the SAME weight tensors.

Models (random weights, bf16, full size):
  flux: FLUX.1-dev transformer, 1024x1024 image -> 64x64 = 4,096 packed latent tokens + 512 text tokens.
  wan:  Wan2.1-1.3B transformer, 480x832 x 81 frames -> latents 21x60x104 -> 21x30x52 = 32,760 tokens
        (patch 1x2x2) + 512 text tokens.
Variants (run in the order given):
  diffusers-eager, diffusers-compile   diffusers' model, eager / torch.compile of the whole model; its attention
                                       backend from --diffusers-attention-backend (e.g. _flash_3: FA3 through
                                       the fa3-fwd wheel, aliased as flash_attn_interface in this process)
  ours-plain                           our DiT as loaded: separate q/k/v GEMMs, torch elementwise ops
  ours-eager                           + fused projections (fuse_projections) + Triton fused ops
  ours-compile                         + torch.compile (diffserve.runtime.compile.optimize_dit: per block by
                                       default, --compile-scope model for the whole forward); our q/k and
                                       GELU kernels stay in the graph as custom ops
  ours-compile+inductor                the same with every elementwise op left to Inductor
ours-plain must come before the fused variants (fusing changes the model in place), ours-compile last.
Ours always uses diffserve's attention selection (FA3 on Hopper).

Figures: ms per forward = median of --iters (>= 5) timed with CUDA events after --warmup calls (compilation
happens during warm-up and is reported separately); relative error ||out - ref|| / ||ref|| against the
diffusers-eager output; TFLOP/s from a per-token FLOP count:
  * every linear layer costs 2 * tokens * in_features * out_features over the tokens it touches
    (image/video tokens, text tokens, or one row per sample for timestep/adaLN projections);
    FLUX's and Wan's patch embeddings are linear maps of a patch and count the same way;
  * every attention layer costs 4 * Lq * Lk * head_dim * heads (QK^T and PV, 2 FLOPs per multiply-add),
    i.e. 4 * L^2 * d * heads for self-attention (FLUX's joint attention: L = image + text tokens) and
    4 * L * L_text * d * heads for Wan's cross-attention;
  * elementwise work (norms, RoPE, modulation, activations) is not counted.
FLUX.1-dev at 1024^2 (4,608 tokens) comes to ~74.4 TFLOP and Wan2.1-1.3B at 480p x 81 frames to ~283.

Memory: FLUX-12B in bf16 is ~24 GB, so diffusers' model is built once on the GPU and ours is built on
the meta device and takes diffusers' tensors with load_state_dict(assign=True): no second copy (fusing
the projections then copies the q/k/v/mlp-in weights once more, ~6 GB for FLUX). Each family is freed
before the next.

--profile VARIANT... writes a kernel table of each named variant (torch.profiler, top kernels by GPU time, grouped into
GEMM / attention / Triton / other, and the GPU-busy fraction of the forward) to --out-dir.

    python benchmarks/bench_dit.py [--family flux wan] [--variants ours-eager,ours-compile,...]
    python benchmarks/bench_dit.py --tiny     # CPU, tiny configs: checks this script end to end

Each figure is appended to benchmarks/results.jsonl (benchmarks/record.py); --tiny writes to a temporary
file instead, so CPU figures never mix with GPU results.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import RESULTS, record  # noqa: E402

VARIANTS = (
    "diffusers-eager",
    "diffusers-compile",
    "diffusers-eager+fa3",
    "diffusers-compile+fa3",
    "ours-plain",
    "ours-eager",
    "ours-compile",
    "ours-compile+inductor",
)
BF16_PEAK_TFLOPS = {"H100": 798.0}  # measured 8192^3 bf16 matmul on H100 (DESIGN.md); for "% of peak"

# fmt: off
FULL = {
    "flux": dict(
        config=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                    guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        shape=dict(height=1024, width=1024, text_tokens=512),
        label="FLUX.1-dev 1024x1024",
    ),
    "wan": dict(
        config=dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
        shape=dict(height=480, width=832, frames=81, text_tokens=512),
        label="Wan2.1-1.3B 480x832x81",
    ),
}
TINY = {
    "flux": dict(
        config=dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
                    guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
        shape=dict(height=128, width=128, text_tokens=16),
        label="tiny FLUX 128x128",
    ),
    "wan": dict(
        config=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                    out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True),
        shape=dict(height=64, width=64, frames=9, text_tokens=16),
        label="tiny Wan 64x64x9",
    ),
}
# fmt: on


# ---------------------------------------------------------------- FLOP counts (see the module docstring)


def _lin(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def _attn(lq: int, lk: int, head_dim: int, heads: int) -> int:
    return 4 * lq * lk * head_dim * heads


def flux_flops(c: dict, batch: int, n_img: int, n_txt: int) -> int:
    hd, h = c["attention_head_dim"], c["num_attention_heads"]
    d, n = hd * h, n_img + n_txt

    def stream(t: int) -> int:  # q, k, v, out projections and the 4x MLP of one dual-block stream
        return _lin(t, d, 3 * d) + _lin(t, d, d) + _lin(t, d, 4 * d) + _lin(t, 4 * d, d)

    dual = stream(n_img) + stream(n_txt) + _attn(n, n, hd, h) + 2 * _lin(1, d, 6 * d)
    single = (
        _lin(n, d, 3 * d) + _lin(n, d, 4 * d) + _lin(n, 5 * d, d) + _attn(n, n, hd, h) + _lin(1, d, 3 * d)
    )
    mlp_embedders = 2 if c["guidance_embeds"] else 1  # timestep (+ guidance): 256 -> d -> d
    embed = (
        _lin(n_img, c["in_channels"], d)
        + _lin(n_txt, c["joint_attention_dim"], d)
        + mlp_embedders * (_lin(1, 256, d) + _lin(1, d, d))
        + _lin(1, c["pooled_projection_dim"], d)
        + _lin(1, d, d)
    )
    out = _lin(1, d, 2 * d) + _lin(n_img, d, c["patch_size"] ** 2 * c["in_channels"])
    return batch * (c["num_layers"] * dual + c["num_single_layers"] * single + embed + out)


def wan_flops(c: dict, batch: int, n_vid: int, n_txt: int) -> int:
    hd, h, f = c["attention_head_dim"], c["num_attention_heads"], c["ffn_dim"]
    d = hd * h
    patch = c["patch_size"][0] * c["patch_size"][1] * c["patch_size"][2]
    self_attn = _lin(n_vid, d, 3 * d) + _attn(n_vid, n_vid, hd, h) + _lin(n_vid, d, d)
    cross_attn = _lin(n_vid, d, d) + _lin(n_txt, d, 2 * d) + _attn(n_vid, n_txt, hd, h) + _lin(n_vid, d, d)
    block = self_attn + cross_attn + _lin(n_vid, d, f) + _lin(n_vid, f, d)
    embed = (
        _lin(n_vid, c["in_channels"] * patch, d)
        + _lin(n_txt, c["text_dim"], d)
        + _lin(n_txt, d, d)
        + _lin(1, c["freq_dim"], d)
        + _lin(1, d, d)
        + _lin(1, d, 6 * d)
    )
    out = _lin(n_vid, d, c["out_channels"] * patch)
    return batch * (c["num_layers"] * block + embed + out)


# ---------------------------------------------------------------- models and inputs


def init_weights_(model: torch.nn.Module, seed: int = 0) -> None:
    """Fast random init where the weights live (the GPU): N(0, 0.02), norm weights near 1 so the
    attention logits stay realistic."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and not name.endswith("bias"):
                p.normal_(1.0, 0.02, generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)


def build_pair(family: str, config: dict, device: torch.device, dtype: torch.dtype):
    """diffusers' model built directly on the device in `dtype`; ours on meta, then given the same tensors."""
    import diffusers

    from diffserve.runtime.models.flux import FluxTransformer
    from diffserve.runtime.models.wan import WanTransformer

    ref_cls, ours_cls = {
        "flux": (diffusers.FluxTransformer2DModel, FluxTransformer),
        "wan": (diffusers.WanTransformer3DModel, WanTransformer),
    }[family]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # construct in bf16: a float32 FLUX would need 48 GB
    try:
        with torch.device(device):
            ref = ref_cls(**config)
    finally:
        torch.set_default_dtype(previous)
    init_weights_(ref)
    ref.eval().requires_grad_(False)
    with torch.device("meta"):
        ours = ours_cls.from_config(dict(ref.config))
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    ours.eval().requires_grad_(False)
    shared = {p.data_ptr() for p in ref.parameters()}
    assert all(p.data_ptr() in shared for p in ours.parameters()), "ours must share diffusers' tensors"
    return ref, ours


def make_inputs(family: str, config: dict, shape: dict, batch: int, device, dtype):
    gen = torch.Generator(device=device).manual_seed(1)
    rand = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=gen)  # noqa: E731
    n_txt = shape["text_tokens"]
    if family == "flux":
        # VAE /8, then 2x2 packing: 1024^2 -> 64x64 tokens of 16*4 = 64 channels.
        h, w = shape["height"] // 16, shape["width"] // 16
        ids = torch.zeros(h, w, 3, device=device)
        ids[..., 1] = torch.arange(h, device=device)[:, None]
        ids[..., 2] = torch.arange(w, device=device)[None, :]
        inputs = dict(
            hidden_states=rand(batch, h * w, config["in_channels"]),
            encoder_hidden_states=rand(batch, n_txt, config["joint_attention_dim"]),
            pooled_projections=rand(batch, config["pooled_projection_dim"]),
            timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
            img_ids=ids.reshape(-1, 3),
            txt_ids=torch.zeros(n_txt, 3, device=device),
            guidance=torch.full((batch,), 3.5, device=device) if config["guidance_embeds"] else None,
        )
        return inputs, h * w, n_txt, flux_flops(config, batch, h * w, n_txt)
    # Wan VAE: 4x temporal (first frame kept), 8x spatial; then the 1x2x2 patch.
    frames = (shape["frames"] - 1) // 4 + 1
    lh, lw = shape["height"] // 8, shape["width"] // 8
    pt, ph, pw = config["patch_size"]
    n_vid = (frames // pt) * (lh // ph) * (lw // pw)
    inputs = dict(
        hidden_states=rand(batch, config["in_channels"], frames, lh, lw),
        timestep=torch.full((batch,), 500.0, device=device),
        encoder_hidden_states=rand(batch, n_txt, config["text_dim"]),
    )
    return inputs, n_vid, n_txt, wan_flops(config, batch, n_vid, n_txt)


# ---------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, warmup: int, iters: int) -> tuple[float, float, torch.Tensor]:
    """(median ms, warm-up seconds, last output). CUDA events on the GPU, perf_counter on the CPU."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        out = fn()
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), warmup_s, out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def enable_diffusers_fa3() -> str:
    """Let diffusers' "_flash_3" backend run on the fa3-fwd wheel: diffusers looks for a distribution named
    flash_attn_3 and imports flash_attn_interface; fa3-fwd ships the same API as fa3_fwd_interface (with its
    config module named fa3_fwd_config). Alias both modules in this process and point diffusers at them."""
    import importlib

    sys.modules.setdefault("flash_attn_config", importlib.import_module("fa3_fwd_config"))
    interface = importlib.import_module("fa3_fwd_interface")
    sys.modules.setdefault("flash_attn_interface", interface)
    from diffusers.models import attention_dispatch

    attention_dispatch._CAN_USE_FLASH_ATTN_3 = True
    attention_dispatch.flash_attn_3_func = interface.flash_attn_func
    attention_dispatch.flash_attn_3_varlen_func = interface.flash_attn_varlen_func
    return "diffusers _flash_3 -> fa3_fwd_interface (aliased as flash_attn_interface)"


def prepare_variant(variant: str, models: dict, args, state: dict):
    """The callable module for `variant`; applies fusion/compilation to ours in place when first needed."""
    from diffserve.kernels import fused_ops
    from diffserve.runtime.compile import compile_dit

    impl, mode = variant.split("-")
    if impl == "diffusers":
        mode, _, extra = mode.partition("+")
        ref = models["diffusers"]
        ref.set_attention_backend(
            "_flash_3" if extra == "fa3" else args.diffusers_attention_backend or "native"
        )
        return torch.compile(ref, mode=args.compile_mode) if mode == "compile" else ref
    ours = models["ours"]
    if mode == "plain":
        if state.get("fused"):
            raise SystemExit("ours-plain must come before ours-eager/ours-compile (fusion is in place)")
        fused_ops.set_fused_ops(False)
        return ours
    fused_ops.set_fused_ops(not args.no_fused_ops)
    if not state.get("fused") and not args.no_fuse:
        ours.fuse_projections()
        state["fused"] = True
    if mode.startswith("compile"):
        fused_ops.set_kernels_in_compile(not mode.endswith("+inductor"))
        torch._dynamo.utils.counters.clear()
        if state.get("compiled"):
            torch._dynamo.reset()  # recompile with the other choice
        compile_dit(ours, mode=args.compile_mode, regional=args.compile_scope == "block")
        state["compiled"] = True
    elif state.get("compiled"):
        raise SystemExit("ours-compile variants come last (compilation is in place)")
    return ours


def run_family(family: str, spec: dict, args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    config, shape = spec["config"], spec["shape"]
    ref, ours = build_pair(family, config, device, dtype)
    if args.diffusers_attention_backend:
        ref.set_attention_backend(args.diffusers_attention_backend)  # for the reference output too
    inputs, n_img, n_txt, flops = make_inputs(family, config, shape, args.batch, device, dtype)
    print(
        f"\n{spec['label']}: {n_img} + {n_txt} text tokens, batch {args.batch}, {flops / 1e12:.4g} TFLOP/forward",
        flush=True,
    )

    models = {"diffusers": ref, "ours": ours}
    state: dict = {}
    rows = []
    with torch.inference_mode():
        reference = ref(**inputs, return_dict=False)[0]  # diffusers eager: what every variant is held to
        # One eager call of ours first: it resolves the attention backend (an import) outside any compiled
        # graph, and shows a wrong model before minutes of compilation.
        print(
            f"  ours-plain vs diffusers-eager, first call: rel err {rel_err(ours(**inputs), reference):.2e}",
            flush=True,
        )
        model = None
        for variant in args.variants:
            model = prepare_variant(variant, models, args, state)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            ms, warmup_s, out = time_ms(
                lambda m=model, x=inputs: m(**x, return_dict=False)[0], device, args.warmup, args.iters
            )
            row = dict(
                model=spec["label"],
                impl=variant,
                ms=ms,
                tflops=flops / (ms * 1e-3) / 1e12,
                rel_err=rel_err(out, reference),
                warmup_s=warmup_s,
                peak_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            )
            rows.append(row)
            print(
                f"  {variant:18s} {ms:10.2f} ms  {row['tflops']:7.4g} TFLOP/s  rel err {row['rel_err']:.2e}"
                f"  (warm-up {warmup_s:.1f} s)",
                flush=True,
            )
            if args.record:
                ours_variant = variant.startswith("ours")
                record(
                    f"dit_{family}_{'tiny_' if args.tiny else ''}forward",
                    variant,
                    ms,
                    row["tflops"],
                    path=args.results,
                    model=spec["label"],
                    dtype=str(dtype).removeprefix("torch."),
                    batch=args.batch,
                    tokens=n_img,
                    text_tokens=n_txt,
                    tflop=round(flops / 1e12, 3),
                    rel_err_vs_diffusers_eager=row["rel_err"],
                    warmup_s=round(warmup_s, 2),
                    peak_gb=None if row["peak_gb"] is None else round(row["peak_gb"], 2),
                    diffusers_attention_backend=(
                        None
                        if ours_variant
                        else "_flash_3"
                        if variant.endswith("+fa3")
                        else args.diffusers_attention_backend or "native"
                    ),
                    compile_mode=args.compile_mode if "compile" in variant else None,
                    compile_scope=args.compile_scope if variant.startswith("ours-compile") else None,
                    fused_projections=bool(state.get("fused")) if ours_variant else None,
                    fused_ops=(
                        (variant not in ("ours-plain", "ours-compile+inductor") and not args.no_fused_ops)
                        if ours_variant
                        else None
                    ),
                    torch=torch.__version__,
                )
            del out
            if variant.startswith("ours-compile"):
                breaks = torch._dynamo.utils.counters["graph_break"]
                print(
                    f"  graph breaks: {sum(breaks.values())}",
                    *(f"    {k.splitlines()[0]}" for k in breaks),
                    sep="\n",
                )
            if variant in args.profile and device.type == "cuda":
                from profile_kernels import profile_forward

                profile_forward(
                    lambda m=model, x=inputs: m(**x, return_dict=False)[0],
                    args.out_dir / f"profile_{family}_{variant}.txt",
                    title=f"{spec['label']} {variant}, {flops / 1e12:.4g} TFLOP/forward",
                )
    from diffserve.kernels import fused_ops

    fused_ops.set_fused_ops(None)
    fused_ops.set_kernels_in_compile(True)
    del ref, ours, models, reference, inputs, model
    free(device)
    return rows


def free(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def markdown(rows: list[dict], device_name: str) -> str:
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in device_name), None)
    lines = [
        f"| model | impl | ms | TFLOP/s |{' % of peak |' if peak else ''} rel err vs diffusers eager |",
        f"|---|---|---:|---:|{'---:|' if peak else ''}---:|",
    ]
    for r in rows:
        pct = f" {100 * r['tflops'] / peak:.0f}% |" if peak else ""
        lines.append(
            f"| {r['model']} | {r['impl']} | {r['ms']:.2f} | {r['tflops']:.4g} |{pct} {r['rel_err']:.2e} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", nargs="+", choices=("flux", "wan"), default=["flux", "wan"])
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)} (run in this order)",
    )
    p.add_argument("--iters", type=int, default=10, help="timed forwards (median reported; at least 5)")
    p.add_argument("--warmup", type=int, default=3, help="untimed forwards first (compilation happens here)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument(
        "--compile-scope",
        choices=("block", "model"),
        default="block",
        help="ours-compile: compile each repeated block (default) or the whole forward",
    )
    p.add_argument("--no-fuse", action="store_true", help="ours-eager/compile without fused projections")
    p.add_argument("--no-fused-ops", action="store_true", help="ours-eager/compile without Triton fused ops")
    p.add_argument(
        "--diffusers-attention-backend",
        default=None,
        help="diffusers' attention backend for its model, e.g. _flash_3 (FA3 through fa3-fwd, aliased), "
        "flash_hub (default: diffusers' default, native SDPA)",
    )
    p.add_argument(
        "--profile", nargs="*", default=[], metavar="VARIANT", help="variants whose forward to profile (GPU)"
    )
    p.add_argument("--out-dir", type=Path, default=Path("."), help="where --profile and --markdown write")
    p.add_argument("--markdown", type=Path, default=None, help="also write the result table to this file")
    p.add_argument("--kernels", action="store_true", help="time each fused op at the family's shape (GPU)")
    p.add_argument("--tiny", action="store_true", help="CPU, tiny configs: an end-to-end check of the script")
    p.add_argument("--no-record", dest="record", action="store_false", help="do not append to results")
    p.add_argument(
        "--results",
        type=Path,
        default=None,
        help=f"results file (default {RESULTS}; with --tiny a file in the temp dir)",
    )
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    if args.iters < 5:
        p.error("--iters must be at least 5 (the median of fewer is not a figure)")
    if args.results is None:
        args.results = Path(tempfile.gettempdir()) / "bench_dit_tiny.jsonl" if args.tiny else RESULTS
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("bench_dit.py needs a CUDA GPU (use --tiny for a CPU check of the script)", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device_name}, torch {torch.__version__}, {args.dtype}, variants {args.variants}")

    if args.diffusers_attention_backend == "_flash_3" or any(v.endswith("+fa3") for v in args.variants):
        print(enable_diffusers_fa3())
    specs = TINY if args.tiny else FULL
    rows = []
    for family in args.family:
        if args.kernels and device.type == "cuda":
            from profile_kernels import bench_fused_ops

            c = specs[family]["config"]
            _, n_img, n_txt, _ = make_inputs(family, c, specs[family]["shape"], 1, device, dtype)
            tokens = n_img + n_txt if family == "flux" else n_img
            dim = c["num_attention_heads"] * c["attention_head_dim"]
            bench_fused_ops(family, tokens, dim, c["num_attention_heads"], args.out_dir / f"ops_{family}.md")
        rows += run_family(family, specs[family], args, device, dtype)
    print()
    print(markdown(rows, device_name))
    if args.markdown:
        args.markdown.write_text(markdown(rows, device_name) + "\n")
    if args.record:
        print(f"\nappended {len(rows)} rows to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
