"""Simulate CUDA / ROCm / XPU builds and devices on the CPU by patching torch and sys.modules.

The kernels' math still runs on the CPU: a simulated FA3/FA2 provider computes attention with SDPA and
records each call, so a test can see which backend really ran.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from diffserve.kernels.flash_attention_v2 import fa2_support
from diffserve.kernels.flash_attention_v3 import fa3_support
from diffserve.platforms import get_current_platform, reset_current_platform
from diffserve.runtime.layers import attention as attention_layer
from diffserve.runtime.layers.attention import reset_attention_backends


def reset_all() -> None:
    fa3_support.cache_clear()
    fa2_support.cache_clear()
    reset_current_platform()
    reset_attention_backends()


def fake_provider(name: str, calls: list) -> types.ModuleType:
    module = types.ModuleType(name)

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, **kwargs):
        calls.append((name, tuple(q.shape), causal))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=softmax_scale
        )
        return out.transpose(1, 2)

    module.flash_attn_func = flash_attn_func
    return module


class Simulator:
    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.mp = monkeypatch
        self.calls: list = []

    def __call__(
        self,
        platform: str,
        *,
        cuda: str | None = None,
        hip: str | None = None,
        capability: tuple[int, int] = (9, 0),
        providers: tuple[str, ...] = (),
    ) -> Simulator:
        mp = self.mp
        mp.setattr(torch.version, "cuda", cuda)
        mp.setattr(torch.version, "hip", hip, raising=False)
        gpu = platform in ("cuda", "rocm")
        mp.setattr(torch.cuda, "is_available", lambda: gpu)
        mp.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        if hasattr(torch, "xpu"):
            mp.setattr(torch.xpu, "is_available", lambda: platform == "xpu")
        # Hide any real provider on this machine, then plant the simulated ones.
        for name in ("fa3_fwd_interface", "flash_attn_interface", "flash_attn", "fa3_fwd_config"):
            mp.setitem(sys.modules, name, None)  # None in sys.modules makes `import name` raise ImportError
        for name in providers:
            mp.setitem(sys.modules, name, fake_provider(name, self.calls))
        # The simulated device's tensors are CPU tensors: let the simulated platform pick their kernel, as
        # it would for tensors on that device (outside simulation CPU tensors go to the CPU platform).
        mp.setattr(attention_layer, "platform_for", lambda device_type: get_current_platform())
        mp.setenv("DIFFSERVE_PLATFORM", platform)
        mp.delenv("DIFFSERVE_ATTENTION_BACKEND", raising=False)
        reset_all()
        return self
