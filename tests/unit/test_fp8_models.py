"""`--quantization fp8` through our native FLUX and Wan DiTs on the CPU (issue 17): every selected GEMM runs
as an FP8 GEMM on inputs the blocks' own passes wrote quantised, and nothing reads a quantised weight back.

The CPU runs the same model code as the GPU: torch._scaled_mm's CPU implementation for the GEMMs, and the
reference formulas of the fused quantising kernels (kernels/fp8_quant.py), which the GPU tests in
test_fp8.py hold the Triton kernels to.
"""

from __future__ import annotations

import logging

import pytest
import torch

from diffserve.runtime.layers import fp8 as fp8_module
from diffserve.runtime.layers.fp8 import Fp8Linear, Quantized, quantize_linears
from diffserve.runtime.models.flux import FluxConfig, FluxTransformer
from diffserve.runtime.models.wan import WanConfig, WanTransformer

U32 = 2.0**-24  # float32 unit roundoff


def _flux(seed: int = 0) -> FluxTransformer:
    torch.manual_seed(seed)
    config = FluxConfig(
        in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    return FluxTransformer(config).eval().requires_grad_(False)


def _flux_inputs(batch: int, n_img: int = 24, n_txt: int = 7) -> dict:
    g = torch.Generator().manual_seed(batch)
    ids = torch.zeros(n_img, 3)
    ids[:, 1], ids[:, 2] = torch.arange(n_img) // 6, torch.arange(n_img) % 6
    return dict(
        hidden_states=torch.randn(batch, n_img, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, n_txt, 32, generator=g),
        pooled_projections=torch.randn(batch, 24, generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=ids,
        txt_ids=torch.zeros(n_txt, 3),
        guidance=torch.full((batch,), 3.5),
        return_dict=False,
    )


def _wan(seed: int = 0) -> WanTransformer:
    torch.manual_seed(seed)
    config = WanConfig(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
    )  # fmt: skip
    return WanTransformer(config).eval().requires_grad_(False)


def _wan_inputs(batch: int) -> dict:
    g = torch.Generator().manual_seed(batch)
    return dict(
        hidden_states=torch.randn(batch, 4, 3, 8, 12, generator=g),
        timestep=torch.full((batch,), 500.0),
        encoder_hidden_states=torch.randn(batch, 9, 32, generator=g),
        return_dict=False,
    )


def _mm_float64(self, a, scale_a, out_dtype, out=None):
    """Fp8Linear._mm's math in float64: the same quantised operands (a, scale_a as the model's passes wrote
    them; the layer's FP8 weight and scales), dequantised and multiplied exactly (float64 is exact for the
    products of e4m3 values and float32 scales, and its sums are ~2^29 times more accurate than float32's),
    the bias added, one rounding to out_dtype."""
    w = self.qweight.double() * self.weight_scale.double().t()
    result = (a.double() * scale_a.double()) @ w.t()
    if self.bias is not None:
        result = result + self.bias.double()
    result = result.to(out_dtype)
    return result if out is None else out.copy_(result)


def _record_gemms(monkeypatch) -> list:
    """Every FP8 GEMM of a forward: (layer, its quantised input a, scale_a, the output)."""
    calls = []
    original = Fp8Linear._mm

    def recording(self, a, scale_a, out_dtype, out=None):
        result = original(self, a, scale_a, out_dtype, out)
        calls.append((self, a, scale_a, result.clone()))
        return result

    monkeypatch.setattr(Fp8Linear, "_mm", recording)
    return calls


# Whole-model bound. Each FP8 GEMM of the model differs from the float64 one by its float32 accumulation
# only (checked per element below: <= (K + 2) u32 |A||W|, K <= 256 here, i.e. ~1e-5 of the row's scale at
# worst and ~1e-7 typically). Propagated through the blocks that stays ~1e-6 relative, EXCEPT where such a
# difference moves a downstream activation across an e4m3 rounding boundary: that element then differs by
# a whole e4m3 step (2^-4 of itself at most). With ~10^4 quantised activations per forward and boundary
# crossings happening for a fraction ~(1e-6 / 2^-4) of them, a crossing or two per forward is possible;
# each moves the output by at most ~2^-4 of one activation's share (~1/sqrt(#activations of a row) of the
# row). 1e-3 relative (Frobenius) holds those while failing for any systematic error: a wrong scale, a
# missing bias, a lost row or the unquantised float32 path (which is ~3e-2 away: e4m3's own error).
# BLAS blocking (AVX2 vs AVX-512, thread count) only changes the float32 sums within the same bound.
MODEL_REL_BOUND = 1e-3


def _check_gemms(calls: list, expect_quantized_inputs: set[str]) -> None:
    """Per GEMM, the element-wise float32-GEMM bound against float64 of the same quantised operands."""
    assert calls
    for layer, a, scale_a, got in calls:
        a64 = a.double() * scale_a.double()
        w64 = layer.qweight.double() * layer.weight_scale.double().t()
        bias = layer.bias.double() if layer.bias is not None else torch.zeros(layer.out_features).double()
        exact = a64 @ w64.t() + bias
        k = layer.in_features
        bound = (k + 4) * U32 * (a64.abs() @ w64.abs().t() + bias.abs())
        err = (got.double() - exact).abs()
        assert (err <= bound + 1e-30).all(), f"{layer.name}: worst error / bound {(err / bound).max():.3f}"
    assert {layer.name for layer, *_ in calls} >= expect_quantized_inputs


def _weight_reads(model) -> dict:
    return {
        n: m.weight_reads for n, m in model.named_modules() if isinstance(m, Fp8Linear) and m.weight_reads
    }


def _quantized_inputs(monkeypatch) -> set:
    """Names of the Fp8Linear layers called with a Quantized input (written by a fused pass) rather than a
    tensor they quantise themselves."""
    names = set()
    original = Fp8Linear.forward

    def forward(self, x, *args, **kwargs):
        if isinstance(x, Quantized):
            names.add(self.name)
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(Fp8Linear, "forward", forward)
    return names


@pytest.mark.parametrize("batch", [1, 2])  # batch 1: FLUX's joint q|k|v buffer (out=); 2: the cat path
def test_flux_fp8_forward_matches_float64_of_the_same_quantised_math(monkeypatch, batch):
    model = _flux().fuse_projections()
    inputs = _flux_inputs(batch)
    with torch.inference_mode():
        exact = model(**inputs)[0]
    stats = quantize_linears(model)
    assert stats["count"] == 2 * 4 + 2 * 3 and not stats["skipped"]
    quantized_inputs = _quantized_inputs(monkeypatch)
    calls = _record_gemms(monkeypatch)
    with torch.inference_mode():
        out = model(**inputs)[0]
    assert not _weight_reads(model)
    # every FP8 GEMM ran (the fused q|k|v as one), and every one whose input a block pass writes got it
    # quantised by that pass: all but the dual blocks' attention output projection (attention's output)
    assert sorted({layer.name for layer, *_ in calls}) == sorted(stats["names"])
    assert quantized_inputs == {n for n in stats["names"] if not n.endswith("attn.to_out.0")}
    _check_gemms(calls, quantized_inputs)
    monkeypatch.setattr(Fp8Linear, "_mm", _mm_float64)
    with torch.inference_mode():
        reference = model(**inputs)[0]
    rel = ((out - reference).norm() / reference.norm()).item()
    assert rel < MODEL_REL_BOUND, rel
    fp8_vs_exact = ((out - exact).norm() / exact.norm()).item()
    assert 1e-3 < fp8_vs_exact < 0.1, fp8_vs_exact  # quantised indeed, and still the same function


@pytest.mark.parametrize("batch", [1, 2])
def test_wan_fp8_forward_matches_float64_of_the_same_quantised_math(monkeypatch, batch):
    model = _wan().fuse_projections()
    inputs = _wan_inputs(batch)
    with torch.inference_mode():
        exact = model(**inputs)[0]
    stats = quantize_linears(model)
    assert stats["count"] == 2 * 6 and not stats["skipped"]
    quantized_inputs = _quantized_inputs(monkeypatch)
    calls = _record_gemms(monkeypatch)
    with torch.inference_mode():
        out = model(**inputs)[0]
    assert not _weight_reads(model)
    assert sorted({layer.name for layer, *_ in calls}) == sorted(stats["names"])
    # q|k|v, cross-attention q and the FFN input come quantised from the adaLN passes; the FFN output from
    # the GELU pass; the two attention output projections quantise attention's output themselves
    assert quantized_inputs == {n for n in stats["names"] if not n.endswith("to_out.0")}
    _check_gemms(calls, quantized_inputs)
    monkeypatch.setattr(Fp8Linear, "_mm", _mm_float64)
    with torch.inference_mode():
        reference = model(**inputs)[0]
    rel = ((out - reference).norm() / reference.norm()).item()
    assert rel < MODEL_REL_BOUND, rel
    fp8_vs_exact = ((out - exact).norm() / exact.norm()).item()
    assert 1e-3 < fp8_vs_exact < 0.1, fp8_vs_exact


def _generate_fp8(model_dir, request: dict, caplog, monkeypatch, forced: float | None = None):
    from diffserve.runtime.api import GenerationRequest
    from diffserve.runtime.config import RuntimeConfig
    from diffserve.runtime.runner import load_runner
    from diffserve.runtime.step_cache import StepCacheConfig

    monkeypatch.setattr(fp8_module, "_warned_weight_read", False)  # the warning is said once per process
    caplog.set_level(logging.INFO, logger="diffserve")
    runner = load_runner(RuntimeConfig(model=str(model_dir), device="cpu", quantization="fp8"))
    dit = runner.pipeline.transformer
    fp8_layers = [m for m in dit.modules() if isinstance(m, Fp8Linear)]
    assert fp8_layers and "fp8:" in caplog.text and "GEMMs quantised" in caplog.text
    results = [runner.generate(GenerationRequest(seed=3, **request))]
    if forced is not None:  # the step cache's head / tail / reuse forwards on the FP8 model
        runner.pipeline.step_cache = StepCacheConfig.forced_fraction(request["num_inference_steps"], forced)
        results.append(runner.generate(GenerationRequest(seed=3, **request)))
        assert results[-1].dit_forwards["cached"] > 0
    assert "read directly" not in caplog.text
    assert not _weight_reads(dit)
    return results


def test_flux_generation_with_fp8_reads_no_weight(tiny_flux_dir, caplog, monkeypatch):
    request = dict(prompt="a red fox", width=96, height=64, num_inference_steps=3, guidance_scale=4.0)
    results = _generate_fp8(tiny_flux_dir, request, caplog, monkeypatch, forced=0.5)
    assert all(r.images and r.images[0].size == (96, 64) for r in results)


def test_wan_generation_with_fp8_reads_no_weight(tiny_wan_dir, caplog, monkeypatch):
    request = dict(
        prompt="waves", width=64, height=48, num_frames=5, num_inference_steps=3, guidance_scale=4.0
    )
    results = _generate_fp8(tiny_wan_dir, request, caplog, monkeypatch, forced=0.5)
    assert all(r.videos for r in results)


# ---------------------------------------------------------------- GPU: the fused kernels in the models


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (FP8 GEMMs, Triton kernels, CUDA graphs)"
)
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_fp8_models_on_cuda_in_cuda_graphs(family):
    """bf16 on an H100/H200: the FP8 model (Triton quantising kernels + cuBLASLt FP8 GEMMs) replays under a
    CUDA graph with the eager result (no host sync, no data-dependent shape in the FP8 path), and computes
    the function of the CPU's float32 FP8 model (same weights) to e4m3's precision."""
    from diffserve.kernels.fused_ops import triton_available
    from diffserve.runtime.cuda_graphs import GraphedForward

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need compute capability 8.9+ (CUDA)")
    if not triton_available():
        pytest.skip("the fused quantising kernels need Triton (CUDA)")
    build, make = (_flux, _flux_inputs) if family == "flux" else (_wan, _wan_inputs)
    cpu = build().fuse_projections()
    gpu = build().to("cuda", torch.bfloat16).fuse_projections()
    quantize_linears(cpu)
    quantize_linears(gpu)
    inputs = make(1)
    on_gpu = {k: v.to("cuda", torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in inputs.items()}  # fmt: skip
    with torch.inference_mode():
        want = cpu(**inputs)[0]
        eager = gpu(**on_gpu)[0]
        graphed = GraphedForward(gpu)
        for _ in range(3):  # capture, then replays
            out = graphed(**on_gpu)[0]
    assert graphed.replays >= 1, graphed.uncapturable
    # the same kernels replayed (cuBLASLt may pick another algorithm inside a capture: bf16 rounding apart)
    assert ((out.float() - eager.float()).norm() / eager.float().norm()).item() < 1e-2
    assert not _weight_reads(gpu)
    rel = ((eager.float().cpu() - want).norm() / want.norm()).item()
    assert rel < 0.1, rel  # bf16 activations and e4m3 flips: ~3e-2 expected (fp8 vs float32 is ~3e-2 itself)
