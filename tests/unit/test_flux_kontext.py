"""FLUX.1 Kontext on our native FLUX DiT against diffusers' FluxKontextPipeline on the same tiny random model
(diffserve.testing's "flux-kontext"), prompts, images and seeds.

Tolerance: that of tests/unit/test_pipelines.py, for the same reason. Everything runs in float32 on the CPU,
our pipeline does diffusers' operations in diffusers' order (the DiT is ours, checked to < 1e-5 relative
error in test_native_dits.py), so the images agree to about 1e-5 relative before they are rounded to uint8:
our uint8 pixel must be within 0.5 (the rounding) + 0.02 (1e-5 relative of 255, with margin; it absorbs the
float32 reduction order of AVX2 vs AVX-512 kernels and any thread count) of diffusers' float output x 255.

Most comparisons keep the reference image at its own size (extra kontext_auto_resize=False, diffusers'
_auto_resize=False) so that they cost a second; the default policy (resize to the preferred Kontext
resolution, about one megapixel) is compared once, through `diffserve generate --image`.
"""

from __future__ import annotations

import inspect
import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffserve.runtime.api import GenerationRequest, InvalidRequest
from diffserve.runtime.pipelines.flux_kontext import AUTO_RESIZE, PREFERRED_RESOLUTIONS, reference_size
from diffserve.runtime.runner import load_runner

PIXEL_TOLERANCE = 0.5 + 0.02  # = test_pipelines.PIXEL_TOLERANCE; see the module docstring
OWN_SIZE = {AUTO_RESIZE: False}


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory):
    from diffserve.testing import make_tiny_model

    return make_tiny_model("flux-kontext", tmp_path_factory.mktemp("tiny-kontext") / "model")


@pytest.fixture(scope="module")
def kontext(kontext_dir):
    return load_runner(str(kontext_dir), device="cpu")


@pytest.fixture(scope="module")
def reference(kontext_dir):
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(kontext_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _assert_same_picture(ours, reference_images: np.ndarray):
    pixels = np.stack([np.asarray(im) for im in ours]).astype(np.float64)
    assert pixels.shape == reference_images.shape
    err = np.abs(pixels - reference_images * 255.0)
    assert err.max() <= PIXEL_TOLERANCE, f"max |ours - diffusers| = {err.max():.4f} levels"
    assert reference_images.std() > 0.05, "a flat reference image would not test anything"


def _diffusers(pipe, prompt, width, height, steps, seed, **kw):
    """diffusers' call for an output of exactly width x height (its max_area rescales any size to that area)."""
    return pipe(
        prompt=prompt,
        height=height,
        width=width,
        max_area=width * height,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kw,
    ).images


def test_kontext_is_detected_and_has_diffusers_defaults(kontext, reference):
    from diffserve.runtime.models.flux import FluxTransformer

    assert (kontext.family, kontext.task, kontext.accepts_image) == ("flux-kontext", "image", True)
    assert isinstance(kontext.pipeline.transformer, FluxTransformer)  # the native DiT, not diffusers'
    params = inspect.signature(type(reference).__call__).parameters
    size = reference.default_sample_size * reference.vae_scale_factor
    assert kontext.defaults == {
        "width": size,
        "height": size,
        "num_inference_steps": params["num_inference_steps"].default,
        "guidance_scale": params["guidance_scale"].default,
    }
    assert (size, params["num_inference_steps"].default, params["guidance_scale"].default) == (1024, 28, 3.5)


def test_reference_size_is_diffusers_choice():
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    assert list(PREFERRED_RESOLUTIONS) == list(PREFERRED_KONTEXT_RESOLUTIONS)
    processor = VaeImageProcessor(vae_scale_factor=16)  # FluxKontextPipeline's: VAE scale 8 x 2x2 packing
    for width, height in [
        (1024, 1024),
        (640, 480),
        (480, 640),
        (1920, 1080),
        (100, 900),
        (3000, 17),
        (77, 81),
    ]:
        h, w = processor.get_default_height_width(Image.new("RGB", (width, height)))
        _, want_w, want_h = min((abs(w / h - pw / ph), pw, ph) for pw, ph in PREFERRED_KONTEXT_RESOLUTIONS)
        assert reference_size(width, height) == (want_w, want_h), (width, height)
        assert reference_size(width, height, auto_resize=False) == (w, h)


def _first_dit_inputs(module, into: list):
    """A hook that records the (hidden_states, img_ids) of the first forward of `module`."""

    def hook(_module, _args, kwargs):
        if not into:
            into.append((kwargs["hidden_states"].clone(), kwargs["img_ids"].clone()))

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def test_edit_matches_diffusers(kontext, reference):
    init = _image(112, 80)  # kept at 112x80: 7x5 reference tokens after the 6x4 generated ones
    ours_in, ref_in = [], []
    hooks = [
        _first_dit_inputs(kontext.pipeline.transformer, ours_in),
        _first_dit_inputs(reference.transformer, ref_in),
    ]
    try:
        ours = kontext.generate(
            GenerationRequest(
                "make it blue",
                width=96,
                height=64,
                num_inference_steps=3,
                guidance_scale=4.0,
                seed=4,
                num_outputs=2,
                image=_png(init),
                extra=OWN_SIZE,
            )
        )
        ref = _diffusers(
            reference, "make it blue", 96, 64, 3, 4, image=init, guidance_scale=4.0, num_images_per_prompt=2,
            _auto_resize=False,
        )  # fmt: skip
    finally:
        for hook in hooks:
            hook.remove()
    assert [im.size for im in ours.images] == [(96, 64)] * 2
    _assert_same_picture(ours.images, ref)
    # On random tiny weights the reference moves the pixels by less than a level (the 24 generated tokens
    # attend mostly to the 512 text tokens), so the pixels alone would hardly see a wrong reference: the
    # DiT's first inputs are compared too. Noise tokens, then the reference's latent tokens; ids (0, row,
    # col) then (1, row, col). Same VAE module and inputs on both sides: equal up to float32 reduction order.
    (ours_x, ours_ids), (ref_x, ref_ids) = ours_in[0], ref_in[0]
    assert ours_x.shape == ref_x.shape == (2, 24 + 35, 16)
    torch.testing.assert_close(ours_x, ref_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_ids, ref_ids, rtol=0, atol=0)
    assert ours_ids[24:, 0].eq(1).all() and ours_ids[:24, 0].eq(0).all()


def test_true_cfg_with_negative_prompt_matches_diffusers(kontext, reference):
    init = _image(48, 64, seed=2)
    ours = kontext.generate(
        GenerationRequest(
            "a hat",
            negative_prompt="blurry",
            width=48,
            height=32,
            num_inference_steps=2,
            seed=9,
            image=_png(init),
            extra={**OWN_SIZE, "true_cfg_scale": 2.5},
        )
    )
    ref = _diffusers(
        reference, "a hat", 48, 32, 2, 9, image=init, negative_prompt="blurry", true_cfg_scale=2.5,
        _auto_resize=False,
    )  # fmt: skip
    _assert_same_picture(ours.images, ref)
    assert ours.dit_forwards == {"computed": 4, "cached": 0}  # two branches a step


def test_without_an_image_is_flux_text_to_image_as_diffusers(kontext, reference):
    ours = kontext.generate(GenerationRequest("a fox", width=64, height=48, num_inference_steps=3, seed=1))
    _assert_same_picture(ours.images, _diffusers(reference, "a fox", 64, 48, 3, 1))


def test_cli_generate_image_matches_diffusers_at_its_defaults(kontext_dir, reference, tmp_path, capsys):
    """`diffserve generate --image` against FluxKontextPipeline(image=...) with its defaults: the reference
    resized to the preferred resolution of its aspect ratio (120x72 -> 1328x800), guidance 3.5. Only the
    output size and the step count are set (1024x1024 x 28 steps would take minutes on the CPU)."""
    from diffserve.cli import main

    init = _image(120, 72, seed=3)
    (tmp_path / "in.png").write_bytes(_png(init))
    out = tmp_path / "out.png"
    args = ["--prompt", "add a moon", "--size", "64x48", "--steps", "2", "--seed", "7", "-q"]
    code = main(
        ["generate", "--model", str(kontext_dir), "--image", str(tmp_path / "in.png"), *args, "-o", str(out)]
    )
    assert code == 0, capsys.readouterr().err
    ref = _diffusers(reference, "add a moon", 64, 48, 2, 7, image=init)
    _assert_same_picture([Image.open(out)], ref)


def test_size_policy(kontext):
    """No size: the reference's resized size (diffusers' 1024x1024 default for a square input); a size is
    honoured exactly; no image: 1024x1024."""
    plan = kontext.pipeline.plan
    square, wide = _png(_image(300, 300)), _png(_image(640, 360))
    p = plan(GenerationRequest("x", image=square))
    assert (p.width, p.height) == (1024, 1024)
    p = plan(GenerationRequest("x", image=wide))
    assert (p.width, p.height) == (1392, 752) == p.extra["reference_size"]
    p = plan(GenerationRequest("x", image=wide, extra=OWN_SIZE))
    assert (p.width, p.height) == (640, 352)
    p = plan(GenerationRequest("x", image=wide, width=256, height=128))
    assert (p.width, p.height, p.extra["reference_size"]) == (256, 128, (1392, 752))
    p = plan(GenerationRequest("x"))
    assert (p.width, p.height, p.image) == (1024, 1024, None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"strength": 0.5}, "edits by instruction and takes no strength"),
        ({"mask": b"\x89PNG"}, "edits whole images and takes no mask"),
        ({"width": 40, "height": 32}, "width must be a multiple of 16"),
        ({"extra": {AUTO_RESIZE: "no"}}, "kontext_auto_resize must be true or false"),
        ({"extra": {"true_cfg_scale": 0.5}}, "true_cfg_scale must be a number between 1 and 100"),
        ({"image": b"not an image"}, "input image could not be decoded"),
    ],
)
def test_invalid_requests(kontext, change, message):
    req = GenerationRequest(**{"prompt": "x", "image": _png(_image(32, 32)), **change})
    with pytest.raises(InvalidRequest, match=message):
        kontext.generate(req)
