"""`serve --offload layerwise` (runtime/offload.py) on the tiny FLUX model, driven by the openai client: the
worker warms up and serves with the DiT's blocks streamed and the text encoders and VAE visiting, and its
pixels are those of the resident server (flux_server, same model) for the same seed."""

from __future__ import annotations

from tests.integration.conftest import CLEAN_EXIT, LiveServer


def _image(server, model: str) -> str:
    r = server.openai().images.generate(
        model=model,
        prompt="a red square",
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 7, "num_inference_steps": 3},
    )
    return r.data[0].b64_json


def test_serve_with_layerwise_offload_matches_resident(tiny_flux_dir, flux_server, tmp_path):
    server = LiveServer(
        ["--model", str(tiny_flux_dir), "--warmup-resolutions", "64x64", "--offload", "layerwise"],
        tmp_path / "out",
    ).start()
    try:
        server.wait_healthy()
        offloaded = [_image(server, server.openai().models.list().data[0].id) for _ in range(2)]
        assert offloaded[0] == offloaded[1]  # the streamed blocks come home and return intact
        assert offloaded[0] == _image(flux_server, "flux")  # bitwise the resident model's (CPU)
        assert "offload layerwise" in server.log_tail(400)  # the streamer said what it streams
    finally:
        code = server.stop()
    assert code in CLEAN_EXIT, f"exit code {code}\n{server.log_tail()}"
