"""Request bodies (pydantic), and the checks that depend on the server's configured limits.

Fields OpenAI defines but a diffusion model has no use for (quality, style, user, ...) are accepted and
ignored, so that OpenAI clients work unchanged; any other unknown field is an error, so that a misspelt
extension (num_inference_step) is not silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from diffserve.runtime import limits
from diffserve.runtime.api import GenerationRequest
from diffserve.runtime.limits import LimitError, ModelLimits
from diffserve.server.config import ServerConfig
from diffserve.server.errors import APIError

# _Body fields that go to GenerationRequest.extra
EXTENSIONS = ("step_cache_threshold", "true_cfg_scale", "lora")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Ranges (empty prompt, steps, seed, guidance, n, fps, frames) are checked by runtime/limits.py, which the
    # CLI runs too: pydantic checks types only, so that both give the same verdict with the same words.
    prompt: str
    model: str | None = None
    size: str | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    user: Any = None  # OpenAI's end-user id: accepted, unused
    # Extensions (the openai client sends them through extra_body); they travel in GenerationRequest.extra.
    step_cache_threshold: float | None = None  # runtime/step_cache.py; 0 turns caching off for this request
    # True CFG with negative_prompt (FLUX: off unless > 1; Qwen-Image: 4.0 by default, as diffusers)
    true_cfg_scale: float | None = None
    # LoRA adapters by name with their scales, {"NAME": scale, ...} (runtime/lora.py); any JSON here, so
    # that runtime/limits.check_lora gives the one message the CLI gives too
    lora: Any = None

    def extra(self) -> dict[str, Any]:
        """The extension fields the request gives, as GenerationRequest.extra."""
        return {k: getattr(self, k) for k in EXTENSIONS if getattr(self, k) is not None}


class _ImageBody(_Body):
    n: int = 1
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
    strength: float | None = None
    input_fidelity: Any = None


class VideoCreateRequest(_Body):
    seconds: str | int | float | None = None
    num_frames: int | None = None
    fps: int | None = None
    num_inference_steps: int | None = Field(
        default=None, validation_alias=AliasChoices("num_inference_steps", "steps")
    )
    # {"image_url": "data:image/png;base64,..."} (JSON); an uploaded file arrives as a form file instead
    input_reference: dict[str, str] | None = None


def model_limits(meta: dict[str, Any], cfg: ServerConfig) -> ModelLimits:
    """The server's limits within the model's own rules (reported by the worker when the runtime has them)."""
    return cfg.limits.for_model(meta.get("rules"))


def _api_error(e: LimitError) -> APIError:
    message = e.args[0]
    return APIError(400, message[0].upper() + message[1:] + ".", e.code, e.param)


def parse_size(size: str | None, lim: ModelLimits, param: str = "size") -> tuple[int, int] | None:
    """'WIDTHxHEIGHT' -> (width, height), checked now so that a video job fails at once, not in the worker;
    None or 'auto' -> None (the model's default)."""
    if size is None or size == "auto":
        return None
    try:
        w, h = limits.parse_size(size, param)
        limits.check_size(w, h, lim, param)
    except LimitError as e:
        raise _api_error(e) from None
    return w, h


def check_generation(gen: GenerationRequest, lim: ModelLimits, task: str) -> None:
    """The shared request checks (runtime/limits.py, which `diffserve generate` runs too) as API errors."""
    try:
        limits.check_request(gen, lim, task)
    except LimitError as e:
        raise _api_error(e) from None


def video_frames(
    body: VideoCreateRequest, fps: int, default_frames: int | None, lim: ModelLimits
) -> tuple[int | None, str]:
    """(num_frames, seconds as OpenAI reports it). `seconds` becomes seconds*fps + 1 frames, snapped to the
    model's frame step: video VAEs (Wan's among them) encode the first frame alone, then groups of `step`.
    `fps` has passed the limits already."""
    if body.num_frames is not None and body.seconds is not None:
        raise APIError(400, "Give 'seconds' or 'num_frames', not both.", "invalid_value", "seconds")
    step, top = lim.frame_step or 1, lim.max_frames
    frames, param = body.num_frames, "num_frames"
    if body.seconds is not None:
        try:
            seconds = float(body.seconds)
        except ValueError:
            raise APIError(400, "'seconds' must be a number.", "invalid_value", "seconds") from None
        frames, param = max(1, round(seconds * fps / step)) * step + 1, "seconds"
        if not 0 < seconds < float("inf") or frames > top:
            raise APIError(
                400,
                f"'seconds' must be above 0 and at most {(top - 1) / fps:g} at {fps} fps.",
                "invalid_value",
                "seconds",
            )
    if frames is not None:
        try:
            limits.check_frames(frames, lim, param)
        except LimitError as e:
            raise _api_error(e) from None
    shown = frames if frames is not None else default_frames
    seconds_text = (
        str(body.seconds) if body.seconds is not None else (f"{(shown - 1) / fps:g}" if shown else "0")
    )
    return frames, seconds_text
