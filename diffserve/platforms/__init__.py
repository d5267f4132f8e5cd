"""`current_platform`: detected lazily on first use, never at import, so tests can patch torch first.

DIFFSERVE_PLATFORM=cuda|rocm|xpu|cpu overrides detection (e.g. to force the CPU path on a GPU host).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffserve import envs
from diffserve.platforms.backends import AttentionBackendEnum  # noqa: F401  (re-exported; no torch)

if TYPE_CHECKING:
    from diffserve.platforms.interface import Platform

# Imported from interface.py (which imports torch) on first use, so that the server process can validate
# backend names through this package without importing torch.
_FROM_INTERFACE = ("AttentionBackendUnavailable", "Platform")

PLATFORM_CLASSES = {
    "cuda": "diffserve.platforms.cuda.CudaPlatform",
    "rocm": "diffserve.platforms.rocm.RocmPlatform",
    "xpu": "diffserve.platforms.xpu.XpuPlatform",
    "cpu": "diffserve.platforms.cpu.CpuPlatform",
}

_current: type[Platform] | None = None


def detect_platform_name() -> str:
    forced = envs.DIFFSERVE_PLATFORM  # validated by envs: one of PLATFORM_CLASSES, or None
    if forced:
        return forced
    import torch

    if getattr(torch.version, "hip", None) and torch.cuda.is_available():
        return "rocm"
    if torch.version.cuda is not None and torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    return "cpu"


def get_platform(name: str) -> type[Platform]:
    from diffserve.platforms.interface import import_class

    return import_class(PLATFORM_CLASSES[name])


def get_current_platform() -> type[Platform]:
    global _current
    if _current is None:
        _current = get_platform(detect_platform_name())
    return _current


def reset_current_platform() -> None:
    """Forget the detected platform (tests patch torch.version / the environment, then re-detect)."""
    global _current
    _current = None


def __getattr__(name: str):
    if name == "current_platform":
        return get_current_platform()
    if name in _FROM_INTERFACE:
        from diffserve.platforms import interface

        return getattr(interface, name)
    raise AttributeError(name)
