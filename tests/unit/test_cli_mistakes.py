"""Every user mistake the command line can meet ends in one line on stderr and exit status 2, no traceback:
checked in real subprocesses, as a user meets them. Mistakes that need no model fail before it loads."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "diffserve", *args], capture_output=True, text=True, timeout=timeout, env=full_env
    )


def _one_line(result: subprocess.CompletedProcess, command: str, expected: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"diffserve {command}: error: "), result.stderr[-2000:]
    assert expected in lines[0], lines[0]


@pytest.fixture
def no_fa3(monkeypatch):
    # This machine's torch is a CPU build: FA3 can never run on it (torch.version.cuda is None).
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a usable FA3 (this one has a GPU)")


def test_explicit_fa3_without_fa3(tiny_flux_dir, tmp_path, no_fa3):
    out = tmp_path / "x.png"
    result = _run("generate", "--model", str(tiny_flux_dir), "--prompt", "x", "--attention-backend", "fa3", "-o", str(out))
    _one_line(result, "generate", "fa3")
    assert not out.exists()


def test_fa3_from_the_environment_without_fa3(tiny_flux_dir, tmp_path, no_fa3):
    out = tmp_path / "x.png"
    result = _run(
        "generate", "--model", str(tiny_flux_dir), "--prompt", "x", "-o", str(out),
        env={"DIFFSERVE_ATTENTION_BACKEND": "fa3"},
    )  # fmt: skip
    _one_line(result, "generate", "fa3")


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_unknown_platform(tmp_path, command):
    args = ["--prompt", "x", "-o", str(tmp_path / "x.png")] if command == "generate" else ["--port", "0"]
    result = _run(command, *args, env={"DIFFSERVE_PLATFORM": "bogus"}, timeout=60)
    _one_line(result, command, "DIFFSERVE_PLATFORM='bogus': choose one of cuda, rocm, xpu, cpu")


def test_bad_boolean_variable(tmp_path):
    result = _run("generate", "--prompt", "x", "-o", str(tmp_path / "x.png"), env={"DIFFSERVE_CUDA_GRAPHS": "maybe"})
    _one_line(result, "generate", "DIFFSERVE_CUDA_GRAPHS='maybe'")


def test_unwritable_output_fails_before_the_model_loads(tmp_path):
    # A model path that does not exist: were the output checked after loading, the error would name the model.
    start = time.monotonic()
    result = _run("generate", "--model", str(tmp_path / "no-model"), "--prompt", "x", "-o", "/proc/nope/x.png")
    _one_line(result, "generate", "cannot write /proc/nope/x.png")
    assert time.monotonic() - start < 60
    directory = _run("generate", "--prompt", "x", "-o", str(tmp_path))
    _one_line(directory, "generate", "cannot tell the output format")


def test_request_limits_fail_before_the_model_loads(tmp_path):
    missing = str(tmp_path / "no-model")
    for args, expected in (
        (["--prompt", ""], "'prompt' must not be empty"),
        (["--prompt", "x" * 8193], "'prompt' is too long (8193 characters; at most 8192)"),
        (["--prompt", "x", "--seed", "-1"], "'seed' must be an integer between 0 and"),
        (["--prompt", "x", "--steps", "201"], "'num_inference_steps' must be an integer between 1 and 200"),
        (["--prompt", "x", "--fps", "24"], "this model makes images: 'fps' is not accepted"),  # -o x.png
    ):
        result = _run("generate", "--model", missing, *args, "-o", str(tmp_path / "x.png"))
        _one_line(result, "generate", expected)


def test_serve_missing_model_fails_before_uvicorn(tmp_path):
    result = _run("serve", "--model", str(tmp_path / "nonexistent"), "--port", "0", "--output-dir", str(tmp_path / "o"))
    _one_line(result, "serve", f"model directory not found: {tmp_path / 'nonexistent'}")
    assert "Uvicorn running" not in result.stderr + result.stdout


def test_serve_busy_port_fails_before_the_model_loads(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        start = time.monotonic()
        result = _run("serve", "--port", str(port), "--output-dir", str(tmp_path / "o"), timeout=60)
    _one_line(result, "serve", f"port {port} on 127.0.0.1 is in use by another process")
    assert time.monotonic() - start < 30  # no model load, no worker


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--dtype", "int4"], "unknown dtype 'int4'"),
        (["--attention-backend", "magic"], "unknown attention backend 'magic'"),
        (["--warmup-resolutions", "big"], "invalid size 'big'"),
        (["--ulysses-degree", "0"], "--ulysses-degree must be at least 1"),
        (["--max-queue", "0"], "max_queue must be at least 1"),
    ],
)
def test_serve_bad_flags(tmp_path, args, expected):
    result = _run("serve", "--port", "0", "--output-dir", str(tmp_path / "o"), *args, timeout=60)
    _one_line(result, "serve", expected)


def test_version():
    import diffserve

    result = _run("--version", timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"diffserve {diffserve.__version__}"


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_help_shows_defaults_and_both_dtype_spellings(command):
    result = _run(command, "--help", timeout=60)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "bf16|bfloat16" in text and "fp16|float16" in text
    if command == "serve":
        for default in ("default 8000", "default 16)", "default 600)", "default 2048", "default 8192"):
            assert default in text, default
