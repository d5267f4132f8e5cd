"""The contract between the runtime and its callers (the CLI, the Python API, the server's worker).

Plain dataclasses, no torch: the server process builds `GenerationRequest`s and ships them to the worker
process by pickling, so nothing here may import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# on_step(step_index_done, total_steps): called after every denoising step.
StepCallback = Callable[[int, int], None]
# should_cancel() -> True to stop between denoising steps (raises GenerationCancelled).
CancelCheck = Callable[[], bool]


class GenerationCancelled(Exception):
    """Raised by a pipeline when should_cancel() answered True between two denoising steps."""


class InvalidRequest(ValueError):
    """A request the model cannot serve (bad size for this family, image input to a text-only model, ...).
    Its message is shown to the user as-is."""


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str | None = None
    width: int | None = None  # None -> the family's default
    height: int | None = None
    num_frames: int | None = None  # video families only
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    num_outputs: int = 1
    # image-to-image / edit: PNG/JPEG bytes of the input image (and optional mask), strength in (0, 1]
    image: bytes | None = None
    mask: bytes | None = None
    strength: float | None = None
    fps: int | None = None
    is_warmup: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class GenerationResult:
    # Images: a list of PIL.Image (one per output). Videos: a list of videos, each a list of PIL.Image frames.
    images: list[Any] = field(default_factory=list)
    videos: list[list[Any]] = field(default_factory=list)
    fps: int | None = None
    seed: int | None = None  # the seed used (drawn at random when the request gave none)
    width: int = 0
    height: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # stage name -> seconds
    # DiT forwards of the denoising loop, one per branch (a CFG step counts 2): {"computed": n, "cached": m},
    # "cached" being those the step cache (runtime/step_cache.py) reused. Empty when not counted.
    dit_forwards: dict[str, int] = field(default_factory=dict)
