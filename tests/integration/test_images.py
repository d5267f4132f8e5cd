"""The images API on the tiny FLUX model, through the official openai client: b64_json and url, n > 1,
output formats, seeds, SSE streaming, edits, batching, the API key, models and metrics."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json

import httpx
import openai
import pytest
from PIL import Image

STEPS = {"num_inference_steps": 2}


def decode(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def png_bytes(w: int, h: int, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def test_b64_json_n2(flux_server):
    client = flux_server.openai()
    r = client.images.generate(
        model="flux", prompt="a red square", n=2, size="96x64", response_format="b64_json", extra_body=STEPS
    )
    assert r.size == "96x64" and r.output_format == "png" and r.created > 0
    images = [decode(d.b64_json) for d in r.data]
    assert len(images) == 2
    assert all(im.format == "PNG" and im.size == (96, 64) for im in images)
    assert images[0].tobytes() != images[1].tobytes()  # two samples, not one image twice


@pytest.mark.parametrize("fmt, pil_format", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_url_response(flux_server, fmt, pil_format):
    client = flux_server.openai()
    r = client.images.generate(
        model="flux-alias",
        prompt="a blue circle",
        n=2,
        size="64x80",
        response_format="url",
        output_format=fmt,
        extra_body=STEPS,
    )
    assert len(r.data) == 2 and len({d.url for d in r.data}) == 2
    for d in r.data:
        assert d.b64_json is None and d.url.startswith(flux_server.url + "/v1/files/images/")
        # The random name is the credential: fetched without the API key, as browsers fetch image URLs.
        got = httpx.get(d.url, timeout=10)
        assert got.status_code == 200 and got.headers["content-type"] == f"image/{fmt}"
        im = Image.open(io.BytesIO(got.content))
        assert im.format == pil_format and im.size == (64, 80)


def test_unknown_image_url_is_404(flux_server):
    for name in ["0" * 32 + ".png", "..%2Fjobs.sqlite3", "x.png"]:
        r = httpx.get(f"{flux_server.url}/v1/files/images/{name}", timeout=10)
        assert r.status_code == 404 and r.json()["error"]["code"] in ("image_not_found", "not_found")


def test_seed_reproducible(flux_server):
    client = flux_server.openai()
    outs = [
        client.images.generate(
            model="flux", prompt="seeded", size="64x64", extra_body={**STEPS, "seed": 1234}
        )
        .data[0]
        .b64_json
        for _ in range(2)
    ]
    other = (
        client.images.generate(model="flux", prompt="seeded", size="64x64", extra_body={**STEPS, "seed": 99})
        .data[0]
        .b64_json
    )
    assert outs[0] == outs[1]
    assert decode(outs[0]).tobytes() != decode(other).tobytes()


def test_unseeded_request_reports_its_seed(flux_server):
    with flux_server.http() as http:
        body = {"model": "flux", "prompt": "lucky", "size": "64x64", "num_inference_steps": 2}
        first = http.post("/v1/images/generations", json=body).json()
        again = http.post("/v1/images/generations", json={**body, "seed": first["seed"]}).json()
    assert isinstance(first["seed"], int) and again["seed"] == first["seed"]
    assert again["data"][0]["b64_json"] == first["data"][0]["b64_json"]


def test_sse_stream_progress_and_image(flux_server):
    with (
        flux_server.http() as http,
        http.stream(
            "POST",
            "/v1/images/generations",
            json={
                "model": "flux",
                "prompt": "streamed",
                "size": "64x48",
                "stream": True,
                "num_inference_steps": 3,
            },
        ) as r,
    ):
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = []
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    progress = [d for n, d in events if n == "image_generation.progress"]
    assert [(d["step"], d["total_steps"]) for d in progress] == [(1, 3), (2, 3), (3, 3)]
    assert [d["progress"] for d in progress] == [33, 66, 100]
    ((name, done),) = [e for e in events if e[0] == "image_generation.completed"]
    assert done["type"] == name and done["size"] == "64x48"
    assert decode(done["b64_json"]).size == (64, 48)


def test_sse_stream_with_openai_client(flux_server):
    client = flux_server.openai()
    stream = client.images.generate(
        model="flux", prompt="streamed", size="64x64", stream=True, extra_body={"num_inference_steps": 2}
    )
    types = []
    for event in stream:
        types.append(event.type)
        if event.type == "image_generation.completed":
            assert decode(event.b64_json).size == (64, 64)
    assert types == ["image_generation.progress"] * 2 + ["image_generation.completed"]


def test_edit_on_flux(flux_server):
    client = flux_server.openai()
    r = client.images.edit(
        model="flux",
        image=("in.png", png_bytes(96, 64), "image/png"),
        prompt="make it blue",
        n=2,
        response_format="b64_json",
        extra_body={**STEPS, "strength": 0.5},
    )
    images = [decode(d.b64_json) for d in r.data]
    # no size given: the input's size, as OpenAI's edits do
    assert len(images) == 2 and all(im.size == (96, 64) for im in images)
    r = client.images.edit(
        model="flux",
        image=("in.png", png_bytes(96, 64), "image/png"),
        prompt="resize",
        size="64x64",
        output_format="jpeg",
        extra_body=STEPS,
    )
    assert decode(r.data[0].b64_json).format == "JPEG" and decode(r.data[0].b64_json).size == (64, 64)


def test_edit_with_mask_is_refused_not_ignored(flux_server):
    client = flux_server.openai()
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(
            model="flux",
            image=("in.png", png_bytes(64, 64), "image/png"),
            prompt="x",
            mask=("mask.png", png_bytes(64, 64, (0, 0, 0)), "image/png"),
            extra_body=STEPS,
        )
    assert e.value.body["code"] == "unsupported_mask" and e.value.body["param"] == "mask"


def test_identical_unseeded_requests_share_a_runner_call(flux_server):
    before_count = flux_server.metric("diffserve_batch_requests_count")
    before_sum = flux_server.metric("diffserve_batch_requests_sum")
    body = {"model": "flux", "prompt": "batch me", "size": "64x64", "num_inference_steps": 6}
    with flux_server.http() as http, cf.ThreadPoolExecutor(5) as pool:
        results = list(pool.map(lambda _: http.post("/v1/images/generations", json=body), range(5)))
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    images = {r.json()["data"][0]["b64_json"] for r in results}
    assert len(images) == 5  # one runner call with num_outputs, still five different samples
    calls = flux_server.metric("diffserve_batch_requests_count") - before_count
    assert flux_server.metric("diffserve_batch_requests_sum") - before_sum == 5
    assert calls < 5  # while the first runs, the other four wait and then go together


def test_api_key_required(flux_server):
    body = {"prompt": "x", "size": "64x64", "num_inference_steps": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": flux_server.api_key}):
        r = httpx.post(f"{flux_server.url}/v1/images/generations", json=body, headers=headers, timeout=10)
        assert r.status_code == 401
        assert (
            r.json()["error"]["type"] == "authentication_error"
            and r.json()["error"]["code"] == "invalid_api_key"
        )
    assert httpx.get(f"{flux_server.url}/v1/models", timeout=10).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        flux_server.openai(api_key="nope").models.list()
    # probes and metrics stay open for load balancers and Prometheus
    for path in ("/health", "/liveness", "/metrics"):
        assert httpx.get(f"{flux_server.url}{path}", timeout=10).status_code == 200


def test_cors_is_off_unless_configured(flux_server):
    r = httpx.get(
        f"{flux_server.url}/v1/models",
        headers={**flux_server.headers(), "Origin": "http://app.example"},
        timeout=10,
    )
    assert r.status_code == 200 and not any(h.startswith("access-control-") for h in r.headers)


def test_models(flux_server):
    ids = [m.id for m in flux_server.openai().models.list()]
    assert ids == ["model", "flux", "flux-alias"]  # the directory's name, then the --served-model-name ones


def test_metrics_count_requests_and_steps(flux_server):
    done = flux_server.metric("diffserve_requests_finished_total", task="image", outcome="completed")
    steps = flux_server.metric("diffserve_denoise_step_seconds_count")
    route = flux_server.metric(
        "diffserve_http_request_duration_seconds_count", method="POST", route="/v1/images/generations"
    )
    flux_server.openai().images.generate(
        model="flux", prompt="count me", size="64x64", extra_body={"seed": 1, "num_inference_steps": 4}
    )
    assert (
        flux_server.metric("diffserve_requests_finished_total", task="image", outcome="completed") == done + 1
    )
    # steps 2..4 are timed (the first interval also holds text encoding)
    assert flux_server.metric("diffserve_denoise_step_seconds_count") == steps + 3
    assert (
        flux_server.metric(
            "diffserve_http_request_duration_seconds_count", method="POST", route="/v1/images/generations"
        )
        == route + 1
    )
    assert flux_server.metric("diffserve_queue_depth") == 0
    assert flux_server.metric("diffserve_running_requests") == 0
    assert flux_server.metric("diffserve_worker_ready") == 1
