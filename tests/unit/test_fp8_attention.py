"""`--quantization fp8-attention` (issue 17): q, k, v quantised per (batch, head) to e4m3 and both attention
products in FP8 (kernels/fp8_attention.py). The CPU runs the emulation of FA3's FP8 forward, the GPU tests
hold FA3's kernel and the Triton quantiser to it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffserve.kernels.fp8_attention import (
    FP8_DTYPE,
    P_OFFSET,
    emulated_fp8_attention,
    fp8_attention,
    quantize_heads,
    quantize_heads_reference,
)
from diffserve.kernels.fp8_quant import FP8_MAX

# e4m3 keeps 3 mantissa bits: rounding to nearest moves a normal value by at most half an ulp, 2^-4 of it
# relative; below the smallest normal (2^-6) the spacing is fixed at 2^-9, so at most 2^-10 (times the scale).
E4M3_REL, E4M3_SUB = 2.0**-4, 2.0**-10


def _qkv(batch=2, seq=200, heads=3, dim=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # uneven magnitudes per head, so that one scale per (batch, head) matters
    mag = torch.tensor([0.3, 1.0, 4.0])[:heads].view(1, 1, heads, 1)
    return tuple((torch.randn(batch, seq, heads, dim, generator=g) * mag).to(dtype) for _ in range(3))


def test_quantize_heads_bounds_each_element():
    x = _qkv()[0]
    x[1, :, 2] = 0.0  # an all-zero (batch, head): MIN_AMAX's scale, zeros out
    xq, scale = quantize_heads_reference(x)
    assert xq.dtype == FP8_DTYPE and xq.shape == x.shape and xq.is_contiguous() and scale.shape == (2, 3)
    amax = x.abs().amax(dim=(1, 3))
    # each (batch, head)'s largest element maps to 448: its scale is amax / 448 (float32 division)
    assert torch.equal(scale[amax > 0], (amax / FP8_MAX)[amax > 0])
    assert torch.equal(xq[1, :, 2].float(), torch.zeros_like(x[1, :, 2]))
    deq = xq.float() * scale[:, None, :, None]
    bound = E4M3_REL * x.abs() + E4M3_SUB * scale[:, None, :, None]
    # the product deq = q * scale adds one float32 rounding (2^-24 relative)
    assert ((deq - x).abs() <= bound * (1 + 2.0**-20)).all()


def test_quantize_heads_takes_strided_views():
    qkv = torch.randn(2, 50, 3 * 64)  # a fused projection's output, split as the blocks split it
    v = qkv[..., 128:].unflatten(-1, (2, 32))
    got, scale = quantize_heads(v)
    want, want_scale = quantize_heads_reference(v.contiguous())
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)) and torch.equal(scale, want_scale)


def _exact_attention(q, k, v, scale):
    """float64 softmax attention of the given (dequantised) tensors: the emulation without P's rounding."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    p = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
    return (p @ v).transpose(1, 2)


@pytest.mark.parametrize("seq", [7, 200, 1500])
def test_emulation_differs_from_exact_attention_only_by_p_rounding(seq, monkeypatch):
    """On the same quantised q, k, v the emulation's only other rounding is P to e4m3: each output is
    sum_j p8_j v_j / sum_j p_j, and |p8_j - p_j| <= 2^-4 p_j + 2^-10 / 2^8 (P is stored times 2^8), so the
    output moves by at most (2^-4 + keys * 2^-18 / row sum) * max|v| of its (batch, head); the row sum is
    >= 1 (its largest term is exp(0)). float32 scores and sums add ~1e-6 relative: far inside."""
    from diffserve.kernels import fp8_attention as module

    monkeypatch.setattr(module, "SCORE_ELEMENTS", 6 * 1500 * 512)  # 1500: three query chunks of 512
    q, k, v = _qkv(seq=seq)
    scale = 32**-0.5
    (q8, qd), (k8, kd), (v8, vd) = (quantize_heads_reference(t) for t in (q, k, v))
    got = emulated_fp8_attention(q8, k8, v8, (qd, kd, vd), scale, torch.float32)
    deq = [t.float() * d[:, None, :, None] for t, d in ((q8, qd), (k8, kd), (v8, vd))]
    want = _exact_attention(*deq, scale)
    vmax = deq[2].abs().amax(dim=(1, 3))[:, None, :, None].double()
    bound = (E4M3_REL + seq * E4M3_SUB / P_OFFSET + 1e-5) * vmax
    err = (got.double() - want).abs()
    assert (err <= bound).all(), (err / vmax).max()
    assert (err > 0).any()  # P's rounding is really there


def test_fp8_attention_approximates_attention():
    """Against float64 attention of the unquantised inputs: e4m3 rounding of q, k, v and P (each ~2^-5 rms
    relative) gives a few percent of relative error where the scores are O(1), as with RMS-normalised q and
    k. (Scores of O(10) would move by ~2^-5 of that before the exp: FP8 attention is for such models.)"""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 300, 3, 32, generator=g) for _ in range(3))
    got = fp8_attention(q, k, v)
    want = _exact_attention(q, k, v, 32**-0.5)
    rel = ((got.double() - want).norm() / want.norm()).item()
    assert 1e-3 < rel < 0.1, rel
    exact = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert ((exact.double() - want).norm() / want.norm()).item() < 1e-5  # the oracle itself


def test_attention_layer_fp8_switch_and_refusal():
    from diffserve.kernels.sdpa import SDPABackend
    from diffserve.runtime.layers.attention import attention, fp8_attention_unsupported

    q, k, v = _qkv(seq=40)
    assert torch.equal(attention(q, k, v, fp8=True), fp8_attention(q, k, v))
    assert not torch.equal(attention(q, k, v, fp8=True), attention(q, k, v))
    assert fp8_attention_unsupported(SDPABackend, "cpu") is None
    reason = fp8_attention_unsupported(SDPABackend, "cuda")
    assert "FlashAttention-3" in reason and "torch_sdpa" in reason and "\n" not in reason
    with pytest.raises(RuntimeError, match="causal"):
        attention(q, k, v, causal=True, fp8=True)


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_generation_with_fp8_attention(family, tiny_flux_dir, tiny_wan_dir):
    """Through the runner as `--quantization fp8-attention` loads it: every attention module switched, the
    output near the FP8-GEMM-only output and not equal to it."""
    from diffserve.runtime.api import GenerationRequest
    from diffserve.runtime.config import RuntimeConfig
    from diffserve.runtime.runner import load_runner
    from tests.unit.test_pipelines import _pixels

    model = tiny_flux_dir if family == "flux" else tiny_wan_dir
    request = dict(prompt="a red fox", width=64, height=48, num_inference_steps=2, guidance_scale=4.0, seed=3)
    if family == "wan":
        request["num_frames"] = 5
    out = {}
    for quantization in ("fp8", "fp8-attention"):
        runner = load_runner(RuntimeConfig(model=str(model), device="cpu", quantization=quantization))
        switches = [
            m.fp8_attention for m in runner.pipeline.transformer.modules() if hasattr(m, "fp8_attention")
        ]
        assert switches and all(switches) == (quantization == "fp8-attention")
        result = runner.generate(GenerationRequest(**request))
        out[quantization] = _pixels(result.images if family == "flux" else result.videos[0])
    diff = abs(out["fp8"] - out["fp8-attention"]).mean()
    assert 0 < diff < 8, diff  # 8 of 255: a visible change would be far larger


def test_fp8_attention_setting_and_qwen_image(tmp_path):
    """The setting's validation, and Qwen-Image (FLUX's joint attention, unmasked in our pipelines) switched."""
    from diffserve.runtime.config import RuntimeConfig
    from diffserve.runtime.runner import load_runner
    from diffserve.testing import make_tiny_model

    assert RuntimeConfig(quantization="fp8-attention").quantization == "fp8-attention"
    with pytest.raises(ValueError, match="--quantization must be one of fp8, fp8-attention"):
        RuntimeConfig(quantization="fp8-attn")
    model = make_tiny_model("qwen-image", tmp_path / "qwen")
    runner = load_runner(RuntimeConfig(model=str(model), device="cpu", quantization="fp8-attention"))
    blocks = runner.pipeline.transformer.transformer_blocks
    assert all(block.attn.fp8_attention for block in blocks)


# ---------------------------------------------------------------- GPU: FA3's e4m3 kernel, the Triton quantiser


def _fa3_or_skip():
    from diffserve.kernels.flash_attention_v3 import FlashAttention3Backend, fa3_support

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (FlashAttention-3's FP8 kernel)")
    if not fa3_support():
        pytest.skip(f"needs FlashAttention-3 on a Hopper GPU: {fa3_support().reason}")
    return FlashAttention3Backend.fp8_func()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton quantiser)")
@pytest.mark.parametrize("shape", [(1, 4096, 12, 128), (2, 1000, 3, 64), (1, 77, 24, 128)])
def test_quantize_heads_triton_matches_reference(shape):
    from diffserve.kernels.fused_ops import triton_available

    if not triton_available():
        pytest.skip("needs Triton (CUDA)")
    g = torch.Generator(device="cuda").manual_seed(0)
    fused = torch.randn(shape[0], shape[1], 3 * shape[2] * shape[3], device="cuda", generator=g)
    x = fused.to(torch.bfloat16)[..., shape[2] * shape[3] : 2 * shape[2] * shape[3]].unflatten(-1, shape[2:])
    got, scale = quantize_heads(x)
    want, want_scale = quantize_heads_reference(x)
    assert torch.equal(scale, want_scale)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("dim", [32, 64, 128])  # 32: the bundled model's heads
def test_fa3_fp8_matches_the_emulation(dim):
    """FA3's e4m3 forward against the emulation on the same quantised inputs. They differ where FA3 rounds P
    against a running max (a key block's) instead of the row's: still one e4m3 rounding of each P term, so
    the bound of the emulation test, doubled, plus bf16's output rounding (2^-9 relative)."""
    fa3 = _fa3_or_skip()
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (
        torch.randn(2, 3000, 4, dim, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3)
    )
    q = q * 3  # peakier attention than unit scores
    (q8, qd), (k8, kd), (v8, vd) = (quantize_heads(t) for t in (q, k, v))
    scale = dim**-0.5
    got = fa3(q8, k8, v8, softmax_scale=scale, q_descale=qd, k_descale=kd, v_descale=vd)
    got = (got[0] if isinstance(got, tuple) else got).float()
    want = emulated_fp8_attention(q8, k8, v8, (qd, kd, vd), scale, torch.float32)
    vmax = (v8.float() * vd[:, None, :, None]).abs().amax(dim=(1, 3))[:, None, :, None]
    bound = (2 * (2.0**-4 + 3000 * 2.0**-18) + 2.0**-9) * vmax
    assert ((got - want).abs() <= bound).all(), ((got - want).abs() / vmax).max()
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 2e-2, rel
    # How far FP8 attention is from exact attention is the emulation's matter (tested on the CPU against
    # float64) and the quality gates' (benchmarks/RESULTS.md): with FA3 within the bound above of the
    # emulation, a separate bound against exact attention would follow from those by the triangle
    # inequality. (It grows as heads narrow: 10.3% at head size 32 with these peaky scores, H200.)


def test_attention_layer_fp8_on_fa3():
    """attention(..., fp8=True) on a CUDA tensor takes FA3's kernel when FA3 is the backend."""
    _fa3_or_skip()
    from diffserve.runtime.layers.attention import attention, get_attention_backend

    q, k, v = (torch.randn(1, 512, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if get_attention_backend(128, torch.bfloat16, "cuda").name != "fa3":
        pytest.skip("FA3 is not the selected attention backend here")
    out = attention(q, k, v, fp8=True)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    exact = attention(q, k, v)
    assert 1e-4 < ((out.float() - exact.float()).norm() / exact.float().norm()).item() < 0.1
