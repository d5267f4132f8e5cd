"""The tiny image-to-video makers (diffserve.testing): the real checkpoints' layout and config keys, loaded
and run for one step by diffusers' own pipelines, and accepted by our loader's checks."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

from diffserve.runtime.loader import inspect_model
from diffserve.testing import make_tiny_model


@pytest.fixture(autouse=True)
def _no_ftfy(monkeypatch):
    """diffusers 0.42's WanImageToVideoPipeline calls ftfy.fix_text even when ftfy is not installed (its
    WanPipeline checks first). Without ftfy our Wan prompt cleaning skips it too, so: the identity."""
    from diffusers.pipelines.wan import pipeline_wan_i2v

    if not hasattr(pipeline_wan_i2v, "ftfy"):
        monkeypatch.setattr(
            pipeline_wan_i2v, "ftfy", types.SimpleNamespace(fix_text=lambda t: t), raising=False
        )


def _image(width: int = 56, height: int = 40) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _one_step(pipe, height: int, width: int, **kw) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt="a cat",
        height=height,
        width=width,
        num_frames=5,
        num_inference_steps=1,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kw,
    )
    frames = out.frames[0]
    assert frames.shape == (5, height, width, 3) and np.isfinite(frames).all() and frames.std() > 0.01
    return frames


def _configs(path):
    index = json.loads((path / "model_index.json").read_text())
    dit = json.loads((path / "transformer" / "config.json").read_text())
    vae = json.loads((path / "vae" / "config.json").read_text())
    return index, dit, vae


def test_wan21_i2v(tmp_path):
    from diffusers import WanImageToVideoPipeline

    path = make_tiny_model("wan-i2v", tmp_path / "wan-i2v")
    index, dit, vae = _configs(path)
    assert index["_class_name"] == "WanImageToVideoPipeline"
    assert index["image_encoder"] == ["transformers", "CLIPVisionModelWithProjection"]
    assert index["image_processor"] == ["transformers", "CLIPImageProcessor"]  # as Wan2.1-I2V-14B's
    assert index["transformer_2"] == [None, None] and index["boundary_ratio"] is None
    assert (dit["in_channels"], dit["out_channels"], vae["z_dim"]) == (36, 16, 16)  # 16 noise + 4 mask + 16
    encoder = json.loads((path / "image_encoder" / "config.json").read_text())
    assert dit["image_dim"] == encoder["hidden_size"] and dit["added_kv_proj_dim"] == 2 * 12
    assert inspect_model(path).family == "wan-i2v"  # the native Wan I2V pipeline (pipelines/wan_i2v.py)
    pipe = WanImageToVideoPipeline.from_pretrained(path)
    assert pipe.image_encoder is not None and pipe.transformer.condition_embedder.image_embedder is not None
    _one_step(pipe, 32, 48, image=_image())


def test_wan22_ti2v(tmp_path):
    from diffusers import WanImageToVideoPipeline, WanPipeline

    path = make_tiny_model("wan2.2-ti2v", tmp_path / "ti2v")
    index, dit, vae = _configs(path)
    assert (index["_class_name"], index["expand_timesteps"]) == ("WanPipeline", True)  # as Wan2.2-TI2V-5B's
    assert (dit["in_channels"], dit["out_channels"]) == (48, 48)
    assert (vae["z_dim"], vae["is_residual"], vae["patch_size"], vae["scale_factor_spatial"]) == (
        48,
        True,
        2,
        16,
    )
    assert len(vae["latents_mean"]) == len(vae["latents_std"]) == 48
    inspect_model(path)
    _one_step(WanPipeline.from_pretrained(path), 32, 32)  # text to video
    pipe = WanImageToVideoPipeline.from_pretrained(path)  # image to video, the same directory
    assert pipe.config.expand_timesteps and pipe.image_encoder is None
    _one_step(pipe, 32, 32, image=_image())


def test_wan22_i2v_two_experts(tmp_path):
    from diffusers import WanImageToVideoPipeline

    path = make_tiny_model("wan2.2-i2v", tmp_path / "i2v-a14b")
    index, dit, vae = _configs(path)
    assert (index["_class_name"], index["boundary_ratio"]) == ("WanImageToVideoPipeline", 0.9)
    assert index["image_encoder"] == [None, None] and index["image_processor"] == [None, None]
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    assert (dit["in_channels"], dit["image_dim"], vae["z_dim"]) == (36, None, 16)
    inspect_model(path)
    pipe = WanImageToVideoPipeline.from_pretrained(path)
    used = []
    for name in ("transformer", "transformer_2"):
        getattr(pipe, name).register_forward_hook(lambda *a, name=name: used.append(name))
    # 2 steps at flow shift 5: the first above 900 (the high-noise expert), the second below (low-noise)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt="a cat", image=_image(), height=32, width=48, num_frames=5, num_inference_steps=2,
        guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="np",
    )  # fmt: skip
    assert out.frames[0].shape == (5, 32, 48, 3)
    assert set(used) == {"transformer", "transformer_2"}


def test_sd3_img2img_layout(tmp_path):
    path = make_tiny_model("sd3-img2img", tmp_path / "sd3")
    spec = inspect_model(path)
    assert (spec.family, spec.pipeline_class) == ("generic", "StableDiffusion3Img2ImgPipeline")


def test_unknown_family_lists_the_image_input_ones(tmp_path):
    with pytest.raises(ValueError, match="flux-kontext, wan-i2v, wan2.2-ti2v, wan2.2-i2v"):
        make_tiny_model("wan-i2v-typo", tmp_path / "x")
