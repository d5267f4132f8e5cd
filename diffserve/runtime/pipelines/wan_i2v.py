"""Wan image-to-video on the native Wan DiT: Wan2.1-I2V, Wan2.2-I2V-A14B and Wan2.2-TI2V-5B with an image.

Same numbers as diffusers' WanImageToVideoPipeline for the same seed and image. The reference image is resized
to cover the requested size (aspect ratio kept, Lanczos) and centre-cropped to it (reference_frame), then:

- Wan2.1-I2V / Wan2.2-I2V-A14B (36-channel DiT): the image, followed by black frames, is encoded by the VAE
  (its mode) and normalised; 4 mask channels (ones on the first latent frame) and these 16 channels are
  concatenated to the 16 noise channels at every step. Wan2.1-I2V also has a CLIP vision encoder: its
  penultimate hidden states are the DiT's image context (models/wan.py), the same for both CFG branches.
  A14B's two experts switch at boundary_ratio, each with its own guidance scale (guidance_scale_2).
- Wan2.2-TI2V-5B (expand_timesteps, served by WanPipeline): the image's latents replace the first latent
  frame before every forward and at the end, and those tokens get timestep 0 (per-token timesteps).

Without a size the video is 832x480 (diffusers' default, Wan's 480p), whatever the image's size.
Where the image's aspect ratio differs from the video's, diffusers instead stretches it (VideoProcessor) and
gives CLIP the image as sent; we crop, and CLIP sees the cropped first frame. For an image of the video's
size the two are the same numbers (the parity tests).
"""

from __future__ import annotations

import dataclasses

import torch

from diffserve.runtime import step_cache
from diffserve.runtime.api import GenerationRequest, GenerationResult, InvalidRequest
from diffserve.runtime.pipelines import stages
from diffserve.runtime.pipelines.wan import WanPipeline


def reference_frame(image, width: int, height: int):
    """The PIL image resized to cover width x height (aspect kept, Lanczos) and centre-cropped to it."""
    from PIL import Image

    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize((w, h), resample=Image.LANCZOS)
    left, top = (w - width) // 2, (h - height) // 2
    return image.crop((left, top, left + width, top + height))


def plan_i2v(pipe: WanPipeline, req: GenerationRequest) -> stages.Plan:
    """A request for a Wan pipeline that takes an image: the model's defaults (not the image's size), no
    strength; the warm-up gets a grey image."""
    if req.strength is not None:
        raise InvalidRequest(
            f"this model ({pipe.rules.label}) starts the video from the image and takes no strength"
        )
    # a missing width or height is the model's (fitted to its rules), never the image's (plan_request's rule
    # for edits): a 4000x3000 photo still makes an 832x480 video
    width = pipe.defaults["width"] if req.width is None else req.width
    height = pipe.defaults["height"] if req.height is None else req.height
    plan = stages.plan_request(
        dataclasses.replace(req, width=width, height=height), pipe.defaults, pipe.rules
    )
    plan.strength = None
    if plan.image is None and req.is_warmup:
        from PIL import Image

        plan.image = Image.new("RGB", (plan.width, plan.height), (128, 128, 128))
    if plan.image is not None:
        plan.image = reference_frame(plan.image, plan.width, plan.height)
    stages.extra_number(plan, "guidance_scale_2", plan.guidance, 0.0, 100.0)
    step_cache.check_request(plan)
    return plan


def _normalise(vae, latents: torch.Tensor) -> torch.Tensor:
    view = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(view).to(latents)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(view).to(latents)
    return (latents - mean) * inv_std


def _denormalise(vae, latents: torch.Tensor) -> torch.Tensor:
    view = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(view).to(latents)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(view).to(latents)
    return latents / inv_std + mean


def run_i2v(pipe: WanPipeline, p: stages.Plan, timings, on_step, should_cancel) -> GenerationResult:
    """One image-to-video request (never batched with others: api.batch_key)."""
    n, cfg = p.num_outputs, p.guidance > 1.0
    scales = [p.guidance, p.extra["guidance_scale_2"]]
    vae, dtype = pipe.vae, pipe.transformer.dtype
    with timings("prepare_latents"):
        scheduler, expert = pipe.schedule(p.steps)
    with timings("encode_text"):
        cond = pipe.encode([p.prompt]).repeat_interleave(n, 0)
        uncond = pipe.encode([p.negative_prompt or ""]).repeat_interleave(n, 0) if cfg else None
        image_states = None
        if getattr(pipe.transformer.config, "image_dim", None) is not None:  # Wan2.1-I2V: CLIP context
            pixels = pipe.image_processor(images=p.image, return_tensors="pt")["pixel_values"]
            encoder = pipe.image_encoder
            out = encoder(pixel_values=pixels.to(pipe.device, encoder.dtype), output_hidden_states=True)
            image_states = out.hidden_states[-2].to(dtype).expand(n, -1, -1)
    with timings("prepare_latents"):
        frames = (p.num_frames - 1) // pipe.scale_t + 1
        lh, lw = p.height // pipe.scale_s, p.width // pipe.scale_s
        gen = stages.cpu_generator(p.seed)
        latents = stages.gaussian((n, vae.config.z_dim, frames, lh, lw), gen, pipe.device, torch.float32)
        first = stages.image_tensor(p.image, p.width, p.height).to(pipe.device)[:, :, None]
        if not pipe.expand_timesteps:  # the image then black frames, one clip
            black = first.new_zeros(1, 3, p.num_frames - 1, p.height, p.width)
            first = torch.cat([first, black], dim=2)
        encoded = vae.encode(first.to(vae.dtype)).latent_dist.mode()
        condition = _normalise(vae, encoded.to(torch.float32)).expand(n, -1, -1, -1, -1)
        if pipe.expand_timesteps:
            keep = torch.ones(1, 1, frames, lh, lw, device=pipe.device)  # 0 on the image's latent frame
            keep[:, :, 0] = 0
        else:
            mask = torch.zeros(n, pipe.scale_t, frames, lh, lw, device=pipe.device)
            mask[:, :, 0] = 1
            condition = torch.cat([mask, condition], dim=1)

    cache = step_cache.StepCache.for_run(step_cache.config_for(p, pipe.step_cache), len(scheduler.timesteps))

    def predict(x, t, i):
        dit, parts, scale = pipe.dits[expert[i]], pipe.dit_parts[expert[i]], scales[expert[i]]
        if pipe.expand_timesteps:
            x = ((1 - keep) * condition + keep * x).to(dtype)
            timestep = (keep[0, 0][:, ::2, ::2] * t).flatten().expand(n, -1)
        else:
            x = torch.cat([x, condition], dim=1).to(dtype)
            timestep = t.expand(n)

        def branch(prompt_states):
            return dict(
                hidden_states=x,
                timestep=timestep,
                encoder_hidden_states=prompt_states,
                encoder_hidden_states_image=image_states,
                return_dict=False,
            )

        if not cfg:
            return cache.step(i, dit, parts, {"cond": branch(cond)})["cond"]
        out, neg = step_cache.guided_pair(cache, i, dit, parts, branch(cond), branch(uncond))
        return stages.guided(out, neg, scale)

    with timings("denoise"):
        latents = stages.denoise(scheduler, scheduler.timesteps, latents, predict, on_step, should_cancel)
    with timings("decode"):
        if pipe.expand_timesteps:
            latents = (1 - keep) * condition + keep * latents
        videos = stages.decode_videos(vae, _denormalise(vae, latents.to(vae.dtype)))
    return GenerationResult(
        videos=videos, width=p.width, height=p.height, seed=p.seed, dit_forwards=cache.counts()
    )


class WanI2VPipeline(WanPipeline):
    """Wan2.1-I2V and Wan2.2-I2V-A14B (model_index WanImageToVideoPipeline): an image is required."""

    family, task, accepts_image = "wan-i2v", "video", True
    batches_samples = False  # image requests never share a forward (api.batch_key)

    def setup(self):
        super().setup()
        self.rules.accepts_image, self.rules.label = True, "Wan I2V"

    def plan(self, req: GenerationRequest) -> stages.Plan:
        if req.image is None and not req.is_warmup:
            raise InvalidRequest(
                "this model (Wan I2V) makes a video from an image: send one (input_reference on "
                "/v1/videos, --image for generate)"
            )
        return plan_i2v(self, req)

    def run(self, p: stages.Plan, timings, on_step, should_cancel) -> GenerationResult:
        return run_i2v(self, p, timings, on_step, should_cancel)
