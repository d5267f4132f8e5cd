"""AMD GPUs (ROCm). torch.version.cuda is None here; torch.cuda.* still drives the device."""

from __future__ import annotations

import torch

from diffserve.platforms.interface import AttentionBackendEnum, Platform


class RocmPlatform(Platform):
    name = "rocm"
    device_type = "cuda"  # ROCm builds of torch expose AMD GPUs as "cuda" devices
    # FA2 through the ROCm build of flash_attn (CK kernels on MI200/MI300) when it imports, else SDPA.
    attn_priority = (AttentionBackendEnum.FA2, AttentionBackendEnum.TORCH_SDPA)
    triton_kernels = True  # Triton's ROCm backend compiles the same kernels
    # The walk's channels-last 3D convolutions were never measured on MIOpen: diffusers' modules decode.
    wan_vae_walk = False

    @classmethod
    def platform_rejection(cls, backend: AttentionBackendEnum) -> str | None:
        if backend is AttentionBackendEnum.FA3:
            # FA3's kernels are Hopper-only CUDA code; _is_fa3_supported() also says no here (cuda is None),
            # but the platform states the rule instead of relying on that probe.
            return "FA3 is NVIDIA Hopper only; on ROCm use fa2 (ROCm flash_attn build) or torch_sdpa"
        return None

    @classmethod
    def get_attn_backend_cls_str(cls, selected_backend, head_size: int, dtype: torch.dtype) -> str:
        return cls.resolve_attn_backend(selected_backend, head_size, dtype, cls.attn_priority)
