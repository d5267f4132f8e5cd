"""Starting with the bundled default model or without a loadable one, and the output directory's
housekeeping (no server needed for the latter)."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time

import pytest
from PIL import Image

from diffserve.server.files import OutputFiles
from tests.integration.conftest import CLEAN_EXIT, REPO, LiveServer, free_port


def test_without_model_serves_the_bundled_default(tmp_path):
    server = LiveServer([], tmp_path / "out").start()
    try:
        assert server.wait_healthy()["model"] == "diffserve-default"
        r = server.openai().images.generate(prompt="a red circle", extra_body={"seed": 0})
        im = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
        assert im.size == (128, 128)  # the size the bundled model was trained at, its default
    finally:
        assert server.stop() in CLEAN_EXIT


def test_unloadable_model_exits_with_the_reason(tiny_flux_dir, tmp_path):
    # A model that passes the start-up checks (its directory and files are fine) but that the worker cannot
    # load as asked: FA3 chosen explicitly on a machine without it. (A missing directory fails earlier, before
    # the worker starts: tests/unit/test_cli_mistakes.py.)
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without FA3 (this one has a GPU)")
    cmd = [
        sys.executable,
        "-m",
        "diffserve",
        "serve",
        "--model",
        str(tiny_flux_dir),
        "--attention-backend",
        "fa3",
        "--port",
        str(free_port()),
        "--output-dir",
        str(tmp_path / "out"),
    ]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "cannot serve the model" in run.stderr and "fa3" in run.stderr


def test_expired_images_are_removed_and_names_are_checked(tmp_path):
    files = OutputFiles(tmp_path)
    old, new = files.save_image(b"old", "png"), files.save_image(b"new", "webp")
    past = time.time() - 7200
    os.utime(files.images / old, (past, past))
    assert files.expire_images(ttl=3600) == 1
    assert files.image_path(old) is None and files.image_path(new).read_bytes() == b"new"
    (tmp_path / "secret.png").write_bytes(b"x")
    for name in ("../secret.png", "secret.png", new.upper(), new + "/", "/etc/passwd"):
        assert files.image_path(name) is None


def test_ulysses_worker_group_serves_the_same_image_as_one_process(flux_server, tiny_flux_dir, tmp_path):
    """--ulysses-degree 2 on the CPU (gloo): the server's worker becomes a group of two ranks, and the
    image equals the one-process image (the shared server's, on the same model) for the same seed (fp32;
    sharded sums may round differently, hence one uint8 level)."""
    import numpy as np

    request = dict(prompt="a red circle", size="64x64", extra_body={"seed": 3, "num_inference_steps": 2})

    def image(server: LiveServer) -> np.ndarray:
        r = server.openai().images.generate(**request)
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))).astype(int)

    assert flux_server.wait_healthy()["world_size"] == 1
    single = image(flux_server)
    server = LiveServer(
        ["--model", str(tiny_flux_dir), "--warmup-resolutions", "64x64", "--ulysses-degree", "2"],
        tmp_path / "out",
    ).start()
    try:
        assert server.wait_healthy()["world_size"] == 2
        sharded = image(server)
    finally:
        assert server.stop() in CLEAN_EXIT, server.log_tail()
    assert single.shape == (64, 64, 3)
    assert np.abs(single - sharded).max() <= 1
