"""benchmarks/bench_wan_i2v.py keeps working: its --tiny mode runs the GPU run's code path (random weights
shared by diffusers' model and ours, one CFG step of two forwards with the image context, ours through
GraphedForward) on the CPU and records its rows."""

from __future__ import annotations

import json
from pathlib import Path

from tests.unit.test_bench_scripts import _load


def test_bench_wan_i2v_tiny(tmp_path):
    bench = _load("bench_wan_i2v")
    results = tmp_path / "results.jsonl"
    assert bench.main(["--tiny", "--iters", "2", "--warmup", "1", "--results", str(results)]) == 0
    rows = [json.loads(line) for line in Path("/tmp/bench_wan_i2v_tiny.jsonl").read_text().splitlines()[-2:]]
    assert [r["impl"] for r in rows] == ["diffusers", "diffserve"]
    assert all(r["benchmark"] == "wan_i2v_tiny_cfg_step" and r["forwards"] == 2 for r in rows)
    assert all(
        r["text_tokens"] == 512 and r["image_tokens"] == 9 and r["video_tokens"] == 3 * 16 for r in rows
    )
    # float32 tiny model, the same weights: ours is diffusers' step to the DiT parity bound (test_native_dits:
    # < 1e-5 per forward; the CFG combination neg + 5 (out - neg) amplifies it at most ~11x)
    assert rows[1]["rel_err"] < 1e-4
    # the full-size FLOP count: 2 forwards of Wan2.1-I2V-14B at 480x832x81 (~1.69 PFLOP a forward, 1.68 of them the text-to-video count)
    full = bench.FULL
    flops = bench.i2v_flops(full["config"], 21 * 30 * 52, 512, 257)
    assert 1.6e15 < flops < 1.8e15


def test_bench_wan_i2v_fp8_attention_tiny(tmp_path, monkeypatch):
    # --quantization fp8-attention: ours again after in-place quantisation, one more row, near bf16's output
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # --tiny rows go to the temporary directory
    bench = _load("bench_wan_i2v")
    assert bench.main(["--tiny", "--iters", "2", "--warmup", "1", "--quantization", "fp8-attention"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "bench_wan_i2v_tiny.jsonl").read_text().splitlines()]
    assert [r["impl"] for r in rows] == ["diffusers", "diffserve", "diffserve+fp8-attention"]
    assert [r["quantization"] for r in rows] == [None, None, "fp8-attention"]
    assert 1e-4 < rows[2]["rel_err"] < 0.2  # e4m3 GEMMs and attention on a tiny random model
