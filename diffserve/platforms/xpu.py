"""Intel GPUs (XPU). No FlashAttention build exists for XPU; torch's SDPA dispatches to the oneDNN fused
attention kernel there, so SDPA is the native choice."""

from __future__ import annotations

import torch

from diffserve.platforms.interface import AttentionBackendEnum, Platform


class XpuPlatform(Platform):
    name = "xpu"
    device_type = "xpu"
    attn_priority = (AttentionBackendEnum.TORCH_SDPA,)
    # Neither fast path was ever run on Intel GPUs (the Triton kernels launch on CUDA/ROCm tensors only).
    triton_kernels = False
    wan_vae_walk = False

    @classmethod
    def platform_rejection(cls, backend: AttentionBackendEnum) -> str | None:
        if backend in (AttentionBackendEnum.FA3, AttentionBackendEnum.FA2):
            return f"{backend.value} has no XPU build; torch_sdpa uses oneDNN's fused attention on XPU"
        return None

    @classmethod
    def get_attn_backend_cls_str(cls, selected_backend, head_size: int, dtype: torch.dtype) -> str:
        return cls.resolve_attn_backend(selected_backend, head_size, dtype, cls.attn_priority)
