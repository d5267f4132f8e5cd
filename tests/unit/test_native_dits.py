"""Our FLUX and Wan transformers against diffusers' reference classes, with identical random weights.

Every parameter is re-randomised (diffusers zero-initialises some, e.g. the adaLN projections, which would
hide mistakes in what they feed), so each piece of the forward pass moves the output.
"""

from __future__ import annotations

import json

import diffusers
import pytest
import torch

from diffserve.runtime.models.flux import FluxTransformer
from diffserve.runtime.models.wan import WanTransformer

# Ours against diffusers in float32, the same weights: the same math with other GEMM shapes (fused q|k|v and
# adaLN projections, residual adds folded into GEMMs) and attention through SDPA, so the sums (K <= 320: dim
# 64, MLP 256) are blocked and vectorised in another order; ~sqrt(K) * 1.2e-7 per layer over 4 FLUX / 2 Wan
# blocks. Measured max 3.1e-7 (threads 1/2; ATEN_CPU_CAPABILITY avx512/avx2/default; MKL_CBWR=COMPATIBLE,
# oneDNN AVX2/SSE4.1): 1e-5 is 30x that.
TOL = 1e-5

FLUX_CFG = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    axes_dims_rope=(4, 6, 6),
)
WAN_CFG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=32,
    ffn_dim=96,
    num_layers=2,
    cross_attn_norm=True,
    rope_max_seq_len=64,
)


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim > 1 else 0.5))
    return model.eval()


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def _flux_pair(guidance_embeds: bool):
    ref = _randomise(diffusers.FluxTransformer2DModel(**FLUX_CFG, guidance_embeds=guidance_embeds))
    ours = FluxTransformer.from_config(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _flux_inputs(batch=2, h=3, w=4, txt=5, guidance=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.randint(0, 8, (h * w, 3), generator=g).float()  # every rope axis varies
    return dict(
        hidden_states=torch.randn(batch, h * w, FLUX_CFG["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, txt, FLUX_CFG["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, FLUX_CFG["pooled_projection_dim"], generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=img_ids,
        txt_ids=torch.zeros(txt, 3),
        guidance=torch.full((batch,), 3.5) if guidance else None,
    )


def _wan_inputs(frames: int, batch=2, h=6, w=8, txt=7, seed=2):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, WAN_CFG["in_channels"], frames, h, w, generator=g),
        timestep=torch.rand(batch, generator=g) * 1000,
        encoder_hidden_states=torch.randn(batch, txt, WAN_CFG["text_dim"], generator=g),
    )


@pytest.mark.parametrize("guidance_embeds", [False, True], ids=["schnell", "dev"])
def test_flux_matches_diffusers(guidance_embeds):
    ref, ours = _flux_pair(guidance_embeds)
    inputs = _flux_inputs(guidance=guidance_embeds)
    with torch.no_grad():
        expected = ref(**inputs, return_dict=False)[0]
        got = ours(**inputs, joint_attention_kwargs=None, return_dict=False)
    assert isinstance(got, tuple) and len(got) == 1
    assert _rel_err(got[0], expected) < TOL
    # The default return is the bare tensor.
    with torch.no_grad():
        assert torch.equal(ours(**inputs), got[0])


def test_flux_guidance_changes_output_and_is_required():
    _, ours = _flux_pair(True)
    inputs = _flux_inputs(guidance=True)
    with torch.no_grad():
        a = ours(**inputs)
        b = ours(**{**inputs, "guidance": torch.full((2,), 1.0)})
    assert _rel_err(a, b) > 1e-3
    with torch.no_grad():  # a single timestep/guidance value is shared by the batch
        shared = ours(**{**inputs, "timestep": torch.tensor(0.4), "guidance": 3.5})
        batched = ours(**{**inputs, "timestep": torch.full((2,), 0.4), "guidance": torch.full((2,), 3.5)})
    assert torch.equal(shared, batched)
    with pytest.raises(ValueError, match="guidance"):
        ours(**{**inputs, "guidance": None})


@pytest.mark.parametrize("frames", [1, 3])
@pytest.mark.parametrize("cross_attn_norm", [True, False])
def test_wan_matches_diffusers(frames, cross_attn_norm):
    ref = _randomise(diffusers.WanTransformer3DModel(**{**WAN_CFG, "cross_attn_norm": cross_attn_norm}))
    ours = WanTransformer.from_config(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    inputs = _wan_inputs(frames)
    with torch.no_grad():
        expected = ref(**inputs, return_dict=False)[0]
        got = ours(**inputs, attention_kwargs=None)
    assert got.shape == inputs["hidden_states"].shape
    assert _rel_err(got, expected) < TOL


def test_wan_per_token_timesteps_match_diffusers():
    # Wan2.2 TI2V passes one timestep per latent token, shape (batch, seq).
    ref = _randomise(diffusers.WanTransformer3DModel(**WAN_CFG))
    ours = WanTransformer.from_config(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    inputs = _wan_inputs(frames=2)
    seq = 2 * 3 * 4
    inputs["timestep"] = torch.rand(2, seq, generator=torch.Generator().manual_seed(3)) * 1000
    with torch.no_grad():
        expected = ref(**inputs, return_dict=False)[0]
        got = ours(**inputs)
    assert _rel_err(got, expected) < TOL


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_wan_i2v_image_context_matches_diffusers(fused):
    """Wan2.1-I2V: CLIP image states (here 9 tokens of width 20) through the image embedder lead the
    cross-attention context; each block's add_k/add_v (+ norm_added_k) attend to them. The text must be
    the reference's 512 tokens (its split point)."""
    dim = WAN_CFG["num_attention_heads"] * WAN_CFG["attention_head_dim"]
    cfg = {**WAN_CFG, "in_channels": 36, "image_dim": 20, "added_kv_proj_dim": dim}
    ref = _randomise(diffusers.WanTransformer3DModel(**cfg))
    ours = WanTransformer.from_config(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    if fused:  # what the loader runs: q|k|v, text k|v and image k|v each one GEMM
        for block in ours.blocks:
            block.fuse_projections()
    g = torch.Generator().manual_seed(5)
    inputs = dict(
        hidden_states=torch.randn(2, 36, 2, 6, 8, generator=g),
        timestep=torch.tensor([700.0, 300.0]),
        encoder_hidden_states=torch.randn(2, 512, WAN_CFG["text_dim"], generator=g),
        encoder_hidden_states_image=torch.randn(2, 9, 20, generator=g),
    )
    with torch.no_grad():
        expected = ref(**inputs, return_dict=False)[0]
        got = ours(**inputs)
        without_image = ref(**{**inputs, "encoder_hidden_states_image": None}, return_dict=False)[0]
    assert _rel_err(got, expected) < TOL
    assert _rel_err(without_image, expected) > 1e-3  # the image context moves the output
    with pytest.raises(ValueError, match="needs the image states"):
        ours(**{**inputs, "encoder_hidden_states_image": None})
    with pytest.raises(ValueError, match="512 text tokens"):
        ours(**{**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"][:, :500]})


def test_wan_rejects_first_last_frame_config():
    with pytest.raises(ValueError, match="FLF2V"):
        WanTransformer.from_config(
            {**WAN_CFG, "image_dim": 32, "added_kv_proj_dim": 64, "pos_embed_seq_len": 514}
        )
    with pytest.raises(ValueError, match="both image_dim and added_kv_proj_dim"):
        WanTransformer.from_config({**WAN_CFG, "image_dim": 32})


def _param_dtypes(model: torch.nn.Module) -> dict[str, torch.dtype]:
    return {name: p.dtype for name, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["flux", "wan"])
@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
def test_from_pretrained_round_trip(tmp_path, family, shard):
    if family == "flux":
        ref, cls = (
            _randomise(diffusers.FluxTransformer2DModel(**FLUX_CFG, guidance_embeds=True)),
            FluxTransformer,
        )
        inputs = _flux_inputs()
    else:
        ref, cls = _randomise(diffusers.WanTransformer3DModel(**WAN_CFG)), WanTransformer
        inputs = _wan_inputs(frames=2)
    ref.save_pretrained(tmp_path, max_shard_size="100KB" if shard else "10GB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists() == shard

    ours = cls.from_pretrained(tmp_path, device="cpu", dtype=torch.float32)
    assert not any(p.is_meta for p in ours.parameters())
    assert ours.dtype == torch.float32 and ours.device == torch.device("cpu")
    assert ours.config.in_channels == ref.config.in_channels and ours.config["num_layers"] == 2
    with torch.no_grad():
        assert _rel_err(ours(**inputs), ref(**inputs, return_dict=False)[0]) < TOL

    # Half precision keeps the same parameters in float32 as diffusers does (Wan's modulation tables ...).
    half = cls.from_pretrained(tmp_path, device="cpu", dtype=torch.bfloat16)
    ref_half = type(ref).from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert _param_dtypes(half) == _param_dtypes(ref_half)
    assert half.dtype == torch.bfloat16
    for name, p in ref_half.named_parameters():
        assert torch.equal(half.get_parameter(name), p), name
    # bf16 forward, mixed with the float32-kept parameters, follows diffusers' own bf16 forward.
    half_inputs = {
        k: v.bfloat16() if k in ("hidden_states", "encoder_hidden_states", "pooled_projections") else v
        for k, v in inputs.items()
    }
    with torch.no_grad():
        got, expected = half(**half_inputs), ref_half(**half_inputs, return_dict=False)[0]
        exact = ref(**inputs, return_dict=False)[0]
    assert got.dtype == torch.bfloat16
    if family == "flux":  # the same ops rounded at the same points as diffusers
        assert _rel_err(got, expected) < 1e-3
    # Wan's residual adds run inside the output GEMMs (WanBlock.forward_folded), so its bf16 rounding
    # differs from diffusers'; it must be as close to the float32 result as diffusers' own bf16 forward.
    ours_err, their_err = _rel_err(got.float(), exact), _rel_err(expected.float(), exact)
    assert their_err > 1e-4 and ours_err <= 1.2 * their_err, (ours_err, their_err)


def test_from_pretrained_truncated_file(tmp_path):
    _randomise(diffusers.WanTransformer3DModel(**WAN_CFG)).save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors.*truncated"):
        WanTransformer.from_pretrained(tmp_path, dtype=torch.float32)


def test_from_pretrained_missing_shard_and_config(tmp_path):
    _randomise(diffusers.FluxTransformer2DModel(**FLUX_CFG)).save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        FluxTransformer.from_pretrained(tmp_path, dtype=torch.float32)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        FluxTransformer.from_pretrained(tmp_path, dtype=torch.float32)


def test_from_pretrained_rejects_weights_of_another_config(tmp_path):
    _randomise(diffusers.FluxTransformer2DModel(**FLUX_CFG)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "guidance_embeds": True}))
    with pytest.raises(ValueError, match="missing.*guidance_embedder"):
        FluxTransformer.from_pretrained(tmp_path, dtype=torch.float32)


@pytest.mark.parametrize("family", ["flux", "flux-schnell", "wan"])
def test_drop_in_diffusers_pipeline(family):
    """Ours replaces the transformer inside diffusers' own FluxPipeline / WanPipeline: same latents."""
    from diffserve.testing.tiny_models import make_tiny_pipeline

    pipe = make_tiny_pipeline(family)
    cls = WanTransformer if family == "wan" else FluxTransformer
    ours = cls.from_config(dict(pipe.transformer.config)).eval()
    ours.load_state_dict(pipe.transformer.state_dict(), strict=True)
    calls = []
    ours.register_forward_hook(lambda *_: calls.append(1))
    kwargs = dict(prompt="a red square", num_inference_steps=2, output_type="latent")
    if family == "wan":
        kwargs.update(height=32, width=32, num_frames=5, guidance_scale=3.0)  # with CFG: cond + uncond calls
    else:
        kwargs.update(height=64, width=64, guidance_scale=3.5)

    def latents(p):
        out = p(**kwargs, generator=torch.Generator().manual_seed(0))
        return out.frames if family == "wan" else out.images

    expected = latents(pipe)
    got = latents(type(pipe)(**{**pipe.components, "transformer": ours}))
    assert len(calls) == (4 if family == "wan" else 2)
    assert _rel_err(got, expected) < TOL


def test_bench_dit_tiny_end_to_end(tmp_path):
    """benchmarks/bench_dit.py --tiny runs (eager variants) and records rows; its FLOP counts reproduce the
    figures in DESIGN.md (FLUX.1-dev 1024^2: 74.4 TFLOP; Wan2.1-1.3B 480p x 81: 283 TFLOP)."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        script = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    bench, specs = load("bench_dit"), load("dit_specs")  # dit_specs: the configs and FLOP counts
    assert round(specs.flux_flops(specs.FULL["flux"]["config"], 1, 4096, 512) / 1e12, 1) == 74.4
    assert round(specs.wan_flops(specs.FULL["wan"]["config"], 1, 21 * 30 * 52, 512) / 1e12) == 283

    results = tmp_path / "results.jsonl"
    argv = ["--tiny", "--variants", "diffusers-eager,ours-plain,ours-eager", "--iters", "5", "--warmup", "1"]
    assert bench.main([*argv, "--results", str(results)]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["benchmark"], r["impl"]) for r in rows] == [
        ("dit_flux_tiny_forward", "diffusers-eager"),
        ("dit_flux_tiny_forward", "ours-plain"),
        ("dit_flux_tiny_forward", "ours-eager"),
        ("dit_wan_tiny_forward", "diffusers-eager"),
        ("dit_wan_tiny_forward", "ours-plain"),
        ("dit_wan_tiny_forward", "ours-eager"),
    ]
    assert [r["fused_projections"] for r in rows] == [None, False, True] * 2
    assert all(r["ms"] > 0 and r["rel_err_vs_diffusers_eager"] < 1e-2 for r in rows)


# ---------------------------------------------------------------- fused projections and compilation


def _wan_pair():
    ref = _randomise(diffusers.WanTransformer3DModel(**WAN_CFG))
    ours = WanTransformer.from_config(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_fused_projections_match_and_keep_the_state_dict(family):
    ref, ours = _flux_pair(True) if family == "flux" else _wan_pair()
    inputs = _flux_inputs() if family == "flux" else _wan_inputs(frames=2)
    names = list(ours.state_dict())
    with torch.no_grad():
        expected = ref(**inputs, return_dict=False)[0]
        ours.fuse_projections()
        assert _rel_err(ours(**inputs), expected) < TOL
    fused = [n for n, b in ours.named_buffers() if n.endswith("_weight") and b is not None]
    # FLUX: q|k|v and the text stream's per dual block, q|k|v per single block, all adaLN projections as
    # one; Wan: q|k|v and k|v.
    assert len(fused) == (2 * 2 + 2 + 1 if family == "flux" else 2 * 2), fused
    assert list(ours.state_dict()) == names  # checkpoints still load by diffusers' names

    # Loading new weights after fusion writes through to the fused GEMMs.
    other = _randomise(type(ref)(**ref.config), seed=7)
    ours.load_state_dict(other.state_dict(), strict=True)
    with torch.no_grad():
        assert _rel_err(ours(**inputs), other(**inputs, return_dict=False)[0]) < TOL
    ours.fuse_projections()  # idempotent
    assert len([n for n, b in ours.named_buffers() if n.endswith("_weight") and b is not None]) == len(fused)


@pytest.mark.parametrize("guidance_embeds", [False, True], ids=["schnell", "dev"])
def test_flux_adaln_schedule_matches_per_step_forwards(guidance_embeds):
    # Pipelines project every step's adaLN conditioning before the loop and pass row i as adaln=; each
    # step must then give what the plain forward gives for that step's timestep, guidance and pooled text.
    ref, ours = _flux_pair(guidance_embeds)
    ours.fuse_projections()
    inputs = _flux_inputs(guidance=guidance_embeds)
    steps = torch.tensor([1.0, 0.75, 0.3125, 0.05])
    with torch.no_grad():
        schedule = ours.adaln_schedule(steps, inputs["guidance"], inputs["pooled_projections"])
        assert schedule.shape == (4, 2, ours.adaln_weight.shape[0])
        for i, t in enumerate(steps):
            per_step = {**inputs, "timestep": t.expand(2)}
            expected = ref(**per_step, return_dict=False)[0]
            plain = ours(**per_step)
            # With the schedule the timestep, guidance and pooled text are not read at all.
            junk = {"timestep": torch.full((2,), 0.5), "pooled_projections": torch.zeros(2, 32)}
            got = ours(**{**per_step, **junk, "guidance": None}, adaln=schedule[i])
            # The schedule runs the timestep/guidance/pooled MLPs and the adaLN GEMM (K = 64..256) on
            # 4 x 2 rows at once instead of 2: another GEMM shape, so the modulation differs by ~1 float32
            # ulp, which 4 blocks amplify. Measured max 1.05e-6 (1.02e-6 1 thread, 1.05e-6 2 threads, avx2
            # 1.05e-6, default 8.1e-7, MKL_CBWR/oneDNN SSE 9.1e-7); 2e-5 is 19x that. (got vs diffusers is
            # got vs plain here: the plain forward equals diffusers' bit for bit.)
            assert _rel_err(got, expected) < 2e-5
            assert _rel_err(got, plain) < 2e-5
        # A row of another step is another output (the schedule really is per step).
        assert _rel_err(ours(**inputs, adaln=schedule[0]), ours(**inputs, adaln=schedule[3])) > 1e-3
        with pytest.raises(ValueError, match="adaln_schedule"):
            ours(**inputs, adaln=schedule[0, :1])
    if guidance_embeds:
        with pytest.raises(ValueError, match="guidance"):
            ours.adaln_schedule(steps, None, inputs["pooled_projections"])
    # Without fused projections there is nothing to precompute: the pipeline runs the plain forward.
    assert (
        _flux_pair(guidance_embeds)[1].adaln_schedule(steps, inputs["guidance"], inputs["pooled_projections"])
        is None
    )


def test_flux_batch_one_joint_buffer_path_matches_diffusers(monkeypatch):
    # With fused projections and batch 1, dual blocks build [text | image] q, k, v in one buffer, normalised
    # in place (FluxAttention._joint_qkv); batch 2 concatenates. Both must match diffusers.
    from diffserve.runtime.models import flux

    ref, ours = _flux_pair(True)
    ours.fuse_projections()
    calls = []
    original = flux.FluxAttention._joint_qkv
    monkeypatch.setattr(flux.FluxAttention, "_joint_qkv", lambda *a: calls.append(1) or original(*a))
    for batch in (1, 2):
        inputs = _flux_inputs(batch=batch, seed=3)
        with torch.no_grad():
            assert _rel_err(ours(**inputs), ref(**inputs, return_dict=False)[0]) < TOL
        # once per dual block for batch 1, not at all for batch 2 (the count stays)
        assert len(calls) == FLUX_CFG["num_layers"]


@pytest.mark.parametrize("regional", [True, False], ids=["per-block", "whole"])
def test_compile_dit_traces_the_blocks(regional, tmp_path, monkeypatch):
    from diffserve.runtime.compile import compile_dit, compiled, configure_compile_cache, repeated_blocks

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert configure_compile_cache(tmp_path / "c") == tmp_path / "c" and (tmp_path / "c").is_dir()
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)

    ref, ours = _flux_pair(True)
    assert [len(s) for s in repeated_blocks(ours)] == [2, 2]
    inputs = _flux_inputs()
    with torch.no_grad():
        expected = ref(**inputs, return_dict=False)[0]
        ours.fuse_projections()
        ours(**inputs)  # eager first: resolves the attention backend outside the trace
        torch._dynamo.reset()
        compile_dit(ours, regional=regional, backend="eager")  # tracing only: fast on the CPU
        assert compiled(ours)
        assert _rel_err(ours(**inputs), expected) < TOL
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="mode"):
        compile_dit(ours, mode="fastest")


def test_linear_concat_splits_the_gemm():
    from diffserve.runtime.layers.mlp import linear_concat

    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(12, 5)
    a, b = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 8, generator=g)
    expected = linear(torch.cat([a, b], dim=-1))
    with torch.no_grad():
        # Two GEMMs (K = 4 and 8) summed, then the bias, vs one K = 12 GEMM with it: a few float32 roundings
        # per element. Measured max 1.1e-7 (MKL_CBWR=COMPATIBLE, 1 thread; 5e-8..8.5e-8 elsewhere): 2e-6 = 18x.
        assert _rel_err(linear_concat([a, b], linear, split=True), expected) < 2e-6
        assert torch.equal(linear_concat([a, b], linear), expected)  # CPU default: the cat itself
        with pytest.raises(ValueError, match="12"):
            linear_concat([a, a], linear, split=True)


def test_flux_last_single_block_keeps_only_the_image_rows():
    # On CUDA the model's last single block computes only the rows it returns (keep_from = text length):
    # queries, MLP, output projection and residual of those rows; keys and values of every token.
    from diffserve.runtime.layers.rope import axes_rope
    from diffserve.runtime.models.flux import FluxSingleBlock

    torch.manual_seed(0)
    block = _randomise(FluxSingleBlock(dim=16, heads=2, head_dim=8))
    x, cond = torch.randn(2, 9, 16), torch.randn(2, 16)
    rope = axes_rope(torch.randint(0, 5, (9, 3)).float(), (2, 2, 4))
    with torch.no_grad():
        full = block(x, cond, rope)
        kept = block(x, cond, rope, keep_from=4)
    assert kept.shape == (2, 5, 16)
    # Its GEMMs (K = 16, and 16 + 64 for the output projection) see 10 rows instead of 18: another blocking, so
    # with 2 threads elements of up to |10| (float32 ulp 9.5e-7 at 8..16) differ by ~2 ulps. Measured max
    # |diff| 1.9e-6 (2 threads, avx512 and avx2; 0..3e-7 on 1 thread); atol 2e-5 = 10x, scaled to the output.
    torch.testing.assert_close(kept, full[:, 4:], rtol=1e-5, atol=2e-5)


def test_flux_blocks_deferring_their_last_residual_compute_the_same():
    # A block may leave its MLP's gated residual for the next block to add in its first norm pass; two
    # blocks chained that way give what the two blocks give one after the other.
    from diffserve.runtime.layers.modulation import gated_residual
    from diffserve.runtime.layers.rope import axes_rope
    from diffserve.runtime.models.flux import FluxDualBlock, FluxSingleBlock

    torch.manual_seed(0)
    duals = [_randomise(FluxDualBlock(dim=16, heads=2, head_dim=8), seed=i) for i in range(2)]
    singles = [_randomise(FluxSingleBlock(dim=16, heads=2, head_dim=8), seed=i) for i in range(2)]
    img, txt, cond = torch.randn(2, 6, 16), torch.randn(2, 3, 16), torch.randn(2, 16)
    rope = axes_rope(torch.randint(0, 5, (9, 3)).float(), (2, 2, 4))
    with torch.no_grad():
        plain = duals[1](*duals[0](img, txt, cond, rope), cond, rope)
        img1, txt1, pending = duals[0](img, txt, cond, rope, defer=True)
        assert pending[0][0].shape == img.shape and pending[1][0].shape == txt.shape
        deferred = duals[1](img1, txt1, cond, rope, pending=pending)
        for got, want in zip(deferred, plain, strict=True):
            # The same x + gate * y, added one norm pass later: exact on the CPU in every setting measured
            # (threads 1/2, avx512/avx2/default). Outputs reach |10|, where a float32 ulp is 9.5e-7, so the
            # tolerance allows a few ulps there (another FMA contraction of that add, as on a GPU).
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)

        x = torch.cat([txt, img], dim=1)
        plain = singles[1](singles[0](x, cond, rope), cond, rope, keep_from=3)
        x1, pending = singles[0](x, cond, rope, defer=True)
        x2, pending = singles[1](x1, cond, rope, keep_from=3, pending=pending, defer=True)
        torch.testing.assert_close(gated_residual(x2, *pending), plain, rtol=1e-5, atol=2e-5)  # as above


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flux_on_cuda_with_the_trimmed_last_block_matches_diffusers():
    ref, ours = _flux_pair(True)
    ref, ours = ref.cuda(), ours.cuda()
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _flux_inputs().items()}
    with torch.no_grad():
        expected = ref(**inputs, return_dict=False)[0]
        got = ours(**inputs)
    assert _rel_err(got.cpu(), expected.cpu()) < 1e-4  # float32 (TF32 off by default for matmuls)
