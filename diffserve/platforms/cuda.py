"""NVIDIA GPUs: FA3 on Hopper, FA2 on Ampere+ when flash_attn imports, else SDPA."""

from __future__ import annotations

import torch

from diffserve.platforms.interface import AttentionBackendEnum, Platform


class CudaPlatform(Platform):
    name = "cuda"
    device_type = "cuda"
    attn_priority = (AttentionBackendEnum.FA3, AttentionBackendEnum.FA2, AttentionBackendEnum.TORCH_SDPA)
    triton_kernels = True
    wan_vae_walk = True

    @classmethod
    def get_attn_backend_cls_str(cls, selected_backend, head_size: int, dtype: torch.dtype) -> str:
        # The FA3 support check (_is_fa3_supported: CUDA >= 12.3, sm 9.x, provider imports) runs inside the
        # shared loop through FlashAttention3Backend.rejection; no CUDA-specific rule on top of it.
        return cls.resolve_attn_backend(selected_backend, head_size, dtype, cls.attn_priority)
