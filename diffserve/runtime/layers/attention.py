"""The attention layer every DiT block calls: `attention(q, k, v)`.

Layout: (batch, seq, heads, head_dim) in and out. The backend is resolved once per (head size,
dtype) through the current platform's `get_attn_backend_cls_str` and cached in a plain dict (a dict
lookup is cheap on the hot path and traceable by torch.compile).

The user's choice comes from `set_attention_backend` (the `--attention-backend` option) or the
DIFFSERVE_ATTENTION_BACKEND environment variable; unset or "auto" means the platform's priority list.
"""

from __future__ import annotations

import torch

from diffserve import envs
from diffserve.platforms import AttentionBackendEnum, get_current_platform
from diffserve.platforms.interface import import_class

ENV_VAR = "DIFFSERVE_ATTENTION_BACKEND"

_selected: AttentionBackendEnum | None = None
_selected_set = False
_backends: dict[tuple[int, torch.dtype, bool], type] = {}


def set_attention_backend(name: str | AttentionBackendEnum | None) -> AttentionBackendEnum | None:
    """Choose the backend for this process (None/'auto' -> platform default). Validates the name now, so a
    typo fails at start-up rather than at the first request; usability is checked at first use."""
    global _selected, _selected_set
    _selected = AttentionBackendEnum.parse(name)
    _selected_set = True
    _backends.clear()
    return _selected


def selected_attention_backend() -> AttentionBackendEnum | None:
    if not _selected_set:
        set_attention_backend(envs.get(ENV_VAR))
    return _selected


def reset_attention_backends() -> None:
    """Forget the choice and every resolved backend (tests; after the platform changed)."""
    global _selected, _selected_set
    _selected, _selected_set = None, False
    _backends.clear()


def platform_for(device_type: str | None):
    """The platform whose rules pick the kernel for tensors on `device_type` (None: the platform's own
    device): the current platform, except for CPU tensors on a GPU machine, which the CPU platform takes."""
    platform = get_current_platform()
    if device_type == "cpu" and platform.device_type != "cpu":
        from diffserve.platforms.cpu import CpuPlatform

        return CpuPlatform
    return platform


def get_attention_backend(head_size: int, dtype: torch.dtype, device_type: str | None = None) -> type:
    """The backend class for this (head size, dtype), resolved on first use through current_platform.

    device_type: where the tensors are. Tensors on the CPU of a GPU machine (a model run with --device cpu,
    the CPU tests) resolve through the CPU platform: the GPU's kernels (FA3, FA2) cannot take them."""
    on_cpu = device_type == "cpu"  # None (a caller asking for the platform's device) keys as the device's
    key = (head_size, dtype, on_cpu)
    backend = _backends.get(key)
    if backend is None:
        path = platform_for(device_type).get_attn_backend_cls_str(
            selected_attention_backend(), head_size, dtype
        )
        backend = _backends[key] = import_class(path)
    return backend


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    causal: bool = False,
    fp8: bool = False,
) -> torch.Tensor:
    """fp8: q, k and v quantised to e4m3 per (batch, head) and both products in FP8 (kernels/fp8_attention.py;
    `--quantization fp8-attention`): FA3's FP8 kernel where the backend is FA3, the emulation on the CPU."""
    backend = get_attention_backend(q.shape[-1], q.dtype, q.device.type)
    if fp8:
        from diffserve.kernels.fp8_attention import fp8_attention

        reason = "causal FP8 attention is not implemented" if causal else None
        reason = reason or fp8_attention_unsupported(backend, q.device.type)
        if reason:
            raise RuntimeError(reason)
        return fp8_attention(q, k, v, scale, fa3=getattr(backend, "fp8_func", lambda: None)())
    return backend.forward(q, k, v, scale=scale, causal=causal)


def fp8_attention_unsupported(backend: type, device_type: str) -> str | None:
    """Why FP8 attention cannot run with this backend on this device (None: it can). On a GPU it needs
    FA3's e4m3 kernel; on the CPU the emulation runs (CI, the quality measurements)."""
    if device_type == "cpu" or getattr(backend, "fp8_func", None) is not None:
        return None
    return (
        f"--quantization fp8-attention needs FlashAttention-3 (Hopper, sm90) for its e4m3 kernel; "
        f"the attention backend here is {backend.name}"
    )


def use_fp8_attention(model: torch.nn.Module) -> int:
    """Turn FP8 attention on in every attention module of `model` that has the switch (`fp8_attention`:
    FLUX's and Qwen-Image's joint attention, Wan's self-attention); returns how many. Cross-attention to the text (512 keys)
    stays in the model dtype: FP8 would save little there."""
    modules = [m for m in model.modules() if hasattr(m, "fp8_attention")]
    for module in modules:
        module.fp8_attention = True
    return len(modules)
