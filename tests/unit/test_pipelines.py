"""Our stage pipelines against diffusers' own pipelines on the same tiny random models, prompts and seeds.

Tolerance: everything runs in float32 on the CPU, and our pipelines do the same operations in the same
order as diffusers' (the DiTs are ours, checked separately to < 1e-5 relative error), so the images agree
to about 1e-5 relative before they are rounded to uint8. We compare our uint8 pixels with diffusers'
float output x 255: each must be within 0.5 (the rounding) + 0.02 (1e-5 relative of 255, with margin)
— i.e. our pixel is diffusers' pixel rounded, and can differ by one level only where diffusers' value
sits within 0.02 of a rounding boundary.
"""

from __future__ import annotations

import io
import json
import shutil
import time

import numpy as np
import pytest
import torch

from diffserve.runtime.api import GenerationCancelled, GenerationRequest, InvalidRequest
from diffserve.runtime.runner import load_runner

PIXEL_TOLERANCE = 0.5 + 0.02


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images]).astype(np.float64)


def _assert_same_picture(ours: np.ndarray, reference: np.ndarray):
    """reference: diffusers' float output in [0, 1], (..., H, W, 3); ours: uint8 values."""
    assert ours.shape == reference.shape
    err = np.abs(ours - reference * 255.0)
    assert err.max() <= PIXEL_TOLERANCE, f"max |ours - diffusers| = {err.max():.4f} levels"
    assert reference.std() > 0.05, "a flat reference image would not test anything"


@pytest.fixture(scope="module")
def flux(tiny_flux_dir):
    return load_runner(str(tiny_flux_dir), device="cpu")


@pytest.fixture(scope="module")
def flux_reference(tiny_flux_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def wan(tiny_wan_dir):
    return load_runner(str(tiny_wan_dir), device="cpu")


# ---- FLUX ----


def test_flux_runner_facts(flux):
    assert (flux.family, flux.task, flux.accepts_image, flux.model_id) == ("flux", "image", True, "model")
    # diffusers' FluxPipeline defaults (FLUX.1-dev: guidance embedding present)
    assert flux.defaults == {
        "width": 1024,
        "height": 1024,
        "num_inference_steps": 28,
        "guidance_scale": 3.5,
        "strength": 0.6,
    }


def test_flux_text_to_image_matches_diffusers(flux, flux_reference):
    kw = dict(prompt="a red fox in the snow", width=96, height=64, num_inference_steps=3, guidance_scale=4.0)
    ours = flux.generate(GenerationRequest(seed=42, num_outputs=2, **kw))
    ref = flux_reference(
        kw["prompt"],
        height=64,
        width=96,
        num_inference_steps=3,
        guidance_scale=4.0,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(42),
        output_type="np",
    )
    assert [im.size for im in ours.images] == [(96, 64)] * 2
    _assert_same_picture(_pixels(ours.images), ref.images)
    assert set(ours.timings) >= {"encode_text", "prepare_latents", "denoise", "decode", "total"}


def test_flux_true_cfg_with_negative_prompt_matches_diffusers(flux, flux_reference):
    ours = flux.generate(
        GenerationRequest(
            "a fox",
            negative_prompt="blurry",
            width=48,
            height=32,
            num_inference_steps=2,
            seed=9,
            extra={"true_cfg_scale": 2.5},
        )
    )
    ref = flux_reference(
        "a fox",
        negative_prompt="blurry",
        true_cfg_scale=2.5,
        height=32,
        width=48,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(9),
        output_type="np",
    )
    _assert_same_picture(_pixels(ours.images), ref.images)


def test_flux_output_depends_on_seed_prompt_and_guidance(flux):
    base = dict(prompt="a red fox", width=64, height=64, num_inference_steps=2, guidance_scale=3.5, seed=1)

    def run(**change):
        return _pixels(flux.generate(GenerationRequest(**{**base, **change})).images)

    first = run()
    np.testing.assert_array_equal(first, run())  # deterministic for one seed
    for change in ({"seed": 2}, {"prompt": "a blue fox"}, {"guidance_scale": 1.0}):
        assert np.abs(first - run(**change)).mean() > 0.5, f"{change} did not change the image"


def test_flux_image_to_image_matches_diffusers(flux, flux_reference):
    from diffusers import FluxImg2ImgPipeline
    from PIL import Image

    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (80, 112, 3), dtype=np.uint8))  # resized to 96x64 by both
    buf = io.BytesIO()
    init.save(buf, format="PNG")
    ours = flux.generate(
        GenerationRequest(
            "a painting of a fox",
            width=96,
            height=64,
            num_inference_steps=4,
            guidance_scale=3.5,
            seed=3,
            image=buf.getvalue(),
            strength=0.5,
        )
    )
    ref_pipe = FluxImg2ImgPipeline.from_pipe(flux_reference)
    ref = ref_pipe(
        "a painting of a fox",
        image=init,
        height=64,
        width=96,
        num_inference_steps=4,
        strength=0.5,
        guidance_scale=3.5,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    )
    _assert_same_picture(_pixels(ours.images), ref.images)


def test_flux_image_to_image_keeps_input_size_by_default(flux):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (70, 50), (200, 10, 10, 128)).save(buf, format="PNG")
    steps = []
    result = flux.generate(
        GenerationRequest("x", image=buf.getvalue(), num_inference_steps=4, strength=0.5, seed=0),
        on_step=lambda done, total: steps.append((done, total)),
    )
    assert result.images[0].size == (64, 48)  # rounded down to multiples of 16
    assert steps == [(1, 2), (2, 2)]  # strength 0.5 of 4 steps


def test_flux_schnell_defaults(tiny_flux_schnell_dir):
    runner = load_runner(str(tiny_flux_schnell_dir), device="cpu")
    assert runner.defaults["num_inference_steps"] == 4 and runner.defaults["guidance_scale"] == 0.0
    result = runner.generate(GenerationRequest("a fox", width=32, height=48, seed=0))
    assert result.images[0].size == (32, 48)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"width": 100}, "width must be a multiple of 16"),
        ({"height": 8}, "height must be a multiple of 16"),
        ({"num_inference_steps": 0}, "num_inference_steps must be between 1 and 1000"),
        ({"guidance_scale": -1.0}, "guidance_scale must be between 0 and 100"),
        ({"guidance_scale": "7"}, "guidance_scale must be a number"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"num_frames": 9}, "makes images: num_frames is not accepted"),
        ({"num_outputs": 0}, "num_outputs must be a positive integer"),
        ({"image": b"not an image"}, "input image could not be decoded"),
        ({"mask": b"\x89PNG"}, "edits whole images and takes no mask"),
        ({"extra": {"true_cfg_scale": "high"}}, "true_cfg_scale must be a number between 1 and 100"),
    ],
)
def test_flux_invalid_requests(flux, change, message):
    req = GenerationRequest(**{"prompt": "x", "width": 64, "height": 64, **change})
    with pytest.raises(InvalidRequest, match=message):
        flux.generate(req)


def test_flux_strength_out_of_range(flux):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="PNG")
    with pytest.raises(InvalidRequest, match=r"strength must be in \(0, 1\]"):
        flux.generate(GenerationRequest("x", image=buf.getvalue(), strength=1.5))
    # A small strength still runs one step (as diffusers: int(steps - steps * strength) < steps).
    calls = []
    flux.generate(
        GenerationRequest("x", image=buf.getvalue(), strength=0.1, num_inference_steps=2),
        on_step=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(1, 1)]


def test_on_step_called_once_per_step(flux):
    calls = []
    flux.generate(
        GenerationRequest("x", width=32, height=32, num_inference_steps=5, seed=0),
        on_step=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(i, 5) for i in range(1, 6)]


def test_cancellation_between_steps(flux):
    calls = []
    with pytest.raises(GenerationCancelled):
        flux.generate(
            GenerationRequest("x", width=32, height=32, num_inference_steps=6, seed=0),
            on_step=lambda done, total: calls.append(done),
            should_cancel=lambda: len(calls) >= 2,
        )
    assert calls == [1, 2]  # stopped before the third step


def test_warmup(flux):
    flux.warmup([(32, 32), (48, 32)])


# ---- Wan ----


def test_wan_runner_facts(wan):
    assert (wan.family, wan.task, wan.accepts_image) == ("wan", "video", False)
    # diffusers' 832x480 would not fit the tiny DiT's RoPE table (512 a side): scaled down, aspect kept.
    assert wan.defaults == {
        "width": 512,
        "height": 288,
        "num_frames": 81,
        "num_inference_steps": 50,
        "guidance_scale": 5.0,
        "fps": 16,
    }
    assert wan.pipeline.defaults == wan.defaults  # what a request without a size gets


def test_wan_warmup_at_the_default_size(wan):
    wan.warmup()  # before the defaults were fitted: "width must be ... between 16 and 512 ..., got 832"


def test_fit_defaults():
    from diffserve.runtime.pipelines.stages import Rules, fit_defaults

    wan_like = {"width": 832, "height": 480, "num_frames": 81, "fps": 16}
    rules = Rules(multiple=16, max_side=8192, frame_step=4, max_frames=1025)
    assert fit_defaults(wan_like, rules) == wan_like  # fits: unchanged
    small = Rules(multiple=16, max_side=256, frame_step=4, max_frames=33)
    assert fit_defaults(wan_like, small) == {"width": 256, "height": 144, "num_frames": 33, "fps": 16}
    # tall, and a frame limit that is not on the 4k+1 grid
    odd = Rules(multiple=16, max_side=100, frame_step=4, max_frames=31)
    tall = fit_defaults({"width": 480, "height": 832, "num_frames": 81}, odd)
    assert tall == {"width": 48, "height": 96, "num_frames": 29}
    # never below one multiple
    assert fit_defaults({"width": 4000, "height": 16}, Rules(multiple=16, max_side=64)) == {
        "width": 64,
        "height": 16,
    }
    assert wan_like["width"] == 832  # the input is not modified


def test_wan_text_to_video_matches_diffusers(wan, tiny_wan_dir):
    from diffusers import WanPipeline

    ref_pipe = WanPipeline.from_pretrained(tiny_wan_dir)
    ref_pipe.set_progress_bar_config(disable=True)
    kw = dict(
        negative_prompt="blurry,  static",
        height=48,
        width=64,
        num_frames=9,
        num_inference_steps=3,
        guidance_scale=4.0,
    )
    ref = ref_pipe(
        "waves  on a &amp; beach", generator=torch.Generator().manual_seed(11), output_type="np", **kw
    )
    steps = []
    ours = wan.generate(
        GenerationRequest("waves  on a &amp; beach", seed=11, **kw),
        on_step=lambda done, total: steps.append(done),
    )
    assert steps == [1, 2, 3]
    assert len(ours.videos) == 1 and len(ours.videos[0]) == 9 and ours.fps == 16
    assert ours.videos[0][0].size == (64, 48)
    _assert_same_picture(_pixels(ours.videos[0]), ref.frames[0])


def test_wan_without_guidance_matches_diffusers(wan, tiny_wan_dir):
    from diffusers import WanPipeline

    ref_pipe = WanPipeline.from_pretrained(tiny_wan_dir)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(
        "a cat",
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    ours = wan.generate(
        GenerationRequest(
            "a cat", width=32, height=32, num_frames=5, num_inference_steps=2, guidance_scale=1.0, seed=0
        )
    )
    _assert_same_picture(_pixels(ours.videos[0]), ref.frames[0])


def _wan_parity(runner, model_dir, steps: int = 4):
    from diffusers import WanPipeline

    ref_pipe = WanPipeline.from_pretrained(model_dir)
    ref_pipe.set_progress_bar_config(disable=True)
    kw = dict(height=32, width=48, num_frames=5, num_inference_steps=steps, guidance_scale=3.0)
    ref = ref_pipe("a cat", generator=torch.Generator().manual_seed(2), output_type="np", **kw)
    ours = runner.generate(GenerationRequest("a cat", seed=2, **kw))
    _assert_same_picture(_pixels(ours.videos[0]), ref.frames[0])
    return ours


def test_wan22_two_experts_match_diffusers(tiny_wan22_dir):
    runner = load_runner(str(tiny_wan22_dir), device="cpu")
    assert runner.pipeline.boundary == 875.0 and runner.pipeline.transformer_2 is not None
    used = []
    for name in ("transformer", "transformer_2"):
        model = getattr(runner.pipeline, name)
        model.register_forward_hook(lambda *a, name=name: used.append(name))
    _wan_parity(runner, tiny_wan22_dir)
    assert "transformer" in used and "transformer_2" in used  # both experts ran


def test_wan_per_token_timesteps_match_diffusers(tiny_wan_dir, tmp_path):
    """Wan2.2 TI2V's expand_timesteps: one timestep per latent token."""
    model = tmp_path / "model"
    shutil.copytree(tiny_wan_dir, model)
    index = json.loads((model / "model_index.json").read_text())
    index["expand_timesteps"] = True
    (model / "model_index.json").write_text(json.dumps(index))
    runner = load_runner(str(model), device="cpu")
    assert runner.pipeline.expand_timesteps
    _wan_parity(runner, model, steps=2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_frames": 10}, r"num_frames must be 4\*k\+1"),
        ({"width": 40}, "width must be a multiple of 16"),
        ({"width": 16 * 40}, "between 16 and 512"),  # the tiny DiT's RoPE table covers 32 latent patches
        ({"image": b"\x89PNG"}, "does not take an input image"),
        ({"fps": 0}, "fps must be between 1 and 120"),
        ({"extra": {"guidance_scale_2": "high"}}, "guidance_scale_2 must be a number between 0 and 100"),
    ],
)
def test_wan_invalid_requests(wan, change, message):
    req = GenerationRequest(**{"prompt": "x", "width": 32, "height": 32, "num_frames": 5, **change})
    with pytest.raises(InvalidRequest, match=message):
        wan.generate(req)


def test_wan_cancellation(wan):
    with pytest.raises(GenerationCancelled):
        wan.generate(
            GenerationRequest("x", width=32, height=32, num_frames=5, num_inference_steps=3),
            should_cancel=lambda: True,
        )


# ---- generic (SD3 through diffusers) ----


def test_generic_family_runs_with_progress_and_matches_diffusers(tiny_generic_dir, monkeypatch):
    from diffusers import DiffusionPipeline

    runner = load_runner(str(tiny_generic_dir), device="cpu")
    assert (runner.family, runner.task, runner.accepts_image) == ("generic", "image", False)
    assert runner.defaults["num_inference_steps"] == 28 and runner.defaults["guidance_scale"] == 7.0
    for component in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        assert getattr(runner.pipeline.pipe, component).config._attn_implementation == "diffserve"
    # While the pipeline runs, the DiT's attention goes through our layer; torch's function is restored after.
    from diffserve.runtime.layers import attention as attention_layer

    routed, original = [], attention_layer.attention
    monkeypatch.setattr(attention_layer, "attention", lambda *a, **k: routed.append(1) or original(*a, **k))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    steps = []
    ours = runner.generate(
        GenerationRequest("a cat", width=64, height=48, num_inference_steps=3, seed=5),
        on_step=lambda done, total: steps.append((done, total)),
    )
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert len(routed) >= 3 * 2, "two joint-attention layers per step"
    assert torch.nn.functional.scaled_dot_product_attention is sdpa
    ref_pipe = DiffusionPipeline.from_pretrained(tiny_generic_dir)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(
        "a cat",
        height=48,
        width=64,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(5),
        output_type="np",
    )
    _assert_same_picture(_pixels(ours.images), ref.images)

    with pytest.raises(GenerationCancelled):
        runner.generate(
            GenerationRequest("a cat", width=32, height=32, num_inference_steps=3), should_cancel=lambda: True
        )
    with pytest.raises(InvalidRequest, match="multiple of 8"):
        runner.generate(GenerationRequest("a cat", width=30, height=32))


def test_result_reports_the_seed_and_it_reproduces(flux):
    kw = dict(prompt="a blue square", width=32, height=32, num_inference_steps=2)
    drawn = flux.generate(GenerationRequest(**kw))
    assert isinstance(drawn.seed, int)
    again = flux.generate(GenerationRequest(seed=drawn.seed, **kw))
    assert again.seed == drawn.seed
    assert np.array_equal(_pixels(again.images), _pixels(drawn.images))


def test_upload_and_timings_on_the_cpu():
    # On the CPU upload() is a plain move and a stage's time is its host time (no CUDA events).
    from diffserve.runtime.pipelines import stages

    t = torch.arange(4.0)
    assert stages.upload(t, "cpu") is t
    timings = stages.Timings()
    with timings("a"):
        sum(range(10000))
    with timings("a"):
        pass
    assert timings == {}  # filled in by settle()
    assert set(timings.settle()) == {"a"} and timings["a"] > 0


def test_noise_drawn_later_is_the_noise_drawn_now():
    # gaussian_later draws on a background thread: same values, same dtype, and the generator is left as
    # gaussian() leaves it.
    from diffserve.runtime.pipelines import stages

    later_gen, now_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    draw = stages.gaussian_later((2, 4, 8, 8), later_gen, "cpu", torch.bfloat16)
    now = stages.gaussian((2, 4, 8, 8), now_gen, "cpu", torch.bfloat16)
    later = draw()
    assert later.dtype == torch.bfloat16 and torch.equal(later, now)
    assert torch.equal(torch.randn(5, generator=later_gen), torch.randn(5, generator=now_gen))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork (POSIX)")
def test_noise_thread_works_in_a_forked_child():
    # The background draw must not hang in a child forked after the parent used it.
    import os

    from diffserve.runtime.pipelines import stages

    stages.gaussian_later(
        (4,), torch.Generator().manual_seed(0), "cpu", torch.float32
    )()  # parent's thread up
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the draw completes with the expected values
        ok = False
        try:
            got = stages.gaussian_later((4,), torch.Generator().manual_seed(1), "cpu", torch.float32)()
            ok = torch.equal(got, torch.randn(4, generator=torch.Generator().manual_seed(1)))
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's noise draw hung")
    assert os.waitstatus_to_exitcode(status) == 0
