"""Bad input of every kind gets a 4xx in OpenAI's error shape, never a 500, and the server stays healthy."""

from __future__ import annotations

import io
import struct
import zlib

import httpx
import openai
import pytest
from PIL import Image

GEN = "/v1/images/generations"


def png(w=64, h=64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 10)).save(buf, format="PNG")
    return buf.getvalue()


def png_header(w: int, h: int) -> bytes:
    """A PNG that is only its signature, an IHDR claiming w x h (1-bit grey) and IEND: no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


JSON_CASES = [
    # (body, code, param): a wrong type is pydantic's 'invalid_request'; a value out of the limits that
    # `diffserve generate` shares (runtime/limits.py) is 'invalid_value' or 'invalid_size'.
    ({"prompt": "x", "size": "big"}, "invalid_size", "size"),
    ({"prompt": "x", "size": "100x100"}, "invalid_size", "size"),  # not a multiple of 16
    ({"prompt": "x", "size": "4096x4096"}, "invalid_size", "size"),  # above the server's limit
    ({"prompt": "x", "size": "0x64"}, "invalid_size", "size"),
    ({"prompt": "x", "num_inference_steps": -1}, "invalid_value", "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 0}, "invalid_value", "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 100000}, "invalid_value", "num_inference_steps"),
    ({"prompt": "x", "n": "two"}, "invalid_request", "n"),
    ({"prompt": "x", "n": 0}, "invalid_value", "n"),
    ({"prompt": "x", "n": 11}, "invalid_value", "n"),
    ({"prompt": "x", "n": 1.5}, "invalid_request", "n"),
    ({"prompt": 123}, "invalid_request", "prompt"),
    ({"prompt": ["a", "b"]}, "invalid_request", "prompt"),
    ({"prompt": ""}, "invalid_value", "prompt"),
    ({}, "invalid_request", "prompt"),
    ({"prompt": "x", "guidance_scale": "high"}, "invalid_request", "guidance_scale"),
    ({"prompt": "x", "guidance_scale": -1}, "invalid_value", "guidance_scale"),
    ({"prompt": "x", "seed": -5}, "invalid_value", "seed"),
    ({"prompt": "x", "seed": 2**70}, "invalid_value", "seed"),
    ({"prompt": "x", "stream": "maybe"}, "invalid_request", "stream"),
    ({"prompt": "x", "response_format": "gif"}, "invalid_request", "response_format"),
    ({"prompt": "x", "output_format": "bmp"}, "invalid_request", "output_format"),
    ({"prompt": "x", "num_inference_step": 3}, "invalid_request", "num_inference_step"),  # misspelt extension
    ({"prompt": "x", "negative_prompt": {"a": 1}}, "invalid_request", "negative_prompt"),
]


@pytest.mark.parametrize("body, code, param", JSON_CASES, ids=[repr(c[0])[:40] for c in JSON_CASES])
def test_bad_generation_fields(flux_server, body, code, param):
    with flux_server.http() as http:
        assert_openai_error(http.post(GEN, json=body), 400, code, param)


@pytest.mark.parametrize("size", ["100000x100000", "64x999999999"])
def test_oversized_size_names_the_limits(flux_server, size):
    with flux_server.http() as http:
        err = assert_openai_error(
            http.post(GEN, json={"prompt": "x", "size": size}), 400, "invalid_size", "size"
        )
    assert "between 16 and" in err["message"], err


def test_two_megabyte_prompt(flux_server):
    # This server's body limit (two 1 MB uploads and some form text) refuses it before parsing; with the
    # default 20 MB uploads it would reach the prompt-length check below.
    with flux_server.http() as http:
        r = http.post(GEN, json={"prompt": "a" * (2 * 1024 * 1024)})
    assert_openai_error(r, 413, "request_too_large")
    assert len(r.content) < 1000  # the prompt is not echoed back


def test_prompt_over_the_limit(flux_server):
    with flux_server.http() as http:
        r = http.post(GEN, json={"prompt": "a" * 8193, "negative_prompt": "b"})
        assert_openai_error(r, 400, "prompt_too_long", "prompt")
        assert len(r.content) < 1000
        r = http.post(GEN, json={"prompt": "a", "negative_prompt": "b" * 8193})
        assert_openai_error(r, 400, "prompt_too_long", "negative_prompt")


def test_chunked_body_over_the_limit(flux_server):
    def chunks():  # no Content-Length: the limit applies while reading
        yield b'{"prompt": "'
        for _ in range(30):
            yield b"a" * 100_000
        yield b'"}'

    with flux_server.http() as http:
        r = http.post(GEN, content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(r, 413, "request_too_large")


@pytest.mark.parametrize(
    "raw", [b'{"prompt": "x",', b"not json at all", b"", b'["prompt"]', b"\xff\xfe\x00garbage"]
)
def test_malformed_json(flux_server, raw):
    with flux_server.http() as http:
        r = http.post(GEN, content=raw, headers={"content-type": "application/json"})
    assert_openai_error(r, 400, "invalid_json")


def test_unknown_model(flux_server):
    client = flux_server.openai()
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(model="dall-e-3", prompt="x")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


@pytest.mark.parametrize(
    "video_id", ["video_" + "0" * 32, "nope", "video_../../jobs", "%2e%2e%2fjobs.sqlite3"]
)
def test_unknown_video_id(flux_server, video_id):
    with flux_server.http() as http:
        for method, suffix in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
            r = http.request(method, f"/v1/videos/{video_id}{suffix}")
            assert r.status_code == 404, r.text
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_video_route_on_image_model(flux_server):
    with flux_server.http() as http:
        assert_openai_error(http.post("/v1/videos", json={"prompt": "x"}), 400, "unsupported_task", "model")


def edit(flux_server, files, data=None):
    with flux_server.http() as http:
        return http.post(
            "/v1/images/edits", files=files, data=data or {"prompt": "x", "num_inference_steps": "1"}
        )


def test_broken_image_upload(flux_server):
    truncated = png(64, 64)[:60]
    for blob in (b"this is not an image", truncated, b"GIF89a" + b"\0" * 20):
        err = assert_openai_error(
            edit(flux_server, {"image": ("x.png", blob, "image/png")}), 400, "invalid_image", "image"
        )
        assert "image" in err["message"]


def test_image_upload_limits(flux_server):
    # the test server allows 1,000,000 bytes per upload
    noise = Image.frombytes("RGB", (800, 600), bytes(range(256)) * (800 * 600 * 3 // 256))
    buf = io.BytesIO()
    noise.save(buf, format="PNG", compress_level=0)
    assert len(buf.getvalue()) > 1_000_000
    assert_openai_error(
        edit(flux_server, {"image": ("big.png", buf.getvalue(), "image/png")}), 413, "file_too_large", "image"
    )
    # a small file that claims a huge canvas is refused before it is decoded
    assert_openai_error(
        edit(flux_server, {"image": ("wide.png", png(5000, 16), "image/png")}),
        400,
        "image_too_large",
        "image",
    )
    # a header claiming 30000x30000 (Pillow's own decompression-bomb guard refuses it at open) is "too large"
    assert_openai_error(
        edit(flux_server, {"image": ("bomb.png", png_header(30000, 30000), "image/png")}),
        400,
        "image_too_large",
        "image",
    )
    # the edit's form fields obey the same rules as JSON ones
    assert_openai_error(
        edit(flux_server, {"image": ("x.png", png(), "image/png")}, {"prompt": "x", "strength": "2"}),
        400,
        "invalid_value",
        "strength",
    )
    assert_openai_error(edit(flux_server, {}, {"prompt": "x"}), 400, "invalid_request", "image")
    # a file under a name the route does not take is refused, not ignored
    extra = {"image": ("x.png", png(), "image/png"), "photo": ("y.png", png(), "image/png")}
    assert_openai_error(edit(flux_server, extra), 400, "invalid_request", "photo")


def test_unknown_route_and_method(flux_server):
    with flux_server.http() as http:
        assert_openai_error(http.get("/v1/nothing"), 404, "not_found")
        assert_openai_error(http.put(GEN, json={"prompt": "x"}), 405, "method_not_allowed")
        assert_openai_error(http.get("/v1/videos", params={"limit": 0}), 400, "invalid_request", "limit")
        assert_openai_error(http.get("/v1/videos", params={"order": "sideways"}), 400, "invalid_request")


def test_still_healthy_after_bad_input(flux_server):
    assert httpx.get(f"{flux_server.url}/health", timeout=10).status_code == 200
    assert flux_server.metric("diffserve_errors_total", kind="internal_error") == 0
