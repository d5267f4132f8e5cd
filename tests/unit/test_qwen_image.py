"""Qwen-Image and Qwen-Image-Edit: our DiT against diffusers' QwenImageTransformer2DModel with identical
random weights, and our pipelines against diffusers' QwenImagePipeline / QwenImageEditPipeline on the tiny
random models of diffserve.testing (float32, the CPU, the same seeds).

Tolerances. DiT: the same math with other GEMM shapes (fused q|k|v, one GEMV for every adaLN projection)
and attention through our backend instead of diffusers' dispatcher, so float32 sums (K <= 256 here) are
blocked in another order: ~sqrt(K) * 1.2e-7 per layer over 2 blocks; measured 2.0-2.6e-7 on this CPU (2
threads, AVX-512); 1e-5 leaves 40x for AVX2, other thread counts and MKL paths, as test_native_dits.py.
Pipelines: everything else runs the same operations in the same order as diffusers, so the images agree to
~1e-5 relative before the rounding to uint8: our pixel must be diffusers' float pixel x 255 within 0.5 (the
rounding) + 0.02 (1e-5 of 255 with margin), as in test_pipelines.py.

Time: the edit pipeline works at ~1024^2 pixels whatever the output size (diffusers' calculate_dimensions),
and the tiny VAE's encoder at that size takes ~8 s on this CPU: one edit comparison only.
"""

from __future__ import annotations

import io
import logging

import diffusers
import numpy as np
import pytest
import torch

from diffserve.runtime.api import GenerationRequest, InvalidRequest
from diffserve.runtime.models.qwen_image import QwenImageConfig, QwenImageTransformer
from diffserve.runtime.runner import load_runner

TOL = 1e-5
PIXEL_TOLERANCE = 0.5 + 0.02

DIT_CFG = dict(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=32,
    axes_dims_rope=(4, 6, 6),
)


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def _pair(fuse: bool = False):
    ref = diffusers.QwenImageTransformer2DModel(**DIT_CFG)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every parameter random (diffusers zero-initialises none here, but be sure)
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim > 1 else 0.5))
    ours = QwenImageTransformer.from_config(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours.fuse_projections() if fuse else ours


def _inputs(grids, batch: int, txt: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = sum(f * h * w for f, h, w in grids)
    return dict(
        hidden_states=torch.randn(batch, tokens, DIT_CFG["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, txt, DIT_CFG["joint_attention_dim"], generator=g),
        timestep=torch.rand(batch, generator=g),
        img_shapes=[list(grids)] * batch,  # diffusers' layout: per sample, a list of (frames, h, w)
    )


# (3, 5): odd sides, so the centred RoPE positions are asymmetric; the edit layout adds a second image
# (frame position 1) of another size.
LAYOUTS = {"t2i": [(1, 3, 5)], "edit": [(1, 3, 5), (1, 4, 2)]}


@pytest.mark.parametrize("fuse", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_dit_matches_diffusers(layout, fuse):
    ref, ours = _pair(fuse)
    inputs = _inputs(LAYOUTS[layout], batch=2)
    with torch.no_grad():
        expected = ref(**inputs, return_dict=False)[0]
        assert _rel_err(ours(**inputs, return_dict=False)[0], expected) < TOL
        # batch 1 takes FLUX's joint q|k|v buffer when fused; our pipelines pass img_shapes as tuples
        one = {k: v[:1] for k, v in inputs.items()}
        one["img_shapes"] = tuple(LAYOUTS[layout])
        assert _rel_err(ours(**one, return_dict=False)[0], expected[:1]) < TOL


def test_dit_text_padding_mask_matches_diffusers():
    ref, ours = _pair()
    inputs = _inputs(LAYOUTS["t2i"], batch=2)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 3:] = 0  # the first prompt is two tokens shorter
    with torch.no_grad():
        expected = ref(**inputs, encoder_hidden_states_mask=mask, return_dict=False)[0]
        got = ours(**inputs, encoder_hidden_states_mask=mask, return_dict=False)[0]
        unmasked = ours(**inputs, return_dict=False)[0]
    assert _rel_err(got, expected) < TOL
    assert _rel_err(unmasked, expected) > 1e-3  # the mask matters


def test_dit_parts_and_adaln_schedule_compose_to_the_forward():
    _, ours = _pair(fuse=True)
    inputs = _inputs(LAYOUTS["edit"], batch=1)
    with torch.no_grad():
        full = ours(**inputs, return_dict=False)[0]
        signal, state = ours.forward_head(head_blocks=1, **inputs)
        out, residual = ours.forward_tail(head_blocks=1, head_state=state, **inputs)
        # the same blocks in two calls: identical arithmetic
        torch.testing.assert_close(out, full, rtol=0, atol=0)
        reused = ours.forward_reuse(head_blocks=1, head_state=state, residual=residual, **inputs)
        # head state + (tail output - head state): one rounding of the add back (float32 ulps)
        torch.testing.assert_close(reused, full, rtol=1e-5, atol=1e-5)
        assert signal.shape == (1, 23, ours.config.inner_dim)

        steps = torch.tensor([0.9, 0.5, 0.1])
        schedule = ours.adaln_schedule(steps, 1)
        for i in range(3):
            step = dict(inputs, timestep=steps[i : i + 1])
            # one GEMM over 3 rows instead of one row: the same dot products, maybe blocked otherwise
            assert _rel_err(ours(**step, adaln=schedule[i], return_dict=False)[0], ours(**step)) < 2e-6


def test_bf16_timestep_conditioning_matches_diffusers():
    """bf16 timesteps: the sinusoid's frequencies stay float32 as in diffusers' get_timestep_embedding.
    Rounding them to bf16 moved 1000 * t * freq by up to ~2 rad: the conditioning was ~14% off and the
    full-size bf16 forward 0.28 from diffusers' (float32 and the tiny tests could not see it)."""
    from diffusers.models.embeddings import Timesteps

    from diffserve.runtime.models.qwen_image import timestep_proj

    t = torch.tensor([0.9, 0.5, 0.1, 0.0173], dtype=torch.bfloat16)
    expected = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)(t)
    torch.testing.assert_close(timestep_proj(t), expected, rtol=1e-6, atol=1e-6)
    ref, ours = _pair(fuse=True)
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    with torch.no_grad():
        want = torch.nn.functional.silu(ref.time_text_embed(t, torch.zeros(1, dtype=torch.bfloat16)))
        got = ours.conditioning(t, 4, t.device)
    assert _rel_err(got, want) < 1e-2


def test_config_refuses_what_the_native_dit_does_not_run():
    with pytest.raises(ValueError, match="zero_cond_t"):
        QwenImageConfig(zero_cond_t=True)
    with pytest.raises(ValueError, match="axes_dims_rope"):
        QwenImageConfig(axes_dims_rope=(16, 56, 54))


def test_tiny_tokenizer_template_prefixes_are_what_diffusers_drops():
    from diffserve.runtime.pipelines.qwen_image import EDIT_TEMPLATE, T2I_TEMPLATE
    from diffserve.testing.tiny_qwen import qwen_tokenizer

    tok = qwen_tokenizer()
    assert len(tok(T2I_TEMPLATE.split("{}")[0]).input_ids) == 34
    # the edit pipeline drops the system prompt and "<|im_start|>user\n": the vision tokens stay
    edit_prefix = EDIT_TEMPLATE.split("<|vision_start|>")[0]
    assert len(tok(edit_prefix).input_ids) == 64
    assert tok.convert_ids_to_tokens(tok("<|im_start|>user\n<|image_pad|>").input_ids) == [
        "<|im_start|>", "user", "Ċ", "<|image_pad|>",
    ]  # fmt: skip
    assert tok("a red fox").input_ids != tok("a red cat").input_ids


# ---- pipelines ----


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from diffserve.testing import make_tiny_model

    return make_tiny_model("qwen-image", tmp_path_factory.mktemp("tiny-qwen") / "model")


@pytest.fixture(scope="module")
def qwen_edit_dir(tmp_path_factory):
    from diffserve.testing import make_tiny_model

    return make_tiny_model("qwen-image-edit", tmp_path_factory.mktemp("tiny-qwen-edit") / "model")


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return load_runner(str(qwen_dir), device="cpu")


@pytest.fixture(scope="module")
def qwen_reference(qwen_dir):
    pipe = diffusers.QwenImagePipeline.from_pretrained(qwen_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images]).astype(np.float64)


def _assert_same_picture(ours: np.ndarray, reference: np.ndarray):
    assert ours.shape == reference.shape
    err = np.abs(ours - reference * 255.0)
    assert err.max() <= PIXEL_TOLERANCE, f"max |ours - diffusers| = {err.max():.4f} levels"
    assert reference.std() > 0.05, "a flat reference image would not test anything"


def test_runner_facts_and_log(qwen_dir, caplog):
    with caplog.at_level(logging.INFO, logger="diffserve.runtime.runner"):
        runner = load_runner(str(qwen_dir), device="cpu")
    assert (runner.family, runner.task, runner.accepts_image) == ("qwen-image", "image", False)
    assert runner.defaults == {
        "width": 1024,
        "height": 1024,
        "num_inference_steps": 50,
        "guidance_scale": 1.0,
    }
    assert "(qwen-image, QwenImagePipeline)" in caplog.text  # the native family, not "generic"
    assert type(runner.pipeline.transformer) is QwenImageTransformer


@pytest.mark.parametrize("negative_prompt", [None, "blurry, low quality"], ids=["plain", "true-cfg"])
def test_text_to_image_matches_diffusers(qwen, qwen_reference, negative_prompt):
    # true_cfg_scale left at its default (4.0, as diffusers): on only with the negative prompt
    kw = dict(width=64, height=48, num_inference_steps=3)
    ours = qwen.generate(
        GenerationRequest(
            "a red fox in the snow", negative_prompt=negative_prompt, seed=7, num_outputs=2, **kw
        )
    )
    ref = qwen_reference(
        "a red fox in the snow",
        negative_prompt=negative_prompt,
        height=48,
        width=64,
        num_inference_steps=3,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    )
    assert [im.size for im in ours.images] == [(64, 48)] * 2
    _assert_same_picture(_pixels(ours.images), ref.images)
    assert ours.dit_forwards == {"computed": 3 * (2 if negative_prompt else 1), "cached": 0}


def test_output_depends_on_seed_prompt_and_cfg_scale(qwen):
    base = dict(
        prompt="a red fox", negative_prompt="dark", width=32, height=32, num_inference_steps=2, seed=1
    )

    def run(**change):
        return _pixels(qwen.generate(GenerationRequest(**{**base, **change})).images)

    first = run()
    np.testing.assert_array_equal(first, run())  # deterministic for one seed
    for change in ({"seed": 2}, {"prompt": "a blue fox"}, {"extra": {"true_cfg_scale": 1.5}}):
        assert np.abs(first - run(**change)).mean() > 0.5, f"{change} did not change the image"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"width": 40}, "width must be a multiple of 16"),
        ({"image": b"\x89PNG"}, "does not take an input image"),
        ({"extra": {"true_cfg_scale": 0.5}}, "true_cfg_scale must be a number between 1 and 100"),
    ],
)
def test_invalid_requests(qwen, change, message):
    with pytest.raises(InvalidRequest, match=message):
        qwen.generate(GenerationRequest(**{"prompt": "x", "width": 32, "height": 32, **change}))


def _png(width: int, height: int, seed: int = 0) -> tuple[bytes, object]:
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), image


def test_edit_matches_diffusers(qwen_edit_dir):
    from diffserve.testing.tiny_qwen import load_processor

    runner = load_runner(str(qwen_edit_dir), device="cpu")
    assert (runner.family, runner.accepts_image) == ("qwen-image-edit", True)
    data, image = _png(56, 40)
    ours = runner.generate(
        GenerationRequest(
            "make it blue",
            negative_prompt="blurry",
            image=data,
            width=64,
            height=48,
            num_inference_steps=2,
            seed=5,
        )
    )
    # Without torchvision (as here and in CI) transformers cannot load the saved processor itself.
    ref_pipe = diffusers.QwenImageEditPipeline.from_pretrained(
        qwen_edit_dir, processor=load_processor(qwen_edit_dir / "processor")
    )
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(
        image,
        "make it blue",
        negative_prompt="blurry",
        height=48,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(5),
        output_type="np",
    )
    _assert_same_picture(_pixels(ours.images), ref.images)

    # Without a size: diffusers' edit size, ~1024^2 at the input's aspect (56:40 -> 1216x864), to multiples of 16.
    plan = runner.pipeline.plan(GenerationRequest("x", image=data))
    assert (plan.width, plan.height) == (1216, 864)
    with pytest.raises(InvalidRequest, match="edits an input image"):
        runner.generate(GenerationRequest("x", width=32, height=32))


def test_fp8_dit_close_to_exact():
    """--quantization fp8's selection on the Qwen-Image DiT: the image stream's q|k|v, out and MLP GEMMs of
    every block (4 a block, fused q|k|v once); the text stream and embedders stay as they were. e4m3 keeps 3
    mantissa bits: round-to-nearest moves each weight and activation by up to 2^-4 relative, RMS ~2^-4/sqrt(3)
    = 3.6%, so a GEMM whose two operands are both rounded is off by ~5% of its output's norm (independent
    errors add in quadrature); the bf16 residual streams carry the rest. Measured 4.2e-2 (t2i and edit). That
    error is the rounding of the same values on every CPU (only float32 summation order differs, ~1e-6), so
    0.08 holds on AVX2/AVX-512 at any thread count, while an FP8 path that dropped or doubled a term (relative
    error ~1) fails; > 0 proves the quantised layers ran."""
    from diffserve.runtime.layers.fp8 import Fp8Linear, quantize_linears

    _, exact = _pair(fuse=True)
    _, quant = _pair(fuse=True)
    stats = quantize_linears(quant)
    assert stats["count"] == 2 * 4 and not stats["skipped"]
    assert sorted(stats["names"])[:4] == [
        "transformer_blocks.0.attn.qkv",
        "transformer_blocks.0.attn.to_out.0",
        "transformer_blocks.0.img_mlp.net.0.proj",
        "transformer_blocks.0.img_mlp.net.2",
    ]
    block = quant.transformer_blocks[0]
    assert not isinstance(block.attn.to_add_out, Fp8Linear)
    assert not isinstance(block.txt_mlp.net[2], Fp8Linear)
    for layout in ("t2i", "edit"):
        inputs = _inputs(LAYOUTS[layout], batch=1)
        inputs["img_shapes"] = tuple(LAYOUTS[layout])
        with torch.no_grad():
            want = exact(**inputs, return_dict=False)[0]
            got = quant(**inputs, return_dict=False)[0]
        err = _rel_err(got, want)
        assert 0 < err < 0.08, err


def test_fp8_pipeline_and_step_cache(qwen_dir, qwen):
    """The runner with --quantization fp8 and the step cache on the true-CFG loop (two forwards a step, each
    branch cached apart): threshold 0 is the exact loop; forced reuse skips the tail of both branches."""
    from diffserve.runtime.config import RuntimeConfig
    from diffserve.runtime.layers.fp8 import Fp8Linear
    from diffserve.runtime.step_cache import StepCacheConfig

    kw = dict(prompt="a red fox", negative_prompt="dark", width=32, height=32, num_inference_steps=4, seed=3)
    saved = qwen.pipeline.step_cache
    try:
        qwen.pipeline.step_cache = None
        plain = qwen.generate(GenerationRequest(**kw))
        assert plain.dit_forwards == {"computed": 8, "cached": 0}
        qwen.pipeline.step_cache = StepCacheConfig(threshold=0.0)
        off = qwen.generate(GenerationRequest(**kw))
        np.testing.assert_array_equal(_pixels(off.images), _pixels(plain.images))  # the same loop
        assert off.dit_forwards == {"computed": 8, "cached": 0}
        qwen.pipeline.step_cache = StepCacheConfig(force=(False, True, False, True))
        cached = qwen.generate(GenerationRequest(**kw))
        assert cached.dit_forwards == {"computed": 4, "cached": 4}  # 2 steps x 2 CFG branches reused
        assert not np.array_equal(_pixels(cached.images), _pixels(plain.images))
    finally:
        qwen.pipeline.step_cache = saved

    fp8 = load_runner(RuntimeConfig(model=str(qwen_dir), device="cpu", quantization="fp8"))
    assert isinstance(fp8.pipeline.transformer.transformer_blocks[0].img_mlp.net[2], Fp8Linear)
    out = fp8.generate(GenerationRequest(**kw))
    a, b = _pixels(plain.images).astype(float), _pixels(out.images).astype(float)
    # measured: FP8 moves a pixel by 0.73 levels on average (the DiT's ~4% error through the 4-step loop
    # and the VAE; the image's spread is 31 levels std). Like the DiT's error it is e4m3's rounding of the
    # same values on any CPU; 3 levels leaves 4x, while a broken FP8 path (a term dropped) moves tens.
    assert a.shape == b.shape and np.abs(a - b).mean() < 3.0


def test_generate_true_cfg_scale_flag(qwen):
    """`diffserve generate --true-cfg-scale S` is the request extension true_cfg_scale (left out: the
    model's default, 4), and it reaches the true-CFG loop."""
    import argparse
    import dataclasses

    from diffserve.runtime.cli import add_generate_arguments, generation_request

    parser = argparse.ArgumentParser()
    add_generate_arguments(parser)
    base = ["--prompt", "a red fox", "--negative-prompt", "dark", "--size", "32x32", "--steps", "2"]
    base += ["--seed", "1", "-o", "out.png"]
    plain = generation_request(parser.parse_args(base), None)
    assert "true_cfg_scale" not in plain.extra
    scaled = generation_request(parser.parse_args([*base, "--true-cfg-scale", "1.5"]), None)
    assert scaled.extra["true_cfg_scale"] == 1.5
    default = _pixels(qwen.generate(plain).images)
    four = dataclasses.replace(plain, extra={"true_cfg_scale": 4.0})
    np.testing.assert_array_equal(default, _pixels(qwen.generate(four).images))
    assert np.abs(default - _pixels(qwen.generate(scaled).images)).mean() > 0.5
