"""The contract between the runtime and its callers (the CLI, the Python API, the server's worker).

Plain dataclasses, no torch: the server process builds `GenerationRequest`s and ships them to the worker
process by pickling, so nothing here may import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

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
    negative_prompt: Optional[str] = None
    width: Optional[int] = None  # None -> the family's default
    height: Optional[int] = None
    num_frames: Optional[int] = None  # video families only
    num_inference_steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    seed: Optional[int] = None
    num_outputs: int = 1
    # image-to-image / edit: PNG/JPEG bytes of the input image (and optional mask), strength in (0, 1]
    image: Optional[bytes] = None
    mask: Optional[bytes] = None
    strength: Optional[float] = None
    fps: Optional[int] = None
    is_warmup: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class GenerationResult:
    # Images: a list of PIL.Image (one per output). Videos: a list of videos, each a list of PIL.Image frames.
    images: list[Any] = field(default_factory=list)
    videos: list[list[Any]] = field(default_factory=list)
    fps: Optional[int] = None
    seed: Optional[int] = None  # the seed used (drawn at random when the request gave none)
    width: int = 0
    height: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # stage name -> seconds
