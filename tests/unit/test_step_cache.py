"""Step caching (runtime/step_cache.py): the first-block residual cache of the native FLUX and Wan DiTs.

What is checked: off (threshold 0) is the plain path, bit for bit; a reused step adds exactly the residual
the tail added on the last computed step (against a float64 hand computation from the model's own modules);
the head + tail of a computed step is the whole forward; the policy (warm-up, last steps, the cap on
consecutive skips, forced patterns) and the per-forward counts; CFG branches cache separately but decide
together; configuration and request validation; and, over two gloo ranks, that the decision is all-reduced
so that ranks with different data decide the same.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from diffserve.runtime import step_cache
from diffserve.runtime.api import GenerationRequest, InvalidRequest
from diffserve.runtime.layers.modulation import norm_modulate
from diffserve.runtime.models.flux import FluxConfig, FluxTransformer
from diffserve.runtime.models.wan import WanConfig, WanTransformer
from diffserve.runtime.pipelines import stages
from diffserve.runtime.runner import load_runner
from diffserve.runtime.step_cache import DiTParts, StepCache, StepCacheConfig

FLUX_CFG = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    axes_dims_rope=(4, 6, 6),
    guidance_embeds=True,
)
WAN_CFG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=32,
    ffn_dim=48,
    num_layers=3,
    rope_max_seq_len=32,
)
FLUX_REQ = dict(prompt="a red fox", width=64, height=64, guidance_scale=4.0, seed=5)
WAN_REQ = dict(prompt="a boat", width=32, height=32, num_frames=5, guidance_scale=5.0, seed=6)


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim > 1 else 0.5))
    return model.eval()


def _flux_inputs(seed: int, batch: int = 1, h: int = 3, w: int = 5, txt: int = 6, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
    return dict(
        hidden_states=torch.randn(batch, h * w, 16, generator=g, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, txt, 32, generator=g, dtype=dtype),
        pooled_projections=torch.randn(batch, 24, generator=g, dtype=dtype),
        timestep=torch.rand(batch, generator=g, dtype=dtype),
        guidance=torch.full((batch,), 3.5, dtype=dtype),
        img_ids=torch.cat([torch.zeros(h * w, 1), ids.float()], 1).to(dtype),
        txt_ids=torch.zeros(txt, 3, dtype=dtype),
        return_dict=False,
    )


def _wan_inputs(seed: int, per_token: bool = False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    tokens = 3 * 3 * 5
    t = torch.rand(2, tokens, generator=g) if per_token else torch.rand(2, generator=g)
    return dict(
        hidden_states=torch.randn(2, 4, 3, 6, 10, generator=g, dtype=dtype),
        timestep=(t * 1000).to(dtype),
        encoder_hidden_states=torch.randn(2, 7, 32, generator=g, dtype=dtype),
        return_dict=False,
    )


@pytest.fixture(scope="module")
def flux(tiny_flux_dir):
    return load_runner(str(tiny_flux_dir), device="cpu")


@pytest.fixture(scope="module")
def wan(tiny_wan_dir):
    return load_runner(str(tiny_wan_dir), device="cpu")


@pytest.fixture
def caches(monkeypatch):
    """Every StepCache the pipelines make, in order (to look at the decisions of a run)."""
    made = []
    real = StepCache.for_run

    def spy(config, steps):
        made.append(real(config, steps))
        return made[-1]

    monkeypatch.setattr(StepCache, "for_run", staticmethod(spy))
    return made


def _final_latents(runner, req: GenerationRequest, monkeypatch):
    """(final latents, pixels, result) of one generation."""
    family = runner.family
    name = "decode_images" if family == "flux" else "decode_videos"
    decode, seen = getattr(stages, name), []
    monkeypatch.setattr(stages, name, lambda vae, z: seen.append(z.clone()) or decode(vae, z))
    result = runner.generate(req)
    monkeypatch.setattr(stages, name, decode)
    frames = result.images if family == "flux" else result.videos[0]
    return seen[0], np.stack([np.asarray(im) for im in frames]), result


# ---- off: the plain path -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_threshold_zero_is_the_uncached_path_bit_for_bit(family, flux, wan, monkeypatch):
    runner = flux if family == "flux" else wan
    pipeline = runner.pipeline
    base = dict(FLUX_REQ if family == "flux" else WAN_REQ, num_inference_steps=4)
    if family == "flux":
        base.update(negative_prompt="blurry", extra={"true_cfg_scale": 3.0})
    full = pipeline.dit if family == "flux" else pipeline.dits[0]
    parts = [g.eager_calls for g in pipeline.step_cache_graphs]
    assert pipeline.step_cache is None  # off unless configured
    latents, pixels, result = _final_latents(runner, GenerationRequest(**base), monkeypatch)
    assert result.dit_forwards == {"computed": 8, "cached": 0}  # 4 steps x 2 CFG branches
    calls = full.eager_calls
    try:
        # a default policy that would reuse, turned off by the request; and a default with threshold 0
        for default, extra in ((StepCacheConfig(threshold=1.0), {"step_cache_threshold": 0}),
                               (StepCacheConfig(threshold=0.0), {})):  # fmt: skip
            pipeline.step_cache = default
            req = GenerationRequest(**{**base, "extra": {**base.get("extra", {}), **extra}})
            again, again_pixels, again_result = _final_latents(runner, req, monkeypatch)
            assert torch.equal(again, latents) and np.array_equal(again_pixels, pixels)
            assert again_result.dit_forwards == {"computed": 8, "cached": 0}
    finally:
        pipeline.step_cache = None
    assert full.eager_calls == calls + 16  # the whole DiT ran, every time ...
    assert [g.eager_calls for g in pipeline.step_cache_graphs] == parts  # ... and none of its parts


# ---- the parts: head + tail = forward; a reused step = head + cached residual ---------------------------


@pytest.mark.parametrize("head_blocks", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 2])
def test_flux_head_and_tail_are_the_whole_forward(head_blocks, batch):
    model = _randomise(FluxTransformer(FluxConfig(**FLUX_CFG)))
    kw = _flux_inputs(0, batch)
    with torch.inference_mode():
        full = model(**kw)[0]
        signal, state = model.forward_head(head_blocks=head_blocks, **kw)
        out, residual = model.forward_tail(head_blocks=head_blocks, head_state=state, **kw)
    assert state.shape == (batch, 6 + 15, model.config.inner_dim)
    assert signal.shape == residual.shape == (batch, 15, model.config.inner_dim)
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="head_blocks must be between 1 and 3"):
        model.forward_head(head_blocks=4, **kw)


@pytest.mark.parametrize("per_token", [False, True])
def test_wan_head_and_tail_are_the_whole_forward(per_token):
    model = _randomise(WanTransformer(WanConfig(**WAN_CFG))).fuse_projections()
    kw = _wan_inputs(0, per_token)
    with torch.inference_mode():
        full = model(**kw)[0]
        head = model.forward_head(head_blocks=1, **kw)
        state = dict(zip(model.step_state_names, head[1:], strict=False))
        out, *residual = model.forward_tail(head_blocks=1, **state, **kw)
    # folded blocks (per-sample modulation) carry their float32 offset beside x; per-token ones do not
    assert len(head) - 1 == len(residual) == (1 if per_token else 2)
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-6)


def _flux_by_hand(model: FluxTransformer, kw: dict):
    """(head image rows, final image rows before the output norm) of one FLUX forward, block by block with
    nothing deferred, from the model's modules (float64)."""
    cond = model._conditioning(kw["timestep"], kw["guidance"], kw["pooled_projections"], 1, "cpu")
    img, txt = model.x_embedder(kw["hidden_states"]), model.context_embedder(kw["encoder_hidden_states"])
    ids = torch.cat([kw["txt_ids"], kw["img_ids"]])
    from diffserve.runtime.layers.rope import axes_rope

    rope = axes_rope(ids, model.config.axes_dims_rope)
    img, txt = model.transformer_blocks[0](img, txt, cond, rope)
    head = img.clone()
    img, txt = model.transformer_blocks[1](img, txt, cond, rope)
    x = torch.cat([txt, img], 1)
    for block in model.single_transformer_blocks:
        x = block(x, cond, rope)
    return head, x[:, txt.shape[1] :], cond


def test_flux_forced_skip_adds_the_cached_residual_exactly():
    """Steps 0 and 3 computed, 1 and 2 reused: a reused step's output is the output norm and projection of
    (its own head output + the residual the tail added at step 0), computed here by hand in float64."""
    model = _randomise(FluxTransformer(FluxConfig(**FLUX_CFG))).double()
    parts = DiTParts(model)
    cache = StepCache(StepCacheConfig(force=(False, True, True, False)), steps=4)
    inputs = [_flux_inputs(10 + i, dtype=torch.float64) for i in range(4)]
    full_calls = []
    with torch.inference_mode():
        outs = [
            cache.step(i, lambda **kw: full_calls.append(1), parts, {"cond": kw})["cond"]
            for i, kw in enumerate(inputs)
        ]
        head0, final0, _ = _flux_by_hand(model, inputs[0])
        residual0 = final0 - head0
        for i in (1, 2):
            head, _, cond = _flux_by_hand(model, inputs[i])
            scale, shift = model.norm_out(cond)
            expected = model.proj_out(norm_modulate(head + residual0, shift, scale, 1e-6))
            torch.testing.assert_close(outs[i], expected, rtol=1e-12, atol=1e-12)
            assert (outs[i] - model(**inputs[i])[0]).abs().max() > 1e-3  # not what the whole DiT gives
        for i in (0, 3):
            torch.testing.assert_close(outs[i], model(**inputs[i])[0], rtol=1e-12, atol=1e-12)
    assert full_calls == [] and cache.reused_steps == [1, 2]
    assert cache.counts() == {"computed": 2, "cached": 2}


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_reusing_on_the_same_inputs_gives_the_whole_forward(family):
    """With the inputs of the computed step, head + its cached residual is the whole forward (float64)."""
    if family == "flux":
        model, kw = (
            _randomise(FluxTransformer(FluxConfig(**FLUX_CFG))).double(),
            _flux_inputs(1, 2, dtype=torch.float64),
        )
    else:
        model, kw = (
            _randomise(WanTransformer(WanConfig(**WAN_CFG))).double(),
            _wan_inputs(1, dtype=torch.float64),
        )
    cache = StepCache(StepCacheConfig(force=(False, True)), steps=2)
    parts = DiTParts(model)
    with torch.inference_mode():
        first, second = (cache.step(i, None, parts, {"cond": kw})["cond"] for i in range(2))
        torch.testing.assert_close(second, model(**kw)[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(first, second, rtol=1e-12, atol=1e-12)
    assert cache.reused_steps == [1]


# ---- the policy, on a DiT whose head signal is set by the test ---------------------------------------------


class _ScriptedParts:
    """DiTParts stand-in: the head's signal is kwargs["signal"]; the tail returns 10 * step, residual = step;
    a reuse returns -(the cached residual)."""

    state_names, residual_names = ("head_state",), ("residual",)

    def head(self, head_blocks, signal, step, **_):
        return signal, torch.tensor(float(step))

    def tail(self, head_blocks, head_state, step, **_):
        return torch.tensor(10.0 * step), head_state.clone()

    def reuse(self, head_blocks, head_state, residual, **_):
        return -residual


def _run(config: StepCacheConfig, signals: list[float], reduce: bool = False, group=None, cfg=False):
    cache, parts = StepCache(config, len(signals), group=group, reduce=reduce), _ScriptedParts()
    outs = []
    for i, s in enumerate(signals):
        calls = {"cond": dict(signal=torch.full((4,), s), step=i)}
        if cfg:  # the unconditional branch changes twice as much
            calls["uncond"] = dict(signal=torch.full((4,), 2 * s), step=i)
        outs.append(cache.step(i, None, parts, calls))
    return cache, outs


def test_policy_warmup_last_steps_and_cap():
    config = StepCacheConfig(threshold=0.5, warmup_steps=2, last_steps_computed=2, max_consecutive_skips=2)
    cache, outs = _run(config, [1.0] * 10)  # the signal never changes: every step may reuse
    assert cache.reused_steps == [2, 3, 5, 6]  # not 0-1 (warm-up), 8-9 (last), and 2 in a row at most
    assert cache.counts() == {"computed": 6, "cached": 4}
    # a reused step gives the residual of the last computed step (1 for steps 2-3, 4 for steps 5-6)
    assert [o["cond"].item() for o in outs] == [0, 10, -1, -1, 40, -4, -4, 70, 80, 90]
    assert set(cache.ratios) == {2, 3, 5, 6} and all(r == 0.0 for r in cache.ratios.values())


def test_policy_relative_l1_against_the_last_computed_step():
    # signal 1, then +20% per step: steps 2.. compare with step 1's signal (the last computed one)
    config = StepCacheConfig(threshold=0.3, warmup_steps=2, last_steps_computed=0, max_consecutive_skips=9)
    cache, _ = _run(config, [1.0, 1.0, 1.2, 1.2, 1.4, 1.4, 1.6])
    # 2: |1.2-1|/1 = 0.2 reuse; 3: 0.2 reuse; 4: 0.4 compute (reference -> 1.4); 5: 0 reuse; 6: 0.2/1.4 reuse
    assert cache.reused_steps == [2, 3, 5, 6]
    assert cache.ratios[4] == pytest.approx(0.4) and cache.ratios[6] == pytest.approx(0.2 / 1.4)


def test_cfg_branches_cache_separately_and_decide_together():
    config = StepCacheConfig(threshold=0.25, warmup_steps=1, last_steps_computed=0, max_consecutive_skips=9)
    # cond changes 0.2 (alone: reuse), uncond 0.4 of 2 ... the pair: (0.2 + 0.4) / (1 + 2) = 0.2 -> reuse
    cache, outs = _run(config, [1.0, 1.2], cfg=True)
    assert cache.reused_steps == [1] and cache.ratios[1] == pytest.approx(0.2)
    assert cache.counts() == {"computed": 2, "cached": 2}
    assert len(cache._branches) == 2
    # each branch reuses its own residual (its own head state at step 0: 0 for both here) ...
    assert [outs[1][k].item() for k in ("cond", "uncond")] == [0.0, 0.0]
    # ... and a pair that changes too much is computed as a whole
    cache, _ = _run(config, [1.0, 1.5], cfg=True)
    assert cache.reused_steps == [] and cache.counts() == {"computed": 4, "cached": 0}


def test_forced_pattern_overrides_the_policy_but_needs_a_cached_residual():
    config = StepCacheConfig(threshold=0.0, force=(False, True, True, True), max_consecutive_skips=1)
    cache, _ = _run(config, [1.0, 9.0, 9.0, 9.0, 9.0])  # past the pattern's end: computed
    assert cache.reused_steps == [1, 2, 3] and cache.ratios == {}
    # a branch that has nothing cached yet (say, a Wan2.2 expert's first step) computes
    cache, parts = StepCache(StepCacheConfig(force=(False, True, True)), 3), _ScriptedParts()
    cache.step(0, None, parts, {"a": dict(signal=torch.ones(4), step=0)})
    cache.step(1, None, parts, {"b": dict(signal=torch.ones(4), step=1)})
    cache.step(2, None, parts, {"b": dict(signal=torch.ones(4), step=2)})
    assert cache.reused_steps == [2]


def test_forced_fraction_patterns():
    for steps, fraction, reused in ((20, 0.0, 0), (20, 0.25, 5), (20, 0.5, 10), (4, 0.5, 2)):
        force = StepCacheConfig.forced_fraction(steps, fraction).force
        assert len(force) == steps and sum(force) == reused and not force[0]


# ---- through the pipelines -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, cfg, expected",
    [
        ("flux", False, {"computed": 2, "cached": 2}),
        ("flux", True, {"computed": 4, "cached": 4}),  # true CFG: two forwards per step
        ("wan", True, {"computed": 4, "cached": 4}),
        ("wan", False, {"computed": 2, "cached": 2}),
    ],
)
def test_forced_pattern_counts_per_branch_forward(family, cfg, expected, flux, wan, caches):
    runner = flux if family == "flux" else wan
    req = dict(FLUX_REQ if family == "flux" else WAN_REQ, num_inference_steps=4)
    if family == "flux" and cfg:
        req.update(negative_prompt="blurry", extra={"true_cfg_scale": 3.0})
    if family == "wan" and not cfg:
        req.update(guidance_scale=1.0)
    runner.pipeline.step_cache = StepCacheConfig(force=(False, True, True, False))
    try:
        result = runner.generate(GenerationRequest(**req))
    finally:
        runner.pipeline.step_cache = None
    assert result.dit_forwards == expected
    assert caches[-1].reused_steps == [1, 2]
    assert len(caches[-1]._branches) == (2 if cfg else 1)


def test_cfg_branches_keep_their_own_residuals(flux, caches):
    req = dict(FLUX_REQ, num_inference_steps=3, negative_prompt="blurry", extra={"true_cfg_scale": 3.0})
    flux.pipeline.step_cache = StepCacheConfig(force=(False, True, False))
    try:
        flux.generate(GenerationRequest(**req))
    finally:
        flux.pipeline.step_cache = None
    (_, cond), (_, uncond) = sorted(caches[-1]._branches.items(), key=lambda kv: kv[0][1])
    assert not torch.equal(cond.residual["residual"], uncond.residual["residual"])
    assert not torch.equal(cond.signal, uncond.signal)


def test_wan22_experts_cache_separately(tiny_wan22_dir, caches):
    """Wan2.2 A14B: each expert has its own parts and cache; the second expert's first step has nothing
    cached, so it computes even where the pattern says reuse."""
    runner = load_runner(str(tiny_wan22_dir), device="cpu")
    schedule = type(runner.pipeline.scheduler).from_config(runner.pipeline.scheduler.config)
    schedule.set_timesteps(4)
    high_noise = int((schedule.timesteps >= runner.pipeline.boundary).sum())  # steps of the first expert
    assert 0 < high_noise < 4
    runner.pipeline.step_cache = StepCacheConfig(force=(False, True, True, True))
    result = runner.generate(GenerationRequest(**WAN_REQ, num_inference_steps=4))
    reused = [i for i in (1, 2, 3) if i != high_noise]
    assert caches[-1].reused_steps == reused
    assert result.dit_forwards == {"computed": 2 * (4 - len(reused)), "cached": 2 * len(reused)}
    assert {parts for parts, _ in caches[-1]._branches} == {id(p) for p in runner.pipeline.dit_parts}


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_high_threshold_reuses_within_the_policy(family, flux, wan, caches):
    runner = flux if family == "flux" else wan
    req = dict(FLUX_REQ if family == "flux" else WAN_REQ, num_inference_steps=10)
    runner.pipeline.step_cache = StepCacheConfig(
        threshold=1.0, warmup_steps=2, last_steps_computed=2, max_consecutive_skips=2
    )
    try:
        result = runner.generate(GenerationRequest(**req))
    finally:
        runner.pipeline.step_cache = None
    reused = caches[-1].reused_steps
    assert reused and all(2 <= i < 8 for i in reused)
    assert not any(i in reused and i + 1 in reused and i + 2 in reused for i in range(10))
    branches = 1 if family == "flux" else 2  # Wan runs CFG here (guidance 5), FLUX no true CFG
    assert result.dit_forwards == {
        "computed": (10 - len(reused)) * branches,
        "cached": len(reused) * branches,
    }
    assert result.images or result.videos


def test_request_threshold_overrides_the_default(flux, caches):
    req = dict(FLUX_REQ, num_inference_steps=10)  # past the default warm-up (6 steps)
    result = flux.generate(GenerationRequest(**req, extra={"step_cache_threshold": 1.0}))
    assert caches[-1].config == StepCacheConfig(threshold=1.0)  # the default policy, this threshold
    assert result.dit_forwards["cached"] > 0
    flux.pipeline.step_cache = StepCacheConfig(threshold=1.0, warmup_steps=1)
    try:
        flux.generate(GenerationRequest(**req, extra={"step_cache_threshold": 0.5}))
        assert caches[-1].config == StepCacheConfig(threshold=0.5, warmup_steps=1)
        flux.generate(GenerationRequest(**req))
        assert caches[-1].config == StepCacheConfig(threshold=1.0, warmup_steps=1)
    finally:
        flux.pipeline.step_cache = None


# ---- validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(policy="teacache"), "policy must be one of first-block"),
        (dict(threshold=-0.1), "threshold must be a number between 0 and 1"),
        (dict(threshold=1.5), "threshold must be a number between 0 and 1"),
        (dict(threshold=float("nan")), "threshold must be a number"),
        (dict(threshold="0.1"), "threshold must be a number"),
        (dict(threshold=True), "threshold must be a number"),
        (dict(warmup_steps=-1), "warmup_steps must be an integer >= 0"),
        (dict(last_steps_computed=1.5), "last_steps_computed must be an integer >= 0"),
        (dict(max_consecutive_skips=0), "max_consecutive_skips must be an integer >= 1"),
        (dict(head_blocks=0), "head_blocks must be an integer >= 1"),
        (dict(force=(True, False)), "force\\[0\\] must be False"),
        (dict(force=(False, 1)), "force must hold only True/False"),
        (dict(force="FT"), "force must be a list of booleans"),
    ],
)
def test_bad_config_values_raise_value_error(change, message):
    with pytest.raises(ValueError, match=message) as info:
        StepCacheConfig(**change)
    assert "\n" not in str(info.value)


def test_config_defaults_and_off():
    config = StepCacheConfig()
    assert (config.policy, config.threshold, config.head_blocks) == (
        "first-block",
        step_cache.DEFAULT_THRESHOLD,
        1,
    )
    assert config.enabled and not StepCacheConfig(threshold=0).enabled
    assert StepCacheConfig(threshold=0, force=[False, True]).force == (
        False,
        True,
    )  # a list is kept as a tuple
    assert StepCache(StepCacheConfig(threshold=0), 4).config is None


@pytest.mark.parametrize("value", [-0.1, 1.5, "0.1", None, True, float("inf")])
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_bad_request_threshold_is_invalid_request(family, value, flux, wan):
    runner = flux if family == "flux" else wan
    req = dict(FLUX_REQ if family == "flux" else WAN_REQ, num_inference_steps=1)
    with pytest.raises(InvalidRequest, match="step_cache_threshold must be a number between 0 and 1"):
        runner.generate(GenerationRequest(**req, extra={"step_cache_threshold": value}))


# ---- two gloo ranks: one decision ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, results: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    config = StepCacheConfig(threshold=0.25, warmup_steps=1, last_steps_computed=0, max_consecutive_skips=9)
    # Step 1: rank 0's signal changes 10%, rank 1's (twice as large) 40%: alone, rank 0 would reuse and
    # rank 1 would not; together (0.1 + 0.8) / (1 + 2) = 0.3 -> both compute. Step 2, against step 1:
    # (0.11 + 0.56) / (1.1 + 2.8) = 0.17 -> both reuse (alone, rank 0 compares with step 0: 0.21, reuse).
    scale = (1.0, 2.0)[rank]
    growth = (0.1, 0.4)[rank]
    signals = [
        scale,
        scale * (1 + growth),
        scale * (1 + growth) * 1.1 if rank == 0 else scale * (1 + growth) * 1.2,
    ]
    together, _ = _run(config, signals, reduce=True)
    alone, _ = _run(config, signals)
    torch.save({"together": together.reused_steps, "alone": alone.reused_steps, "ratios": together.ratios},
               f"{results}/rank{rank}.pt")  # fmt: skip
    dist.destroy_process_group()


def test_ranks_all_reduce_the_decision(tmp_path):
    mp.start_processes(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["alone"] == [1, 2] and r1["alone"] == [2]  # alone they would disagree at step 1 ...
    assert r0["together"] == r1["together"] == [2]  # ... all-reduced they decide the same
    assert r0["ratios"] == r1["ratios"] and r0["ratios"][1] == pytest.approx(0.3)


# ---- on a GPU: the parts as CUDA graphs, and the loop's one read ----------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_graphed_parts_give_the_eager_parts_output(family, tiny_flux_dir, tiny_wan_dir, monkeypatch):
    from diffserve.runtime import cuda_graphs

    runner = load_runner(
        str(tiny_flux_dir if family == "flux" else tiny_wan_dir), device="cuda", dtype="bfloat16"
    )
    base = dict(FLUX_REQ if family == "flux" else WAN_REQ, num_inference_steps=5)
    if family == "flux":
        base.update(negative_prompt="blurry", extra={"true_cfg_scale": 3.0})
    runner.pipeline.step_cache = StepCacheConfig(force=(False, True, False, True, True))
    frames = {}
    for graphs in ("1", "0"):
        monkeypatch.setenv(cuda_graphs.GRAPHS_ENV, graphs)
        result = runner.generate(GenerationRequest(**base))
        assert result.dit_forwards == {"computed": 4, "cached": 6}
        images = result.images if family == "flux" else result.videos[0]
        frames[graphs] = np.stack([np.asarray(im) for im in images])
    head, tail, reuse = runner.pipeline.step_cache_graphs[:3]
    assert head.captures == tail.captures == reuse.captures == 1  # one layout, both branches replay it
    assert (head.replays, tail.replays, reuse.replays) == (10, 4, 6)
    assert np.array_equal(frames["1"], frames["0"]) and frames["1"].std() > 1


@cuda
@pytest.mark.parametrize("graphs", ["1", "0"])
def test_the_decision_read_is_the_loops_only_sync(tiny_flux_dir, monkeypatch, graphs):
    """DIFFSERVE_CHECK_SYNC=1: a cached generation that reads its decision at every step completes."""
    from diffserve.runtime import cuda_graphs

    monkeypatch.setenv(cuda_graphs.GRAPHS_ENV, graphs)
    monkeypatch.setenv(cuda_graphs.CHECK_SYNC_ENV, "1")
    runner = load_runner(str(tiny_flux_dir), device="cuda", dtype="bfloat16")
    made = []
    real = StepCache.for_run
    monkeypatch.setattr(StepCache, "for_run", staticmethod(lambda c, s: made.append(real(c, s)) or made[-1]))
    config = dict(threshold=1.0, warmup_steps=1, last_steps_computed=1, max_consecutive_skips=1)
    runner.pipeline.step_cache = StepCacheConfig(**config)
    result = runner.generate(GenerationRequest(**FLUX_REQ, num_inference_steps=6))
    assert made[-1].ratios and result.dit_forwards["cached"] > 0
    assert torch.cuda.get_sync_debug_mode() == 0
