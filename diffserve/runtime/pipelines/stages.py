"""The stages every pipeline is made of: validate -> encode text -> prepare latents -> denoise -> decode.

Family pipelines (flux.py, wan.py) compose these (the encode-text stage lives in text.py); anything
family-specific (latent packing, guidance style) stays in the family file. Random numbers come from a CPU
torch.Generator in the order diffusers' pipelines draw them, so a seed gives the same picture as diffusers
on any device.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import io
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from diffserve.runtime import cuda_graphs
from diffserve.runtime.api import (
    CancelCheck,
    GenerationCancelled,
    GenerationRequest,
    InvalidRequest,
    StepCallback,
)
from diffserve.runtime.limits import MAX_SEED, Limits

MAX_FPS = Limits.max_fps  # the serving limits' bound (runtime/limits.py), so that the CLI and server agree

# ---- validate ----------------------------------------------------------------------------------------


@dataclass
class Plan:
    """A request with every default filled in and every value checked: what the stages run on."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    num_outputs: int
    num_frames: int | None = None
    fps: int | None = None
    image: Any = None  # PIL.Image (RGB) for image-to-image
    strength: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rules:
    """What a family accepts: sizes in multiples of `multiple`, frame counts of the form k*temporal+1."""

    multiple: int
    max_side: int = 8192
    frame_step: int | None = None  # video: (num_frames - 1) must be divisible by this
    max_frames: int = 1025
    accepts_image: bool = False
    label: str = ""


def fit_defaults(defaults: dict[str, Any], rules: Rules) -> dict[str, Any]:
    """`defaults` with the default size and frame count brought inside `rules`. A model can allow less than
    its family's usual defaults (a Wan DiT with a small RoPE table, say), and then a request without a size,
    and the warm-up, would fail. The size is scaled down with its aspect kept, to multiples of
    rules.multiple; the frame count drops to the longest allowed. Defaults that fit are returned unchanged."""
    out = dict(defaults)
    w, h = out.get("width"), out.get("height")
    if isinstance(w, int) and isinstance(h, int) and max(w, h) > rules.max_side:
        side = max(w, h)
        out["width"], out["height"] = (
            max(rules.multiple, v * rules.max_side // side // rules.multiple * rules.multiple) for v in (w, h)
        )
    frames = out.get("num_frames")
    if rules.frame_step and isinstance(frames, int) and frames > rules.max_frames:
        out["num_frames"] = (rules.max_frames - 1) // rules.frame_step * rules.frame_step + 1
    return out


def plan_request(
    req: GenerationRequest,
    defaults: dict[str, Any],
    rules: Rules,
    image_defaults: dict[str, Any] | None = None,
) -> Plan:
    """Fill defaults and validate; every problem raises InvalidRequest with a message for the user."""
    if not isinstance(req.prompt, str):
        raise InvalidRequest("prompt must be a string")
    if req.mask is not None:  # no pipeline inpaints: ignoring the mask would repaint the whole image
        raise InvalidRequest(f"this model ({rules.label}) edits whole images and takes no mask")
    image = None
    if req.image is not None:
        if not rules.accepts_image:
            raise InvalidRequest(f"this model ({rules.label}) does not take an input image")
        image = load_image(req.image)
        defaults = {**defaults, **(image_defaults or {})}
        # Without a size, an edit keeps the input's size (rounded down to what the model accepts).
        defaults["width"] = max(rules.multiple, image.width // rules.multiple * rules.multiple)
        defaults["height"] = max(rules.multiple, image.height // rules.multiple * rules.multiple)
    width = _int(req.width, defaults["width"], "width")
    height = _int(req.height, defaults["height"], "height")
    for name, v in (("width", width), ("height", height)):
        if v < rules.multiple or v % rules.multiple or v > rules.max_side:
            raise InvalidRequest(
                f"{name} must be a multiple of {rules.multiple} between {rules.multiple} and "
                f"{rules.max_side} for {rules.label}, got {v}"
            )
    steps = _int(req.num_inference_steps, defaults["num_inference_steps"], "num_inference_steps")
    if not 1 <= steps <= 1000:
        raise InvalidRequest(f"num_inference_steps must be between 1 and 1000, got {steps}")
    guidance = _float(req.guidance_scale, defaults["guidance_scale"], "guidance_scale")
    if not 0.0 <= guidance <= 100.0:
        raise InvalidRequest(f"guidance_scale must be between 0 and 100, got {guidance}")
    if not isinstance(req.num_outputs, int) or req.num_outputs < 1:
        raise InvalidRequest(f"num_outputs must be a positive integer, got {req.num_outputs!r}")
    seed = random.SystemRandom().randrange(2**32) if req.seed is None else _int(req.seed, 0, "seed")
    if not 0 <= seed <= MAX_SEED:
        raise InvalidRequest(f"seed must be between 0 and {MAX_SEED}, got {seed}")
    plan = Plan(
        req.prompt,
        req.negative_prompt,
        width,
        height,
        steps,
        guidance,
        seed,
        req.num_outputs,
        image=image,
        extra=dict(req.extra or {}),
    )
    if rules.frame_step is not None:
        frames = _int(req.num_frames, defaults["num_frames"], "num_frames")
        if frames < 1 or (frames - 1) % rules.frame_step or frames > rules.max_frames:
            raise InvalidRequest(
                f"num_frames must be {rules.frame_step}*k+1 (1, {rules.frame_step + 1}, "
                f"{2 * rules.frame_step + 1}, ...) up to {rules.max_frames} for {rules.label}, "
                f"got {frames}"
            )
        plan.num_frames = frames
        plan.fps = _int(req.fps, defaults["fps"], "fps")
        if not 1 <= plan.fps <= MAX_FPS:
            raise InvalidRequest(f"fps must be between 1 and {MAX_FPS}, got {plan.fps}")
    elif req.num_frames not in (None, 1):
        raise InvalidRequest(f"this model ({rules.label}) makes images: num_frames is not accepted")
    if image is not None:
        plan.strength = _float(req.strength, defaults.get("strength", 0.6), "strength")
        if not 0.0 < plan.strength <= 1.0:
            raise InvalidRequest(f"strength must be in (0, 1], got {plan.strength}")
    return plan


def extra_number(plan: Plan, name: str, default: float, low: float, high: float) -> float:
    """A family's own numeric option from GenerationRequest.extra (e.g. FLUX's true_cfg_scale), checked and
    stored back in plan.extra as a float for the run to read."""
    value = plan.extra.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be a number between {low:g} and {high:g}, got {value!r}")
    plan.extra[name] = float(value)
    return plan.extra[name]


def _int(value, default, name: str) -> int:
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidRequest(f"{name} must be an integer, got {value!r}")
    return int(value)


def _float(value, default, name: str) -> float:
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InvalidRequest(f"{name} must be a number, got {value!r}")
    return float(value)


def load_image(data: bytes):
    """PNG/JPEG/WebP bytes -> an RGB PIL image (alpha dropped: the VAE takes three channels)."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InvalidRequest(f"the input image could not be decoded ({e})") from None
    return img.convert("RGB")


# ---- timing ------------------------------------------------------------------------------------------


class Timings(dict):
    """stage name -> seconds; `with timings("denoise"): ...` adds to one entry.

    Nothing here waits for the GPU: a wait at the end of every stage would leave the GPU idle through the
    host-only work of the next one (drawing the noise on the CPU, ~10 ms for FLUX at 1024^2, while T5 could
    still be running). On CUDA each stage records an event where it starts and where it ends instead, and
    settle() (once per request, after the last stage) turns them into the time between them on the GPU's
    timeline: what the stage added to the request, the stages tiling it without overlap. Elsewhere (the
    CPU) a stage's time is its host time."""

    def __init__(self):
        super().__init__()
        self._pending: list[tuple[str, float, Any, Any]] = []

    @contextlib.contextmanager
    def __call__(self, stage: str):
        gpu = torch.cuda.is_available() and torch.cuda.is_initialized()
        begin = _timing_event() if gpu else None
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            end = _timing_event() if begin is not None else None
            self._pending.append((stage, seconds, begin, end))

    def settle(self) -> Timings:
        """Wait for the last stage's work and fill in every stage's seconds. Returns self."""
        for stage, seconds, begin, end in self._pending:
            if begin is not None:
                end.synchronize()
                seconds = begin.elapsed_time(end) / 1e3
            self[stage] = self.get(stage, 0.0) + seconds
        self._pending.clear()
        return self


def _timing_event() -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def upload(t: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor on `device` without making the host wait for the GPU: a plain .to(cuda) of pageable
    memory synchronises the stream, i.e. waits for every queued kernel (the text encoders, a step). The
    copy goes through pinned memory asynchronously instead (the pinned block stays reserved until the copy
    has run: torch's host allocator tracks it)."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


# ---- encode text: diffserve/runtime/pipelines/text.py --------------------------------------------------


# ---- prepare latents ---------------------------------------------------------------------------------


def cpu_generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def set_timesteps_async(scheduler, device, **kwargs) -> None:
    """scheduler.set_timesteps(device=device, **kwargs) without making the host wait for the GPU: the
    schedule is computed on the CPU (as diffusers does before its own copy) and its tensors uploaded with
    `upload`. For schedulers whose state is `timesteps` and `sigmas` (flow matching: FLUX)."""
    scheduler.set_timesteps(device="cpu", **kwargs)
    scheduler.timesteps = upload(scheduler.timesteps, device)
    scheduler.sigmas = upload(scheduler.sigmas, device)


def gaussian(shape: tuple[int, ...], generator: torch.Generator, device, dtype) -> torch.Tensor:
    """Standard normal noise drawn on the CPU (device-independent results), then moved."""
    return upload(torch.randn(shape, generator=generator, device="cpu", dtype=dtype), device)


_noise_thread: concurrent.futures.ThreadPoolExecutor | None = None


def _forget_noise_thread() -> None:
    # A forked child inherits the executor but not its thread: it would queue draws that never run.
    global _noise_thread
    _noise_thread = None


os.register_at_fork(after_in_child=_forget_noise_thread)


def gaussian_later(
    shape: tuple[int, ...], generator: torch.Generator, device, dtype
) -> Callable[[], torch.Tensor]:
    """gaussian(), drawn on a background thread: returns a function that waits for the draw and gives the
    tensor on `device` (the copy is queued by the caller's thread, on its stream). The generator belongs to
    the draw until then.

    Why: drawing a FLUX.1 latent's bfloat16 noise takes ~8 ms on a lent H100's host (1 ms in float32, but
    only a draw in the request's dtype gives diffusers' values on every CPU), longer than the GPU needs for
    the text encoders and the adaLN schedule queued before it, so the GPU waited for the host before the
    first step (benchmarks/RESULTS.md, session 5). torch releases the GIL while
    it draws, so the draw overlaps the host's tokenising and queueing."""
    global _noise_thread
    if _noise_thread is None:
        _noise_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="diffserve-noise")

    def draw() -> torch.Tensor:
        noise = torch.randn(shape, generator=generator, device="cpu", dtype=dtype)
        return noise.pin_memory() if torch.device(device).type == "cuda" else noise

    future = _noise_thread.submit(draw)
    return lambda: upload(future.result(), device)


def image_tensor(image, width: int, height: int) -> torch.Tensor:
    """RGB PIL image -> (1, 3, height, width) in [-1, 1], resized with Lanczos like diffusers."""
    from PIL import Image

    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2.0 - 1.0


def fresh_scheduler(scheduler):
    """Schedulers keep per-run state (step index, solver history): each generation gets its own."""
    return type(scheduler).from_config(scheduler.config)


# ---- several requests in one forward (api.batch_key's "samples" groups) ------------------------------


def counts(plans: list[Plan]) -> list[int]:
    """Each plan's number of samples, in batch order (a request's samples are consecutive)."""
    return [p.num_outputs for p in plans]


def repeat_per_sample(rows: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
    """One row block per request (batch 1 each) -> one per sample: request i's repeated counts[i] times.
    A single request: rows[0].repeat_interleave(n, 0), exactly what a pipeline does for one request."""
    if len(rows) == 1:
        return rows[0].repeat_interleave(counts[0], 0)
    return torch.cat([r.repeat_interleave(n, 0) for r, n in zip(rows, counts, strict=True)])


def encode_each(encode: Callable[[list[str]], Any], prompts: list[str]) -> list[Any]:
    """encode([prompt]) for each distinct prompt, in order (repeats share one encode).

    One prompt per call, not all of them in one: a batch's text states are then bit-identical to the ones
    each request gets alone, and the text encoders keep the single shape warm-up captured as a CUDA graph
    (a batch of k prompts would capture a new graph per k; their LRU keeps two). T5-XXL over 512 tokens is
    compute-bound already at batch 1, so one call per prompt costs about what a batched call would."""
    done: dict[str, Any] = {}
    return [done[p] if p in done else done.setdefault(p, encode([p])) for p in prompts]


def sample_values(values: list[float], counts: list[int], device) -> float | torch.Tensor:
    """A per-request scale as the forward takes it: the float itself when every request has the same
    (bit-identical to a request alone), else a float32 (samples,) tensor on `device`, uploaded without
    waiting for the GPU."""
    if all(v == values[0] for v in values):
        return values[0]
    per_sample = [v for v, n in zip(values, counts, strict=True) for _ in range(n)]
    return upload(torch.tensor(per_sample, dtype=torch.float32), device)


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance, uncond + scale * (cond - uncond), with one scale or one per sample
    (sample_values). Per sample, the product is taken in float32 and rounded to the prediction's dtype,
    as a Python float scale is (torch multiplies low-precision tensors by a scalar in float32): the same
    numbers as each request alone."""
    if not isinstance(scale, torch.Tensor):
        return uncond + scale * (cond - uncond)
    delta = cond - uncond
    scale = scale.view(-1, *([1] * (delta.ndim - 1)))
    return uncond + (scale * delta).to(delta.dtype)


def split_samples(items: list, plans: list[Plan]) -> list[list]:
    """A batch's outputs (images or videos, in sample order) -> one list per plan."""
    out, offset = [], 0
    for n in counts(plans):
        out.append(items[offset : offset + n])
        offset += n
    return out


# ---- denoise -----------------------------------------------------------------------------------------


def denoise(
    scheduler,
    timesteps: torch.Tensor,
    latents: torch.Tensor,
    predict: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    on_step: StepCallback | None = None,
    should_cancel: CancelCheck | None = None,
) -> torch.Tensor:
    """The loop: predict(latents, t, i) -> model output; scheduler step; progress; cancellation checked
    before every step, so a cancelled request stops within one step (on a GPU, the one step already queued
    still runs: see StepPacer).

    Nothing in the loop makes the host wait for the work it has just queued (no .item(), no tensor in an
    `if`, no copy to the CPU): the GPU never idles between steps. DIFFSERVE_CHECK_SYNC=1 proves it: the loop
    then runs under torch.cuda.set_sync_debug_mode("error"), and any synchronising call in it raises.

    Two deliberate exceptions, each made under cuda_graphs.sync_allowed() so that the check still covers
    everything else: StepPacer's wait for the step before last, and, with step caching on, the one read of
    two floats per step that decides whether the DiT's tail runs (runtime/step_cache.py; none at all when
    step caching is off)."""
    from diffserve.runtime import offload

    offload.release_all()  # --offload: the text encoders are done; the DiT gets the memory
    total = len(timesteps)
    pacer = StepPacer(latents.device, total, on_step)
    with cuda_graphs.no_host_sync(latents.device):
        for i, t in enumerate(timesteps):
            if should_cancel is not None and should_cancel():
                raise GenerationCancelled(f"cancelled after {i} of {total} denoising steps")
            latents = scheduler.step(predict(latents, t, i), t, latents, return_dict=False)[0]
            pacer.queued()
        pacer.finish()
    return latents


class StepPacer:
    """Progress that follows the GPU, and a host that stays at most AHEAD steps in front of it.

    On a GPU, the loop only queues work; without a bound the host would queue every step at once (a CUDA
    graph is one launch per forward), report them all done at once, and a cancelled request would leave
    every queued step to run. So each step records an event, and once more than AHEAD steps are in
    flight the host waits for the oldest one and reports it done. That wait is for a step queued BEFORE
    the newest one, so the GPU always has the next step in hand and never idles: it is not the kind of
    synchronisation the loop must avoid, and it is exempt from the DIFFSERVE_CHECK_SYNC check. On other
    devices a step is reported as soon as its host code returns (on the CPU, when it is done)."""

    AHEAD = 1

    def __init__(self, device: torch.device, total: int, on_step: StepCallback | None):
        self.device = device
        self.events: collections.deque | None = collections.deque() if device.type == "cuda" else None
        self.total, self.on_step, self.done = total, on_step, 0

    def queued(self) -> None:
        if self.events is None:
            self._report()
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.events.append(event)
        while len(self.events) > self.AHEAD:
            self._wait_oldest()

    def finish(self) -> None:
        """After the loop: the steps still in flight."""
        while self.events:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        event = self.events.popleft()
        with cuda_graphs.sync_allowed():
            event.synchronize()
        self._report()

    def _report(self) -> None:
        self.done += 1
        if self.on_step is not None:
            self.on_step(self.done, self.total)


# ---- decode ------------------------------------------------------------------------------------------


def to_pil(images: torch.Tensor) -> list:
    """(batch, 3, H, W) in [-1, 1] -> PIL images, rounded to uint8 as diffusers' image processor does."""
    from PIL import Image

    # Scaled, rounded (half to even, as numpy) and narrowed to uint8 where the images are: only bytes cross
    # to the host (81 Wan frames at 480x832: 97 MB instead of 388 MB of float32, and no numpy pass).
    # Channels last on the device, then one contiguous copy: .cpu() of the permuted view would reorder the
    # bytes on the host instead (FLUX's decode stage at 1024^2: 46.5 -> 34.0 ms, benchmarks/RESULTS.md).
    pixels = ((images / 2 + 0.5).clamp(0, 1).float() * 255).round().to(torch.uint8)
    return [Image.fromarray(a) for a in pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()]


def decode_images(vae, latents: torch.Tensor) -> list:
    """AutoencoderKL latents (batch, C, h, w), already un-normalised -> PIL images. Decoded by
    kl_vae_decode (= vae.decode, with each GroupNorm + SiLU as one bandwidth-bound kernel on CUDA)."""
    from diffserve.runtime import offload
    from diffserve.runtime.kl_vae_decode import decode_kl_latents

    offload.onload(vae)  # --offload: the walk reads the VAE's weights without calling it
    return to_pil(decode_kl_latents(vae, latents.to(vae.dtype)))


def decode_videos(vae, latents: torch.Tensor) -> list[list]:
    """AutoencoderKLWan latents (batch, C, f, h, w), already un-normalised -> one list of frames per video."""
    from diffserve.runtime import offload
    from diffserve.runtime.vae_decode import decode_wan_latents

    offload.onload(vae)  # --offload: the walk reads the VAE's weights without calling it

    videos = decode_wan_latents(vae, latents.to(vae.dtype))  # (batch, 3, frames, H, W), = vae.decode
    return [to_pil(v.transpose(0, 1)) for v in videos]
