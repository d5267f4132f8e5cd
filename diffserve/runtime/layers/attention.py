"""The attention layer every DiT block calls: `attention(q, k, v)`.

Layout: (batch, seq, heads, head_dim) in and out. The backend is resolved once per (head size,
dtype) through the current platform's `get_attn_backend_cls_str` and cached in a plain dict (a dict
lookup is cheap on the hot path and traceable by torch.compile).

The user's choice comes from `set_attention_backend` (the `--attention-backend` option) or the
DIFFSERVE_ATTENTION_BACKEND environment variable; unset or "auto" means the platform's priority list.
"""

from __future__ import annotations

import os

import torch

from diffserve.platforms import AttentionBackendEnum, get_current_platform
from diffserve.platforms.interface import import_class

ENV_VAR = "DIFFSERVE_ATTENTION_BACKEND"

_selected: AttentionBackendEnum | None = None
_selected_set = False
_backends: dict[tuple[int, torch.dtype], type] = {}


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
        set_attention_backend(os.environ.get(ENV_VAR) or None)
    return _selected


def reset_attention_backends() -> None:
    """Forget the choice and every resolved backend (tests; after the platform changed)."""
    global _selected, _selected_set
    _selected, _selected_set = None, False
    _backends.clear()


def get_attention_backend(head_size: int, dtype: torch.dtype) -> type:
    """The backend class for this (head size, dtype), resolved on first use through current_platform."""
    key = (head_size, dtype)
    backend = _backends.get(key)
    if backend is None:
        path = get_current_platform().get_attn_backend_cls_str(selected_attention_backend(), head_size, dtype)
        backend = _backends[key] = import_class(path)
    return backend


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, causal: bool = False
) -> torch.Tensor:
    backend = get_attention_backend(q.shape[-1], q.dtype)
    return backend.forward(q, k, v, scale=scale, causal=causal)
