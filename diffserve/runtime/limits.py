"""Request limits and the checks against them: one module that `diffserve generate` and the server both call,
so that the same input gets the same verdict from either (tests/integration/test_cli_server_agreement.py).

Two layers of limits meet here:
* the serving policy (`Limits`): what an operator allows per request (prompt length, largest side, steps,
  outputs, frames, fps). The server's flags set it; the CLI uses the same defaults.
* the model's own rules (`ModelRules`, reported by the loaded pipeline): sizes in multiples of the
  VAE x patch factor, frame counts of the form k*step+1, the largest side its position table covers.
`Limits.for_model(rules)` is the tighter of the two, and `check_request` checks a GenerationRequest against it.

No torch here: the API process imports this module.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any

from diffserve.runtime.api import GenerationRequest, InvalidRequest

# 2^63-1: the largest seed every layer takes as a plain integer (JSON clients' int64, numpy's and torch's
# generators). The runtime draws unseeded requests' seeds below 2^32.
MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 100.0

# Up to 9 digits a side: a well-formed but huge size (100000x100000) gets the limits in its error, not a
# format complaint; longer digit strings are not sizes.
_SIZE = re.compile(r"^\s*(\d{1,9})\s*[xX]\s*(\d{1,9})\s*$")


class LimitError(InvalidRequest):
    """A request outside the limits: `param` names the offending field, `code` is the API's error code."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.param = param
        self.code = code


def parse_size(text: str, param: str = "size") -> tuple[int, int]:
    """'WIDTHxHEIGHT' -> (width, height): the one size grammar (CLI --size, --warmup-resolutions, the API's
    `size`). Checks the form only; check_size checks the numbers against a model's limits."""
    m = _SIZE.match(text) if isinstance(text, str) else None
    if not m:
        shown = text[:40] if isinstance(text, str) else text
        raise LimitError(
            f"invalid size {shown!r}: expected WIDTHxHEIGHT, e.g. 1024x1024", param, "invalid_size"
        )
    return int(m.group(1)), int(m.group(2))


def parse_sizes(text: str | None, param: str = "size") -> list[tuple[int, int]] | None:
    """'1024x1024,768x1344' -> [(1024, 1024), (768, 1344)]; None or '' -> None."""
    if not text:
        return None
    return [parse_size(part, param) for part in text.split(",")]


@dataclass(frozen=True)
class Limits:
    """The serving policy: per-request bounds an operator sets (`diffserve serve --max-...`)."""

    max_prompt_chars: int = 8192
    max_side: int = 2048  # output width and height
    max_steps: int = 200
    max_n: int = 10
    max_frames: int = 257
    max_fps: int = 120

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"{f.name} must be at least 1")

    def for_model(self, rules: dict[str, Any] | None) -> ModelLimits:
        """These limits within a model's own rules ({multiple, max_side, frame_step, max_frames}; any may be
        missing or None: a runtime that reports no rules is held to the policy alone)."""
        rules = rules or {}
        return ModelLimits(
            policy=self,
            multiple=rules.get("multiple") or 1,
            max_side=min(self.max_side, rules.get("max_side") or self.max_side),
            frame_step=rules.get("frame_step"),
            max_frames=min(self.max_frames, rules.get("max_frames") or self.max_frames),
            loras=None if rules.get("loras") is None else tuple(rules["loras"]),
            max_loras=rules.get("max_loras"),
        )


@dataclass(frozen=True)
class ModelLimits:
    policy: Limits
    multiple: int
    max_side: int
    frame_step: int | None  # None: the model makes images
    max_frames: int
    loras: tuple[str, ...] | None = None  # the LoRA adapters served (--lora); None: not known here
    max_loras: int | None = None  # adapters one request may combine (--max-loras)


def rules_of(runner) -> dict[str, Any]:
    """A runner's size/frame rules as a plain dict (what the worker reports to the API process), with the
    LoRA adapters it serves."""
    rules = getattr(getattr(runner, "pipeline", None), "rules", None)
    out = {k: getattr(rules, k, None) for k in ("multiple", "max_side", "frame_step", "max_frames")}
    return {**out, **lora_rules(runner)}


def lora_rules(runner) -> dict[str, Any]:
    """{"loras": the adapter names a runner serves, "max_loras": how many one request may combine}."""
    loras = getattr(runner, "loras", None)
    names = list(getattr(runner, "lora_names", None) or [])
    slots = getattr(getattr(loras, "state", None), "slots", None)
    return {"loras": names, "max_loras": slots}


def check_lora(value: Any, lim: ModelLimits) -> None:
    """The request extension `lora`: {"NAME": scale, ...}, names among the served adapters, scales finite
    numbers, at most max_loras adapters with a non-zero scale (those must be resident at once)."""
    example = 'e.g. {"style": 0.8}'
    if not isinstance(value, dict):
        raise LimitError(f"'lora' must be an object of adapter names and scales, {example}", "lora")
    known = lim.loras
    for name, scale in value.items():
        if known is not None and name not in known:
            served = f"known adapters are {', '.join(known)}" if known else "this server has no LoRA adapters"
            raise LimitError(f"unknown LoRA adapter {name!r}: {served}", "lora", "unknown_lora")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise LimitError(f"'lora' scale of {name!r} must be a finite number, got {scale!r}", "lora")
    used = sum(1 for scale in value.values() if scale != 0)
    if lim.max_loras is not None and used > lim.max_loras:
        raise LimitError(
            f"'lora': at most {lim.max_loras} adapters at once on this server (--max-loras), got {used}",
            "lora",
        )


def check_size(width: int, height: int, lim: ModelLimits, param: str = "size") -> None:
    low, top, multiple = lim.multiple, lim.max_side, lim.multiple
    if not (low <= width <= top and low <= height <= top) or width % multiple or height % multiple:
        rule = f"multiples of {multiple} " if multiple > 1 else ""
        raise LimitError(
            f"invalid size {width}x{height}: width and height must be {rule}between {low} and {top} "
            "for this model",
            param,
            "invalid_size",
        )


def check_frames(frames: int, lim: ModelLimits, param: str = "num_frames") -> None:
    step = lim.frame_step or 1
    if frames < 1 or frames > lim.max_frames or (frames - 1) % step:
        form = f" and of the form k*{step}+1" if step > 1 else ""
        raise LimitError(f"'num_frames' must be between 1 and {lim.max_frames}{form}, got {frames}", param)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _in_range(name: str, value: Any, low, high, integer: bool = True) -> None:
    ok = _integer(value) if integer else isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise LimitError(f"'{name}' must be {kind} between {low:g} and {high:g}, got {value!r}", name)


def check_request(req: GenerationRequest, lim: ModelLimits, task: str) -> None:
    """Everything about `req` that the limits decide (task: 'image' | 'video'). Raises LimitError with a
    one-line message naming the field. Fields left None take the model's defaults, which are not checked
    here (a model's own defaults fit its rules: stages.fit_defaults)."""
    p = lim.policy
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise LimitError("'prompt' must not be empty", "prompt")
    for name in ("prompt", "negative_prompt"):
        text = getattr(req, name)
        if text is not None and len(text) > p.max_prompt_chars:
            raise LimitError(
                f"'{name}' is too long ({len(text)} characters; at most {p.max_prompt_chars})",
                name,
                "prompt_too_long",
            )
    if (req.width is None) != (req.height is None):
        raise LimitError("give both width and height, or neither", "size", "invalid_size")
    if req.width is not None:
        check_size(req.width, req.height, lim)
    if req.num_inference_steps is not None:
        _in_range("num_inference_steps", req.num_inference_steps, 1, p.max_steps)
    if req.guidance_scale is not None:
        _in_range("guidance_scale", req.guidance_scale, 0.0, MAX_GUIDANCE, integer=False)
    if req.seed is not None:
        _in_range("seed", req.seed, 0, MAX_SEED)
    _in_range("n", req.num_outputs, 1, p.max_n)
    if req.strength is not None:
        if (
            isinstance(req.strength, bool)
            or not isinstance(req.strength, (int, float))
            or not (0.0 < req.strength <= 1.0)
        ):
            raise LimitError(f"'strength' must be in (0, 1], got {req.strength!r}", "strength")
    if req.extra.get("lora") is not None:
        check_lora(req.extra["lora"], lim)
    threshold = req.extra.get("step_cache_threshold")
    if threshold is not None:
        _in_range("step_cache_threshold", threshold, 0.0, 1.0, integer=False)  # step_cache.MAX_THRESHOLD
    if task == "video":
        if req.num_frames is not None:
            check_frames(req.num_frames, lim)
        if req.fps is not None:
            _in_range("fps", req.fps, 1, p.max_fps)
    else:
        if req.num_frames not in (None, 1):
            raise LimitError("this model makes images: 'num_frames' is not accepted", "num_frames")
        if req.fps is not None:
            raise LimitError("this model makes images: 'fps' is not accepted", "fps")
