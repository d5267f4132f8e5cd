"""The DiT attention layer: numerics of every backend this machine has, resolution and caching."""

import pytest
import torch

from diffserve.kernels.flash_attention_v2 import FlashAttention2Backend
from diffserve.kernels.flash_attention_v3 import FlashAttention3Backend
from diffserve.kernels.sdpa import SDPABackend
from diffserve.platforms import AttentionBackendUnavailable, get_platform
from diffserve.runtime.layers import attention as attn_layer

# Relative-error bounds vs a float64 reference: float32 rounding is ~1e-7 per op; bf16 has an 8-bit
# mantissa (2^-8 ~ 4e-3 per value) and fp16 a 10-bit one. On the CPU (SDPA, K = 64 per head, 77 keys) float32
# measured max 3.1e-7 and bf16 2.2e-3 (threads 1/2, avx512/avx2/default, MKL_CBWR): >= 14x inside the bounds.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def reference(q, k, v, scale, causal):
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize(
    "backend", [SDPABackend, FlashAttention3Backend, FlashAttention2Backend], ids=lambda b: b.name
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_backend_matches_float64_reference(backend, dtype, causal):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    head_size = 64
    reason = backend.rejection(head_size, dtype)
    if reason is not None:
        pytest.skip(f"{backend.name} cannot run here (needs an NVIDIA GPU with its kernel): {reason}")
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("float16 SDPA is a GPU path (needs a CUDA/ROCm GPU)")
    gen = torch.Generator(device="cpu").manual_seed(1234)
    q, k, v = (torch.randn(2, 77, 4, head_size, generator=gen).to(device, dtype) for _ in range(3))
    scale = head_size**-0.5
    out = backend.forward(q, k, v, scale=scale, causal=causal)
    ref = reference(q, k, v, scale, causal)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < TOLERANCE[dtype], err


def test_layer_resolves_once_per_head_size_and_dtype(simulate, monkeypatch):
    simulate("cpu", cuda=None)
    cpu = get_platform("cpu")
    asked = []
    original = cpu.get_attn_backend_cls_str.__func__

    def spy(cls, selected, head_size, dtype):
        asked.append((head_size, dtype))
        return original(cls, selected, head_size, dtype)

    monkeypatch.setattr(cpu, "get_attn_backend_cls_str", classmethod(spy))
    q = torch.randn(1, 8, 2, 16)
    for _ in range(3):
        attn_layer.attention(q, q, q)
    attn_layer.attention(torch.randn(1, 8, 2, 32), torch.randn(1, 8, 2, 32), torch.randn(1, 8, 2, 32))
    assert asked == [(16, torch.float32), (32, torch.float32)]


def test_layer_runs_fa3_on_simulated_hopper(simulate):
    sim = simulate("cuda", cuda="12.4", capability=(9, 0), providers=("fa3_fwd_interface",))
    q, k, v = (torch.randn(1, 32, 2, 64, dtype=torch.bfloat16) for _ in range(3))
    out = attn_layer.attention(q, k, v)
    assert sim.calls == [("fa3_fwd_interface", (1, 32, 2, 64), False)]
    ref = reference(q, k, v, 64**-0.5, False)
    assert ((out.double() - ref).norm() / ref.norm()).item() < TOLERANCE[torch.bfloat16]


def test_env_var_choice_is_honoured_and_fails_closed(simulate, monkeypatch):
    simulate("cuda", cuda="12.4", capability=(8, 0), providers=("fa3_fwd_interface", "flash_attn"))
    monkeypatch.setenv(attn_layer.ENV_VAR, "torch_sdpa")
    q = torch.randn(1, 8, 2, 64, dtype=torch.bfloat16)
    assert attn_layer.get_attention_backend(64, torch.bfloat16) is SDPABackend
    attn_layer.reset_attention_backends()
    monkeypatch.setenv(attn_layer.ENV_VAR, "fa3")
    with pytest.raises(AttentionBackendUnavailable, match="compute capability 8.0"):
        attn_layer.attention(q, q, q)


def test_set_attention_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown attention backend"):
        attn_layer.set_attention_backend("fast-please")
    attn_layer.reset_attention_backends()


def test_cpu_tensors_on_a_gpu_machine_get_the_cpu_platforms_kernel(monkeypatch):
    # A model run with --device cpu on a CUDA machine: FA3/FA2 cannot take CPU tensors, so their kernel is
    # chosen by the CPU platform's rules, while the GPU's tensors keep the GPU platform's choice.
    from diffserve.platforms.cpu import CpuPlatform
    from diffserve.platforms.cuda import CudaPlatform

    monkeypatch.setattr(attn_layer, "get_current_platform", lambda: CudaPlatform)
    asked = []
    monkeypatch.setattr(
        CudaPlatform, "get_attn_backend_cls_str", classmethod(lambda cls, *a: asked.append(a) or "x.FA3")
    )
    assert attn_layer.platform_for("cpu") is CpuPlatform
    assert attn_layer.platform_for("cuda") is CudaPlatform and attn_layer.platform_for(None) is CudaPlatform
    attn_layer.reset_attention_backends()
    q = torch.randn(1, 8, 2, 16)
    assert attn_layer.get_attention_backend(16, torch.float32, "cpu") is SDPABackend
    out = attn_layer.attention(q, q, q)  # runs (SDPA), where the CUDA platform's FA3 would fail
    # float32 SDPA vs float64 (K = 16, 8 keys): measured max |diff| 7.2e-7, <= 0.023 of the bound, any setting
    torch.testing.assert_close(out, reference(q, q, q, 16**-0.5, False).float(), rtol=1e-5, atol=1e-5)
    assert asked == []  # the CUDA platform was never asked about CPU tensors
    attn_layer.reset_attention_backends()
