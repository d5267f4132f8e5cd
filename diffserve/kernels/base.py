"""What every attention backend offers: one layout, one call, and a way to say why it cannot run.

Layout for all backends: (batch, seq, heads, head_dim) in and out.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class Support:
    """Whether a backend can run on this machine; `reason` says why not (empty when ok)."""

    ok: bool
    reason: str = ""
    provider: str = ""

    def __bool__(self) -> bool:
        return self.ok


def version_tuple(text: str | None) -> tuple[int, ...]:
    """'12.10' -> (12, 10); '6.2.41133-dd7f95766' -> (6, 2, 41133). Never compares strings: '12.10' > '12.3'
    is False as strings, True as versions. Unparseable text -> ()."""
    parts = []
    for piece in (text or "").split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def torch_build() -> str:
    """Names the torch build for messages: 'CUDA 12.4', 'ROCm 6.2', 'XPU', 'CPU'."""
    if torch.version.cuda is not None:
        return f"CUDA {torch.version.cuda}"
    if getattr(torch.version, "hip", None):
        return f"ROCm {'.'.join(map(str, version_tuple(torch.version.hip)[:2]))}"
    if getattr(torch.version, "xpu", None) or (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return "XPU"
    return "CPU"


class AttentionBackend:
    """Base of the backend classes whose dotted paths the platforms hand out."""

    name: ClassVar[str]
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    max_head_size: ClassVar[int] = 1 << 30
    head_size_multiple: ClassVar[int] = 1

    @classmethod
    def support(cls) -> Support:
        """Can this backend run on this machine at all (build, device, provider import)? Never raises."""
        return Support(True)

    @classmethod
    def rejection(cls, head_size: int, dtype: torch.dtype) -> str | None:
        """Why this backend can't take (head_size, dtype) here, or None when it can."""
        status = cls.support()
        if not status:
            return status.reason
        if dtype not in cls.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in cls.dtypes)
            return f"dtype {str(dtype).removeprefix('torch.')} unsupported (needs {names})"
        if head_size > cls.max_head_size or head_size % cls.head_size_multiple:
            return (
                f"head size {head_size} unsupported (needs <= {cls.max_head_size}, "
                f"multiple of {cls.head_size_multiple})"
            )
        return None

    @staticmethod
    def forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, causal: bool = False
    ) -> torch.Tensor:
        raise NotImplementedError


def cached_support(fn):
    """Cache a backend's support probe (hardware and imports don't change in a process) and keep
    `cache_clear` so tests can re-probe after patching torch.version or sys.modules."""
    return functools.lru_cache(maxsize=None)(fn)
