"""Models that take an input image, through a live server and the official openai client: FLUX.1 Kontext on
the native FLUX DiT (/v1/images/edits), Stable Diffusion 3 img2img on the generic diffusers path, and the
400 a text-only model gives an edit."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
import torch
from PIL import Image

from tests.integration.conftest import CLEAN_EXIT, LiveServer


def _png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _decode(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def _server(tmp_path_factory, family: str, name: str):
    from diffserve.testing import make_tiny_model

    model = make_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}") / name)
    server = LiveServer(
        ["--model", str(model), "--warmup-resolutions", "32x32"], tmp_path_factory.mktemp(f"{name}-out")
    ).start()
    server.wait_healthy()
    return server, model


@pytest.fixture(scope="module")
def kontext_server(tmp_path_factory):
    server, _ = _server(tmp_path_factory, "flux-kontext", "kontext")
    yield server
    code = server.stop()
    assert code in CLEAN_EXIT, f"exit code {code}\n{server.log_tail()}"


def _stop(server):
    code = server.stop()
    assert code in CLEAN_EXIT, f"exit code {code}\n{server.log_tail()}"


def test_kontext_edit(kontext_server):
    client = kontext_server.openai()
    ids = [m.id for m in client.models.list()]
    assert ids == ["kontext"]
    # A 64x64 input: the reference is resized to 1024x1024 (the preferred resolution of its aspect ratio);
    # the requested size is the output's.
    r = client.images.edit(
        model="kontext",
        image=("in.png", _png(64, 64), "image/png"),
        prompt="make the sky green",
        size="64x48",
        n=2,
        extra_body={"num_inference_steps": 2, "seed": 5},
    )
    images = [_decode(d.b64_json) for d in r.data]
    assert len(images) == 2 and all(im.size == (64, 48) for im in images)
    assert images[0].tobytes() != images[1].tobytes()
    # Kontext steers by instruction: a strength is refused, not ignored.
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(
            model="kontext",
            image=("in.png", _png(64, 64), "image/png"),
            prompt="x",
            size="64x48",
            extra_body={"num_inference_steps": 1, "strength": 0.5},
        )
    assert "takes no strength" in e.value.body["message"]
    # Without an image it is FLUX text-to-image.
    r = client.images.generate(
        model="kontext", prompt="a fox", size="32x48", extra_body={"num_inference_steps": 1}
    )
    assert _decode(r.data[0].b64_json).size == (32, 48)


def test_text_only_model_refuses_an_edit_and_img2img_runs_on_the_generic_path(tmp_path_factory):
    """SD3 text-to-image takes no image: 400 with a message that says so. The same model saved as
    StableDiffusion3Img2ImgPipeline (no native DiT: diffusers runs it) edits, and gives diffusers' pixels."""
    text_only, _ = _server(tmp_path_factory, "sd3", "sd3")
    try:
        with pytest.raises(openai.BadRequestError) as e:
            text_only.openai().images.edit(
                image=("in.png", _png(64, 64), "image/png"), prompt="x", extra_body={"num_inference_steps": 1}
            )
        body = e.value.body
        assert (body["code"], body["param"]) == ("unsupported_task", "image")
        assert "does not take an input image, so it cannot edit images" in body["message"]
    finally:
        _stop(text_only)

    server, model = _server(tmp_path_factory, "sd3-img2img", "sd3-img2img")
    try:
        client = server.openai()
        steps = {"num_inference_steps": 4, "strength": 0.5, "seed": 3, "guidance_scale": 5.0}
        r = client.images.edit(
            image=("in.png", _png(80, 56, seed=1), "image/png"), prompt="a red barn", extra_body=steps
        )
        ours = _decode(r.data[0].b64_json)
        assert ours.size == (80, 56)  # no size: the input's (a multiple of 8 already)
    finally:
        _stop(server)

    from diffusers import StableDiffusion3Img2ImgPipeline

    pipe = StableDiffusion3Img2ImgPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        "a red barn",
        image=Image.open(io.BytesIO(_png(80, 56, seed=1))),
        height=56,
        width=80,
        num_inference_steps=4,
        strength=0.5,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).images[0]
    # tests/unit/test_pipelines.py's tolerance: float32 on the CPU in both processes, rounded to uint8 once
    # (0.5) with 0.02 for the float32 reduction order (AVX2 / AVX-512, thread count)
    err = np.abs(np.asarray(ours, np.float64) - ref * 255.0)
    assert err.max() <= 0.52 and ref.std() > 0.05, err.max()
