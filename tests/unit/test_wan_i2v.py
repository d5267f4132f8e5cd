"""Wan image-to-video on our native Wan DiT against diffusers' WanImageToVideoPipeline on the tiny random
models of diffserve.testing ("wan-i2v": Wan2.1-I2V, "wan2.2-i2v": Wan2.2-I2V-A14B's two experts,
"wan2.2-ti2v": Wan2.2-TI2V-5B), the same prompt, image and seed, through `diffserve generate --image`.

Tolerance: that of tests/unit/test_pipelines.py, for the same reason: float32 on the CPU, diffusers'
operations in diffusers' order (the DiT is ours, checked to < 1e-5 relative in test_native_dits.py), so the
frames agree to about 1e-5 relative before rounding to uint8: our uint8 value must be within 0.5 (the
rounding) + 0.02 (1e-5 relative of 255, with margin for the float32 reduction order of AVX2 vs AVX-512
kernels at any thread count) of diffusers' float output x 255. The CLI writes MP4 (lossy), so the test takes
the frames where the CLI hands them to save_result.
"""

from __future__ import annotations

import io
import logging
import types

import numpy as np
import pytest
import torch
from PIL import Image

from diffserve.runtime.api import GenerationRequest, InvalidRequest
from diffserve.runtime.pipelines.wan_i2v import reference_frame
from diffserve.runtime.runner import load_runner

PIXEL_TOLERANCE = 0.5 + 0.02  # = test_pipelines.PIXEL_TOLERANCE; see the module docstring


@pytest.fixture(autouse=True)
def _no_ftfy(monkeypatch):
    """diffusers 0.42's WanImageToVideoPipeline calls ftfy.fix_text even when ftfy is not installed; our
    prompt cleaning skips ftfy then: the identity on both sides (as test_tiny_i2v_makers.py)."""
    from diffusers.pipelines.wan import pipeline_wan_i2v

    if not hasattr(pipeline_wan_i2v, "ftfy"):
        monkeypatch.setattr(
            pipeline_wan_i2v, "ftfy", types.SimpleNamespace(fix_text=lambda t: t), raising=False
        )


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from diffserve.testing import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-wan-i2v")
    return {name: make_tiny_model(name, root / name) for name in ("wan-i2v", "wan2.2-i2v", "wan2.2-ti2v")}


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    # smooth gradients plus noise: a first frame the VAE keeps recognisable
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "family", "expert_count"),
    [("wan-i2v", "wan-i2v", 1), ("wan2.2-i2v", "wan-i2v", 2), ("wan2.2-ti2v", "wan", 1)],
)
def test_cli_generate_image_matches_diffusers(
    model_dirs, name, family, expert_count, tmp_path, monkeypatch, caplog
):
    """`diffserve generate --image` against WanImageToVideoPipeline(image=...) at its defaults (guidance 5,
    no negative prompt; A14B: guidance_scale_2 = guidance_scale): only the size, frame count and step count
    are set (832x480 x 81 frames x 50 steps would take hours on the CPU). The image has the output's size,
    so neither side resizes it."""
    from diffusers import WanImageToVideoPipeline

    from diffserve.cli import main
    from diffserve.runtime import outputs

    saved = []
    monkeypatch.setattr(outputs, "save_result", lambda result, path: saved.append(result) or [path])
    width, height, frames, steps, seed = 64, 32, 5, 3, 7
    init = _image(width, height, seed=3)
    (tmp_path / "in.png").write_bytes(_png(init))
    args = ["--prompt", "a fox runs", "--size", f"{width}x{height}", "--frames", str(frames)]
    args += ["--steps", str(steps), "--seed", str(seed), "-q", "-o", str(tmp_path / "out.mp4")]
    with caplog.at_level(logging.INFO, logger="diffserve"):
        code = main(
            ["generate", "--model", str(model_dirs[name]), "--image", str(tmp_path / "in.png"), *args]
        )
    assert code == 0
    # the log names the native family (not "generic": diffusers' pipeline would have run)
    assert any(
        f"({family}, " in r.getMessage() and r.getMessage().startswith("loaded") for r in caplog.records
    )

    pipe = WanImageToVideoPipeline.from_pretrained(model_dirs[name])
    pipe.set_progress_bar_config(disable=True)
    assert (pipe.transformer_2 is not None) == (expert_count == 2)
    ref = pipe(
        image=init,
        prompt="a fox runs",
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).frames[0]
    (result,) = saved
    ours = np.stack([np.asarray(f) for f in result.videos[0]]).astype(np.float64)
    assert ours.shape == ref.shape == (frames, height, width, 3)
    err = np.abs(ours - ref * 255.0)
    assert err.max() <= PIXEL_TOLERANCE, f"max |ours - diffusers| = {err.max():.4f} levels"
    assert ref.std() > 0.02, "a flat reference video would not test anything"


def test_the_image_reaches_the_dit(model_dirs):
    """The DiT sees the image twice (Wan2.1-I2V): the mask + first-frame latents on channels 16..35 and the
    CLIP states as image context; another image changes both, and the video. (On random tiny weights the
    image moves the pixels only a little: parity with diffusers is what shows it is used correctly.)"""
    runner = load_runner(str(model_dirs["wan-i2v"]), device="cpu")
    seen = []
    runner.pipeline.transformer.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(kwargs), with_kwargs=True
    )
    kw = dict(width=64, height=32, num_frames=5, num_inference_steps=1, guidance_scale=1.0, seed=1)
    a = runner.generate(GenerationRequest("x", image=_png(_image(64, 32, 1)), **kw)).videos[0]
    b = runner.generate(GenerationRequest("x", image=_png(_image(64, 32, 2)), **kw)).videos[0]
    (first, second) = seen
    assert first["hidden_states"].shape[1] == 36
    mask = first["hidden_states"][:, 16:20]
    assert torch.equal(mask[:, :, 0], torch.ones_like(mask[:, :, 0])) and not mask[:, :, 1:].any()
    assert not torch.equal(first["hidden_states"][:, 20:], second["hidden_states"][:, 20:])
    assert not torch.equal(first["encoder_hidden_states_image"], second["encoder_hidden_states_image"])
    assert torch.equal(
        first["hidden_states"][:, :16], second["hidden_states"][:, :16]
    )  # same seed: same noise
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))


def test_size_policy_cover_and_centre_crop(model_dirs):
    """No size: 832x480 (diffusers' default) whatever the image's size; the image resized to cover the size
    (aspect kept) and centre-cropped to it."""
    runner = load_runner(str(model_dirs["wan2.2-i2v"]), device="cpu")
    wide = _image(200, 50)
    p = runner.pipeline.plan(GenerationRequest("x", image=_png(wide), width=64, height=32))
    assert p.image.size == (64, 32)
    # cover: 200x50 scaled by 32/50 -> 128x32, the middle 64 columns kept
    expected = wide.resize((128, 32), resample=Image.LANCZOS).crop((32, 0, 96, 32))
    assert np.array_equal(np.asarray(p.image), np.asarray(expected))
    assert reference_frame(wide, 200, 50) is wide  # already the size: untouched
    tall = reference_frame(_image(40, 100), 64, 32)  # 40x100 -> 64x160, rows 64..96
    assert tall.size == (64, 32)
    p = runner.pipeline.plan(GenerationRequest("x", image=_png(_image(3000, 2000))))  # larger than allowed
    assert (p.width, p.height) == (runner.defaults["width"], runner.defaults["height"])
    p = runner.pipeline.plan(GenerationRequest("x", image=_png(wide)))
    assert (p.width, p.height, p.image.size) == (
        runner.defaults["width"],
        runner.defaults["height"],
        (runner.defaults["width"], runner.defaults["height"]),
    )


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("wan-i2v", {"image": None}, "makes a video from an image: send one"),
        ("wan-i2v", {"strength": 0.5}, "takes no strength"),
        ("wan2.2-ti2v", {"strength": 0.5}, "takes no strength"),
        ("wan-i2v", {"image": b"not an image"}, "input image could not be decoded"),
        ("wan-i2v", {"width": 40}, "width must be a multiple of 16"),
    ],
)
def test_invalid_requests(model_dirs, name, change, message):
    runner = load_runner(str(model_dirs[name]), device="cpu")
    req = {"prompt": "x", "image": _png(_image(32, 32)), "width": 32, "height": 32, "num_frames": 5, **change}
    with pytest.raises(InvalidRequest, match=message):
        runner.generate(GenerationRequest(**req))


def test_warmup_runs_without_an_image(model_dirs):
    runner = load_runner(str(model_dirs["wan-i2v"]), device="cpu")
    assert runner.accepts_image
    runner.warmup([(32, 32)])


def test_fp8_and_step_cache_run_on_the_i2v_dit(model_dirs):
    """--quantization fp8 quantises the I2V DiT's linears (the image k|v projection too) and the step cache
    reuses the tail with the image context passed to its head/tail/reuse parts (forced reuse: other frames,
    the same shape). FP8 e4m3 keeps ~3 significant bits per weight: frames near the float32 ones."""
    from diffserve.runtime.config import RuntimeConfig
    from diffserve.runtime.layers.fp8 import Fp8Linear
    from diffserve.runtime.step_cache import StepCacheConfig

    kw = dict(width=64, height=32, num_frames=5, num_inference_steps=4, seed=1, image=_png(_image(64, 32)))
    base = load_runner(str(model_dirs["wan-i2v"]), device="cpu")
    plain = base.generate(GenerationRequest("x", **kw))
    base.pipeline.step_cache = StepCacheConfig(force=(False, True, False, True))
    cached = base.generate(GenerationRequest("x", **kw))
    assert cached.dit_forwards == {"computed": 4, "cached": 4}  # 2 steps x 2 CFG branches reused
    assert any(
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(plain.videos[0], cached.videos[0], strict=True)
    )

    fp8 = load_runner(RuntimeConfig(model=str(model_dirs["wan-i2v"]), device="cpu", quantization="fp8"))
    attn2 = fp8.pipeline.transformer.blocks[0].attn2
    assert any(isinstance(m, Fp8Linear) for m in attn2.modules())
    out = fp8.generate(GenerationRequest("x", **kw))
    a = np.stack([np.asarray(f) for f in plain.videos[0]]).astype(float)
    b = np.stack([np.asarray(f) for f in out.videos[0]]).astype(float)
    # measured mean 0.03 levels (spread of the frames: 13 levels std); 2 levels leaves room for any CPU's
    # rounding of the e4m3 GEMMs while still catching an FP8 path that drops a term (the image context, ...)
    assert a.shape == b.shape and np.abs(a - b).mean() < 2.0
