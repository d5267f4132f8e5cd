"""FlashAttention-2 through the `flash_attn` package: CUDA sm80+ builds, and the ROCm build (CK/Triton
backends on MI200/MI300), which is how AMD GPUs get a flash kernel."""

from __future__ import annotations

import importlib

import torch

from diffserve.kernels.base import AttentionBackend, Support, cached_support, torch_build


@cached_support
def fa2_support() -> Support:
    """Why FA2 can or cannot run here. Cached; `fa2_support.cache_clear()` re-probes. Never raises."""
    try:
        on_rocm = bool(getattr(torch.version, "hip", None))
        if torch.version.cuda is None and not on_rocm:
            return Support(False, f"flash_attn needs a CUDA or ROCm build of torch ({torch_build()})")
        if not torch.cuda.is_available():
            return Support(False, "no GPU visible")
        if not on_rocm:
            major, minor = torch.cuda.get_device_capability()
            if major < 8:
                return Support(False, f"compute capability {major}.{minor} (FA2 needs 8.0+)")
        try:
            module = importlib.import_module("flash_attn")
        except Exception as exc:
            return Support(False, f"flash_attn does not import ({type(exc).__name__}: {exc})".splitlines()[0])
        if not hasattr(module, "flash_attn_func"):
            return Support(False, "flash_attn has no flash_attn_func")
        return Support(True, provider="flash_attn")
    except Exception as exc:
        return Support(False, f"FA2 check failed: {type(exc).__name__}: {exc}")


class FlashAttention2Backend(AttentionBackend):
    name = "fa2"
    dtypes = (torch.bfloat16, torch.float16)
    max_head_size = 256
    head_size_multiple = 8

    @classmethod
    def support(cls) -> Support:
        return fa2_support()

    @staticmethod
    def forward(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, causal: bool = False
    ) -> torch.Tensor:
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)
