"""LoRA files -> our native layers, and the adapters a worker serves (issue 20).

    manager = attach_loras(transformer, [("style", "style.safetensors")], max_loras=4)
    with manager.applied({"style": 0.8}):      # the batch's adapter set; {} = the base model
        ...DiT forwards...

Formats (what diffusers' load_lora_weights takes for FLUX.1 and Wan2.x, read into the same (A, B, alpha)):
  * diffusers / PEFT: `[transformer.]<diffusers layer name>.lora_A[.<adapter>].weight` (r, in) and
    `.lora_B...weight` (out, r), optional `<name>.alpha`; also `.lora.down/.lora.up` and `.lora_down/.lora_up`.
  * kohya (sd-scripts, musubi-tuner): `lora_unet_<name with _ for .>.lora_down.weight`, `.lora_up.weight`,
    `.alpha`, over the original (BFL / Wan) layer names: FLUX `double_blocks_i_img_attn_qkv` (q|k|v as one
    up matrix over one down), `single_blocks_i_linear1` (q|k|v|mlp-in), `..._proj`, `..._mlp_0/2`,
    `linear2`; Wan `blocks_i_self_attn_q|k|v|o`, `cross_attn_*`, `ffn_0/2`. Also `diffusion_model.` keys
    (Wan's original names with dots) and `lora_transformer_` keys (diffusers names with _).
The scale alpha/rank (1 without alpha) is folded into B once, at load; the request's scale multiplies it.

Which layers: the attention and MLP projections of the repeated blocks (`SUPPORTED`). A file with weights
for anything else (adaLN modulation, embedders, the final projection, text encoders) is refused at load with
the layer named: those are computed by fused kernels that no low-rank term can join, and silently skipping
them would give another picture than diffusers.

Residency: every adapter stays in host memory; at most `max_loras` are on the device at once (each in a slot
of every LoraLinear it touches), least recently used out. A batch needs all its adapters resident.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from diffserve.runtime.api import InvalidRequest
from diffserve.runtime.layers.lora import LoraLinear, LoraState, called_layers, wrap_linears

logger = logging.getLogger(__name__)

SUPPORTED = re.compile(
    r"^(?:transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
    r"to_add_out)|ff\.net\.(?:0\.proj|2)|ff_context\.net\.(?:0\.proj|2))"
    r"|single_transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v)|proj_mlp|proj_out)"  # FLUX
    r"|blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ffn\.net\.(?:0\.proj|2)))$"  # Wan
)

# kohya / original names (underscored) -> diffusers names; a list: one up matrix split by rows over them
_ORIGINAL = [
    (
        r"double_blocks_(\d+)_img_attn_qkv",
        [
            "transformer_blocks.{}.attn.to_q",
            "transformer_blocks.{}.attn.to_k",
            "transformer_blocks.{}.attn.to_v",
        ],
    ),
    (
        r"double_blocks_(\d+)_txt_attn_qkv",
        [
            "transformer_blocks.{}.attn.add_q_proj",
            "transformer_blocks.{}.attn.add_k_proj",
            "transformer_blocks.{}.attn.add_v_proj",
        ],
    ),
    (r"double_blocks_(\d+)_img_attn_proj", ["transformer_blocks.{}.attn.to_out.0"]),
    (r"double_blocks_(\d+)_txt_attn_proj", ["transformer_blocks.{}.attn.to_add_out"]),
    (r"double_blocks_(\d+)_img_mlp_0", ["transformer_blocks.{}.ff.net.0.proj"]),
    (r"double_blocks_(\d+)_img_mlp_2", ["transformer_blocks.{}.ff.net.2"]),
    (r"double_blocks_(\d+)_txt_mlp_0", ["transformer_blocks.{}.ff_context.net.0.proj"]),
    (r"double_blocks_(\d+)_txt_mlp_2", ["transformer_blocks.{}.ff_context.net.2"]),
    (r"double_blocks_(\d+)_img_mod_lin", ["transformer_blocks.{}.norm1.linear"]),
    (r"double_blocks_(\d+)_txt_mod_lin", ["transformer_blocks.{}.norm1_context.linear"]),
    (
        r"single_blocks_(\d+)_linear1",
        [
            "single_transformer_blocks.{}.attn.to_q",
            "single_transformer_blocks.{}.attn.to_k",
            "single_transformer_blocks.{}.attn.to_v",
            "single_transformer_blocks.{}.proj_mlp",
        ],
    ),
    (r"single_blocks_(\d+)_linear2", ["single_transformer_blocks.{}.proj_out"]),
    (r"single_blocks_(\d+)_modulation_lin", ["single_transformer_blocks.{}.norm.linear"]),
    (r"blocks_(\d+)_self_attn_(q|k|v|o)", "blocks.{}.attn1.{}"),
    (r"blocks_(\d+)_cross_attn_(q|k|v|o)", "blocks.{}.attn2.{}"),
    # Wan I2V's image-context key/value: named so that the refusal below names the layer (not SUPPORTED)
    (r"blocks_(\d+)_cross_attn_(k_img|v_img)", "blocks.{}.attn2.{}"),
    (r"blocks_(\d+)_ffn_(0|2)", "blocks.{}.ffn.{}"),
]
_WAN_PROJ = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "0": "net.0.proj", "2": "net.2",
             "k_img": "add_k_proj", "v_img": "add_v_proj"}  # fmt: skip
_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.", "lora_unet_", "lora_transformer_")
_KEY = re.compile(
    r"^(?P<path>.+?)\.(?:(?P<a>lora_A|lora_down|lora\.down)|(?P<b>lora_B|lora_up|lora\.up))"
    r"(?:\.[A-Za-z0-9_]+)?\.weight$"
)


class LoraFileError(ValueError):
    """A LoRA file that cannot be served: the message names the file and what is wrong, in one line."""


@dataclass
class Adapter:
    name: str
    path: str
    # called layer name -> (A (rank, in), B^T (rank, out) with alpha/rank folded in), in host memory
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"LoRA file {path} does not exist")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for a bad file
        raise LoraFileError(f"{path}: not a readable safetensors file ({e})") from None


def _diffusers_names(path: str, linear_names: dict[str, str]) -> list[str]:
    """A LoRA key's layer path -> the diffusers layer names its up matrix covers (several: split by rows)."""
    for prefix in _PREFIXES:
        path = path.removeprefix(prefix)
    if path in linear_names.values():
        return [path]
    flat = path.replace(".", "_")
    for pattern, target in _ORIGINAL:
        m = re.fullmatch(pattern, flat)
        if m and isinstance(target, list):
            return [t.format(m.group(1)) for t in target]
        if m:
            return [target.format(m.group(1), _WAN_PROJ[m.group(2)])]
    if flat in linear_names:  # diffusers names with _ for . (lora_transformer_..., kohya over diffusers)
        return [linear_names[flat]]
    return []


def convert(state: dict[str, torch.Tensor], model: nn.Module, where: str = "LoRA file") -> dict:
    """A LoRA state dict (any format above) -> {diffusers layer name: (A (r, in), B (out, r) * alpha/r)},
    float32, checked against `model`'s layers. Raises LoraFileError naming the first problem."""
    linears = {
        n: m for n, m in model.named_modules() if hasattr(m, "in_features") and hasattr(m, "out_features")
    }
    flat_names = {n.replace(".", "_"): n for n in linears}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key.endswith(".alpha"):
            pairs.setdefault(key.removesuffix(".alpha"), {})["alpha"] = tensor
            continue
        m = _KEY.match(key)
        if m is None:
            if key.startswith(("text_encoder", "lora_te")):
                raise LoraFileError(f"{where}: text-encoder LoRA weights ({key}) are not supported")
            raise LoraFileError(
                f"{where}: {key} is not a LoRA weight this server reads (lora_A/lora_B, lora_down/lora_up)"
            )
        pairs.setdefault(m.group("path"), {})["a" if m.group("a") else "b"] = tensor
    out = {}
    for path, parts in pairs.items():
        if path.startswith(("text_encoder", "lora_te")):
            raise LoraFileError(f"{where}: text-encoder LoRA weights ({path}) are not supported")
        if "a" not in parts or "b" not in parts:
            raise LoraFileError(
                f"{where}: {path} has {'no down (A)' if 'a' not in parts else 'no up (B)'} matrix"
            )
        names = _diffusers_names(path, flat_names)
        if not names:
            raise LoraFileError(f"{where}: {path} names no layer of this model")
        bad = [n for n in names if not SUPPORTED.match(n)]
        if bad:
            image_kv = re.fullmatch(r"blocks\.\d+\.attn2\.add_[kv]_proj", bad[0])
            raise LoraFileError(
                f"{where}: LoRA on {bad[0]} is not supported: only the blocks' attention and MLP projections"
                + (
                    "; Wan I2V's image-context key/value run as one fused GEMM that takes no LoRA"
                    if image_kv
                    else ""
                )
            )
        a, b = parts["a"].float(), parts["b"].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise LoraFileError(f"{where}: {path}: down {tuple(a.shape)} and up {tuple(b.shape)} do not pair")
        rank = a.shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        b = b * (alpha / rank)
        row = 0
        for name in names:
            layer = linears.get(name)
            if layer is None:
                raise LoraFileError(f"{where}: {path} names {name}, which this model does not have")
            if a.shape[1] != layer.in_features:
                raise LoraFileError(
                    f"{where}: {name}: A has {a.shape[1]} inputs, the layer {layer.in_features}"
                )
            out[name] = (a, b[row : row + layer.out_features])
            row += layer.out_features
        if row != b.shape[0]:
            raise LoraFileError(f"{where}: {path}: B has {b.shape[0]} rows, the layers {row}")
    if not out:
        raise LoraFileError(f"{where}: no LoRA weights in it")
    return out


def _called_factors(per_name: dict, where: dict[str, tuple[str, int, int]], dtype) -> dict:
    """{diffusers name: (A, B)} -> {called layer: (A, B^T)}: members of one fused GEMM stacked, their A rows
    concatenated (an A shared by several members counted once: kohya's q|k|v) and each B^T placed in its
    member's output columns (zero elsewhere)."""
    widths: dict[str, int] = {}
    for called, _, stop in where.values():
        widths[called] = max(widths.get(called, 0), stop)
    grouped: dict[str, list[tuple[torch.Tensor, torch.Tensor, int, int]]] = {}
    for name, (a, b) in per_name.items():
        called, start, stop = where[name]
        grouped.setdefault(called, []).append((a, b, start, stop))
    out = {}
    for called, parts in grouped.items():
        a_list: list[torch.Tensor] = []
        for a, *_ in parts:
            if not any(a is seen for seen in a_list):
                a_list.append(a)
        offsets, col = [], 0
        for a in a_list:
            offsets.append(col)
            col += a.shape[0]
        bt = torch.zeros(col, widths[called])
        for a, b, start, stop in parts:
            first = offsets[next(i for i, seen in enumerate(a_list) if seen is a)]
            bt[first : first + a.shape[0], start:stop] = b.t()
        out[called] = (torch.cat(a_list).to(dtype), bt.to(dtype))
    return out


class LoraManager:
    """The adapters one DiT serves: all in host memory, up to `slots` on the device (LRU)."""

    def __init__(self, model: nn.Module, adapters: list[Adapter], slots: int, dtype, device):
        self.model = model
        self.adapters = {a.name: a for a in adapters}
        self.state = LoraState(slots, device)
        ranks: dict[str, int] = {}
        for adapter in adapters:
            for called, (a, _) in adapter.factors.items():
                ranks[called] = max(ranks.get(called, 0), a.shape[0])
        self.layers: dict[str, LoraLinear] = wrap_linears(model, ranks, self.state, dtype)
        self.resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        # GraphedForward keys its graphs on this too (runtime/cuda_graphs.py)
        model.graph_state_key = self.state.graph_key

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def _slot_for(self, name: str, keep: set[str]) -> int:
        if name in self.resident:
            self.resident.move_to_end(name)
            return self.resident[name]
        used = set(self.resident.values())
        free = [s for s in range(self.state.slots) if s not in used]
        if free:
            slot = free[0]
        else:
            victim = next((n for n in self.resident if n not in keep), None)
            if victim is None:
                raise InvalidRequest(
                    f"a request may use at most {self.state.slots} LoRA adapters at once (--max-loras)"
                )
            slot = self.resident.pop(victim)
            for layer in self.layers.values():
                layer.load_slot(slot, victim, None, None)
        adapter = self.adapters[name]
        for called, layer in self.layers.items():
            a, bt = adapter.factors.get(called, (None, None))
            layer.load_slot(slot, name, a, bt)
        self.resident[name] = slot
        logger.info("lora: %s resident in slot %d", name, slot)
        return slot

    def activate(self, scales: dict[str, float] | None) -> None:
        """Make `scales` ({name: scale}; zeros dropped, {} or None = base model) the adapter set of the next
        forwards. Unknown names raise InvalidRequest (the API checks before; this guards the Python API)."""
        wanted = {n: float(s) for n, s in (scales or {}).items() if float(s) != 0.0}
        unknown = sorted(set(wanted) - set(self.adapters))
        if unknown:
            raise InvalidRequest(
                f"unknown LoRA adapter {unknown[0]!r}: known adapters are {', '.join(self.adapters)}"
            )
        active = tuple((n, self._slot_for(n, set(wanted))) for n in sorted(wanted))
        self.state.set(active, {slot: wanted[name] for name, slot in active})

    @contextlib.contextmanager
    def applied(self, scales: dict[str, float] | None):
        self.activate(scales)
        try:
            yield
        finally:
            self.state.active = ()


def attach_loras(model: nn.Module, specs, max_loras: int, device=None) -> LoraManager:
    """Read every (name, path) of `specs`, convert to `model`'s layers (after fusion and FP8 quantisation),
    wrap those layers and return the manager. Raises LoraFileError (one line) for a bad file."""
    device = device or next(model.parameters()).device
    dtype = getattr(model, "dtype", torch.float32)
    where = called_layers(model)
    adapters = []
    for name, path in specs:
        per_name = convert(read_state_dict(path), model, f"LoRA {name!r} ({path})")
        adapters.append(Adapter(name, str(path), _called_factors(per_name, where, dtype)))
        logger.info("lora: %s from %s (%d layers)", name, path, len(per_name))
    return LoraManager(model, adapters, min(max_loras, len(adapters)), dtype, device)
