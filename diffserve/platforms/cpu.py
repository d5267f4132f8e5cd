"""The CPU: development and CI. Only SDPA runs here."""

from __future__ import annotations

import torch

from diffserve.platforms.interface import AttentionBackendEnum, Platform


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    attn_priority = (AttentionBackendEnum.TORCH_SDPA,)
    # The reference formulas and diffusers' modules: CPU results stay bit-identical to diffusers'.
    triton_kernels = False
    wan_vae_walk = False

    @classmethod
    def platform_rejection(cls, backend: AttentionBackendEnum) -> str | None:
        if backend is not AttentionBackendEnum.TORCH_SDPA:
            return f"{backend.value} needs a GPU"
        return None

    @classmethod
    def get_attn_backend_cls_str(cls, selected_backend, head_size: int, dtype: torch.dtype) -> str:
        return cls.resolve_attn_backend(selected_backend, head_size, dtype, cls.attn_priority)
