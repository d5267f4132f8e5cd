"""Random LoRA files for the tiny FLUX and Wan models (and for users' own CI), in the two formats diffserve
reads (runtime/lora.py): diffusers/PEFT and kohya (sd-scripts for FLUX, musubi-tuner for Wan).

    peft = make_tiny_lora(model_dir, "style.safetensors", fmt="peft", seed=1)
    kohya = make_tiny_lora(model_dir, "k.safetensors", fmt="kohya", seed=2)

Both return the same adapter as a diffusers/PEFT state dict (`transformer.<name>.lora_A/B.weight`, alpha
folded into B): what diffusers' load_lora_weights is given in the parity tests. For kohya FLUX files that
matters: diffusers converts them with FLUX.1's real widths hard-coded (3072/12288 in single blocks), so a
tiny model's kohya file can only be checked against its PEFT twin.

Factors are random and large enough (std 0.3 on B, where trainers start at zero) that an adapter visibly
changes the picture: a test passing with the LoRA silently ignored would otherwise go unnoticed.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

_FLUX_TARGETS = re.compile(
    r"^(?:transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
    r"to_add_out)|ff\.net\.(?:0\.proj|2)|ff_context\.net\.(?:0\.proj|2))"
    r"|single_transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v)|proj_mlp|proj_out))\.weight$"
)
_WAN_TARGETS = re.compile(
    r"^blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ffn\.net\.(?:0\.proj|2))\.weight$"
)
_WAN_KOHYA = {
    "attn1": "self_attn",
    "attn2": "cross_attn",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "o",
}


def _layers(model_dir: Path) -> tuple[str, dict[str, tuple[int, int]]]:
    """(family, {diffusers layer name: (out, in)}) of the LoRA-able layers of a tiny model's transformer."""
    from safetensors import safe_open

    folder = Path(model_dir) / "transformer"
    shapes = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                shapes[key] = tuple(f.get_slice(key).get_shape())
    family = "flux" if any(k.startswith("single_transformer_blocks.") for k in shapes) else "wan"
    pattern = _FLUX_TARGETS if family == "flux" else _WAN_TARGETS
    return family, {k.removesuffix(".weight"): s for k, s in shapes.items() if pattern.match(k)}


def make_tiny_lora(
    model_dir: str | Path,
    path: str | Path,
    fmt: str = "peft",
    rank: int = 4,
    seed: int = 0,
    alpha: float = 2.0,
) -> dict[str, torch.Tensor]:
    """Write a LoRA over every attention and MLP projection of the tiny model at `model_dir` to `path`
    (safetensors) in `fmt` ("peft" or "kohya"; kohya files carry `alpha`, PEFT ones fold it in). Returns its
    diffusers/PEFT form (see the module docstring)."""
    from safetensors.torch import save_file

    if fmt not in ("peft", "kohya"):
        raise ValueError(f"fmt must be 'peft' or 'kohya', got {fmt!r}")
    family, layers = _layers(Path(model_dir))
    gen = torch.Generator().manual_seed(seed)
    factors = {
        name: (torch.randn(rank, k, generator=gen) * 0.3, torch.randn(n, rank, generator=gen) * 0.3)
        for name, (n, k) in sorted(layers.items())
    }
    scale = alpha / rank if fmt == "kohya" else 1.0
    if family == "flux" and fmt == "kohya":  # q|k|v (and single blocks' mlp-in) share one down matrix
        for name in list(factors):
            m = re.match(r"(.*\.attn\.)(to_q|add_q_proj)$", name)
            if m:
                a = factors[name][0]
                for proj in ("k", "v"):
                    member = m.group(1) + m.group(2).replace("q", proj)
                    factors[member] = (a, factors[member][1])
                if name.startswith("single_"):
                    mlp = name.replace("attn.to_q", "proj_mlp")
                    factors[mlp] = (a, factors[mlp][1])
    peft = {}
    for name, (a, b) in factors.items():
        peft[f"transformer.{name}.lora_A.weight"] = a.contiguous()
        peft[f"transformer.{name}.lora_B.weight"] = (b * scale).contiguous()
    if fmt == "peft":
        save_file(peft, str(path))
    elif family == "flux":
        save_file(_kohya_flux(factors, alpha), str(path))
    else:
        save_file(_kohya_wan(factors, alpha), str(path))
    return peft


def _kohya_pair(out: dict, key: str, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    out[f"lora_unet_{key}.lora_down.weight"] = a.contiguous()
    out[f"lora_unet_{key}.lora_up.weight"] = b.contiguous()
    out[f"lora_unet_{key}.alpha"] = torch.tensor(float(alpha))


def _kohya_flux(factors: dict, alpha: float) -> dict[str, torch.Tensor]:
    """sd-scripts' names over BFL's layers: fused q|k|v (and linear1 = q|k|v|mlp-in) as one up matrix."""
    out: dict[str, torch.Tensor] = {}
    blocks = {int(n.split(".")[1]) for n in factors if n.startswith("transformer_blocks.")}
    for i in sorted(blocks):
        p = f"transformer_blocks.{i}."
        for stream, q, rest in (
            ("img", "attn.to_q", ("to_k", "to_v")),
            ("txt", "attn.add_q_proj", ("add_k_proj", "add_v_proj")),
        ):
            names = [p + q, *(p + "attn." + r for r in rest)]
            up = torch.cat([factors[n][1] for n in names])
            _kohya_pair(out, f"double_blocks_{i}_{stream}_attn_qkv", factors[names[0]][0], up, alpha)
        for stream, attn_out, ff in (
            ("img", "attn.to_out.0", "ff"),
            ("txt", "attn.to_add_out", "ff_context"),
        ):
            _kohya_pair(out, f"double_blocks_{i}_{stream}_attn_proj", *factors[p + attn_out], alpha)
            _kohya_pair(out, f"double_blocks_{i}_{stream}_mlp_0", *factors[f"{p}{ff}.net.0.proj"], alpha)
            _kohya_pair(out, f"double_blocks_{i}_{stream}_mlp_2", *factors[f"{p}{ff}.net.2"], alpha)
    blocks = {int(n.split(".")[1]) for n in factors if n.startswith("single_transformer_blocks.")}
    for i in sorted(blocks):
        p = f"single_transformer_blocks.{i}."
        names = [p + "attn.to_q", p + "attn.to_k", p + "attn.to_v", p + "proj_mlp"]
        up = torch.cat([factors[n][1] for n in names])
        _kohya_pair(out, f"single_blocks_{i}_linear1", factors[names[0]][0], up, alpha)
        _kohya_pair(out, f"single_blocks_{i}_linear2", *factors[p + "proj_out"], alpha)
    return out


def _kohya_wan(factors: dict, alpha: float) -> dict[str, torch.Tensor]:
    """musubi-tuner's names over Wan's original layers (blocks_i_self_attn_q, ..._ffn_0)."""
    out: dict[str, torch.Tensor] = {}
    for name, (a, b) in factors.items():
        _, i, module, proj = name.split(".", 3)
        key = (
            f"blocks_{i}_ffn_{proj[4]}"
            if module == "ffn"
            else f"blocks_{i}_{_WAN_KOHYA[module]}_{_WAN_KOHYA[proj]}"
        )
        _kohya_pair(out, key, a, b, alpha)
    return out
