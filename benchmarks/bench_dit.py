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
  ours-graph                           ours-eager replayed as a CUDA graph (diffserve.runtime.cuda_graphs.
                                       GraphedForward, as the pipelines run it; the capture happens during
                                       warm-up). No torch.compile. On the CPU (--tiny) it is ours-eager.
  ours-compile                         + torch.compile (diffserve.runtime.compile.optimize_dit: per block by
                                       default, --compile-scope model for the whole forward); our q/k and
                                       GELU kernels stay in the graph as custom ops
  ours-compile+inductor                the same with every elementwise op left to Inductor
  ours-fp8, ours-fp8-eager             `--quantization fp8` (issue 17): ours-eager's model with the default FP8
                                       selection (runtime/layers/fp8.quantize_linears, as loader.load_dit
                                       does), replayed as a CUDA graph as served / eagerly
  ours-fp8-attn                        `--quantization fp8-attention`: ours-fp8 with the attention in FP8 too
                                       (kernels/fp8_attention.py, FA3's e4m3 kernel), as a CUDA graph; after
                                       the ours-fp8 variants (the switch is in place)
  diffusers-torchao-fp8[-compile]      the peer: torchao's Float8DynamicActivationFloat8WeightConfig(PerRow())
                                       on a copy of diffusers' model (every nn.Linear, torchao's default
                                       filter), eager / torch.compile of the whole model. torchao is imported
                                       only here; without it the variants are skipped with a message.
  ours-graph-lora, ours-fp8-lora       issue 20: ours-graph / ours-fp8 with one random LoRA adapter of rank
                                       --lora-rank (default 32) on every attention and MLP linear of the
                                       repeated blocks (runtime/lora.SUPPORTED), written as a diffusers/PEFT
                                       file and attached through runtime/lora.attach_loras, active at scale 1
                                       during the timed forwards: the server's path, CUDA graph included.
                                       The slowdown against the base variant of the same run is printed.
ours-plain must come before the fused variants (fusing changes the model in place), ours-compile last;
ours-fp8 after every bf16 ours variant and not with ours-compile (quantisation is in place). A -lora variant
comes last and alone (the adapter wraps the layers in place), after its base variant.
The FP8 variants' relative error against diffusers-eager is their error against bf16; for scale, pass
--fp32-reference to also get every variant's error against float32 (ours bf16 vs fp32 included).
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
import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dit_specs import FULL, TINY, make_inputs  # noqa: E402
from harness import bench_device, free, init_weights_, native_twin, on_device, rel_err, results_file, time_ms  # noqa: E402
from record import RESULTS, blas_workspace, record  # noqa: E402

VARIANTS = (
    "diffusers-eager",
    "diffusers-compile",
    "diffusers-eager+fa3",
    "diffusers-compile+fa3",
    "ours-plain",
    "ours-eager",
    "ours-graph",
    "ours-compile",
    "ours-compile+inductor",
    "ours-fp8",
    "ours-fp8-eager",
    "ours-fp8-attn",
    "ours-graph-lora",
    "ours-fp8-lora",
    "diffusers-torchao-fp8",
    "diffusers-torchao-fp8-compile",
)
# What runs without --variants: the bf16 variants (ours-fp8 cannot share a run with ours-compile).
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if "fp8" not in v and "lora" not in v)
BF16_PEAK_TFLOPS = {"H100": 798.0}  # measured 8192^3 bf16 matmul on H100 (DESIGN.md); for "% of peak"


def build_pair(family: str, config: dict, device: torch.device, dtype: torch.dtype):
    """diffusers' model built directly on the device in `dtype`; ours on meta, then given the same tensors."""
    import diffusers

    ref_cls = {"flux": diffusers.FluxTransformer2DModel, "wan": diffusers.WanTransformer3DModel}[family]
    ref = on_device(device, dtype, lambda: ref_cls(**config))  # in bf16: a float32 FLUX would need 48 GB
    init_weights_(ref)
    return ref, native_twin(ref, family)


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


class TorchaoMissing(Exception):
    """torchao is not installed: the diffusers-torchao-fp8 variants cannot run (and are skipped)."""


def torchao_fp8(ref: torch.nn.Module) -> torch.nn.Module:
    """A copy of diffusers' model quantised as a diffusers user does it with torchao: FP8 e4m3 weights and
    dynamic activations, per-row scales, on every nn.Linear (quantize_'s default filter)."""
    try:
        import torchao
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as e:
        raise TorchaoMissing(f"torchao is not installed ({e}): pip install torchao") from None
    model = copy.deepcopy(ref)  # quantize_ works in place; the other diffusers variants keep bf16
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    print(f"  torchao {torchao.__version__}: Float8DynamicActivationFloat8WeightConfig(PerRow())", flush=True)
    return model


def prepare_variant(variant: str, models: dict, args, state: dict):
    """The callable module for `variant`; applies fusion/compilation/quantisation to ours in place when first
    needed."""
    from diffserve.kernels import fused_ops
    from diffserve.runtime.compile import compile_dit

    impl, _, mode = variant.partition("-")
    if impl == "diffusers" and mode.startswith("torchao-fp8"):
        if "torchao" not in state:
            state["torchao"] = torchao_fp8(models["diffusers"])
        model = state["torchao"]
        return torch.compile(model, mode=args.compile_mode) if mode.endswith("-compile") else model
    if impl == "diffusers":
        mode, _, extra = mode.partition("+")
        ref = models["diffusers"]
        ref.set_attention_backend(
            "_flash_3" if extra == "fa3" else args.diffusers_attention_backend or "native"
        )
        return torch.compile(ref, mode=args.compile_mode) if mode == "compile" else ref
    ours = models["ours"]
    if mode.endswith("-lora"):
        model = prepare_variant(variant.removesuffix("-lora"), models, args, state)
        attach_bench_lora(ours, args.lora_rank, state)
        return model
    if state.get("quantized") and not mode.startswith("fp8"):
        raise SystemExit("ours bf16 variants come before ours-fp8 (quantisation is in place)")
    if mode.startswith("fp8"):
        return prepare_fp8(ours, mode, args, state)
    if mode == "plain":
        if state.get("fused"):
            raise SystemExit("ours-plain must come before ours-eager/ours-compile (fusion is in place)")
        fused_ops.set_fused_ops(False)
        return ours
    fused_ops.set_fused_ops(not args.no_fused_ops)
    if not state.get("fused") and not args.no_fuse:
        ours.fuse_projections()
        state["fused"] = True
    if mode == "graph":
        if state.get("compiled"):
            raise SystemExit("ours-graph comes before the ours-compile variants (compilation is in place)")
        from diffserve.runtime.cuda_graphs import GraphedForward

        return GraphedForward(ours)  # a new wrapper per variant run: its graphs are freed with it
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


def attach_bench_lora(ours: torch.nn.Module, rank: int, state: dict) -> None:
    """One random rank-`rank` adapter on every LoRA-able linear of `ours` (runtime/lora.SUPPORTED), written
    as a diffusers/PEFT safetensors file and loaded the way `--lora bench=FILE` loads it, then activated at
    scale 1 (what a request's `lora: {"bench": 1}` does). A and B are scaled so the low-rank term is a small
    perturbation (~1% of each layer's output), as trained adapters are; the speed does not depend on it."""
    import tempfile

    from safetensors.torch import save_file

    from diffserve.runtime.lora import SUPPORTED, attach_loras

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, layer in ours.named_modules():
        if SUPPORTED.match(name) and hasattr(layer, "in_features"):
            tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(
                rank, layer.in_features, generator=g
            ) / (layer.in_features**0.5)
            tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(
                layer.out_features, rank, generator=g
            ) * (0.01 / rank**0.5)
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        path = f"{tmp}/bench.safetensors"
        save_file(tensors, path)
        manager = attach_loras(ours, [("bench", path)], max_loras=1)
    manager.activate({"bench": 1.0})
    state["lora"] = manager
    print(f"  lora: rank {rank} on {len(tensors) // 2} linears, active at scale 1", flush=True)


def prepare_fp8(ours: torch.nn.Module, mode: str, args, state: dict):
    """ours-fp8 (CUDA graph) / ours-fp8-eager: the fused model with its default FP8 selection, quantised
    once (as loader.load_dit: after fusing)."""
    from diffserve.kernels import fused_ops
    from diffserve.runtime.layers.fp8 import quantize_linears

    if state.get("compiled"):
        raise SystemExit("ours-fp8 cannot follow the ours-compile variants (compilation is in place)")
    fused_ops.set_fused_ops(not args.no_fused_ops)
    if not state.get("fused") and not args.no_fuse:
        ours.fuse_projections()
        state["fused"] = True
    if not state.get("quantized"):
        stats = quantize_linears(ours)
        state["quantized"] = stats
        print(
            f"  fp8: {stats['count']} GEMMs quantised, their weights {stats['bytes_before'] / 1e9:.2f} -> "
            f"{stats['bytes_after'] / 1e9:.2f} GB",
            flush=True,
        )
    if mode == "fp8-attn" and not state.get("fp8_attention"):
        from diffserve.runtime.layers.attention import use_fp8_attention

        state["fp8_attention"] = use_fp8_attention(ours)
    elif mode != "fp8-attn" and state.get("fp8_attention"):
        raise SystemExit("ours-fp8 variants come before ours-fp8-attn (the attention switch is in place)")
    if mode == "fp8-eager":
        return ours
    from diffserve.runtime.cuda_graphs import GraphedForward

    return GraphedForward(ours)


def float32_output(ref: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """diffusers' model run in float32 (a temporary copy, SDPA): the exact answer bf16 outputs are held to
    with --fp32-reference, so that ours and diffusers' bf16 errors can be compared with each other."""
    exact_model = copy.deepcopy(ref).float()
    exact_model.set_attention_backend("native")
    as_fp32 = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    out = exact_model(**as_fp32, return_dict=False)[0]
    del exact_model
    if out.is_cuda:
        torch.cuda.empty_cache()
    return out


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
        exact = float32_output(ref, inputs) if args.fp32_reference else None
        # One eager call of ours first: it resolves the attention backend (an import) outside any compiled
        # graph, and shows a wrong model before minutes of compilation.
        print(
            f"  ours-plain vs diffusers-eager, first call: rel err {rel_err(ours(**inputs), reference):.2e}",
            flush=True,
        )
        model = None
        for variant in args.variants:
            try:
                model = prepare_variant(variant, models, args, state)
            except TorchaoMissing as e:
                print(f"  {variant:18s} skipped: {e}", flush=True)
                continue
            phases = [variant] + ([f"{variant}-idle"] if args.lora_idle and variant.endswith("-lora") else [])
            for impl in phases:
                if impl.endswith("-idle"):
                    # attached but inactive: what a base-model request costs on a server with adapters loaded
                    state["lora"].activate(None)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                ms, warmup_s, out = time_ms(
                    lambda m=model, x=inputs: m(**x, return_dict=False)[0], device, args.warmup, args.iters
                )
                row = dict(
                    model=spec["label"],
                    impl=impl,
                    ms=ms,
                    tflops=flops / (ms * 1e-3) / 1e12,
                    rel_err=rel_err(out, reference),
                    rel_err_fp32=None if exact is None else rel_err(out, exact),
                    warmup_s=warmup_s,
                    peak_gb=torch.cuda.max_memory_allocated(device) / 2**30
                    if device.type == "cuda"
                    else None,
                )
                rows.append(row)
                print(
                    f"  {impl:18s} {ms:10.2f} ms  {row['tflops']:7.4g} TFLOP/s  rel err {row['rel_err']:.2e}"
                    f"  (warm-up {warmup_s:.1f} s)"
                    + ("" if exact is None else f"  rel err vs float32 {row['rel_err_fp32']:.2e}"),
                    flush=True,
                )
                base = next((r for r in rows if r["impl"] == variant.removesuffix("-lora")), None)
                if variant.endswith("-lora") and base is not None:
                    row["slowdown_vs_base"] = ms / base["ms"] - 1
                    print(
                        f"  {impl}: {100 * row['slowdown_vs_base']:+.1f}% against {base['impl']}", flush=True
                    )
                graphed = variant.removesuffix("-lora") in ("ours-graph", "ours-fp8", "ours-fp8-attn")
                if graphed and device.type == "cuda" and not model.replays:
                    print(f"  {variant} ran eagerly: {'; '.join(model.uncapturable.values())}", flush=True)
                if args.record:
                    ours_variant = variant.startswith("ours")
                    fp8 = "fp8" in variant
                    record(
                        f"dit_{family}_{'tiny_' if args.tiny else ''}forward",
                        impl,
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
                        rel_err_vs_float32=row["rel_err_fp32"],
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
                        # Whether the timed calls were CUDA graph replays (ours-graph / ours-fp8 on a GPU whose
                        # capture worked); None for the variants that never try.
                        cuda_graph=bool(model.replays) if graphed else None,
                        torch=torch.__version__,
                        quantization=(
                            (
                                "fp8 torchao Float8DynamicActivationFloat8WeightConfig(PerRow)"
                                if not ours_variant
                                else "fp8-attention"
                                if variant == "ours-fp8-attn"
                                else "fp8"
                            )
                            if fp8
                            else None
                        ),  # fmt: skip
                        fp8_gemms=state["quantized"]["count"] if fp8 and ours_variant else None,
                        lora_rank=args.lora_rank if variant.endswith("-lora") else None,
                        lora_slowdown_vs_base=(
                            round(row["slowdown_vs_base"], 4) if "slowdown_vs_base" in row else None
                        ),
                    )
                if variant in args.profile and device.type == "cuda":
                    from profile_kernels import profile_forward

                    profile_forward(
                        lambda m=model, x=inputs: m(**x, return_dict=False)[0],
                        args.out_dir / f"profile_{family}_{impl}.txt",
                        title=f"{spec['label']} {impl}, {flops / 1e12:.4g} TFLOP/forward",
                    )
                del out
            if variant.startswith("ours-compile"):
                breaks = torch._dynamo.utils.counters["graph_break"]
                print(
                    f"  graph breaks: {sum(breaks.values())}",
                    *(f"    {k.splitlines()[0]}" for k in breaks),
                    sep="\n",
                )
    from diffserve.kernels import fused_ops

    fused_ops.set_fused_ops(None)
    fused_ops.set_kernels_in_compile(True)
    del ref, ours, models, reference, inputs, model, state
    free(device)
    return rows


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
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)} (run in this order; default: the bf16 ones)",
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
    p.add_argument(
        "--fp32-reference",
        action="store_true",
        help="also hold every output to diffusers' model in float32 (needs 3x the bf16 weights' memory)",
    )
    p.add_argument("--lora-rank", type=int, default=32, help="the -lora variants' adapter rank")
    p.add_argument(
        "--lora-idle",
        action="store_true",
        help="also time the -lora variant with its adapter attached but inactive (row <variant>-idle)",
    )
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
    loras = [i for i, v in enumerate(args.variants) if v.endswith("-lora")]
    if loras and (len(loras) > 1 or loras[0] != len(args.variants) - 1):
        p.error("a -lora variant comes last and alone (the adapter wraps the layers in place)")
    if args.iters < 5:
        p.error("--iters must be at least 5 (the median of fewer is not a figure)")
    if args.results is None:
        args.results = results_file(args.tiny, "bench_dit", RESULTS)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = bench_device(args.tiny, "bench_dit.py")
    if device is None:
        return 2
    dtype = getattr(torch, args.dtype)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device_name}, torch {torch.__version__}, {args.dtype}, variants {args.variants}")
    print(f"cuBLAS workspace: {blas_workspace()}")

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
