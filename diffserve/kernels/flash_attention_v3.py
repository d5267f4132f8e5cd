"""FlashAttention-3 (Hopper, sm90) through the `fa3-fwd` wheel (`fa3_fwd_interface`) or upstream's
`flash_attn_interface` built from flash-attention/hopper.

`_is_fa3_supported()` is the one FA3 support check. It never raises and never falls back by itself:
it answers, and the platform decides what to use instead.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import torch

from diffserve.kernels.base import AttentionBackend, Support, cached_support, torch_build, version_tuple

MIN_CUDA = (12, 3)
# Tried in order: the forward-only wheel first (what `diffserve[cuda]` installs), then upstream's.
PROVIDERS = ("fa3_fwd_interface", "flash_attn_interface")


def _import_provider(name: str) -> ModuleType:
    if name == "fa3_fwd_interface" and "flash_attn_config" not in sys.modules:
        # Packaging slip in fa3-fwd 0.0.x: its interface imports `flash_attn_config` (upstream's name) at call
        # time, but the wheel ships it as `fa3_fwd_config`. Alias it so the first call does not fail.
        try:
            sys.modules["flash_attn_config"] = importlib.import_module("fa3_fwd_config")
        except ImportError:
            pass
    return importlib.import_module(name)


@cached_support
def _probe() -> Support:
    try:
        if torch.version.cuda is None:
            # ROCm, XPU and CPU builds: the check must say no here, not compare None with a string.
            return Support(False, f"torch built without CUDA ({torch_build()})")
        cuda = version_tuple(torch.version.cuda)
        if cuda < MIN_CUDA:
            return Support(False, f"CUDA {torch.version.cuda} < {'.'.join(map(str, MIN_CUDA))}")
        if not torch.cuda.is_available():
            return Support(False, "no CUDA device visible")
        major, minor = torch.cuda.get_device_capability()
        if major != 9:
            return Support(False, f"compute capability {major}.{minor} (FA3 needs 9.x, Hopper)")
        errors = []
        for name in PROVIDERS:
            try:
                module = _import_provider(name)
            except Exception as exc:  # ImportError, or a broken binary raising OSError/RuntimeError
                errors.append(f"{name}: {type(exc).__name__}: {exc}".splitlines()[0])
                continue
            if hasattr(module, "flash_attn_func"):
                return Support(True, provider=name)
            errors.append(f"{name}: no flash_attn_func")
        return Support(False, "no FA3 provider imports (" + "; ".join(errors) + ")")
    except Exception as exc:  # the check never raises: an unexpected failure is a reason, not a crash
        return Support(False, f"FA3 check failed: {type(exc).__name__}: {exc}")


# The provider's flash_attn_func, resolved once: a lookup per call would cost host time on the hot path and
# break torch.compile's graph at every attention call.
_flash_attn_func = None


def fa3_support() -> Support:
    """Why FA3 can or cannot run in this process. Cached; `fa3_support.cache_clear()` re-probes."""
    return _probe()


def _cache_clear() -> None:
    global _flash_attn_func
    _flash_attn_func = None
    _probe.cache_clear()


def _is_fa3_supported() -> bool:
    """True only where FA3 really runs: a CUDA build >= 12.3, a 9.x GPU, and an FA3 provider that imports."""
    return _probe().ok


fa3_support.cache_clear = _cache_clear  # type: ignore[attr-defined]
_is_fa3_supported.cache_clear = _cache_clear  # type: ignore[attr-defined]


def _resolve_flash_attn_func():
    global _flash_attn_func
    _flash_attn_func = _import_provider(_probe().provider).flash_attn_func
    return _flash_attn_func


def fa3_unsupported_reason() -> str:
    return fa3_support().reason


class FlashAttention3Backend(AttentionBackend):
    name = "fa3"
    dtypes = (torch.bfloat16, torch.float16)
    max_head_size = 256
    head_size_multiple = 8

    @classmethod
    def support(cls) -> Support:
        return fa3_support()

    @classmethod
    def rejection(cls, head_size: int, dtype: torch.dtype) -> str | None:
        reason = super().rejection(head_size, dtype)
        if reason is None and dtype == torch.float16 and fa3_support().provider == "fa3_fwd_interface":
            return "dtype float16 unsupported by fa3-fwd (built bf16-only)"
        return reason

    @staticmethod
    def forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, causal: bool = False
    ) -> torch.Tensor:
        func = _flash_attn_func or _resolve_flash_attn_func()
        out = func(q, k, v, softmax_scale=scale, causal=causal)
        # Some upstream versions return (out, softmax_lse).
        return out[0] if isinstance(out, tuple) else out

    @staticmethod
    def fp8_func():
        """flash_attn_func, for its e4m3 inputs with descales (kernels/fp8_attention.py)."""
        return _flash_attn_func or _resolve_flash_attn_func()
