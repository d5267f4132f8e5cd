"""LoRA adapters on Wan image-to-video ("wan-i2v": Wan2.1-I2V, and Wan2.2-I2V-A14B's two experts) against
diffusers' WanImageToVideoPipeline with load_lora_weights + set_adapters, on the tiny random models.

Pixel tolerance: that of tests/unit/test_lora.py's Wan parity test (test_pipelines._assert_same_picture:
0.5 rounding + 0.02), for the same reasons: float32 on the CPU, diffusers' operations in diffusers' order,
and the low-rank term the same product PEFT computes in another association (~1e-7 relative), far inside the
1e-5 relative the 0.02 allows for the float32 reduction order of AVX2 vs AVX-512 kernels at 1 or 2 threads.

A14B: diffusers loads a LoRA into `transformer` only unless load_into_transformer_2=True; we do the same
(runner.attach_pipeline_loras), so the second expert runs without the adapter on both sides.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffserve.runtime.api import GenerationRequest
from diffserve.runtime.config import RuntimeConfig
from diffserve.runtime.loader import ModelLoadError
from diffserve.runtime.runner import load_runner
from diffserve.testing.tiny_loras import make_tiny_lora
from tests.unit.test_lora import _frames
from tests.unit.test_pipelines import _assert_same_picture
from tests.unit.test_wan_i2v import _image, _no_ftfy, _png  # noqa: F401 - _no_ftfy: autouse fixture

KW = dict(width=32, height=32, num_frames=5, num_inference_steps=2, guidance_scale=5.0)
SEED = 3
SCALE = 0.8
# The tiny I2V models' frames follow the conditioning image (test_wan_i2v.test_the_image_reaches_the_dit):
# the random adapter moves them by 4-5 levels here (measured), not test_lora's 15-100, so its VISIBLE (8)
# does not apply. 2 levels is 4x the parity tolerance: a run that ignored the adapter would fail parity.
SHOWS = 2.0


@pytest.fixture(scope="module")
def i2v_dirs(tmp_path_factory):
    from diffserve.testing import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-wan-i2v-lora")
    out = {}
    for name in ("wan-i2v", "wan2.2-i2v"):
        model = make_tiny_model(name, root / name)
        lora = root / f"{name}-peft.safetensors"
        make_tiny_lora(model, lora, fmt="peft", seed=1)
        out[name] = (model, lora)
    return out


@pytest.mark.parametrize("name", ["wan-i2v", "wan2.2-i2v"])
def test_wan_i2v_lora_matches_diffusers(i2v_dirs, name):
    from diffusers import WanImageToVideoPipeline

    model, lora = i2v_dirs[name]
    init = _image(KW["width"], KW["height"], seed=3)
    ours = load_runner(RuntimeConfig(str(model), "cpu", loras=(f"s={lora}",)))
    assert ours.pipeline.transformer.__class__.__module__.startswith("diffserve")  # the native DiT
    request = dict(prompt="a fox runs", image=_png(init), seed=SEED, **KW)
    base = _frames(ours.generate(GenerationRequest(**request)))
    got = _frames(ours.generate(GenerationRequest(**request, extra={"lora": {"s": SCALE}})))

    pipe = WanImageToVideoPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora), adapter_name="s")  # default: into `transformer` only
    pipe.set_adapters(["s"], [SCALE])
    ref = pipe(
        image=init,
        prompt="a fox runs",
        height=KW["height"],
        width=KW["width"],
        num_frames=KW["num_frames"],
        num_inference_steps=KW["num_inference_steps"],
        guidance_scale=KW["guidance_scale"],
        generator=torch.Generator().manual_seed(SEED),
        output_type="np",
    ).frames[0]
    _assert_same_picture(got, ref)
    assert np.abs(got - base).max() > SHOWS  # the adapter is applied, not ignored


def test_lora_on_the_image_projection_is_a_one_line_error(i2v_dirs, tmp_path):
    """attn2.add_k_proj / add_v_proj (the I2V image context) are fused into one GEMM (add_kv) that carries
    no low-rank term: a file naming them is refused at load, with the layer named."""
    model, _ = i2v_dirs["wan-i2v"]
    # diffusers/PEFT names, and musubi-tuner's (kohya) cross_attn_k_img / v_img, which diffusers reads as these
    for prefix, down, up, layer in (
        ("transformer.blocks.0.attn2.add_k_proj", "lora_A", "lora_B", "add_k_proj"),
        ("lora_unet_blocks_1_cross_attn_v_img", "lora_down", "lora_up", "add_v_proj"),
    ):
        bad = tmp_path / f"{layer}.safetensors"
        save_file(
            {f"{prefix}.{down}.weight": torch.zeros(2, 32), f"{prefix}.{up}.weight": torch.zeros(24, 2)},
            str(bad),
        )
        with pytest.raises(
            ModelLoadError, match=rf"LoRA on blocks\.\d\.attn2\.{layer} is not supported"
        ) as e:
            load_runner(RuntimeConfig(str(model), "cpu", loras=(f"b={bad}",)))
        assert "\n" not in str(e.value) and "image-context key/value" in str(e.value)
