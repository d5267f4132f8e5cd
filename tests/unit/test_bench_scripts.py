"""The GPU benchmark scripts keep working: their --tiny modes run the same code paths on the CPU with tiny
models and record rows (the GPU figures themselves are in benchmarks/RESULTS.md)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their siblings (harness, record, *_specs)
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_pipeline_end_to_end_tiny(tmp_path):
    bench = _load("bench_pipeline")
    results = tmp_path / "results.jsonl"
    argv = ["--tiny", "--end-to-end", "--family", "flux", "--steps", "2", "--runs", "3"]
    assert bench.main([*argv, "--results", str(results)]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["impl"] for r in rows] == ["diffserve", "diffusers"]
    assert all(
        r["benchmark"].endswith("end_to_end") and r["steps"] == 2 and len(r["runs_s"]) == 3 for r in rows
    )
    ours = rows[0]
    # Ours reports where its time went, and the stages fit inside the whole generation.
    stages = ours["encode_text_ms"] + ours["denoise_ms"] + ours["decode_ms"]
    assert 0 < stages <= ours["ms"] * 1.05
    assert ours["diffusers_over_ours"] > 0


def test_bench_dit_graph_variant_tiny(tmp_path):
    # ours-graph is the eager forward on the CPU (no CUDA graphs there); recorded as not a graph.
    bench = _load("bench_dit")
    results = tmp_path / "results.jsonl"
    argv = [
        "--tiny",
        "--family",
        "flux",
        "--variants",
        "ours-eager,ours-graph",
        "--iters",
        "5",
        "--warmup",
        "1",
    ]
    assert bench.main([*argv, "--results", str(results)]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["impl"] for r in rows] == ["ours-eager", "ours-graph"]
    assert rows[1]["cuda_graph"] is False and rows[1]["rel_err_vs_diffusers_eager"] < 1e-2


def test_bench_dit_lora_variant_tiny(tmp_path):
    # ours-graph-lora: ours-graph with a random rank-4 adapter on every attention and MLP linear, loaded
    # through runtime/lora and active while timed: its output moves away from the base's (the adapter is on),
    # by about the adapter's ~1% perturbation per layer, and its slowdown against the base row is recorded.
    bench = _load("bench_dit")
    results = tmp_path / "results.jsonl"
    argv = ["--tiny", "--family", "flux", "--variants", "ours-graph,ours-graph-lora", "--lora-rank", "4"]
    assert bench.main([*argv, "--iters", "5", "--warmup", "1", "--results", str(results)]) == 0
    base, lora = [json.loads(line) for line in results.read_text().splitlines()]
    assert (base["impl"], lora["impl"]) == ("ours-graph", "ours-graph-lora")
    assert lora["lora_rank"] == 4 and lora["lora_slowdown_vs_base"] is not None
    assert lora["rel_err_vs_diffusers_eager"] > 10 * max(base["rel_err_vs_diffusers_eager"], 1e-6)
    with pytest.raises(SystemExit):  # the wrapping is in place: a -lora variant comes last
        bench.parse_args(["--tiny", "--variants", "ours-graph-lora,ours-graph"])


def test_bench_vae_flux_tiny(tmp_path):
    # --family flux times diffusers' AutoencoderKL.decode against decode_kl_latents on the same latents.
    bench = _load("bench_vae")
    results = tmp_path / "results.jsonl"
    assert bench.main(["--tiny", "--family", "flux", "--iters", "2", "--results", str(results)]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["impl"] for r in rows] == ["diffusers", "ours"]
    assert all(r["benchmark"] == "vae_decode_tiny_flux1_1024x1024" for r in rows)
    assert rows[1]["rel_err_vs_diffusers"] < 1e-5  # the same decode on the CPU


def test_bench_dit_fp8_variants_tiny(tmp_path, capsys):
    # ours-fp8 quantises the fused model in place (after the bf16 variants); the torchao peer runs where
    # torchao is installed and is skipped with a message naming it where not (this CPU machine).
    import importlib.util

    bench = _load("bench_dit")
    results = tmp_path / "results.jsonl"
    argv = [
        "--tiny",
        "--family",
        "flux",
        "--variants",
        "ours-eager,ours-fp8,ours-fp8-attn,diffusers-torchao-fp8",
    ]
    assert (
        bench.main([*argv, "--iters", "5", "--warmup", "1", "--fp32-reference", "--results", str(results)])
        == 0
    )
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    has_torchao = importlib.util.find_spec("torchao") is not None
    assert [r["impl"] for r in rows] == ["ours-eager", "ours-fp8", "ours-fp8-attn"] + (
        ["diffusers-torchao-fp8"] if has_torchao else []
    )
    ours_bf16, ours_fp8, ours_fp8_attn = rows[0], rows[1], rows[2]
    assert (
        ours_bf16["quantization"] is None
        and ours_fp8["quantization"] == "fp8"
        and ours_fp8["fp8_gemms"] == 14
        and ours_fp8_attn["quantization"] == "fp8-attention"
    )
    # FP8 attention (the CPU's emulation) adds its own rounding to the FP8 GEMMs'
    assert ours_fp8["rel_err_vs_diffusers_eager"] != ours_fp8_attn["rel_err_vs_diffusers_eager"]
    assert ours_fp8_attn["rel_err_vs_diffusers_eager"] < 0.15
    # relative error against bf16 (diffusers eager) and, for scale, against float32
    assert 0 < ours_fp8["rel_err_vs_diffusers_eager"] < 0.1 and ours_fp8["rel_err_vs_float32"] < 0.1
    assert ours_bf16["rel_err_vs_float32"] < 0.05
    if not has_torchao:
        assert "diffusers-torchao-fp8 skipped: torchao is not installed" in capsys.readouterr().out
    # bf16 ours variants cannot follow the in-place quantisation, nor ours-fp8 the in-place attention switch
    for order, message in (
        ("ours-fp8,ours-eager", "before ours-fp8"),
        ("ours-fp8-attn,ours-fp8", "before ours-fp8-attn"),
    ):
        with pytest.raises(SystemExit, match=message):
            bench.main(["--tiny", "--family", "flux", "--variants", order, "--no-record"])


def test_bench_pipeline_fp8_forced_reuse_tiny(tmp_path):
    bench = _load("bench_pipeline")
    results = tmp_path / "results.jsonl"
    argv = [
        "--tiny",
        "--end-to-end",
        "--family",
        "flux",
        "--steps",
        "3",
        "--runs",
        "3",
        "--quantization",
        "fp8",
    ]
    assert bench.main([*argv, "--step-cache-force", "0.5", "--results", str(results)]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["impl"] for r in rows] == ["diffserve+fp8+reuse50%", "diffusers"]
    assert rows[0]["dit_forwards"] == {"computed": 1, "cached": 2}  # round(0.5 * 3) of 3 steps reused
    assert rows[0]["quantization"] == "fp8" and rows[0]["step_cache_forced"] == 0.5
    assert all(r["diffusers_over_ours"] > 0 for r in rows)


def test_bench_qwen_image_tiny(tmp_path):
    bench = _load("bench_qwen_image")
    results = tmp_path / "results.jsonl"
    argv = ["--tiny", "--iters", "2", "--warmup", "1", "--quantization", "fp8", "--results", str(results)]
    assert bench.main(argv) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["benchmark"] for r in rows].count("qwen_image_dit_forward") == 6 + 2  # + FP8 at both sizes
    # float32 tiny model: ours matches diffusers (the DiT parity tests hold it to 1e-5)
    exact = [r for r in rows if "rel_err_vs_diffusers_eager" in r and "fp8" not in r["impl"]]
    assert exact and all(r["rel_err_vs_diffusers_eager"] < 1e-4 for r in exact)
    # FP8: e4m3's rounding, never the exact path (> 0). Measured 1.3e-4: the bench's N(0, 0.02) weights make
    # the blocks add little to the residual streams, so the output sees little of the GEMMs' ~5% error. The
    # rounding is of the same values on any CPU (float32 summation order moves ~1e-6): 1e-2 (75x) holds
    # anywhere; the FP8 accuracy itself is tested in test_qwen_image.test_fp8_dit_close_to_exact.
    fp8 = [r for r in rows if r["impl"] == "ours-fp8-graph"]
    assert len(fp8) == 2 and all(0 < r["rel_err_vs_diffusers_eager"] < 1e-2 for r in fp8)


def test_bench_qwen_image_end_to_end_tiny(tmp_path):
    """--end-to-end on the tiny Qwen-Image (CPU): ours bf16-path, diffusers, ours FP8 at forced reuse 0 and
    50%; rows to --results with the DiT forwards each ran (true CFG: 2 a step)."""
    bench = _load("bench_qwen_image")
    results = tmp_path / "results.jsonl"
    assert bench.main(["--tiny", "--end-to-end", "--runs", "1", "--results", str(results)]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    impls = ["diffserve", "diffusers", "diffserve+fp8+reuse0%", "diffserve+fp8+reuse50%"]
    assert [r["impl"] for r in rows] == impls
    assert all(r["benchmark"] == "qwen_image_end_to_end" and r["steps"] == 3 for r in rows)
    assert rows[0]["dit_forwards"] == rows[2]["dit_forwards"] == {"computed": 6, "cached": 0}
    assert rows[3]["dit_forwards"] == {"computed": 2, "cached": 4}  # round(0.5 * 3) steps x 2 branches
    assert rows[2]["quantization"] == "fp8" and rows[2]["quantized_gemms"] == 2 * 4
    # float32, the same seed: ours is diffusers' image (the parity tests hold it to the uint8 rounding)
    assert rows[0]["pixels_mean_abs_diff_vs_diffusers"] < 0.5
    assert all(r["ms"] > 0 for r in rows)


def test_bench_kontext_tiny(tmp_path, monkeypatch):
    # diffusers, ours eager and ours as served (GraphedForward: the plain module on the CPU), one row each;
    # --tiny rows go to the temporary directory (harness.results_file)
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert _load("bench_kontext").main(["--tiny", "--iters", "2", "--warmup", "1"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "bench_kontext_tiny.jsonl").read_text().splitlines()]
    assert [r["impl"] for r in rows] == ["diffusers", "diffserve-eager", "diffserve"]
    assert all(r["image_tokens"] == 2 * 64 and r["rel_err"] < 1e-5 for r in rows[1:])
