"""Read a diffusers-format transformer directory: config.json plus one safetensors file or an indexed set
of shards. Tensors go straight to the target device and dtype, one at a time, so loading never holds a
second full copy of the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json in the transformer directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def shard_plan(model_dir: str | Path) -> dict[Path, list[str] | None]:
    """Shard file -> the tensor names the index assigns to it (None: every tensor in a single file)."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index with a weight_map ({e})") from None
        plan: dict[Path, list[str]] = {}
        for name, shard in weight_map.items():
            plan.setdefault(model_dir / shard, []).append(name)
        return plan
    single = model_dir / WEIGHTS_NAME
    if single.is_file():
        return {single: None}
    raise FileNotFoundError(f"{single}: no weights in {model_dir} (expected {WEIGHTS_NAME} or {INDEX_NAME})")


def _open_device(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def iter_tensors(
    model_dir: str | Path, device: torch.device | str, dtype_for: Callable[[str], torch.dtype]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from every shard, each on `device` and cast to dtype_for(name).

    A missing shard raises FileNotFoundError and a truncated or corrupt one ValueError, each naming the file.
    """
    from safetensors import SafetensorError, safe_open

    device = torch.device(device)
    for path, names in shard_plan(model_dir).items():
        if not path.is_file():
            raise FileNotFoundError(f"{path}: weight shard listed in the index is missing")
        try:
            with safe_open(str(path), framework="pt", device=_open_device(device)) as f:
                available = set(f.keys())
                wanted = sorted(available) if names is None else names
                absent = [n for n in wanted if n not in available]
                if absent:
                    raise ValueError(
                        f"{path}: index lists {len(absent)} tensors the file lacks, e.g. {absent[0]}"
                    )
                for name in wanted:
                    yield name, f.get_tensor(name).to(dtype_for(name))
        except SafetensorError as e:
            raise ValueError(f"{path}: truncated or corrupt safetensors file ({e})") from None
