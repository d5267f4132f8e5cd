"""`diffserve generate` and the server give the same verdict on the same input, with the same words: both
call runtime/limits.py. Each row of the table goes through the CLI (in process, on the tiny model) and
through a live server (HTTP) serving the same model with its default limits."""

from __future__ import annotations

import pytest

from diffserve.cli import main
from tests.integration.conftest import LiveServer

LONG = 8192  # the default --max-prompt-chars

# (CLI flags, the API body's fields, accepted?)
IMAGE_CASES = [
    ([], {}, True),
    (["--prompt", ""], {"prompt": ""}, False),
    (["--prompt", "   "], {"prompt": "   "}, False),
    (["--prompt", "x" * LONG], {"prompt": "x" * LONG}, True),
    (["--prompt", "x" * 10_010], {"prompt": "x" * 10_010}, False),
    (["--negative-prompt", "x" * (LONG + 1)], {"negative_prompt": "x" * (LONG + 1)}, False),
    (["--size", "48x32"], {"size": "48x32"}, True),
    (["--size", "100x64"], {"size": "100x64"}, False),
    (["--size", "2064x16"], {"size": "2064x16"}, False),
    (["--size", "8192x8192"], {"size": "8192x8192"}, False),
    (["--size", "0x32"], {"size": "0x32"}, False),
    (["--steps", "0"], {"num_inference_steps": 0}, False),
    (["--steps", "201"], {"num_inference_steps": 201}, False),
    (["--seed", "-1"], {"seed": -1}, False),
    (["--seed", str(2**63 - 1)], {"seed": 2**63 - 1}, True),
    (["--seed", str(2**63)], {"seed": 2**63}, False),
    (["--guidance", "-0.5"], {"guidance_scale": -0.5}, False),
    (["--guidance", "100.5"], {"guidance_scale": 100.5}, False),
    (["--guidance", "7"], {"guidance_scale": 7}, True),
    (["--num-outputs", "0"], {"n": 0}, False),
    (["--num-outputs", "11"], {"n": 11}, False),
    (["--num-outputs", "2"], {"n": 2}, True),
]
VIDEO_CASES = [
    ([], {}, True),
    (["--frames", "9"], {"num_frames": 9}, True),
    (["--frames", "10"], {"num_frames": 10}, False),
    (["--frames", "301"], {"num_frames": 301}, False),
    (["--fps", "0"], {"fps": 0}, False),
    (["--fps", "121"], {"fps": 121}, False),
    (["--fps", "24"], {"fps": 24}, True),
    (["--prompt", ""], {"prompt": ""}, False),
]


def _cli(model: str, flags: list[str], out, capsys) -> tuple[bool, str]:
    base = {"--prompt": "a red circle", "--size": "32x32", "--steps": "1", "--seed": "1"}
    for i in range(0, len(flags), 2):
        base[flags[i]] = flags[i + 1]
    argv = ["generate", "--model", model, "-q", "-o", str(out)]
    for key, value in base.items():
        argv += [f"{key}={value}"]  # '=' so that a value starting with '-' is not taken for a flag
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code in (0, 2), err
    return code == 0, err.rpartition("error: ")[2]


def _server(server: LiveServer, route: str, model: str, fields: dict) -> tuple[bool, str]:
    body = {"model": model, "prompt": "a red circle", "size": "32x32", "num_inference_steps": 1, "seed": 1}
    body.update(fields)
    with server.http() as http:
        r = http.post(route, json=body)
    assert r.status_code in (200, 400), r.text
    return r.status_code == 200, (r.json().get("error") or {}).get("message", "")


def _same_words(cli: str, api: str) -> bool:
    """The API words a message as a sentence (capital, full stop); the CLI as a line after 'error: '."""
    return api.rstrip(".").lower() == cli.lower()


@pytest.mark.parametrize(("flags", "fields", "accepted"), IMAGE_CASES)
def test_images_same_verdict(flux_server, tiny_flux_dir, tmp_path, capsys, flags, fields, accepted):
    cli_ok, cli_msg = _cli(str(tiny_flux_dir), flags, tmp_path / "x.png", capsys)
    api_ok, api_msg = _server(flux_server, "/v1/images/generations", "flux", fields)
    assert (cli_ok, api_ok) == (accepted, accepted), (cli_msg, api_msg)
    if not accepted:
        assert _same_words(cli_msg, api_msg), (cli_msg, api_msg)


@pytest.fixture(scope="module")
def wan_server(tiny_wan_dir, tmp_path_factory):
    server = LiveServer(
        ["--model", str(tiny_wan_dir), "--warmup-resolutions", "32x32", "--served-model-name", "wan"],
        tmp_path_factory.mktemp("agree-wan"),
    ).start()
    server.wait_healthy()
    yield server
    server.stop()


@pytest.mark.parametrize(("flags", "fields", "accepted"), VIDEO_CASES)
def test_videos_same_verdict(wan_server, tiny_wan_dir, tmp_path, capsys, flags, fields, accepted):
    cli_ok, cli_msg = _cli(str(tiny_wan_dir), ["--frames", "5", *flags], tmp_path / "x.mp4", capsys)
    api_ok, api_msg = _server(wan_server, "/v1/videos", "wan", {"num_frames": 5, **fields})
    assert (cli_ok, api_ok) == (accepted, accepted), (cli_msg, api_msg)
    if not accepted:
        assert _same_words(cli_msg, api_msg), (cli_msg, api_msg)
