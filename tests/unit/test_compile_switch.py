"""`--compile` (RuntimeConfig.compile): the loader compiles the DiT's blocks, the pictures do not change, and
the compiled kernels land under $DIFFSERVE_CACHE_DIR.

On the CPU the blocks are traced with torch.compile's "eager" backend (Dynamo without code generation):
what Inductor generates is checked on the GPU by benchmarks/bench_dit.py (ours-compile, rel err column).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest

from diffserve.runtime import compile as compile_mod
from diffserve.runtime.api import GenerationRequest
from diffserve.runtime.runner import load_runner


def _pixels(runner) -> np.ndarray:
    req = GenerationRequest("a red circle", width=64, height=64, num_inference_steps=2, seed=3)
    return np.asarray(runner.generate(req).images[0])


def test_compile_switch_compiles_the_blocks_and_keeps_the_image(tiny_flux_dir, tmp_path, monkeypatch):
    import torch

    plain = load_runner(str(tiny_flux_dir), device="cpu")
    assert not compile_mod.compiled(plain.pipeline.transformer)
    expected = _pixels(plain)

    traced = []
    original = compile_mod.compile_dit

    def tracing_only(model, **kwargs):
        traced.append(type(model).__name__)
        return original(model, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(compile_mod, "compile_dit", tracing_only)
    monkeypatch.setenv(compile_mod.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    torch._dynamo.reset()
    try:
        runner = load_runner(str(tiny_flux_dir), device="cpu", compile=True)  # what --compile does
        assert traced == ["FluxTransformer"] and compile_mod.compiled(runner.pipeline.transformer)
        assert (tmp_path / "inductor").is_dir()  # the persistent cache the next start reads
        np.testing.assert_array_equal(_pixels(runner), expected)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("module", ["diffserve.runtime.cli", "diffserve.server.cli"])
def test_both_commands_take_compile(module):
    import importlib

    cli = importlib.import_module(module)
    add = cli.add_generate_arguments if module.endswith("runtime.cli") else cli.add_serve_arguments
    parser = argparse.ArgumentParser()
    add(parser)
    argv = ["--compile"] + (["--prompt", "x", "-o", "x.png"] if module.endswith("runtime.cli") else [])
    assert parser.parse_args(argv).compile is True


def test_cache_dir_wins_over_torchs_own_default(tmp_path, monkeypatch):
    # torch writes its default (/tmp/torchinductor_$USER) into TORCHINDUCTOR_CACHE_DIR once anything asks
    # Inductor for its cache: that value is torch's, not the user's, and must not win over DIFFSERVE_CACHE_DIR.
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    monkeypatch.setenv(compile_mod.CACHE_ENV, str(tmp_path / "mine"))
    assert compile_mod.compile_cache_dir() == tmp_path / "mine" / "inductor"
    monkeypatch.delenv(compile_mod.CACHE_ENV)
    assert compile_mod.compile_cache_dir() == Path.home() / ".cache" / "diffserve" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "users-own"))
    assert compile_mod.compile_cache_dir() == tmp_path / "users-own"


def test_generate_compile_writes_its_kernels_under_the_cache_dir(tiny_flux_dir, tmp_path):
    """The real command, real Inductor (C++ kernels for the CPU): the kernels are files under X/inductor."""
    import os
    import subprocess

    cache = tmp_path / "cache"
    env = {**os.environ, "DIFFSERVE_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    args = ["--model", str(tiny_flux_dir), "--compile", "--prompt", "x", "--size", "32x32", "--steps", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "diffserve", "generate", *args, "-q", "-o", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    kernels = [p for p in (cache / "inductor").rglob("*") if p.suffix in (".so", ".cpp", ".py")]
    assert kernels, sorted((cache / "inductor").rglob("*"))
