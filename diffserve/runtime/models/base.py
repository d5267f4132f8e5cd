"""What FLUX and Wan share as modules: configs as validated dataclasses, loading from a diffusers-format
directory onto the meta device then assigning the real tensors, and the small surface diffusers' pipelines
expect of a transformer (.config, .dtype, .device, cache_context, return_dict).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from diffserve.runtime.models.weights import iter_tensors, read_config

logger = logging.getLogger(__name__)


class DiTConfig:
    """Base for the config dataclasses: attribute access like diffusers' config, plus dict-style access."""

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        # Keys like _class_name/_diffusers_version are bookkeeping; other unknown keys are ignored, as
        # diffusers does, but said once so a wrong config does not pass silently.
        unknown = sorted(k for k in values if k not in known and not k.startswith("_"))
        if unknown:
            logger.warning("%s: ignoring unknown config keys %s", cls.__name__, unknown)
        return cls(**{k: v for k, v in values.items() if k in known})

    def __getitem__(self, key: str):
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default=None):
        return getattr(self, key, default)

    def keys(self):
        return [f.name for f in dataclasses.fields(self)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class NativeDiT(nn.Module):
    """Base class of our DiTs. Subclasses set config_class and the loading policies below."""

    config_class: ClassVar[type[DiTConfig]]
    # Parameters whose dotted name contains one of these components stay float32 when the model is
    # loaded in half precision — the same rule (and names) as diffusers' _keep_in_fp32_modules.
    keep_fp32_modules: ClassVar[tuple[str, ...]] = ()
    # Checkpoint tensors we do not use and may drop (diffusers ignores the same ones).
    ignored_checkpoint_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config

    @classmethod
    def from_config(cls, config: dict[str, Any] | DiTConfig):
        if not isinstance(config, DiTConfig):
            config = cls.config_class.from_dict(dict(config))
        return cls(config)

    @classmethod
    def from_pretrained(
        cls,
        transformer_dir: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
    ):
        """Load a diffusers-format transformer directory (config.json + safetensors, sharded or not)."""
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."))
        config = cls.config_class.from_dict(read_config(transformer_dir))
        with torch.device("meta"):
            model = cls(config)

        def dtype_for(name: str) -> torch.dtype:
            if dtype in (torch.float16, torch.bfloat16) and cls._keeps_fp32(name):
                return torch.float32
            return dtype

        state = {
            name: t
            for name, t in iter_tensors(transformer_dir, device, dtype_for)
            if not any(part in name.split(".") for part in cls.ignored_checkpoint_keys)
        }
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unexpected:
            raise ValueError(
                f"{transformer_dir}: weights do not match the config "
                f"({len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})"
            )
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval().requires_grad_(False)

    @classmethod
    def _keeps_fp32(cls, name: str) -> bool:
        parts = name.split(".")
        return any(m in parts for m in cls.keep_fp32_modules)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the first floating parameter not kept in float32."""
        fallback = None
        for name, p in self.named_parameters():
            if p.is_floating_point():
                if not self._keeps_fp32(name):
                    return p.dtype
                fallback = fallback or p.dtype
        return fallback or torch.float32

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs):
        """No-op: diffusers' pipelines wrap each call in this for their step caches, which we do not use."""
        yield

    @staticmethod
    def _per_sample(t, batch: int, device: torch.device) -> torch.Tensor:
        """Timesteps as given ((batch,), or (batch, seq) for per-token); a single value is shared by the batch."""
        t = torch.as_tensor(t, device=device)
        return t.reshape(1).expand(batch) if t.numel() == 1 else t

    @staticmethod
    def _output(sample: torch.Tensor, return_dict: bool):
        return sample if return_dict else (sample,)

    def fuse_projections(self):
        """Run every submodule's fuse_projections() (q|k|v, and FLUX's single-block q|k|v|mlp-in, become one
        GEMM each; see fuse_linears). Call it once the model is loaded and on its device. Returns self."""
        for module in self.modules():
            if module is not self and hasattr(module, "fuse_projections"):
                module.fuse_projections()
        return self


def has_hooks(module: nn.Module) -> bool:
    """Whether a module carries hooks that code stepping around its forward would skip: torch's, accelerate's
    (offloading, device maps) or diffusers' (group offloading, caches)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or getattr(module, "_hf_hook", None) is not None
        or getattr(module, "_diffusers_hook", None) is not None
    )


def fuse_linears(owner: nn.Module, names: tuple[str, ...], fused: str) -> None:
    """Concatenate the nn.Linear layers owner.<name> (dotted paths, all reading the same input) into one
    weight and one bias (None when none of the layers has one), kept as non-persistent buffers
    `<fused>_weight` / `<fused>_bias` of owner, and make each layer's parameters views into them.

    One GEMM instead of several: fewer launches and wider, more efficient matmuls. The state dict keeps
    diffusers' names and load_state_dict(strict=True) still works (it copies through the views), and memory
    holds one copy. Fuse after the model is on its final device and dtype: .to() copies parameters one by
    one, which would break the sharing (outputs stay right; memory would double). Idempotent."""
    if getattr(owner, f"{fused}_weight", None) is not None:
        return
    layers = [owner.get_submodule(name) for name in names]
    with_bias = {layer.bias is not None for layer in layers}
    if len(with_bias) != 1:
        raise ValueError(f"fuse_linears: {names} mix layers with and without a bias")
    weight = torch.cat([layer.weight.detach() for layer in layers])
    bias = torch.cat([layer.bias.detach() for layer in layers]) if with_bias.pop() else None
    owner.register_buffer(f"{fused}_weight", weight, persistent=False)
    owner.register_buffer(f"{fused}_bias", bias, persistent=False)
    row = 0
    for layer in layers:
        rows = layer.weight.shape[0]
        layer.weight = nn.Parameter(weight[row : row + rows], requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias[row : row + rows], requires_grad=False)
        row += rows
