"""Find a model (local diffusers directory or Hugging Face id in the local cache), check it, detect its
family, and load its components straight onto the target device and dtype.

Every problem a user can cause here (wrong path, half-downloaded weights, a pipeline diffusers doesn't
know, a misspelled dtype) raises `ModelLoadError` with one line that says what is wrong and what to do.
The checks run before any weight is read, so a truncated 20 GB file fails in milliseconds.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# model_index.json `_class_name` -> the family whose native pipeline runs it; anything else is "generic".
FAMILY_BY_PIPELINE = {
    "FluxPipeline": "flux",
    "FluxImg2ImgPipeline": "flux",
    "FluxKontextPipeline": "flux-kontext",  # FLUX.1 Kontext: the FLUX DiT, reference-image tokens
    "WanPipeline": "wan",
    "WanImageToVideoPipeline": "wan-i2v",  # Wan2.1-I2V, Wan2.2-I2V-A14B: the Wan DiT with image conditioning
    "QwenImagePipeline": "qwen-image",
    "QwenImageEditPipeline": "qwen-image-edit",
}
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# Only what a diffusers-format snapshot needs: FLUX repos also hold 20+ GB single-file checkpoints at the root.
_SNAPSHOT_PATTERNS = [
    "model_index.json",
    "*/*.json",
    "*/*.safetensors",
    "*/*.txt",
    "*/*.model",
    "*/*.tiktoken",
]


class ModelLoadError(Exception):
    """A model that cannot be loaded; the message is one line meant for the user."""


@dataclass
class ModelSpec:
    """A checked model directory: where it is, what the user called it, and what it contains."""

    path: Path
    model_id: str
    family: str  # "flux" | "wan" | "generic"
    pipeline_class: str
    index: dict[str, Any] = field(repr=False)

    def components(self) -> dict[str, tuple[str, str]]:
        """name -> (library, class) for every component present in model_index.json."""
        out = {}
        for name, value in self.index.items():
            if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
                continue
            out[name] = (value[0], value[1])
        return out

    def config(self, component: str) -> dict[str, Any]:
        folder = self.path / component
        name = "scheduler_config.json" if (folder / "scheduler_config.json").exists() else "config.json"
        return json.loads((folder / name).read_text())

    def runtime_defaults(self) -> dict[str, Any]:
        """Request defaults a model ships in its own `diffserve.json` (the bundled model is trained at 128x128
        and 20 steps, far from FLUX.1-dev's 1024x1024 and 28). Unknown keys are ignored; bad values fail."""
        file = self.path / RUNTIME_DEFAULTS_FILE
        if not file.is_file():
            return {}
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{file} is not valid JSON ({e})") from None
        out = {}
        for key, (name, kind) in RUNTIME_DEFAULT_KEYS.items():
            if key in raw:
                value = raw[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise ModelLoadError(f"{file}: {key} must be a non-negative number, got {value!r}")
                out[name] = kind(value)
        return out


RUNTIME_DEFAULTS_FILE = "diffserve.json"
RUNTIME_DEFAULT_KEYS = {  # key in diffserve.json -> (request default it sets, type)
    "default_width": ("width", int),
    "default_height": ("height", int),
    "default_steps": ("num_inference_steps", int),
    "default_guidance": ("guidance_scale", float),
    "default_num_frames": ("num_frames", int),
    "default_fps": ("fps", int),
}


def default_model_path() -> Path:
    """The small FLUX-architecture model bundled with the package (used when no --model is given)."""
    return Path(__file__).resolve().parent.parent / "assets" / "default_model"


def parse_dtype(dtype: str | None, device: str):
    """'bf16' | 'fp16' | 'fp32' (and their long names) -> torch.dtype; None -> bf16 on GPUs, fp32 on CPU."""
    import torch

    from diffserve.runtime.config import canonical_dtype

    if dtype is None:
        return torch.float32 if device_type(device) == "cpu" else torch.bfloat16
    try:
        return getattr(torch, canonical_dtype(str(dtype)))
    except ValueError as e:
        raise ModelLoadError(str(e)) from None


def default_device() -> str:
    """The first accelerator torch can see (CUDA and ROCm both answer to 'cuda'), else the CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    return "cpu"


def device_type(device: str) -> str:
    return str(device).split(":")[0]


def resolve_model(model: str | os.PathLike | None) -> tuple[Path, str]:
    """--model value -> (local directory, model id). None -> the bundled default model.

    A Hugging Face id is looked up in the local cache only; it is downloaded only when
    DIFFSERVE_ALLOW_DOWNLOAD=1 and HF_HUB_OFFLINE is not set (tests and servers never download by surprise).
    """
    if model is None:
        path = default_model_path()
        if not (path / "model_index.json").exists():
            raise ModelLoadError(
                f"no --model given and the bundled default model is not installed ({path}); "
                "pass --model DIR_OR_HF_ID"
            )
        return path, "diffserve-default"
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path {text} is a file; pass the diffusers model directory")
        return path, path.resolve().name
    if not _HF_ID.match(text) or text.startswith((".", "/", "~")):
        raise ModelLoadError(f"model directory not found: {text}")
    return _from_hf_cache(text), text


def _from_hf_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    from diffserve import envs

    online = envs.DIFFSERVE_ALLOW_DOWNLOAD and not envs.HF_HUB_OFFLINE
    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=_SNAPSHOT_PATTERNS, local_files_only=not online)
        )
    except Exception as e:  # LocalEntryNotFoundError, RepositoryNotFoundError, network errors
        hint = (
            f"download it first (hf download {repo_id}) or set DIFFSERVE_ALLOW_DOWNLOAD=1"
            if not online
            else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        )
        raise ModelLoadError(
            f"model {repo_id!r} is neither a local directory nor in the Hugging Face cache; {hint}"
        ) from None


def detect_family(index: dict[str, Any]) -> str:
    """flux | wan | generic, from model_index.json's pipeline class."""
    name = index.get("_class_name", "")
    if name in FAMILY_BY_PIPELINE:
        return FAMILY_BY_PIPELINE[name]
    import diffusers

    if not name or not hasattr(diffusers, name):
        raise ModelLoadError(
            f"unknown model family: model_index.json names pipeline {name!r}, which neither "
            f"diffserve nor diffusers {diffusers.__version__} knows"
        )
    return "generic"


def inspect_model(model: str | os.PathLike | None) -> ModelSpec:
    """Resolve and check a model without loading any weight."""
    path, model_id = resolve_model(model)
    index_file = path / "model_index.json"
    if not index_file.exists():
        raise ModelLoadError(f"{path} has no model_index.json: not a diffusers-format model directory")
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{index_file} is not valid JSON ({e})") from None
    if not isinstance(index, dict):
        raise ModelLoadError(f"{index_file} is not a JSON object")
    spec = ModelSpec(path, model_id, detect_family(index), index.get("_class_name", ""), index)
    for name, (_, cls) in spec.components().items():
        check_component(path / name, name, cls)
    spec.runtime_defaults()  # a broken diffserve.json fails here, before any weight is read
    return spec


def _kind(cls: str) -> str:
    if cls.endswith("Scheduler") or cls.endswith("SchedulerMultistep"):
        return "scheduler"
    if "Tokenizer" in cls or cls == "TokenizersBackend":
        return "tokenizer"
    if cls.endswith(("Processor", "FeatureExtractor")):
        return "processor"
    return "model"


def check_component(folder: Path, name: str, cls: str) -> None:
    """Raise ModelLoadError unless `folder` holds what a component of class `cls` needs, weights complete."""
    if not folder.is_dir():
        raise ModelLoadError(f"component {name!r} ({cls}) is missing: no directory {folder}")
    kind = _kind(cls)
    if kind == "scheduler" and not (folder / "scheduler_config.json").exists():
        raise ModelLoadError(f"component {name!r}: {folder / 'scheduler_config.json'} is missing")
    if kind == "tokenizer" and not any(
        (folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        raise ModelLoadError(f"component {name!r}: no tokenizer.json or tokenizer_config.json in {folder}")
    if kind != "model":
        return
    if not (folder / "config.json").exists():
        raise ModelLoadError(f"component {name!r}: {folder / 'config.json'} is missing")
    weights = _weight_files(folder, name)
    if not weights:
        raise ModelLoadError(f"component {name!r}: no weights (*.safetensors) in {folder}")
    for f in weights:
        if f.suffix == ".safetensors":
            check_safetensors(f, name)


def _weight_files(folder: Path, name: str) -> list[Path]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            shards = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ModelLoadError(
                f"component {name!r}: {indexes[0]} is not a valid shard index ({e})"
            ) from None
        missing = [s for s in shards if not (folder / s).exists()]
        if missing:
            raise ModelLoadError(
                f"component {name!r}: shard {folder / missing[0]} is missing "
                f"({len(missing)} of {len(shards)} shards missing)"
            )
        return [folder / s for s in shards]
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))


def check_safetensors(file: Path, name: str = "") -> None:
    """A safetensors file is 8 bytes of header length, a JSON header, then the tensor bytes the header
    points into: a file shorter than the last tensor's end is truncated (an interrupted download)."""
    size = file.stat().st_size
    where = f"component {name!r}: " if name else ""
    try:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{where}{file} is not a valid safetensors file ({e})") from None
    expected = 8 + header_len + end
    if size < expected:
        raise ModelLoadError(
            f"{where}{file} is truncated: {size} bytes, expected {expected} (re-download the model)"
        )


# ---- loading -----------------------------------------------------------------------------------------


def load_text_encoder(folder: Path, cls: str, device: str, dtype, attention_backend: str | None):
    """A transformers text encoder, weights read straight to `device` in `dtype`, with our attention."""
    import transformers

    from diffserve.runtime.layers.text_attention import apply_to_text_encoder

    model_cls = getattr(transformers, cls, None)
    if model_cls is None:
        raise ModelLoadError(f"{folder.name}: transformers {transformers.__version__} has no class {cls}")
    model = model_cls.from_pretrained(folder, dtype=dtype, device_map={"": device}).eval()
    return apply_to_text_encoder(model, attention_backend)


def load_tokenizer(folder: Path, cls: str):
    import transformers

    tok_cls = getattr(transformers, cls, None) or transformers.AutoTokenizer
    return tok_cls.from_pretrained(folder)


def load_scheduler(folder: Path, cls: str):
    import diffusers

    sched_cls = getattr(diffusers, cls, None)
    if sched_cls is None:
        raise ModelLoadError(f"{folder.name}: diffusers {diffusers.__version__} has no scheduler {cls}")
    return sched_cls.from_pretrained(folder)


def diffusers_dtype_kwarg(dtype) -> dict:
    """diffusers >= 0.42 names the argument `dtype` (and warns on `torch_dtype`); older ones `torch_dtype`."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def load_diffusers_model(folder: Path, cls: str, device: str, dtype):
    """A diffusers model (VAE, or a DiT on the generic path), loaded without materialising a CPU copy first."""
    import diffusers

    model_cls = getattr(diffusers, cls, None)
    if model_cls is None:
        raise ModelLoadError(f"{folder.name}: diffusers {diffusers.__version__} has no model class {cls}")
    return model_cls.from_pretrained(folder, device_map={"": device}, **diffusers_dtype_kwarg(dtype)).eval()


def dit_class(family: str):
    """Our native DiT for `family`: `from_pretrained(transformer_dir, device, dtype)` and diffusers' forward."""
    if family in ("flux", "flux-kontext"):
        from diffserve.runtime.models.flux import FluxTransformer

        return FluxTransformer
    if family in ("wan", "wan-i2v"):
        from diffserve.runtime.models.wan import WanTransformer

        return WanTransformer
    if family in ("qwen-image", "qwen-image-edit"):
        from diffserve.runtime.models.qwen_image import QwenImageTransformer

        return QwenImageTransformer
    raise ModelLoadError(f"no native DiT for family {family!r}")


def load_dit(
    folder: Path, family: str, device: str, dtype, compile: bool = False, quantization: str | None = None
):
    """The native DiT on its device, projections fused (q|k|v as one GEMM: measured 177 -> 126 ms per FLUX.1-dev
    forward on an H100 together with the fused Triton ops, benchmarks/RESULTS.md). Fusing after the move to
    the device keeps one copy of the weights. With compile=True (`--compile`) its blocks are also
    torch.compiled under the persistent cache (runtime/compile.py): compilation happens in the warm-up.
    quantization="fp8" (`--quantization fp8`) swaps its linear layers for FP8 ones (runtime/layers/fp8.py)
    after the fusion, so the fused q|k|v weights are quantised as one."""
    from diffserve.runtime.compile import optimize_dit

    model = dit_class(family).from_pretrained(folder, device, dtype).eval()
    if compile:
        # Resolve the attention kernel now, eagerly: the platform probe (imports) must stay out of the
        # traced blocks (compile_dit's rule), and the first forward is compiled.
        from diffserve.runtime.layers.attention import get_attention_backend

        get_attention_backend(model.config.attention_head_dim, model.dtype)
    if quantization is None:
        return optimize_dit(model, compile=compile)
    optimize_dit(model, compile=False)  # fuse first; compile (if asked) the quantised blocks
    stats = quantize_dit(model, quantization, family, device)
    logger.info(
        "fp8: %d GEMMs quantised, DiT linear weights %.2f -> %.2f GB%s",
        stats["count"],
        stats["bytes_before"] / 1e9,
        stats["bytes_after"] / 1e9,
        f", {len(stats['skipped'])} left as they were" if stats["skipped"] else "",
    )
    return optimize_dit(model, fuse=False, compile=compile)


def quantize_dit(model, quantization: str, family: str, device) -> dict:
    """`--quantization fp8 | fp8-attention` applied to a fused native DiT in place: FP8 linear layers, and for
    fp8-attention the attention too (or ModelLoadError where it cannot run). Returns quantize_linears'
    stats. The benchmarks quantise through here as the loader does; CUDA graphs captured before read the
    replaced layers, so drop them first."""
    from diffserve.runtime.layers.fp8 import quantize_linears

    stats = quantize_linears(model)
    if quantization == "fp8-attention":
        _fp8_attention(model, family, device)
    return stats


def _fp8_attention(model, family: str, device) -> None:
    """`--quantization fp8-attention`'s attention half, or ModelLoadError (one line) where it cannot run."""
    import torch

    from diffserve.runtime.layers.attention import (
        fp8_attention_unsupported,
        get_attention_backend,
        use_fp8_attention,
    )

    if not use_fp8_attention(model):
        raise ModelLoadError(
            f"--quantization fp8-attention: the {family} DiT has no FP8 attention (FLUX, Wan and Qwen-Image have)"
        )
    device_type = torch.device(device).type
    backend = get_attention_backend(model.config.attention_head_dim, model.dtype, device_type)
    reason = fp8_attention_unsupported(backend, device_type)
    if reason:
        raise ModelLoadError(reason)


def load_components(
    spec: ModelSpec,
    device: str,
    dtype,
    attention_backend: str | None = None,
    compile: bool = False,
    quantization: str | None = None,
    offload: str | None = None,
) -> dict:
    """Every component of a flux/wan model: DiTs native, the rest through transformers/diffusers. With
    `offload` (--offload), the components it keeps in host memory load on the CPU (offload.offloaded):
    runtime/offload.apply then pins them and moves what stays resident."""
    from diffserve.runtime.offload import offloaded

    out = {}
    target = device
    for name, (library, cls) in spec.components().items():
        folder = spec.path / name
        kind = _kind(cls)
        device = "cpu" if offloaded(name, offload) else target
        try:
            if kind == "scheduler":
                out[name] = load_scheduler(folder, cls)
            elif kind == "tokenizer":
                out[name] = load_tokenizer(folder, cls)
            elif kind == "processor":
                if spec.family not in ("qwen-image-edit", "wan-i2v"):
                    continue  # image encoders for IP-adapters: not used by our pipelines
                # Qwen-Image-Edit: the VL encoder's image patches; Wan2.1-I2V: the CLIP vision encoder's. Only the image processor: the processor
                # class itself cannot be built without torchvision in transformers 5 (its video processor).
                import transformers

                out[name] = transformers.AutoImageProcessor.from_pretrained(folder)
            elif name.startswith("transformer"):
                out[name] = load_dit(folder, spec.family, device, dtype, compile, quantization)
            elif library == "transformers":
                out[name] = load_text_encoder(folder, cls, device, dtype, attention_backend)
            else:
                out[name] = load_diffusers_model(folder, cls, device, dtype)
        except ModelLoadError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(f"component {name!r} ({cls}) failed to load from {folder}: {first}") from e
    return out
