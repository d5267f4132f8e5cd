"""Request bodies (pydantic), and the checks that depend on the server's configured limits.

Fields OpenAI defines but a diffusion model has no use for (quality, style, user, ...) are accepted and
ignored, so that OpenAI clients work unchanged; any other unknown field is an error, so that a misspelt
extension (num_inference_step) is not silently dropped.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from diffserve.server.config import ServerConfig
from diffserve.server.errors import APIError

# Up to 9 digits a side: a well-formed but huge size (100000x100000) gets the limits in its error, not a
# format complaint; longer digit strings are not sizes.
_SIZE = re.compile(r"^(\d{1,9})x(\d{1,9})$")

_MAX_SEED = 2**63 - 1


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    model: str | None = None
    size: str | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=100.0)
    seed: int | None = Field(default=None, ge=0, le=_MAX_SEED)
    user: Any = None  # OpenAI's end-user id: accepted, unused


class _ImageBody(_Body):
    n: int = Field(default=1, ge=1)
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] = "png"
    stream: bool = False
    # OpenAI fields without meaning here
    quality: Any = None
    style: Any = None
    background: Any = None
    moderation: Any = None
    output_compression: Any = None
    partial_images: Any = None
    safety_identifier: Any = None


class ImageGenerationRequest(_ImageBody):
    pass


class ImageEditRequest(_ImageBody):
    strength: float | None = Field(default=None, gt=0.0, le=1.0)
    input_fidelity: Any = None


class VideoCreateRequest(_Body):
    seconds: str | int | float | None = None
    num_frames: int | None = Field(default=None, ge=1)
    fps: int | None = Field(default=None, ge=1, le=120)
    num_inference_steps: int | None = Field(
        default=None, ge=1, validation_alias=AliasChoices("num_inference_steps", "steps")
    )
    # {"image_url": "data:image/png;base64,..."} (JSON); an uploaded file arrives as a form file instead
    input_reference: dict[str, str] | None = None


def limits(meta: dict[str, Any], cfg: ServerConfig) -> dict[str, int | None]:
    """The model's own rules (reported by the worker when the runtime exposes them) within the server's."""
    rules = meta.get("rules") or {}
    return {
        "multiple": rules.get("multiple") or 1,
        "max_side": min(cfg.max_image_side, rules.get("max_side") or cfg.max_image_side),
        "frame_step": rules.get("frame_step"),
        "max_frames": min(cfg.max_frames, rules.get("max_frames") or cfg.max_frames),
    }


def parse_size(size: str | None, lim: dict[str, int | None], param: str = "size") -> tuple[int, int] | None:
    """'WIDTHxHEIGHT' -> (width, height), checked now so that a video job fails at once, not in the worker;
    None or 'auto' -> None (the model's default)."""
    if size is None or size == "auto":
        return None
    m = _SIZE.match(size)
    if not m:
        raise APIError(
            400, f"Invalid size {size[:40]!r}: expected WIDTHxHEIGHT, e.g. 1024x1024.", "invalid_size", param
        )
    w, h = int(m.group(1)), int(m.group(2))
    low, top, multiple = lim["multiple"], lim["max_side"], lim["multiple"]
    if not (low <= w <= top and low <= h <= top) or w % multiple or h % multiple:
        rule = f"multiples of {multiple} " if multiple > 1 else ""
        raise APIError(
            400,
            f"Invalid size {size}: width and height must be {rule}between {low} and {top} for this model.",
            "invalid_size",
            param,
        )
    return w, h


def check_common(body: _Body, cfg: ServerConfig) -> None:
    for name in ("prompt", "negative_prompt"):
        text = getattr(body, name)
        if text is not None and len(text) > cfg.max_prompt_chars:
            raise APIError(
                400,
                f"'{name}' is too long ({len(text)} characters; at most {cfg.max_prompt_chars}).",
                "prompt_too_long",
                name,
            )
    if body.num_inference_steps is not None and body.num_inference_steps > cfg.max_steps:
        raise APIError(
            400,
            f"'num_inference_steps' must be at most {cfg.max_steps}.",
            "invalid_value",
            "num_inference_steps",
        )
    n = getattr(body, "n", 1)
    if n > cfg.max_n:
        raise APIError(400, f"'n' must be at most {cfg.max_n}.", "invalid_value", "n")


def video_frames(
    body: VideoCreateRequest, fps: int, default_frames: int | None, lim: dict[str, int | None]
) -> tuple[int | None, str]:
    """(num_frames, seconds as OpenAI reports it). `seconds` becomes seconds*fps + 1 frames, snapped to the
    model's frame step: video VAEs (Wan's among them) encode the first frame alone, then groups of `step`."""
    if body.num_frames is not None and body.seconds is not None:
        raise APIError(400, "Give 'seconds' or 'num_frames', not both.", "invalid_value", "seconds")
    step, top = lim["frame_step"] or 1, lim["max_frames"]
    frames, param = body.num_frames, "num_frames"
    if body.seconds is not None:
        try:
            seconds = float(body.seconds)
        except ValueError:
            raise APIError(400, "'seconds' must be a number.", "invalid_value", "seconds") from None
        frames, param = max(1, round(seconds * fps / step)) * step + 1, "seconds"
        if not seconds > 0 or frames > top:
            raise APIError(
                400,
                f"'seconds' must be above 0 and at most {(top - 1) / fps:g} at {fps} fps.",
                "invalid_value",
                "seconds",
            )
    if frames is not None and (frames > top or (frames - 1) % step):
        form = f" and of the form k*{step}+1" if step > 1 else ""
        raise APIError(400, f"'num_frames' must be at most {top}{form}.", "invalid_value", param)
    shown = frames if frames is not None else default_frames
    seconds_text = (
        str(body.seconds) if body.seconds is not None else (f"{(shown - 1) / fps:g}" if shown else "0")
    )
    return frames, seconds_text
