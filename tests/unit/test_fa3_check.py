"""_is_fa3_supported(): never raises, integer version comparison, capability, provider import."""

import torch

from diffserve.kernels.base import version_tuple
from diffserve.kernels.flash_attention_v3 import _is_fa3_supported, fa3_unsupported_reason


def test_version_tuple_compares_as_integers():
    assert version_tuple("12.10") > version_tuple("12.3")  # as strings, "12.10" < "12.3"
    assert version_tuple("12.4") >= (12, 3)
    assert version_tuple("11.8") < (12, 3)
    assert version_tuple("6.2.41133-dd7f95766") == (6, 2, 41133)
    assert version_tuple(None) == ()
    assert version_tuple("rocm") == ()


def test_rocm_build_is_false_without_raising(simulate):
    simulate("rocm", cuda=None, hip="6.2.41133-dd7f95766", providers=("fa3_fwd_interface",))
    assert _is_fa3_supported() is False
    assert "torch built without CUDA (ROCm 6.2)" in fa3_unsupported_reason()


def test_xpu_and_cpu_builds_are_false(simulate):
    simulate("xpu", cuda=None)
    assert _is_fa3_supported() is False
    simulate("cpu", cuda=None)
    assert _is_fa3_supported() is False


def test_cuda_12_10_on_sm90_with_provider_is_true(simulate):
    simulate("cuda", cuda="12.10", capability=(9, 0), providers=("fa3_fwd_interface",))
    assert _is_fa3_supported() is True


def test_old_cuda_is_false(simulate):
    simulate("cuda", cuda="12.2", capability=(9, 0), providers=("fa3_fwd_interface",))
    assert _is_fa3_supported() is False
    assert "12.2 < 12.3" in fa3_unsupported_reason()


def test_ampere_is_false(simulate):
    simulate("cuda", cuda="12.4", capability=(8, 0), providers=("fa3_fwd_interface",))
    assert _is_fa3_supported() is False
    assert "8.0" in fa3_unsupported_reason()


def test_missing_provider_is_false_with_reason(simulate):
    simulate("cuda", cuda="12.4", capability=(9, 0))
    assert _is_fa3_supported() is False
    assert "no FA3 provider imports" in fa3_unsupported_reason()


def test_upstream_provider_is_accepted(simulate):
    simulate("cuda", cuda="12.4", capability=(9, 0), providers=("flash_attn_interface",))
    assert _is_fa3_supported() is True


def test_result_is_cached_until_cache_clear(simulate, monkeypatch):
    simulate("cuda", cuda="12.4", capability=(9, 0), providers=("fa3_fwd_interface",))
    assert _is_fa3_supported() is True
    monkeypatch.setattr(torch.version, "cuda", None)
    assert _is_fa3_supported() is True  # cached: hardware does not change within a process
    _is_fa3_supported.cache_clear()
    assert _is_fa3_supported() is False


def test_a_probe_that_explodes_is_a_reason_not_a_crash(simulate, monkeypatch):
    simulate("cuda", cuda="12.4", providers=("fa3_fwd_interface",))

    def boom(device=None):
        raise RuntimeError("driver went away")

    monkeypatch.setattr(torch.cuda, "get_device_capability", boom)
    assert _is_fa3_supported() is False
    assert "driver went away" in fa3_unsupported_reason()
