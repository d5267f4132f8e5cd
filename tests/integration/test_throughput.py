"""Throughput under load (issue 23), on a live server of its own with the tiny FLUX model: concurrent
requests share runner calls (diffserve_batch_requests shows batches > 1) — identical unseeded ones, and
ones with different prompts, seeds and guidance, each of which gets the picture it gets alone and its own
seed back — and the worker's encoding is reported as a stage of its own. Speed itself is measured by
benchmarks/bench_serving.py, never asserted here."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io

import numpy as np
import pytest

from tests.integration.conftest import CLEAN_EXIT, LiveServer

BODY = {"prompt": "share a forward", "size": "64x64", "num_inference_steps": 4}


@pytest.fixture(scope="module")
def server(tiny_flux_dir, tmp_path_factory):
    server = LiveServer(
        [
            "--model",
            str(tiny_flux_dir),
            "--warmup-resolutions",
            "64x64",
            "--max-batch",
            "4",
            # generous, so that a burst from a thread pool on a busy 2-core machine lands in one window
            "--batch-wait-ms",
            "500",
        ],
        tmp_path_factory.mktemp("throughput-out"),
    ).start()
    server.wait_healthy()
    yield server
    assert server.stop() in CLEAN_EXIT, server.log_tail()


def _post_many(server: LiveServer, bodies: list[dict]) -> list:
    with server.http() as http, cf.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: http.post("/v1/images/generations", json=body), bodies))


def test_concurrent_identical_unseeded_requests_are_batched(server):
    count = server.metric("diffserve_batch_requests_count")
    total = server.metric("diffserve_batch_requests_sum")
    alone = server.metric("diffserve_batch_requests_bucket", le="1.0")
    results = _post_many(server, [BODY] * 8)
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    assert len({r.json()["data"][0]["b64_json"] for r in results}) == 8  # eight different samples
    batches = server.metric("diffserve_batch_requests_count") - count
    assert server.metric("diffserve_batch_requests_sum") - total == 8
    assert batches < 8, batches
    # at least one batch held more than one request (the histogram's le=1 bucket counts the lone ones)
    assert server.metric("diffserve_batch_requests_bucket", le="1.0") - alone < batches
    assert server.metric("diffserve_stage_seconds_count", stage="encode_output") >= 8


def test_mixed_load_all_completes_and_nothing_stays_held(server):
    """Seeded requests between unseeded ones, several formats, n=2: every one completes, and afterwards
    nothing is queued or running."""
    bodies = [
        {**BODY, "seed": 1},
        BODY,
        {**BODY, "seed": 2, "output_format": "jpeg"},
        BODY,
        {**BODY, "seed": 3, "output_format": "webp"},
        {**BODY, "n": 2},
    ]
    results = _post_many(server, bodies)
    assert [r.status_code for r in results] == [200] * len(bodies), [r.text for r in results]
    assert [len(r.json()["data"]) for r in results] == [1, 1, 1, 1, 1, 2]
    assert server.metric("diffserve_queue_depth") == 0
    assert server.metric("diffserve_running_requests") == 0


def _pixels(response) -> np.ndarray:
    from PIL import Image

    data = base64.b64decode(response.json()["data"][0]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


def test_different_prompts_and_seeds_share_batches_and_each_gets_its_own_picture(server):
    """Eight requests, each its own prompt, seed and guidance, at once: they share runner calls, each
    answer reports its own seed, and a request's picture is the one it gets when sent alone (PSNR >= 40 dB:
    float32 on the CPU, the batched forward differs from a lone one by float rounding only — see
    tests/unit/test_sample_batching.py). diffserve_dit_forwards_total counts each shared forward once."""
    bodies = [
        {**BODY, "prompt": f"request number {i}", "seed": 100 + i, "guidance_scale": 2.0 + i / 2}
        for i in range(8)
    ]
    count = server.metric("diffserve_batch_requests_count")
    alone = server.metric("diffserve_batch_requests_bucket", le="1.0")
    forwards = server.metric("diffserve_dit_forwards_total", outcome="computed")
    results = _post_many(server, bodies)
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    assert [r.json()["seed"] for r in results] == [100 + i for i in range(8)]
    batches = server.metric("diffserve_batch_requests_count") - count
    assert batches < 8 and server.metric("diffserve_batch_requests_bucket", le="1.0") - alone < batches
    # 4 steps per runner call, whatever its size: the shares of a call add up to one call's forwards
    computed = server.metric("diffserve_dit_forwards_total", outcome="computed") - forwards
    assert computed == pytest.approx(4 * batches)
    with server.http() as http:
        for i in (0, 5):  # one at a time: each runs alone (after --batch-wait-ms without company)
            lone = http.post("/v1/images/generations", json=bodies[i])
            assert lone.status_code == 200 and lone.json()["seed"] == 100 + i
            a, b = _pixels(lone), _pixels(results[i])
            mse = float(np.mean((a - b) ** 2))
            assert mse == 0 or 10 * np.log10(255.0**2 / mse) >= 40.0, mse
            assert a.std() > 5  # a flat picture would not test anything
    assert float(np.mean((_pixels(results[0]) - _pixels(results[1])) ** 2)) > 10  # different pictures


def test_bench_serving_against_the_live_server(server, tmp_path):
    """benchmarks/bench_serving.py's load generator (CPU: GPU busy n/a) appends one row of figures."""
    import json
    import subprocess
    import sys

    from tests.integration.conftest import REPO

    results = tmp_path / "results.jsonl"
    cmd = [sys.executable, "benchmarks/bench_serving.py", "--url", server.url, "--size", "64x64"]
    cmd += ["--steps", "2", "-c", "3", "-r", "6", "--warmup", "1", "--results", str(results)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "GPU busy" in out.stdout and "requests/s" in out.stdout
    (row,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert row["benchmark"] == "serving model 64x64 2 steps n=1 c=3" and row["impl"] == "diffserve"
    assert row["requests"] == 6 and row["errors"] == 0 and row["requests_per_s"] > 0
    assert 0 < row["p50_ms"] <= row["p95_ms"]
    assert row["mean_batch"] >= 1


def test_bench_serving_first_requests(server, tmp_path):
    """--first-requests: n=2, n=2, n=1, n=1 one by one, their four latencies in one row."""
    import json
    import subprocess
    import sys

    from tests.integration.conftest import REPO

    results = tmp_path / "results.jsonl"
    cmd = [
        sys.executable,
        "benchmarks/bench_serving.py",
        "--url",
        server.url,
        "--size",
        "64x64",
        "--steps",
        "2",
    ]
    cmd += ["--first-requests", "--results", str(results)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (row,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert row["benchmark"] == "serving model 64x64 2 steps first requests"
    assert row["sizes"] == [2, 2, 1, 1] and len(row["seconds"]) == 4 and all(s > 0 for s in row["seconds"])
    assert row["first_vs_second_n2"] == round(row["seconds"][0] / row["seconds"][1] - 1, 4)
    assert "against the second" in out.stdout
