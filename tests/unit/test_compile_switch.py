"""`--compile` / DIFFSERVE_COMPILE: the loader compiles the DiT's blocks, and the pictures do not change.

On the CPU the blocks are traced with torch.compile's "eager" backend (Dynamo without code generation):
what Inductor generates is checked on the GPU by benchmarks/bench_dit.py (ours-compile, rel err column).
"""

from __future__ import annotations

import argparse
import sys

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

    monkeypatch.setenv(compile_mod.COMPILE_ENV, "0")  # and monkeypatch restores it after request_compile()
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
    compile_mod.request_compile()  # what --compile does
    assert compile_mod.compile_requested()
    torch._dynamo.reset()
    try:
        runner = load_runner(str(tiny_flux_dir), device="cpu")
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


def test_the_switch_does_not_import_torch():
    # The server process sets it and must never import torch (the runtime lives in its worker).
    import subprocess

    code = "import sys, diffserve.runtime.compile as c; c.request_compile(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
