"""Attention selection per platform, simulated on the CPU (see platform_sim.py)."""

import logging

import pytest
import torch

import diffserve.platforms as platforms
from diffserve.platforms import AttentionBackendUnavailable, detect_platform_name, get_platform
from diffserve.platforms.interface import AttentionBackendEnum

SDPA = "diffserve.kernels.sdpa.SDPABackend"
FA3 = "diffserve.kernels.flash_attention_v3.FlashAttention3Backend"
FA2 = "diffserve.kernels.flash_attention_v2.FlashAttention2Backend"
BF16 = torch.bfloat16


def select(platform, backend=None, head_size=128, dtype=BF16):
    return get_platform(platform).get_attn_backend_cls_str(backend, head_size, dtype)


def test_every_platform_defines_its_own_override():
    for name in ("cuda", "rocm", "xpu", "cpu"):
        cls = get_platform(name)
        assert "get_attn_backend_cls_str" in vars(cls), name


def test_rocm_returns_sdpa_without_touching_fa3(simulate, caplog):
    simulate("rocm", cuda=None, hip="6.2.41133", providers=("fa3_fwd_interface",))
    assert platforms.current_platform.name == "rocm"  # lazy: detected after the patch
    with caplog.at_level(logging.INFO, logger="diffserve.attention"):
        assert select("rocm") == SDPA
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("attention: torch_sdpa (fa2: flash_attn does not import")


def test_rocm_uses_fa2_when_rocm_flash_attn_imports(simulate):
    simulate("rocm", cuda=None, hip="6.2.41133", providers=("flash_attn",))
    assert select("rocm") == FA2


def test_rocm_explicit_fa3_fails_closed(simulate):
    simulate("rocm", cuda=None, hip="6.2.41133", providers=("fa3_fwd_interface",))
    with pytest.raises(AttentionBackendUnavailable, match="NVIDIA Hopper only"):
        select("rocm", "fa3")


def test_xpu_returns_sdpa(simulate):
    simulate("xpu", cuda=None, providers=("fa3_fwd_interface", "flash_attn"))
    assert select("xpu") == SDPA
    with pytest.raises(AttentionBackendUnavailable, match="no XPU build"):
        select("xpu", "fa2")


def test_cuda_sm90_with_provider_chooses_fa3(simulate, caplog):
    simulate("cuda", cuda="12.4", capability=(9, 0), providers=("fa3_fwd_interface",))
    with caplog.at_level(logging.INFO, logger="diffserve.attention"):
        assert select("cuda") == FA3
    assert [r.levelno for r in caplog.records] == [logging.INFO]  # no rejections to report


def test_cuda_sm80_chooses_fa2_when_flash_attn_imports(simulate):
    simulate("cuda", cuda="12.4", capability=(8, 0), providers=("fa3_fwd_interface", "flash_attn"))
    assert select("cuda") == FA2


def test_cuda_sm80_without_flash_attn_falls_back_to_sdpa(simulate):
    simulate("cuda", cuda="12.4", capability=(8, 0), providers=("fa3_fwd_interface",))
    assert select("cuda") == SDPA


def test_cuda_sm90_without_provider_logs_reasons_once(simulate, caplog):
    simulate("cuda", cuda="12.4", capability=(9, 0))
    with caplog.at_level(logging.INFO, logger="diffserve.attention"):
        assert select("cuda") == SDPA
    assert len(caplog.records) == 1
    line = caplog.records[0].getMessage()
    assert line.startswith("attention: torch_sdpa (fa3: no FA3 provider imports")
    assert "fa2: flash_attn does not import" in line


def test_explicit_unusable_choice_raises_clear_error(simulate):
    simulate("cuda", cuda="12.4", capability=(8, 6), providers=("fa3_fwd_interface",))
    with pytest.raises(AttentionBackendUnavailable) as err:
        select("cuda", "fa3")
    assert "'fa3' was requested" in str(err.value) and "compute capability 8.6" in str(err.value)


def test_fa3_rejects_unsupported_dtype_and_head_size(simulate):
    simulate("cuda", cuda="12.4", capability=(9, 0), providers=("fa3_fwd_interface",))
    assert select("cuda", dtype=torch.float32) == SDPA
    with pytest.raises(AttentionBackendUnavailable, match="bf16-only"):
        select("cuda", "fa3", dtype=torch.float16)
    with pytest.raises(AttentionBackendUnavailable, match="head size 300"):
        select("cuda", "fa3", head_size=300)


def test_unknown_backend_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown attention backend 'flashy'"):
        AttentionBackendEnum.parse("flashy")
    assert AttentionBackendEnum.parse("flash_attention_3") is AttentionBackendEnum.FA3
    assert AttentionBackendEnum.parse("auto") is None


def test_detection_without_override(simulate, monkeypatch):
    simulate("rocm", cuda=None, hip="6.2")
    monkeypatch.delenv("DIFFSERVE_PLATFORM")
    assert detect_platform_name() == "rocm"
    simulate("cuda", cuda="12.4")
    monkeypatch.delenv("DIFFSERVE_PLATFORM")
    assert detect_platform_name() == "cuda"
    simulate("cpu", cuda=None)
    monkeypatch.delenv("DIFFSERVE_PLATFORM")
    assert detect_platform_name() == "cpu"


def test_bad_platform_override(monkeypatch):
    monkeypatch.setenv("DIFFSERVE_PLATFORM", "tpu")
    with pytest.raises(ValueError, match="DIFFSERVE_PLATFORM='tpu'"):
        detect_platform_name()


# ---- capability flags: every "does this fast path run here" is asked of the platform

# (platform, Triton kernels, Wan VAE walk)
CAPABILITIES = [("cuda", True, True), ("rocm", True, False), ("xpu", False, False), ("cpu", False, False)]


@pytest.mark.parametrize(("name", "triton", "wan_walk"), CAPABILITIES)
def test_each_platform_answers_its_capabilities(name, triton, wan_walk):
    cls = get_platform(name)
    assert cls.supports_triton_kernels() is triton
    assert cls.supports_wan_vae_walk() is wan_walk


class _GpuTensor:
    """Stands for a tensor on the simulated GPU (a ROCm build's tensors report is_cuda too)."""

    is_cuda = True


@pytest.mark.parametrize(("name", "triton", "wan_walk"), CAPABILITIES)
def test_fast_paths_follow_the_current_platform(simulate, monkeypatch, name, triton, wan_walk):
    from diffserve.kernels import fused_ops
    from diffserve.runtime import kl_vae_decode, vae_decode

    simulate(name, cuda="12.4" if name == "cuda" else None, hip="6.2" if name == "rocm" else None)
    # Enabled, and Triton "imports": only the platform is left to decide.
    monkeypatch.setattr(fused_ops, "fused_ops_enabled", lambda: True)
    monkeypatch.setattr(fused_ops, "triton_available", lambda: True)
    gpu = _GpuTensor()
    assert fused_ops._use_triton(gpu) is triton
    assert kl_vae_decode._cuda_walk(gpu) is triton
    assert vae_decode._walk_on(gpu) is wan_walk  # on ROCm: diffusers' modules, never the walk
    # CPU tensors never take a fast path, whatever the platform.
    cpu = torch.zeros(1)
    assert not fused_ops._use_triton(cpu)
    assert not kl_vae_decode._cuda_walk(cpu)
    assert not vae_decode._walk_on(cpu)
