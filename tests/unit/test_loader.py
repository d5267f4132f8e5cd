"""The loader: model resolution (directory, HF cache), checks before loading, family detection, dtypes,
and the components it loads (native DiTs, our text-encoder attention)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from diffserve.runtime import loader
from diffserve.runtime.api import GenerationRequest
from diffserve.runtime.loader import (
    ModelLoadError,
    inspect_model,
    load_components,
    parse_dtype,
    resolve_model,
)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _error(model) -> str:
    with pytest.raises(ModelLoadError) as info:
        inspect_model(model)
    message = str(info.value)
    assert "\n" not in message, f"error messages are one line: {message!r}"
    return message


# ---- resolution and family detection ----


@pytest.mark.parametrize(
    ("fixture", "family", "pipeline"),
    [
        ("tiny_flux_dir", "flux", "FluxPipeline"),
        ("tiny_wan_dir", "wan", "WanPipeline"),
        ("tiny_generic_dir", "generic", "StableDiffusion3Pipeline"),
    ],
)
def test_family_detected_from_model_index(request, fixture, family, pipeline):
    spec = inspect_model(request.getfixturevalue(fixture))
    assert (spec.family, spec.pipeline_class, spec.model_id) == (family, pipeline, "model")
    assert "transformer" in spec.components()


def test_img2img_pipeline_class_is_flux(tiny_flux_dir, tmp_path):
    model = _copy(tiny_flux_dir, tmp_path)
    index = json.loads((model / "model_index.json").read_text())
    index["_class_name"] = "FluxImg2ImgPipeline"
    (model / "model_index.json").write_text(json.dumps(index))
    assert inspect_model(model).family == "flux"


def test_hf_id_resolves_through_local_cache(tiny_flux_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    # The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-flux"
    shutil.copytree(tiny_flux_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("DIFFSERVE_ALLOW_DOWNLOAD", raising=False)

    spec = inspect_model("acme/tiny-flux")
    assert spec.model_id == "acme/tiny-flux" and spec.family == "flux"
    assert spec.path == repo / "snapshots" / commit

    message = _error("acme/not-downloaded")
    assert "acme/not-downloaded" in message and "Hugging Face cache" in message


def test_missing_directory():
    assert "model directory not found: /no/such/model" == _error("/no/such/model")


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    assert "is a file" in _error(f)


def test_missing_model_index(tmp_path):
    assert "no model_index.json" in _error(tmp_path)


def test_invalid_model_index(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    assert "not valid JSON" in _error(tmp_path)


def test_unknown_family(tiny_flux_dir, tmp_path):
    model = _copy(tiny_flux_dir, tmp_path)
    index = json.loads((model / "model_index.json").read_text())
    index["_class_name"] = "NoSuchPipeline"
    (model / "model_index.json").write_text(json.dumps(index))
    message = _error(model)
    assert "unknown model family" in message and "NoSuchPipeline" in message


def test_missing_component_directory(tiny_flux_dir, tmp_path):
    model = _copy(tiny_flux_dir, tmp_path)
    shutil.rmtree(model / "vae")
    message = _error(model)
    assert "'vae'" in message and "missing" in message


def test_missing_weights(tiny_wan_dir, tmp_path):
    model = _copy(tiny_wan_dir, tmp_path)
    (model / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    assert "no weights" in _error(model)


def test_missing_config(tiny_wan_dir, tmp_path):
    model = _copy(tiny_wan_dir, tmp_path)
    (model / "text_encoder" / "config.json").unlink()
    assert "config.json is missing" in _error(model)


def test_truncated_weights(tiny_flux_dir, tmp_path):
    model = _copy(tiny_flux_dir, tmp_path)
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])  # an interrupted download
    message = _error(model)
    assert "truncated" in message and f"expected {len(data)}" in message


def test_garbage_weights(tiny_flux_dir, tmp_path):
    model = _copy(tiny_flux_dir, tmp_path)
    (model / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"<html>not found</html>")
    assert "not a valid safetensors file" in _error(model)


def test_missing_shard(tiny_flux_dir, tmp_path):
    model = _copy(tiny_flux_dir, tmp_path)
    folder = model / "transformer"
    (folder / "diffusion_pytorch_model.safetensors").rename(
        folder / "diffusion_pytorch_model-00001-of-00002.safetensors"
    )
    index = {
        "weight_map": {
            "a": "diffusion_pytorch_model-00001-of-00002.safetensors",
            "b": "diffusion_pytorch_model-00002-of-00002.safetensors",
        }
    }
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert "00002-of-00002.safetensors is missing" in _error(model)


def test_missing_scheduler_config(tiny_flux_dir, tmp_path):
    model = _copy(tiny_flux_dir, tmp_path)
    (model / "scheduler" / "scheduler_config.json").unlink()
    assert "scheduler_config.json is missing" in _error(model)


def test_default_model_missing_is_clear(monkeypatch, tmp_path):
    monkeypatch.setattr(loader, "default_model_path", lambda: tmp_path / "default_model")
    with pytest.raises(ModelLoadError, match="bundled default model is not installed"):
        resolve_model(None)


def test_default_model_path_is_in_the_package():
    assert loader.default_model_path() == Path(loader.__file__).parent.parent / "assets" / "default_model"


# ---- dtypes ----


@pytest.mark.parametrize(
    ("text", "dtype"),
    [
        ("bf16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("fp16", torch.float16),
        ("FP32", torch.float32),
        ("torch.float32", torch.float32),
    ],
)
def test_dtype_names(text, dtype):
    assert parse_dtype(text, "cpu") == dtype


def test_default_dtype_per_device():
    assert parse_dtype(None, "cpu") == torch.float32
    assert parse_dtype(None, "cuda:0") == torch.bfloat16


def test_wrong_dtype():
    with pytest.raises(ModelLoadError, match=r"unknown dtype 'int8': use bf16\|bfloat16, fp16\|float16 or fp32\|float32"):
        parse_dtype("int8", "cpu")


# ---- loading ----


def test_components_load_native_dits_and_our_text_attention(tiny_flux_dir):
    from diffserve.runtime.models.flux import FluxTransformer

    spec = inspect_model(tiny_flux_dir)
    components = load_components(spec, "cpu", torch.bfloat16)
    assert isinstance(components["transformer"], FluxTransformer)
    assert components["transformer"].dtype == torch.bfloat16
    for name in ("text_encoder", "text_encoder_2"):
        encoder = components[name]
        assert encoder.config._attn_implementation == "diffserve"
        assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}
        assert {p.device.type for p in encoder.parameters()} == {"cpu"}
    assert components["vae"].dtype == torch.bfloat16
    assert type(components["scheduler"]).__name__ == "FlowMatchEulerDiscreteScheduler"


def test_wan_components_load_native_dit(tiny_wan_dir):
    from diffserve.runtime.models.wan import WanTransformer

    components = load_components(inspect_model(tiny_wan_dir), "cpu", torch.float32)
    assert isinstance(components["transformer"], WanTransformer)
    assert type(components["vae"]).__name__ == "AutoencoderKLWan"
    assert components["text_encoder"].config._attn_implementation == "diffserve"


def test_weights_that_do_not_match_the_config_fail_clearly(tiny_flux_dir, tmp_path):
    model = _copy(tiny_flux_dir, tmp_path)
    config = json.loads((model / "transformer" / "config.json").read_text())
    config["num_layers"] += 1
    (model / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="component 'transformer'.*failed to load"):
        load_components(inspect_model(model), "cpu", torch.float32)


def test_tiny_models_have_no_zero_weights(tiny_flux_dir):
    """Zero-initialised weights (output projections, modulation) would let parity tests pass vacuously."""
    from safetensors.torch import load_file

    for name in ("transformer", "vae"):
        state = load_file(tiny_flux_dir / name / "diffusion_pytorch_model.safetensors")
        zeros = [k for k, v in state.items() if v.numel() and not v.any()]
        assert not zeros, f"{name}: all-zero tensors {zeros[:5]}"


def test_model_shipped_defaults_override_family_defaults(tiny_flux_dir, tmp_path):
    from diffserve.runtime.runner import load_runner

    model = _copy(tiny_flux_dir, tmp_path)
    (model / "diffserve.json").write_text(
        json.dumps({"default_width": 64, "default_height": 32, "default_steps": 3, "default_guidance": 1.5})
    )
    runner = load_runner(str(model), device="cpu")
    assert runner.defaults["width"] == 64 and runner.defaults["height"] == 32
    assert runner.defaults["num_inference_steps"] == 3 and runner.defaults["guidance_scale"] == 1.5
    result = runner.generate(GenerationRequest(prompt="x", seed=0))
    assert result.images[0].size == (64, 32)


def test_bad_shipped_defaults_are_one_clear_error(tiny_flux_dir, tmp_path):
    model = _copy(tiny_flux_dir, tmp_path)
    (model / "diffserve.json").write_text(json.dumps({"default_steps": "many"}))
    assert "default_steps must be a non-negative number" in _error(model)


def test_bundled_model_uses_its_own_defaults():
    spec = inspect_model(None)
    assert spec.runtime_defaults()["width"] == 128
