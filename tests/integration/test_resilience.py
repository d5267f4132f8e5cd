"""Warmup and health, a killed worker, a full queue, client disconnects, timeouts, and the process split
(torch only in the worker), on a live server of its own."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import CLEAN_EXIT, FAKE_RUNNER, LiveServer, process_alive

# Long enough (several seconds even on a fast CPU) that a cancel or a kill lands mid-generation.
LONG = {"size": "512x512", "num_inference_steps": 200}


@pytest.fixture(scope="module")
def server(tiny_flux_dir, tmp_path_factory):
    server = LiveServer(
        [
            "--model",
            str(tiny_flux_dir),
            "--warmup-resolutions",
            "64x64",
            "--max-queue",
            "2",
            "--cors-origins",
            "http://app.example",
            "--sse-keepalive",
            "0.2",
        ],
        tmp_path_factory.mktemp("resilience-out"),
    )
    # Started here but NOT waited for: the first test watches the warmup.
    server.start()
    yield server
    assert server.stop() in CLEAN_EXIT, server.log_tail()


def test_health_is_503_until_warm_then_200(server):
    first = httpx.get(f"{server.url}/health", timeout=5)
    # The API answers at once; the worker is still importing torch and loading the model.
    assert first.status_code == 503 and first.headers["retry-after"]
    assert first.json()["error"]["code"] in ("loading", "warming_up")
    assert httpx.get(f"{server.url}/liveness", timeout=5).status_code == 200
    health = server.wait_healthy()
    assert health["status"] == "ok" and health["model"] == "model"
    # warmup ran (one generation per resolution) but is kept out of the metrics
    assert server.metric("diffserve_worker_ready") == 1
    assert server.metric("diffserve_denoise_step_seconds_count") == 0
    assert server.metric("diffserve_generation_seconds_count", task="image") == 0


def test_only_the_worker_loads_torch(server):
    api_pid = server.proc.pid
    worker_pid = server.worker_pid()

    def loads_torch(pid: int) -> bool:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()

    assert loads_torch(worker_pid)
    assert not loads_torch(api_pid)


def sse_events(server, body: dict, on_event=None, stop_after: int | None = None) -> list[tuple[str, dict]]:
    """POST a streaming generation and collect (event, data) pairs; optionally hang up after N events."""
    events = []
    with (
        server.http() as http,
        http.stream("POST", "/v1/images/generations", json={**body, "stream": True}) as r,
    ):
        assert r.status_code == 200, r.read()
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                if on_event is not None:
                    on_event(events[-1])
                if stop_after is not None and len(events) >= stop_after:
                    break  # leaving the block closes the connection mid-stream
    return events


def test_client_disconnect_cancels_the_generation(server):
    server.wait_healthy()
    stopped = server.metric("diffserve_worker_cancelled_total")
    events = sse_events(server, {"prompt": "abandoned", **LONG}, stop_after=1)
    assert events[0][0] == "image_generation.progress"
    deadline = time.monotonic() + 20
    while server.metric("diffserve_worker_cancelled_total") == stopped:
        assert time.monotonic() < deadline, "the worker never stopped the abandoned request"
        time.sleep(0.05)
    assert server.metric("diffserve_requests_finished_total", task="image", outcome="cancelled") >= 1


def test_client_hanging_up_on_a_plain_request_cancels_it(server):
    server.wait_healthy()
    stopped = server.metric("diffserve_worker_cancelled_total")
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=server.url, timeout=1.0) as http:
        http.post(
            "/v1/images/generations",
            json={"prompt": "impatient", **LONG},
        )
    deadline = time.monotonic() + 20
    while server.metric("diffserve_worker_cancelled_total") == stopped:
        assert time.monotonic() < deadline, "the worker never stopped the abandoned request"
        time.sleep(0.05)


def test_a_queued_stream_gets_keep_alive_comments(server):
    """A streamed request waiting in the queue has nothing to send; an SSE comment line every
    --sse-keepalive seconds keeps proxies from closing the idle connection."""
    server.wait_healthy()
    stopped = server.metric("diffserve_worker_cancelled_total")
    gen = "/v1/images/generations"
    with (
        server.http() as http,
        http.stream("POST", gen, json={"prompt": "blocker", **LONG, "stream": True}) as blocker,
    ):
        # The blocker holds the worker (it reports steps), so the next request waits in the queue. Its
        # line iterator stays referenced: a collected one would close the connection, a cancel.
        blocker_lines = blocker.iter_lines()
        assert (
            next(ln for ln in blocker_lines if ln.startswith("event: ")) == "event: image_generation.progress"
        )
        body = {"prompt": "waiting", "size": "64x64", "num_inference_steps": 2, "stream": True}
        with http.stream("POST", gen, json=body) as waiting:
            lines = []
            for line in waiting.iter_lines():
                lines.append(line)
                if lines.count(": keep-alive") == 3:
                    break  # hanging up both cancels them
    assert set(lines) <= {": keep-alive", ""}, lines  # nothing but comments while queued
    deadline = time.monotonic() + 20
    while server.metric("diffserve_worker_cancelled_total") == stopped or server.metric(
        "diffserve_queue_depth"
    ):
        assert time.monotonic() < deadline, "the abandoned requests were never cancelled"
        time.sleep(0.05)


def test_killed_worker_fails_its_request_then_restarts(server):
    old_pid = server.worker_pid()
    restarts = server.metric("diffserve_worker_restarts_total")
    killed = threading.Event()

    def kill_on_first_progress(event):
        if event[0] == "image_generation.progress" and not killed.is_set():
            os.kill(old_pid, signal.SIGKILL)
            killed.set()

    events = sse_events(
        server,
        {"prompt": "doomed", **LONG},
        on_event=kill_on_first_progress,
    )
    # the request in flight ends with a clear error instead of hanging
    name, data = events[-1]
    assert name == "error" and data["error"]["code"] == "worker_crashed", events[-1]
    assert "worker process exited" in data["error"]["message"]
    r = httpx.get(f"{server.url}/health", timeout=5)
    if r.status_code == 503:  # unless the new worker is already warm
        assert r.json()["error"]["code"] in ("worker_dead", "loading", "warming_up")
    health = server.wait_healthy()
    assert health["worker_pid"] != old_pid and not process_alive(old_pid)
    assert server.metric("diffserve_worker_restarts_total") == restarts + 1
    with server.http() as http:
        r = http.post(
            "/v1/images/generations", json={"prompt": "after", "size": "64x64", "num_inference_steps": 2}
        )
    assert r.status_code == 200 and len(r.json()["data"]) == 1


def test_full_queue_answers_429_and_loses_nothing(server):
    server.wait_healthy()

    # Seeded (so never merged into one runner call) and long enough that the burst arrives while the first
    # request runs: 1 running + 2 queued are admitted, the rest are refused.
    def post(i: int) -> httpx.Response:
        with server.http() as http:
            return http.post(
                "/v1/images/generations",
                json={"prompt": f"crowd {i}", "size": "64x64", "num_inference_steps": 20, "seed": i},
            )

    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post, i) for i in range(8)]
        results = [f.result(timeout=180) for f in futures]  # none hangs
    ok = [r for r in results if r.status_code == 200]
    refused = [r for r in results if r.status_code == 429]
    assert len(ok) + len(refused) == 8, [r.text for r in results]
    assert len(ok) >= 3 and refused
    for r in refused:
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "rate_limit_error"
    assert all(len(r.json()["data"]) == 1 for r in ok)
    assert server.metric("diffserve_queue_depth") == 0 and server.metric(
        "diffserve_errors_total", kind="queue_full"
    ) == len(refused)


def test_timeout_and_a_worker_that_ignores_cancel(tmp_path):
    """A runner that never honours a cancel (the fake: the real one always does) — the request times out
    with 504 at its deadline, and after the grace period the stuck worker is killed and replaced."""
    fake = LiveServer(
        [
            "--runner-factory",
            FAKE_RUNNER,
            "--model",
            "step=0.1&ignore_cancel=1",
            "--request-timeout",
            "1",
            "--kill-grace",
            "1",
        ],
        tmp_path / "out",
    )
    fake.start().wait_healthy()
    try:
        old_pid = fake.worker_pid()
        with fake.http() as http:
            start = time.monotonic()
            r = http.post("/v1/images/generations", json={"prompt": "slow", "num_inference_steps": 100})
            assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
            assert time.monotonic() - start < 5
        deadline = time.monotonic() + 30
        while (health := httpx.get(f"{fake.url}/health", timeout=5)).status_code != 200 or (
            health.json()["worker_pid"] == old_pid
        ):
            assert time.monotonic() < deadline, "the stuck worker was never replaced"
            time.sleep(0.05)
        assert not process_alive(old_pid)
        assert fake.metric("diffserve_worker_restarts_total") == 1
        with fake.http() as http:
            assert http.post("/v1/images/generations", json={"prompt": "quick"}).status_code == 200
    finally:
        assert fake.stop() in CLEAN_EXIT


def test_cors_only_for_configured_origins(server):
    preflight = {
        "Origin": "http://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    r = httpx.options(f"{server.url}/v1/images/generations", headers=preflight, timeout=5)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
    r = httpx.options(
        f"{server.url}/v1/images/generations",
        headers={**preflight, "Origin": "http://evil.example"},
        timeout=5,
    )
    assert "access-control-allow-origin" not in r.headers
