"""FLUX.1 Kontext (dev): instruction editing on our native FLUX DiT.

Same numbers as diffusers' FluxKontextPipeline for the same seed. The reference image is resized (stretched,
not cropped) to the Kontext training resolution closest to its aspect ratio (PREFERRED_RESOLUTIONS, about one
megapixel), encoded by the VAE (the distribution's mode: no random draw), packed into 2x2 tokens like the
latents, and appended to the image stream, with position ids (1, row, col) where the generated image has
(0, row, col). The DiT's output rows for the reference tokens are dropped. Everything else is FLUX.1-dev's
text-to-image: CLIP pooled + T5 states, the guidance embedding, the resolution-dependent sigma shift of the
generated image's token count, Euler flow-matching steps, optional true CFG with a negative prompt.

Sizes: a request's size is honoured exactly (diffusers instead rescales any size to about one megapixel,
its `max_area`). Without a size the output has the reference's resized size (BFL's reference code does the
same; for a square input this is diffusers' default 1024x1024 too). Without an input image, Kontext is plain
FLUX text-to-image at 1024x1024.
"""

from __future__ import annotations

import numpy as np
import torch

from diffserve.runtime import step_cache
from diffserve.runtime.api import GenerationRequest, GenerationResult, InvalidRequest
from diffserve.runtime.pipelines import stages
from diffserve.runtime.pipelines.flux import T5_LENGTH, FluxPipeline, image_ids, pack, sigma_shift, unpack

# (width, height) Kontext was trained at; diffusers' PREFERRED_KONTEXT_RESOLUTIONS (BFL's list).
PREFERRED_RESOLUTIONS = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024),
    (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688), (1568, 672),
)  # fmt: skip

# GenerationRequest.extra key: False keeps the reference at its own size (diffusers' _auto_resize=False)
AUTO_RESIZE = "kontext_auto_resize"


def reference_size(width: int, height: int, multiple: int = 16, auto_resize: bool = True) -> tuple[int, int]:
    """The size the reference image is resized to: its own size rounded down to `multiple` (the VAE's scale
    times the 2x2 packing), then, with auto_resize, the preferred resolution whose aspect ratio is closest
    (ties: the smaller width), as diffusers' FluxKontextPipeline chooses."""
    w, h = (max(multiple, v // multiple * multiple) for v in (width, height))
    if auto_resize:
        _, w, h = min((abs(w / h - pw / ph), pw, ph) for pw, ph in PREFERRED_RESOLUTIONS)
    return w // multiple * multiple, h // multiple * multiple


class FluxKontextPipeline(FluxPipeline):
    family, task, accepts_image = "flux-kontext", "image", True
    batches_samples = False  # one request per run; identical unseeded requests still merge (api.batch_key)

    def setup(self):
        super().setup()
        self.rules = stages.Rules(multiple=self.vae_scale * 2, accepts_image=True, label="FLUX.1 Kontext")
        # diffusers' FluxKontextPipeline defaults (FLUX.1-Kontext-dev); no strength: the whole image is
        # generated from noise, the reference steers it through attention.
        self.defaults = {"width": 1024, "height": 1024, "num_inference_steps": 28, "guidance_scale": 3.5}
        self.image_defaults = {}

    def plan(self, req: GenerationRequest) -> stages.Plan:
        if req.strength is not None:
            raise InvalidRequest(
                "this model (FLUX.1 Kontext) edits by instruction and takes no strength: the prompt says "
                "what to change"
            )
        plan = stages.plan_request(req, self.defaults, self.rules)
        plan.strength = None
        auto = plan.extra.get(AUTO_RESIZE, True)
        if not isinstance(auto, bool):
            raise InvalidRequest(f"{AUTO_RESIZE} must be true or false, got {auto!r}")
        if plan.image is not None:
            plan.extra["reference_size"] = reference_size(*plan.image.size, self.rules.multiple, auto)
            if req.width is None and req.height is None:  # plan_request took the input's own size
                plan.width, plan.height = plan.extra["reference_size"]
        stages.extra_number(plan, "true_cfg_scale", 1.0, 1.0, 100.0)
        step_cache.check_request(plan)
        return plan

    def reference_tokens(self, image, size: tuple[int, int], dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (1, seq, c*4), ids (seq, 3)) of the reference image resized to `size`: the VAE's mode
        normalised as the latents are, packed, with ids (1, row, col)."""
        pixels = stages.image_tensor(image, *size).to(self.device, dtype)
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode()
        latents = ((latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor).to(dtype)
        h, w = latents.shape[-2:]
        ids = image_ids(h // 2, w // 2, "cpu", dtype)
        ids[:, 0] = 1
        return pack(latents), stages.upload(ids, self.device)

    def run(self, p: stages.Plan, timings, on_step, should_cancel) -> GenerationResult:
        n, true_cfg = p.num_outputs, p.extra["true_cfg_scale"]  # > 1: real CFG (negative prompt)
        h, w = 2 * (p.height // (self.vae_scale * 2)), 2 * (p.width // (self.vae_scale * 2))
        dtype, gen = self.text_encoder_2.dtype, stages.cpu_generator(p.seed)  # = the T5 states
        shape = (n, self.transformer_config["in_channels"] // 4, h, w)
        # The noise is the only random draw (the reference's latents are the VAE's mode), as in diffusers.
        draw_noise = stages.gaussian_later(shape, gen, self.device, dtype)
        with timings("encode_text"):
            states, pooled = (x.repeat_interleave(n, 0) for x in self.encode([p.prompt]))
            if true_cfg > 1 and p.negative_prompt is not None:
                neg_states, neg_pooled = (x.repeat_interleave(n, 0) for x in self.encode([p.negative_prompt]))
            else:
                true_cfg = 1.0
        with timings("prepare_latents"):
            scheduler = stages.fresh_scheduler(self.scheduler)
            sigmas = np.linspace(1.0, 1 / p.steps, p.steps)
            mu = sigma_shift((h // 2) * (w // 2), scheduler.config)  # the generated tokens only
            stages.set_timesteps_async(scheduler, self.device, sigmas=sigmas, mu=mu)
            scheduler.set_begin_index(0)
            timesteps = scheduler.timesteps
            guidance = torch.full([n], p.guidance, device=self.device) if self.guidance_embeds else None
            step_times = timesteps.to(dtype) / 1000
            schedule = self.transformer.adaln_schedule(step_times, guidance, pooled)  # see FluxPipeline.run
            neg_schedule = (
                self.transformer.adaln_schedule(step_times, guidance, neg_pooled) if true_cfg > 1 else None
            )
            img_ids = stages.upload(image_ids(h // 2, w // 2, "cpu", dtype), self.device)
            txt_ids = torch.zeros(T5_LENGTH, 3, device=self.device, dtype=self.text_encoder.dtype)
            reference = None
            if p.image is not None:
                reference, ref_ids = self.reference_tokens(p.image, p.extra["reference_size"], dtype)
                reference = reference.expand(n, -1, -1)
                img_ids = torch.cat([img_ids, ref_ids])
            latents = pack(draw_noise())
        generated = latents.shape[1]

        cache = step_cache.StepCache.for_run(step_cache.config_for(p, self.step_cache), len(timesteps))

        def predict(x, t, i):
            common = dict(
                hidden_states=x if reference is None else torch.cat([x, reference], dim=1),
                timestep=t.expand(n).to(x.dtype) / 1000,
                guidance=guidance,
                img_ids=img_ids,
                txt_ids=txt_ids,
                return_dict=False,
            )

            def branch(prompt_states, prompt_pooled, adaln):
                kwargs = dict(encoder_hidden_states=prompt_states, pooled_projections=prompt_pooled, **common)
                return dict(kwargs, adaln=None if adaln is None else adaln[i])

            if true_cfg <= 1:
                out = cache.step(i, self.dit, self.dit_parts, {"cond": branch(states, pooled, schedule)})
                return out["cond"][:, :generated]
            out, neg = step_cache.guided_pair(
                cache,
                i,
                self.dit,
                self.dit_parts,
                branch(states, pooled, schedule),
                branch(neg_states, neg_pooled, neg_schedule),
            )
            out, neg = out[:, :generated], neg[:, :generated]
            return neg + true_cfg * (out - neg)

        with timings("denoise"):
            latents = stages.denoise(scheduler, timesteps, latents, predict, on_step, should_cancel)
        with timings("decode"):
            latents = unpack(latents, h, w) / self.vae.config.scaling_factor + self.vae.config.shift_factor
            images = stages.decode_images(self.vae, latents)
        return GenerationResult(
            images=images, width=p.width, height=p.height, seed=p.seed, dit_forwards=cache.counts()
        )
