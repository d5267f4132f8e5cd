"""LoRA adapters through the live server (issue 20): `serve --lora NAME=PATH`, the `lora` request extension
sent by the openai client (extra_body), /v1/models listing the adapters, and `generate --lora-scale`."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from diffserve.testing.tiny_loras import make_tiny_lora
from tests.integration.conftest import API_KEY, CLEAN_EXIT, REPO, LiveServer

BODY = {"seed": 7, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def loras(tiny_flux_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("server-loras")
    make_tiny_lora(tiny_flux_dir, d / "style.safetensors", fmt="peft", seed=1)
    make_tiny_lora(tiny_flux_dir, d / "kohya.safetensors", fmt="kohya", seed=2)
    return d


@pytest.fixture(scope="module")
def lora_server(tiny_flux_dir, loras, tmp_path_factory):
    server = LiveServer(
        [
            "--model",
            str(tiny_flux_dir),
            "--warmup-resolutions",
            "64x64",
            "--lora",
            f"style={loras / 'style.safetensors'}",
            "--lora",
            f"kohya={loras / 'kohya.safetensors'}",
            "--max-batch",
            "2",
        ],
        tmp_path_factory.mktemp("lora-out"),
        api_key=API_KEY,
    ).start()
    server.wait_healthy()
    yield server
    code = server.stop()
    assert code in CLEAN_EXIT, f"exit code {code}\n{server.log_tail()}"


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def _image(client, lora=None) -> bytes:
    extra = {**BODY, **({"lora": lora} if lora is not None else {})}
    r = client.images.generate(model="model", prompt="a red fox", size="64x64", extra_body=extra)
    return base64.b64decode(r.data[0].b64_json)


def test_adapters_switch_per_request(lora_server):
    client = lora_server.openai()
    base = _image(client)
    style = _image(client, {"style": 1.0})
    kohya = _image(client, {"kohya": 1.0})
    both = _image(client, {"style": 0.5, "kohya": 1.0})
    assert len({base, style, kohya, both}) == 4  # each adapter set gives its own picture
    # back to back, in any order, each request gets its own set's picture (nothing left applied, no drift)
    assert _image(client, {"style": 1.0}) == style
    assert _image(client) == base
    assert _image(client, {"kohya": 1.0, "style": 0}) == kohya
    # sent together, so that the engine could batch them: each still gets its own (batches hold one set)
    with ThreadPoolExecutor(4) as pool:
        sets = [None, {"style": 1.0}, {"kohya": 1.0}, {"style": 1.0}]
        got = list(pool.map(lambda s: _image(lora_server.openai(), s), sets))
    # a request batched with another is what it is alone up to float rounding (api.batch_key): 1 level
    for mine, alone in zip(got, [base, style, kohya, style], strict=True):
        assert np.abs(_pixels(mine) - _pixels(alone)).max() <= 1


def test_unknown_adapter_is_a_400_naming_the_known_ones(lora_server):
    client = lora_server.openai()
    with pytest.raises(openai.BadRequestError) as e:
        _image(client, {"nope": 1.0})
    assert e.value.body["message"] == "Unknown LoRA adapter 'nope': known adapters are style, kohya."
    assert (e.value.body["param"], e.value.body["code"]) == ("lora", "unknown_lora")
    for bad in ({"style": "strong"}, ["style"]):
        r = httpx.post(
            f"{lora_server.url}/v1/images/generations",
            headers=lora_server.headers(),
            json={"prompt": "x", "size": "64x64", "lora": bad},
            timeout=30,
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora", r.text


def test_models_lists_the_adapters(lora_server, loras):
    data = lora_server.openai().models.list().data
    by_id = {m.id: m for m in data}
    assert {"style", "kohya"} <= set(by_id)
    base = next(m.id for m in data if not (m.model_extra or {}).get("parent"))
    assert by_id["style"].model_extra["parent"] == base
    assert by_id["kohya"].model_extra["root"] == str(loras / "kohya.safetensors")


def test_generate_cli_lora_scale(tiny_flux_dir, loras, tmp_path):
    def run(*args):
        cmd = [
            sys.executable,
            "-m",
            "diffserve",
            "generate",
            "--model",
            str(tiny_flux_dir),
            "--device",
            "cpu",
        ]
        cmd += ["--prompt", "a red fox", "--size", "64x64", "--steps", "2", "--seed", "7", "-q", *args]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)

    lora = f"style={loras / 'style.safetensors'}"
    bad = run("--lora", lora, "--lora-scale", "nope=1", "-o", str(tmp_path / "x.png"))
    assert bad.returncode == 2
    assert bad.stderr.strip().endswith("unknown LoRA adapter 'nope': known adapters are style")
    for name, scale in (("off", "0"), ("on", "1")):
        done = run("--lora", lora, "--lora-scale", f"style={scale}", "-o", str(tmp_path / f"{name}.png"))
        assert done.returncode == 0, done.stderr
    # scale 0 is the base model, 1 the adapter: two different pictures
    assert (tmp_path / "off.png").read_bytes() != (tmp_path / "on.png").read_bytes()
