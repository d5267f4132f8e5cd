"""Qwen-Image (text-to-image) and Qwen-Image-Edit (an input image and an instruction).

Same numbers as diffusers' QwenImagePipeline / QwenImageEditPipeline for the same seed: the prompt in
Qwen's chat template through Qwen2.5-VL (the edit template with the input image's vision tokens), the
template's system prefix dropped (34 / 64 tokens, as diffusers), 2x2-packed latents, the flow-matching
schedule shifted by the image's token count, true CFG with a negative prompt (extra["true_cfg_scale"],
default 4.0, as diffusers: on only when a negative prompt is given) with the prediction renormalised to the
conditional one's norm, and the Wan-2.1-style VAE on one frame. The edit's input image is encoded to
latents (the distribution's mode) and its tokens follow the noise's in the DiT's sequence; the DiT's output
for them is dropped.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from diffserve.runtime import step_cache
from diffserve.runtime.api import GenerationRequest, GenerationResult, InvalidRequest
from diffserve.runtime.cuda_graphs import GraphedForward
from diffserve.runtime.pipelines import stages
from diffserve.runtime.pipelines.base import NativePipeline
from diffserve.runtime.pipelines.flux import pack, sigma_shift, unpack

T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a "
    "new image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
IMAGE_TOKEN = "<|image_pad|>"
TOKENIZER_MAX_LENGTH = 1024  # diffusers' tokenizer_max_length (plus the dropped prefix)
MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline's max_sequence_length default (the edit pipeline keeps all)
EDIT_AREA = 1024 * 1024  # the edit pipeline works at this many pixels, the input's aspect kept


def edit_size(width: int, height: int) -> tuple[int, int]:
    """diffusers' calculate_dimensions(1024 * 1024, width / height): (width, height) in multiples of 32."""
    ratio = width / height
    w = math.sqrt(EDIT_AREA * ratio)
    return round(w / 32) * 32, round(w / ratio / 32) * 32


class QwenImagePipeline(NativePipeline):
    family, task, accepts_image = "qwen-image", "image", False
    template, drop, max_sequence_length = T2I_TEMPLATE, 34, MAX_SEQUENCE_LENGTH
    label = "Qwen-Image"

    def setup(self):
        self.vae_scale = 2 ** len(self.vae.temperal_downsample)
        self.rules = stages.Rules(
            multiple=self.vae_scale * 2, accepts_image=self.accepts_image, label=self.label
        )
        # diffusers' defaults: 1024^2 (default_sample_size 128 x 8), 50 steps, true_cfg_scale 4 (with a
        # negative prompt). guidance_scale is for guidance-distilled models, which Qwen-Image is not: unused.
        self.defaults = {"width": 1024, "height": 1024, "num_inference_steps": 50, "guidance_scale": 1.0}
        self.dit = GraphedForward(self.transformer)  # CUDA graphs on a GPU, the plain module elsewhere
        self.step_cache: step_cache.StepCacheConfig | None = None
        self.dit_parts = step_cache.DiTParts(self.transformer)
        self.step_cache_graphs = self.dit_parts.graphs  # a list attribute: _drop_cuda_graphs finds them
        self.latent_channels = self.vae.config.z_dim

    # ---- encode text ----
    def encode(self, prompt: str, image=None) -> torch.Tensor:
        """(1, tokens, hidden) Qwen2.5-VL last hidden states of the templated prompt, the template's prefix
        dropped. Prompts are encoded one at a time: no padding, so the DiT needs no mask."""
        text = self.template.format(prompt)
        vision = {}
        if image is not None:
            vision = dict(self.processor(images=[image], return_tensors="pt"))
            merge = self.processor.merge_size**2
            text = text.replace(
                IMAGE_TOKEN, IMAGE_TOKEN * int(vision["image_grid_thw"][0].prod() // merge), 1
            )
            tokens = self.tokenizer([text], padding=True, return_tensors="pt")
        else:
            tokens = self.tokenizer(
                [text],
                max_length=TOKENIZER_MAX_LENGTH + self.drop,
                padding=True,
                truncation=True,
                return_tensors="pt",
            )
        device, encoder = self.device, self.text_encoder
        inputs = dict(input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))
        if vision:
            inputs["pixel_values"] = vision["pixel_values"].to(device, encoder.dtype)
            inputs["image_grid_thw"] = vision["image_grid_thw"].to(device)
        # The decoder's last hidden state (after its final norm; = diffusers' hidden_states[-1]); the language
        # model head, which diffusers also runs, is skipped.
        states = encoder.model(**inputs).last_hidden_state
        states = states[0][tokens.attention_mask[0].bool().to(states.device)][self.drop :]
        if self.max_sequence_length is not None:
            states = states[: self.max_sequence_length]
        return states[None].to(encoder.dtype)

    # ---- the run ----
    def condition_image(self, p: stages.Plan, dtype):
        """(image tokens (1, seq, C*4), grid (1, h, w), the image as the VL encoder sees it), or Nones."""
        return None, None, None

    def run(self, p: stages.Plan, timings, on_step, should_cancel) -> GenerationResult:
        n, true_cfg = p.num_outputs, p.extra["true_cfg_scale"]
        do_cfg = true_cfg > 1 and p.negative_prompt is not None
        h, w = 2 * (p.height // (self.vae_scale * 2)), 2 * (p.width // (self.vae_scale * 2))
        dtype = self.text_encoder.dtype  # diffusers draws and keeps the latents in the prompt states' dtype
        with timings("prepare_latents"):
            cond_tokens, cond_grid, vl_image = self.condition_image(p, dtype)
        with timings("encode_text"):
            states = self.encode(p.prompt, vl_image).repeat_interleave(n, 0)
            neg_states = self.encode(p.negative_prompt, vl_image).repeat_interleave(n, 0) if do_cfg else None
        with timings("prepare_latents"):
            gen = stages.cpu_generator(p.seed)
            shape = (n, self.latent_channels, h, w)
            latents = pack(stages.gaussian(shape, gen, self.device, dtype))
            grids = ((1, h // 2, w // 2),) + ((cond_grid,) if cond_grid is not None else ())
            scheduler = stages.fresh_scheduler(self.scheduler)
            sigmas = np.linspace(1.0, 1 / p.steps, p.steps)
            stages.set_timesteps_async(
                scheduler, self.device, sigmas=sigmas, mu=sigma_shift(latents.shape[1], scheduler.config)
            )
            scheduler.set_begin_index(0)
            timesteps = scheduler.timesteps
            # Every step's adaLN projections in one GEMM before the loop (None when not fused); the
            # conditioning depends on the timestep alone, so both CFG branches share it.
            schedule = self.transformer.adaln_schedule(timesteps.to(dtype) / 1000, n)
            if cond_tokens is not None:
                cond_tokens = cond_tokens.expand(n, -1, -1)

        cache = step_cache.StepCache.for_run(step_cache.config_for(p, self.step_cache), len(timesteps))
        n_noise = latents.shape[1]

        def predict(x, t, i):
            inputs = x if cond_tokens is None else torch.cat([x, cond_tokens], dim=1)
            common = dict(
                hidden_states=inputs,
                timestep=t.expand(n).to(x.dtype) / 1000,
                img_shapes=grids,
                return_dict=False,
                adaln=None if schedule is None else schedule[i],
            )
            if not do_cfg:
                out = cache.step(
                    i, self.dit, self.dit_parts, {"cond": dict(common, encoder_hidden_states=states)}
                )
                return out["cond"][:, :n_noise]
            out, neg = step_cache.guided_pair(
                cache, i, self.dit, self.dit_parts,
                dict(common, encoder_hidden_states=states), dict(common, encoder_hidden_states=neg_states),
            )  # fmt: skip
            out, neg = out[:, :n_noise], neg[:, :n_noise]
            combined = neg + true_cfg * (out - neg)
            # Rescaled to the conditional prediction's norm per token, as diffusers.
            return combined * (
                torch.norm(out, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True)
            )

        with timings("denoise"):
            latents = stages.denoise(scheduler, timesteps, latents, predict, on_step, should_cancel)
        with timings("decode"):
            latents = unpack(latents, h, w)[:, :, None].to(self.vae.dtype)
            mean, inv_std = self._latent_stats(latents)
            # TODO(wan vae walk): the Qwen decoder's up blocks take no first_chunk; diffusers' decode for now.
            images = self.vae.decode(latents / inv_std + mean, return_dict=False)[0][:, :, 0]
            images = stages.to_pil(images)
        return GenerationResult(
            images=images, width=p.width, height=p.height, seed=p.seed, dit_forwards=cache.counts()
        )

    def _latent_stats(self, like: torch.Tensor):
        view = (1, self.latent_channels, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(view).to(like)
        inv_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(view).to(like)
        return mean, inv_std

    def plan(self, req: GenerationRequest) -> stages.Plan:
        plan = stages.plan_request(req, self.defaults, self.rules)
        stages.extra_number(plan, "true_cfg_scale", 4.0, 1.0, 100.0)
        step_cache.check_request(plan)
        return plan


class QwenImageEditPipeline(QwenImagePipeline):
    family, accepts_image = "qwen-image-edit", True
    template, drop, max_sequence_length = EDIT_TEMPLATE, 64, None
    label = "Qwen-Image-Edit"

    def condition_image(self, p: stages.Plan, dtype):
        """The input image at ~1024^2 (its aspect kept, as diffusers): VAE latents (the mode), normalised and
        packed, their grid, and the resized image the VL encoder sees."""
        from PIL import Image

        cw, ch = edit_size(*p.image.size)
        image = p.image.resize((cw, ch), resample=Image.LANCZOS) if p.image.size != (cw, ch) else p.image
        pixels = stages.image_tensor(image, cw, ch)[:, :, None].to(self.device, dtype)
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode()
        mean, inv_std = self._latent_stats(latents)
        latents = ((latents - mean) / (1.0 / inv_std)).to(dtype)  # (x - mean) / std, as diffusers rounds it
        _, c, _, lh, lw = latents.shape
        return pack(latents[:, :, 0]), (1, lh // 2, lw // 2), image

    def plan(self, req: GenerationRequest) -> stages.Plan:
        if req.image is None:
            if not req.is_warmup:
                raise InvalidRequest(
                    f"this model ({self.label}) edits an input image: send one (/v1/images/edits)"
                )
            req = _with_blank_image(req)
        plan = super().plan(req)
        # Without a size, diffusers' edit size: ~1024^2 at the input's aspect, floored to the multiple.
        cw, ch = edit_size(*plan.image.size)
        m = self.rules.multiple
        if req.width is None:
            plan.width = cw // m * m
        if req.height is None:
            plan.height = ch // m * m
        return plan


def _with_blank_image(req: GenerationRequest) -> GenerationRequest:
    """The warm-up request (text only) with a grey input image of its size, so that the edit path warms up."""
    import dataclasses
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (req.width or 1024, req.height or 1024), (128, 128, 128)).save(buf, format="PNG")
    return dataclasses.replace(req, image=buf.getvalue())
