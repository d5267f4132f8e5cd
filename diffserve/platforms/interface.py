"""The platform interface and the ONE attention-selection mechanism.

Each platform file (cuda.py, rocm.py, xpu.py, cpu.py) is a thin subclass: its priority list and its
capability flags (which fast paths run on it: `supports_triton_kernels`, `supports_wan_vae_walk`) as data,
its own rules in `platform_rejection`, and a `get_attn_backend_cls_str` that calls `select_attn_backend`.
Nothing here touches hardware at import time; every probe happens when a backend is asked for.
"""

from __future__ import annotations

import importlib
import logging
from typing import ClassVar

import torch

from diffserve.kernels import fused_ops
from diffserve.platforms.backends import AttentionBackendEnum

logger = logging.getLogger("diffserve.attention")


BACKEND_CLASS_PATHS: dict[AttentionBackendEnum, str] = {
    AttentionBackendEnum.FA3: "diffserve.kernels.flash_attention_v3.FlashAttention3Backend",
    AttentionBackendEnum.FA2: "diffserve.kernels.flash_attention_v2.FlashAttention2Backend",
    AttentionBackendEnum.TORCH_SDPA: "diffserve.kernels.sdpa.SDPABackend",
}


class AttentionBackendUnavailable(RuntimeError):
    """An explicitly chosen attention backend cannot run here. We fail closed rather than silently
    running something the user did not ask for."""


def import_class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Platform:
    """Classmethod-only: a platform is a set of facts and rules, not an object with state."""

    name: ClassVar[str] = "unspecified"
    device_type: ClassVar[str] = "cpu"
    # Tried in this order when the user chose nothing. SDPA is always the terminal fallback.
    attn_priority: ClassVar[tuple[AttentionBackendEnum, ...]] = (AttentionBackendEnum.TORCH_SDPA,)
    # Capabilities, as data: which fast paths run on this platform's GPU tensors. Callers ask through the
    # classmethods below; tensors on the CPU never take these paths, whatever the platform says.
    triton_kernels: ClassVar[bool] = False
    wan_vae_walk: ClassVar[bool] = False

    @classmethod
    def supports_triton_kernels(cls) -> bool:
        """Whether our Triton kernels (diffserve/kernels/_triton_*.py: the fused DiT ops, the VAE norms and
        adds) run here, and with them kl_vae_decode's channels-last form that folds conv biases into them."""
        return cls.triton_kernels

    @classmethod
    def supports_wan_vae_walk(cls) -> bool:
        """Whether Wan VAE decodes take wan_vae_walk (channels-last 3D convolutions, fused norms) rather
        than diffusers' modules."""
        return cls.wan_vae_walk

    @classmethod
    def platform_rejection(cls, backend: AttentionBackendEnum) -> str | None:
        """A platform's own reason to refuse a backend before probing it (e.g. 'FA3 is CUDA-only' on ROCm)."""
        return None

    @classmethod
    def backend_rejection(
        cls, backend: AttentionBackendEnum, head_size: int, dtype: torch.dtype
    ) -> str | None:
        reason = cls.platform_rejection(backend)
        if reason is not None:
            return reason
        try:
            backend_cls = import_class(BACKEND_CLASS_PATHS[backend])
        except Exception as exc:
            return f"does not import ({type(exc).__name__}: {exc})"
        return backend_cls.rejection(head_size, dtype)

    @classmethod
    def select_attn_backend(
        cls,
        selected_backend: AttentionBackendEnum | str | None,
        head_size: int,
        dtype: torch.dtype,
        priority: tuple[AttentionBackendEnum, ...] | None = None,
    ) -> tuple[AttentionBackendEnum, dict[AttentionBackendEnum, str]]:
        """The selection loop, written once. Returns the winner and the rejection reason of every candidate
        tried before it. Explicit unusable choice -> AttentionBackendUnavailable."""
        selected = AttentionBackendEnum.parse(selected_backend)
        candidates = [selected] if selected is not None else list(priority or cls.attn_priority)
        rejected: dict[AttentionBackendEnum, str] = {}
        for backend in candidates:
            reason = cls.backend_rejection(backend, head_size, dtype)
            if reason is None:
                return backend, rejected
            rejected[backend] = reason
        if selected is not None:
            raise AttentionBackendUnavailable(
                f"attention backend {selected.value!r} was requested but cannot run on {cls.name} "
                f"(head size {head_size}, {_dtype_name(dtype)}): {rejected[selected]}"
            )
        sdpa = AttentionBackendEnum.TORCH_SDPA
        if sdpa not in rejected:  # terminal fallback when a priority list forgot it
            return sdpa, rejected
        raise AttentionBackendUnavailable(f"no attention backend can run on {cls.name}: {rejected}")

    @classmethod
    def get_attn_backend_cls_str(
        cls, selected_backend: AttentionBackendEnum | str | None, head_size: int, dtype: torch.dtype
    ) -> str:
        """The dotted class path of the attention backend to use. Each platform defines it, as a thin call
        to `resolve_attn_backend` with its priority list."""
        raise NotImplementedError(f"{cls.__name__} defines no attention selection")

    @classmethod
    def resolve_attn_backend(
        cls,
        selected_backend: AttentionBackendEnum | str | None,
        head_size: int,
        dtype: torch.dtype,
        priority: tuple[AttentionBackendEnum, ...],
    ) -> str:
        """Run the shared selection loop over `priority` and log the outcome once."""
        backend, rejected = cls.select_attn_backend(selected_backend, head_size, dtype, priority)
        if rejected:
            # Only an implicit choice can get here with rejections: one line, the winner and why not the others.
            reasons = "; ".join(f"{b.value}: {r}" for b, r in rejected.items())
            logger.warning(
                "attention: %s (%s) [%s, head size %d, %s]",
                backend.value,
                reasons,
                cls.name,
                head_size,
                _dtype_name(dtype),
            )
        else:
            logger.info(
                "attention: %s [%s, head size %d, %s]", backend.value, cls.name, head_size, _dtype_name(dtype)
            )
        return BACKEND_CLASS_PATHS[backend]


def _current_platform_supports_triton_kernels() -> bool:
    from diffserve.platforms import get_current_platform

    return get_current_platform().supports_triton_kernels()


# kernels never import platforms (imports point platforms -> kernels): the platform layer hands the fused
# ops its answer to "do our Triton kernels run here?", asked at each dispatch so a re-detected platform
# (tests) is followed.
fused_ops.set_platform_query(_current_platform_supports_triton_kernels)
