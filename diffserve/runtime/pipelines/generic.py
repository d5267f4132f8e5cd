"""Any other diffusers pipeline (SD3, Qwen-Image, Wan image-to-video, ...), run by diffusers itself and
labelled "generic": no native DiT, but our attention backend, progress, cancellation and defaults.

Attention: the transformers text encoders get our backend through transformers' registry (as in the
native pipelines). diffusers' models call torch's scaled_dot_product_attention from many processor
classes; while a generic pipeline runs, unmasked calls are routed to `layers.attention.attention` (the
platform-selected backend) and anything else (masks, dropout, GQA) goes to torch's own function.

Why torch's function and not diffusers' attention dispatcher (`set_attention_backend`): only processors
that call `dispatch_attention_fn` go through the dispatcher, and its default backend ("native") calls
torch's function anyway; the older processors (34 call sites in diffusers 0.42's attention_processor.py,
SD3's JointAttnProcessor2_0 among them) call torch's function directly. The dispatcher also offers only
its own named backends (its FA3 wants upstream `flash_attn_interface` or a Hub kernel, not the fa3-fwd
wheel our platform probe accepts) and does not fall back. A TorchFunctionMode would confine the routing
to this thread, but it adds a Python call to every torch op of the pipeline (measured ~0.8 us per op on
the CI CPU); the swap costs nothing outside attention, and the worker runs one generation at a time.

Batching: identical unseeded requests only (runtime.api.batch_key's "merge": one call of their summed
num_outputs, no seed reported for a share), never different prompts or seeds in one call. diffusers'
pipelines take one guidance scale per call, and with a list of generators they draw each sample's noise
on its own, which is not what a multi-output request draws alone: a request would depend on its batch.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from typing import Any

import torch
import torch.nn.functional as F

from diffserve.runtime.api import GenerationCancelled, GenerationRequest, GenerationResult
from diffserve.runtime.pipelines import stages

_torch_sdpa = F.scaled_dot_product_attention
_inside = threading.local()


def _routed_sdpa(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    from diffserve.runtime.layers.attention import attention

    plain = attn_mask is None and not dropout_p and not enable_gqa and query.ndim == 4
    if not plain or key.shape[1] != query.shape[1] or getattr(_inside, "active", False):
        return _torch_sdpa(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    _inside.active = True  # our SDPA backend calls torch's function: do not route it back to ourselves
    try:
        out = attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=scale, causal=is_causal
        )
    finally:
        _inside.active = False
    return out.transpose(1, 2)


@contextlib.contextmanager
def routed_attention():
    F.scaled_dot_product_attention = _routed_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _torch_sdpa


class GenericPipeline:
    family = "generic"

    def __init__(self, pipe, device):
        self.pipe, self.device = pipe, torch.device(device)
        self.params = inspect.signature(pipe.__call__).parameters
        self.task = "video" if "num_frames" in self.params else "image"
        self.accepts_image = "image" in self.params
        self.denoiser_config = getattr(
            getattr(pipe, "transformer", None) or getattr(pipe, "unet", None), "config", None
        )
        self.defaults = self._defaults()
        vae_scale = getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", 8)
        patch = getattr(self.denoiser_config, "patch_size", None) or 1
        patch = patch[-1] if isinstance(patch, (list, tuple)) else patch
        temporal = getattr(pipe, "vae_scale_factor_temporal", 4)
        self.rules = stages.Rules(
            multiple=int(vae_scale * patch),
            accepts_image=self.accepts_image,
            frame_step=temporal if self.task == "video" else None,
            label=f"generic {type(pipe).__name__}",
        )

    @classmethod
    def load(cls, spec, device: str, dtype, config) -> GenericPipeline:
        """Any diffusers pipeline, loaded by diffusers; `config` (RuntimeConfig) gives the attention backend
        (--compile applies to native DiTs only; --quantization, --step-cache and --offload are refused: they need
        our DiTs. --offload is refused rather than mapped onto diffusers' enable_model_cpu_offload or group
        offloading, whose placement and memory we would neither control nor test here)."""
        from diffserve.runtime.loader import ModelLoadError

        for flag, value in (
            ("--quantization", config.quantization),
            ("--step-cache", config.step_cache_config()),
            ("--offload", config.offload),
        ):
            if value is not None:
                raise ModelLoadError(
                    f"{flag} needs a native FLUX or Wan model; {spec.model_id} ({spec.pipeline_class}) runs "
                    "through diffusers"
                )
        attention_backend = config.attention_backend
        from diffusers import DiffusionPipeline
        from diffusers.pipelines.pipeline_utils import SUPPORTED_DEVICE_MAP
        from transformers import PreTrainedModel

        from diffserve.runtime.layers.text_attention import apply_to_text_encoder
        from diffserve.runtime.loader import diffusers_dtype_kwarg

        # Straight to the device where diffusers can place a whole pipeline ("cpu", "cuda"); else move after.
        if str(device) in SUPPORTED_DEVICE_MAP:
            pipe = DiffusionPipeline.from_pretrained(
                spec.path, device_map=str(device), **diffusers_dtype_kwarg(dtype)
            )
        else:
            pipe = DiffusionPipeline.from_pretrained(spec.path, **diffusers_dtype_kwarg(dtype)).to(device)
        for component in pipe.components.values():
            if isinstance(component, PreTrainedModel):
                apply_to_text_encoder(component, attention_backend)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, device)

    def _default(self, name: str, fallback):
        p = self.params.get(name)
        return p.default if p is not None and p.default not in (None, inspect.Parameter.empty) else fallback

    def _defaults(self) -> dict[str, Any]:
        """The pipeline's own __call__ defaults; a size left to None there comes from the model's sample size."""
        pipe = self.pipe
        size = None
        if getattr(pipe, "default_sample_size", None) and getattr(pipe, "vae_scale_factor", None):
            size = pipe.default_sample_size * pipe.vae_scale_factor
        sample = getattr(self.denoiser_config, "sample_size", None)
        if size is None and isinstance(sample, int):
            size = sample * getattr(pipe, "vae_scale_factor", 8)
        out = {
            "width": self._default("width", size or 1024),
            "height": self._default("height", size or 1024),
            "num_inference_steps": self._default("num_inference_steps", 50),
            "guidance_scale": self._default("guidance_scale", 5.0),
        }
        if self.task == "video":
            out.update(num_frames=self._default("num_frames", 81), fps=16)
        if self.accepts_image and "strength" in self.params:
            out["strength"] = self._default("strength", 0.6)
        return out

    def _warmup_image(self, p):
        """A grey input image for the warm-up of a pipeline that takes one: img2img pipelines (SD3's) need an
        image, and the warm-up request has none. None for pipelines that take no image."""
        if not self.accepts_image:
            return None
        from PIL import Image

        return Image.new("RGB", (p.width, p.height), (128, 128, 128))

    @torch.inference_mode()
    def __call__(self, req: GenerationRequest, on_step=None, should_cancel=None) -> GenerationResult:
        start, timings = time.perf_counter(), stages.Timings()
        with timings("validate"):
            p = stages.plan_request(req, self.defaults, self.rules)
        kwargs = dict(
            prompt=p.prompt,
            height=p.height,
            width=p.width,
            num_inference_steps=p.steps,
            guidance_scale=p.guidance,
            generator=stages.cpu_generator(p.seed),
            output_type="pil",
        )
        per_prompt = (
            "num_videos_per_prompt" if "num_videos_per_prompt" in self.params else "num_images_per_prompt"
        )
        optional = {
            "negative_prompt": p.negative_prompt,
            "num_frames": p.num_frames,
            "image": p.image if p.image is not None or not req.is_warmup else self._warmup_image(p),
            "strength": p.strength,
            per_prompt: p.num_outputs,
        }
        kwargs.update({k: v for k, v in optional.items() if v is not None and k in self.params})

        def step_end(pipe, i, t, tensors):
            if on_step is not None:
                on_step(i + 1, getattr(pipe, "_num_timesteps", None) or p.steps)
            if should_cancel is not None and should_cancel():
                raise GenerationCancelled(f"cancelled after {i + 1} denoising steps")
            return tensors

        if "callback_on_step_end" in self.params:
            kwargs["callback_on_step_end"] = step_end
        with timings("pipeline"), routed_attention():
            out = self.pipe(**kwargs)
        result = GenerationResult(width=p.width, height=p.height, fps=p.fps, seed=p.seed)
        if self.task == "video":
            result.videos = [list(v) for v in out.frames]
        else:
            result.images = list(out.images)
        result.timings = {**timings.settle(), "total": time.perf_counter() - start}
        return result
