"""Qwen-Image and Qwen-Image-Edit behind the live server, driven by the openai client: text-to-image through
/v1/images/generations, the edit through /v1/images/edits, negative_prompt and true_cfg_scale as request
extensions, the native family in /v1/models. (Pixel parity with diffusers: tests/unit/test_qwen_image.py.)

The two tiny servers start one after the other (each worker imports torch and warms up: the edit model's warm-up
encodes a ~1024^2 image, its working size, ~10 s on the CI CPU)."""

from __future__ import annotations

import base64
import io

import openai
import pytest

from tests.integration.conftest import CLEAN_EXIT, LiveServer

STEPS = {"num_inference_steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def qwen_servers(tmp_path_factory):
    from diffserve.testing import make_tiny_model

    servers = {}
    for family in ("qwen-image", "qwen-image-edit"):
        model = make_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}") / "model")
        servers[family] = LiveServer(
            ["--model", str(model), "--warmup-resolutions", "32x32", "--served-model-name", family],
            tmp_path_factory.mktemp(f"{family}-out"),
        ).start(timeout=120)
        # one after the other: two workers warming up at once on 2 cores took 140 s, in turn ~25 s
        servers[family].wait_healthy(timeout=240)
    yield servers
    for server in servers.values():
        code = server.stop()
        assert code in CLEAN_EXIT, f"exit code {code}\n{server.log_tail()}"


def _decode(b64: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.radial_gradient("L").resize((width, height)).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def test_generation_with_negative_prompt_and_true_cfg(qwen_servers):
    server = qwen_servers["qwen-image"]
    client = server.openai()
    assert [(m.id, m.family) for m in client.models.list().data][-1] == ("qwen-image", "qwen-image")
    r = client.images.generate(
        model="qwen-image",
        prompt="a red fox in the snow",
        size="64x48",
        n=2,
        extra_body={**STEPS, "negative_prompt": "blurry", "true_cfg_scale": 2.5},
    )
    assert [_decode(d.b64_json).size for d in r.data] == [(64, 48)] * 2
    # true CFG: two forwards a step (the response's dit_forwards extension)
    assert r.model_extra["dit_forwards"] == {"computed": 4, "cached": 0}
    plain = client.images.generate(
        model="qwen-image", prompt="a red fox in the snow", size="64x48", extra_body=STEPS
    )
    assert plain.model_extra["dit_forwards"] == {"computed": 2, "cached": 0}  # no negative prompt: no CFG

    with pytest.raises(openai.BadRequestError) as e:  # checked by the pipeline, reported as a 400
        client.images.generate(
            model="qwen-image", prompt="x", size="64x48", extra_body={"true_cfg_scale": 0.5}
        )
    assert "true_cfg_scale" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # a text-to-image model edits nothing
        client.images.edit(model="qwen-image", image=("in.png", _png(64, 48), "image/png"), prompt="x")
    assert e.value.body["code"] == "unsupported_task"


def test_edit(qwen_servers):
    server = qwen_servers["qwen-image-edit"]
    client = server.openai()
    assert client.models.list().data[-1].family == "qwen-image-edit"
    r = client.images.edit(
        model="qwen-image-edit",
        image=("in.png", _png(56, 40), "image/png"),
        prompt="make it blue",
        size="64x48",
        extra_body={**STEPS, "negative_prompt": "blurry"},
    )
    assert _decode(r.data[0].b64_json).size == (64, 48)
    assert r.model_extra["dit_forwards"] == {"computed": 4, "cached": 0}  # true_cfg_scale 4 by default

    with pytest.raises(openai.BadRequestError) as e:  # the edit model needs an image
        client.images.generate(model="qwen-image-edit", prompt="x", size="64x48", extra_body=STEPS)
    assert "edits an input image" in e.value.body["message"]
