"""The contract between the runtime and its callers (the CLI, the Python API, the server's worker).

Plain dataclasses, no torch: the server process builds `GenerationRequest`s and ships them to the worker
process by pickling, so nothing here may import torch.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
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
    # This result's share of the runner call it ran in (its outputs / the call's outputs): dit_forwards and
    # timings are the whole call's, so that a forward shared by a batch counts once over its requests.
    forward_share: float = 1.0


# ---- which requests may share one runner call ------------------------------------------------------------

# GenerationRequest.extra keys that a family's batched forward takes per sample (a scale broadcast over the
# batch); every other extra key is a shared setting, part of the batch key. The per-sample fields are
# prompt, negative_prompt, seed, guidance_scale, num_outputs (and fps for videos).
PER_SAMPLE_EXTRA: dict[str, tuple[str, ...]] = {
    "flux": ("true_cfg_scale",),  # true CFG: neg + scale * (cond - neg), scale per sample
    "wan": ("guidance_scale_2",),  # Wan2.2 A14B's second expert's CFG scale, per sample like the first
}
STEP_CACHE_KEY = "step_cache_threshold"  # = runtime.step_cache.REQUEST_KEY (that module imports torch)


def batch_key(
    req: GenerationRequest,
    family: str,
    defaults: Mapping[str, Any],
    *,
    samples: bool = True,
    step_cache: bool = False,
) -> Hashable | None:
    """Which requests may share one runner call: requests with equal keys may, None shares with nothing.
    One rule for the server's engine (tickets.merge_key, with the facts the worker reports) and the runtime
    (Runner.generate_batch, which groups a list of requests by it), so both always agree.

    ("samples", ...): one forward over all the requests' samples (the native FLUX and Wan pipelines, when
    `samples`), each keeping its own prompt, negative prompt, seed (its noise drawn from its own generator,
    as alone), guidance scale, true CFG / second-expert scale and output count. The key holds what the
    forward shares: the size (defaults filled in), steps, frame count, whether CFG runs (a second branch in
    every step: FLUX's true CFG when true_cfg_scale > 1 with a negative prompt, Wan's when guidance > 1) and
    every other `extra` setting. The model, its quantisation and its adapters are the worker's, shared by
    construction.

    ("merge", ...): identical unseeded requests only, run as one request whose num_outputs is their sum
    (their outputs come from one seed, so a share reports none). Any runner can do that: the generic
    diffusers path, a parallel runner, or a request with step caching on (`step_cache`: the runner's default
    is on; a request's own threshold overrides it): the cache decides per step for the whole batch from the
    sum over its samples, so a request batched with others would not get the picture it gets alone.

    None: image inputs (edits), warm-up requests, and seeded requests that can only merge."""
    if req.image is not None or req.mask is not None or req.is_warmup:
        return None
    extra = dict(req.extra or {})
    if "lora" in extra:  # one key per adapter set, however the request spelled it
        extra["lora"] = lora_set(extra["lora"])
    threshold = extra.get(STEP_CACHE_KEY)
    caching = step_cache if threshold is None else threshold != 0
    if samples and family in PER_SAMPLE_EXTRA and not caching:
        key = _samples_key(req, family, defaults, extra)
        if key is not None:
            return key
    if req.seed is not None:
        return None
    return (
        "merge",
        req.prompt,
        req.negative_prompt,
        req.width,
        req.height,
        req.num_frames,
        req.num_inference_steps,
        req.guidance_scale,
        req.strength,
        req.fps,
        repr(sorted(extra.items())),
    )


def lora_set(value: Any) -> Hashable:
    """A request's `lora` extension as its adapter set: ((name, scale), ...) sorted, zero scales dropped
    (a zero adds nothing: the base model's batch); anything malformed as its repr (it fails alone later).
    Requests with different sets never share a batch: each batch runs one set (runtime/lora.py)."""
    if not isinstance(value, Mapping):
        return repr(value)
    try:
        return tuple(sorted((str(k), float(v)) for k, v in value.items() if float(v) != 0.0)) or None
    except (TypeError, ValueError):
        return repr(value)


def _samples_key(req: GenerationRequest, family: str, defaults: Mapping[str, Any], extra: dict):
    """The ("samples", ...) key, or None when a value is malformed (that request runs alone, and fails alone
    with the pipeline's own message)."""

    def filled(value, name):
        value = defaults.get(name) if value is None else value
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    shared = [filled(req.width, "width"), filled(req.height, "height")]
    shared.append(filled(req.num_inference_steps, "num_inference_steps"))
    if family == "flux":
        true_cfg = extra.get("true_cfg_scale", 1.0)
        if not isinstance(true_cfg, (int, float)) or isinstance(true_cfg, bool):
            return None
        cfg = true_cfg > 1 and req.negative_prompt is not None
        frames = 1 if req.num_frames in (None, 1) else None
    else:  # wan
        guidance = filled(req.guidance_scale, "guidance_scale")
        cfg = None if guidance is None else guidance > 1.0
        frames = filled(req.num_frames, "num_frames")
    if None in shared or cfg is None or frames is None:
        return None
    # a threshold of 0 is "off", as no threshold is when the runner's default is off: the same forward
    rest = {k: v for k, v in extra.items() if k not in PER_SAMPLE_EXTRA[family] and k != STEP_CACHE_KEY}
    return ("samples", *shared, frames, cfg, repr(sorted(rest.items())))


def batch_shapes(max_batch: int) -> list[int]:
    """The batch sizes (outputs per runner call) the warm-up runs for images: 1, 2, 4, ... below max_batch,
    and max_batch itself (see Runner.warmup for why not every size). The engine forms batches of these
    sizes when it can (tickets.batch_for): on a GPU any other size captures a CUDA graph on first use and,
    the DiT keeping only a few, evicts a warmed one."""
    top = max(1, int(max_batch))
    return sorted({1 << i for i in range(top.bit_length()) if 1 << i < top} | {top})


def split_result(result: GenerationResult, counts: Sequence[int]) -> list[GenerationResult]:
    """One merged call's result (num_outputs = sum(counts)) as one result per request, in order: its outputs,
    its share of the call; the call's timings and forwards. A share of several has no seed of its own."""
    if len(counts) == 1:
        return [result]
    total, offset, out = sum(counts), 0, []
    for n in counts:
        out.append(
            replace(
                result,
                images=result.images[offset : offset + n],
                videos=result.videos[offset : offset + n],
                seed=None,
                timings=dict(result.timings),
                dit_forwards=dict(result.dit_forwards),
                forward_share=result.forward_share * n / total,
            )
        )
        offset += n
    return out


Outcome = GenerationResult | Exception  # one request's answer in a batch: its result or its own error


def run_grouped(
    reqs: Sequence[GenerationRequest],
    key: Callable[[GenerationRequest], Hashable | None],
    run_one: Callable[[GenerationRequest], GenerationResult],
    run_samples: Callable[[list[GenerationRequest]], list[Outcome]] | None = None,
) -> list[Outcome]:
    """Several requests in as few calls as `key` (a batch_key) allows, one outcome per request, in order.
    Requests with equal keys run together: "samples" groups through run_samples, "merge" groups as one
    run_one call of the summed num_outputs, split back (split_result); a key of None runs alone. An error
    fails the requests of its call only."""
    groups: dict[Any, list[int]] = {}
    for i, req in enumerate(reqs):
        k = key(req)
        groups.setdefault(("alone", i) if k is None else k, []).append(i)
    outcomes: list[Outcome | None] = [None] * len(reqs)
    for k, index in groups.items():
        group = [reqs[i] for i in index]
        if len(group) > 1 and k[0] == "samples" and run_samples is None:
            calls = [[r] for r in group]  # a caller without a batched forward: each alone
        else:
            calls = [group]
        got: list[Outcome] = []
        for call in calls:
            try:
                if len(call) == 1:
                    got.append(run_one(call[0]))
                elif k[0] == "samples":
                    got.extend(run_samples(call))
                else:
                    counts = [r.num_outputs for r in call]
                    got.extend(split_result(run_one(replace(call[0], num_outputs=sum(counts))), counts))
            except Exception as exc:  # this call's requests fail; the other calls still run
                got.extend([exc] * len(call))
        for i, outcome in zip(index, got, strict=True):
            outcomes[i] = outcome
    return outcomes  # type: ignore[return-value]
