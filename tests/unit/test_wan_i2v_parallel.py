"""Ulysses and CFG parallelism for Wan image-to-video ("wan-i2v": Wan2.1-I2V, Wan2.2-I2V-A14B's two experts)
on the CPU: 2 gloo ranks give what 1 rank gives, as tests/unit/test_distributed.py checks for FLUX and Wan.

Why it works: the native Wan DiT shards only the video tokens (models/wan.py _start: the patch-embedded
latents, whose 36 channels already carry the mask + first-frame latents, and their RoPE); the cross-attention
context, CLIP image rows then text rows, is built whole on every rank and attended with plain attention (no
exchange), and the image/VAE/text encoders run identically on every rank. CFG parallelism goes through
step_cache.guided_pair, the same as T2V.

Tolerance: test_distributed.TOL (fp32, relative 2e-5 of the reference's norm), for the reasons given there:
sharding changes how many rows each matmul sees, so the sums round differently (~1e-7 per operation); a
token, head or image row out of place gives O(1). Pixels: within 1 level (uint8 rounding at .5).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from diffserve.runtime.api import GenerationRequest
from diffserve.runtime.distributed import group as pg
from diffserve.runtime.distributed.config import ParallelConfig
from tests.unit.test_distributed import _free_port, assert_matches_reference, run_layouts
from tests.unit.test_wan_i2v import _image, _png

NAMES = ("wan-i2v", "wan2.2-i2v")
# 80x48, 9 frames -> a 3 x 6 x 10 latent grid -> 45 video tokens after the 1x2x2 patches (odd: padding runs)
REQ = dict(width=80, height=48, num_frames=9, num_inference_steps=2, guidance_scale=5.0, seed=4,
           negative_prompt="static")  # fmt: skip
LAYOUTS = [ParallelConfig(2), ParallelConfig(1, True)]


@pytest.fixture(scope="module")
def i2v_models(tmp_path_factory):
    from diffserve.testing import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-wan-i2v-parallel")
    return tuple(str(make_tiny_model(name, root / name)) for name in NAMES)


def _stub_ftfy() -> None:
    """As test_wan_i2v._no_ftfy, in a spawned rank: our prompt cleaning skips ftfy when it is absent."""
    import types

    from diffusers.pipelines.wan import pipeline_wan_i2v

    if not hasattr(pipeline_wan_i2v, "ftfy"):
        pipeline_wan_i2v.ftfy = types.SimpleNamespace(fix_text=lambda t: t)


def _dit_forward(runner) -> torch.Tensor:
    """One DiT forward with image context (CLIP rows + the text rows), 45 video tokens, batch 2."""
    from diffserve.runtime.models.wan import TEXT_TOKENS

    g = torch.Generator().manual_seed(7)
    dit = runner.pipeline.transformer
    c = dit.config
    image = None
    if getattr(c, "image_dim", None) is not None:
        image = torch.randn(2, 5, c.image_dim, generator=g)
    return dit(
        hidden_states=torch.randn(2, c.in_channels, 3, 6, 10, generator=g),
        timestep=torch.rand(2, generator=g) * 1000,
        encoder_hidden_states=torch.randn(2, TEXT_TOKENS, c.text_dim, generator=g),
        encoder_hidden_states_image=image,
        return_dict=False,
    )[0]


def _generate(runner) -> tuple[torch.Tensor, torch.Tensor, int, list[int]]:
    """(final latents, pixels, DiT forward calls, tokens each block 0 saw) of one 2-step I2V generation."""
    from diffserve.runtime.pipelines import stages

    latents, calls, tokens = [], [0], []
    decode = stages.decode_videos
    stages.decode_videos = lambda vae, z: latents.append(z.clone()) or decode(vae, z)
    dits = [d for d in (runner.pipeline.transformer, getattr(runner.pipeline, "transformer_2", None)) if d]
    hooks = [d.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for d in dits]
    hooks += [d.blocks[0].register_forward_pre_hook(lambda _, a: tokens.append(a[0].shape[1])) for d in dits]
    try:
        image = _png(_image(REQ["width"], REQ["height"], seed=3))
        result = runner.generate(GenerationRequest(prompt="a fox runs", image=image, **REQ))
    finally:
        for h in hooks:
            h.remove()
        stages.decode_videos = decode
    pixels = torch.stack([torch.from_numpy(np.asarray(im).copy()) for im in result.videos[0]]).int()
    return latents[0], pixels, calls[0], sorted(set(tokens))


def _run_all(runners) -> dict:
    out, info = {}, {}
    for name, runner in zip(NAMES, runners, strict=True):
        out[f"{name}_dit"] = _dit_forward(runner)
        out[f"{name}_latents"], out[f"{name}_pixels"], calls, tokens = _generate(runner)
        info[name] = (calls, tokens)
    return {"out": out, "info": info}


def _rank_main(rank: int, world: int, port: int, models: tuple[str, ...], results: str) -> None:
    from diffserve.runtime.runner import load_runner

    _stub_ftfy()
    torch.set_num_threads(1)
    runners = [load_runner(m, device="cpu") for m in models]
    with torch.inference_mode():
        report, _ = run_layouts(rank, world, port, LAYOUTS, lambda: _run_all(runners))
    torch.save(report, f"{results}/rank{rank}.pt")
    pg.shutdown_distributed()


def test_wan_i2v_parallel_layouts_match_one_rank(i2v_models, tmp_path):
    from diffserve.runtime.distributed.launch import check_model

    for model in i2v_models:  # the launcher's check, before any process starts
        check_model(ParallelConfig(2, True), model)
    world = 2
    mp.start_processes(
        _rank_main, args=(world, _free_port(), i2v_models, str(tmp_path)), nprocs=world, start_method="spawn"
    )
    reports = {rank: torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)}
    ref = reports[0]["reference"]
    for key, value in ref["out"].items():
        if key.endswith("pixels"):
            assert value.float().std() > 2, "a flat reference video would not test anything"
    for config in LAYOUTS:
        name = config.describe()
        for rank in range(world):
            got = reports[rank][name]
            assert_matches_reference(got["out"], ref["out"], reports[0][name]["out"], (name, rank))
            for model, (calls, tokens) in got["info"].items():
                # CFG parallel: one DiT forward per step instead of two (2 steps, either expert);
                # Ulysses: each rank's blocks see ceil(45 / P) video tokens.
                assert calls == 2 * (1 if config.cfg_parallel else 2), (name, rank, model, calls)
                assert tokens == [-(-45 // config.ulysses_degree)], (name, rank, model, tokens)
