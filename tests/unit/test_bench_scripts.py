"""The GPU benchmark scripts keep working: their --tiny modes run the same code paths on the CPU with tiny
models and record rows (the GPU figures themselves are in benchmarks/RESULTS.md)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

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


def test_bench_vae_flux_tiny(tmp_path):
    # --family flux times diffusers' AutoencoderKL.decode against decode_kl_latents on the same latents.
    bench = _load("bench_vae")
    results = tmp_path / "results.jsonl"
    assert bench.main(["--tiny", "--family", "flux", "--iters", "2", "--results", str(results)]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["impl"] for r in rows] == ["diffusers", "ours"]
    assert all(r["benchmark"] == "vae_decode_tiny_flux1_1024x1024" for r in rows)
    assert rows[1]["rel_err_vs_diffusers"] < 1e-5  # the same decode on the CPU
