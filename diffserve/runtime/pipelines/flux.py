"""FLUX.1 (dev and schnell): text-to-image, and image-to-image with `strength` for the edit route.

Same numbers as diffusers' FluxPipeline / FluxImg2ImgPipeline for the same seed: CLIP pooled + T5 states,
2x2-packed latents, resolution-dependent sigma shift, the guidance embedding for dev (optional true CFG
with a negative prompt and extra["true_cfg_scale"] > 1), Euler flow-matching steps.
"""

from __future__ import annotations

import numpy as np
import torch

from diffserve.runtime import step_cache
from diffserve.runtime.api import GenerationRequest, GenerationResult
from diffserve.runtime.cuda_graphs import GraphedForward
from diffserve.runtime.pipelines import stages, text
from diffserve.runtime.pipelines.base import NativePipeline

T5_LENGTH = 512  # diffusers' max_sequence_length default for both dev and schnell


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(b, c, h, w) -> (b, h/2 * w/2, c*4): each 2x2 latent patch becomes one token."""
    b, c, h, w = latents.shape
    return (
        latents.view(b, c, h // 2, 2, w // 2, 2)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(b, (h // 2) * (w // 2), c * 4)
    )


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(h*w, 3) positions (0, row, col) of the packed image tokens, for the 3-axis RoPE."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


def sigma_shift(seq_len: int, config) -> float:
    """mu for the scheduler's resolution-dependent shift: linear in the token count between two anchors."""
    x0, x1 = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    y0, y1 = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (y1 - y0) / (x1 - x0)
    return seq_len * m + (y0 - m * x0)


class FluxPipeline(NativePipeline):
    family, task, accepts_image = "flux", "image", True
    batches_samples = True  # run_samples: several requests' prompts, seeds and guidance in one forward

    def setup(self):
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.guidance_embeds = bool(self.transformer_config.get("guidance_embeds", False))
        self.rules = stages.Rules(multiple=self.vae_scale * 2, accepts_image=True, label="FLUX")
        # diffusers' FluxPipeline defaults; schnell (no guidance embedding) is the 4-step distilled model.
        steps, guidance = (28, 3.5) if self.guidance_embeds else (4, 0.0)
        self.defaults = {
            "width": 1024,
            "height": 1024,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "strength": 0.6,
        }
        self.image_defaults = {"guidance_scale": 7.0 if self.guidance_embeds else 0.0}  # FluxImg2ImgPipeline
        self.dit = GraphedForward(self.transformer)  # CUDA graphs on a GPU, the plain module elsewhere
        # Step caching (runtime/step_cache.py): the default policy (None: off; a request's
        # extra["step_cache_threshold"] overrides the threshold) and the DiT's head/tail/reuse parts.
        self.step_cache: step_cache.StepCacheConfig | None = None
        self.dit_parts = step_cache.DiTParts(self.transformer)
        self.step_cache_graphs = self.dit_parts.graphs  # a list attribute: _drop_cuda_graphs finds them
        self.clip = text.TextEncoder(self.text_encoder, "pooler_output")
        self.t5 = text.TextEncoder(self.text_encoder_2, "last_hidden_state")

    def encode(self, prompts: list[str]):
        # T5 first: it is one graph replay (asynchronous), so the host time CLIP takes to launch its kernels
        # (when it runs eagerly) overlaps T5's GPU time instead of leaving the GPU idle.
        states = text.t5_states(self.tokenizer_2, self.t5, prompts, T5_LENGTH)
        pooled = text.clip_pooled(self.tokenizer, self.clip, prompts)
        return states.to(self.device), pooled.to(self.device)

    def run(self, p: stages.Plan, timings, on_step, should_cancel) -> GenerationResult:
        return self.run_samples([p], timings, on_step, should_cancel)[0]

    def encode_samples(self, prompts: list[str], counts: list[int]):
        """(T5 states, CLIP pooled), one row per sample: request i's prompt repeated counts[i] times."""
        pairs = stages.encode_each(self.encode, prompts)
        return tuple(stages.repeat_per_sample([pair[k] for pair in pairs], counts) for k in (0, 1))

    def run_samples(
        self, plans: list[stages.Plan], timings, on_step, should_cancel
    ) -> list[GenerationResult]:
        """One forward per step over every plan's samples; each plan keeps its prompt, negative prompt, seed,
        guidance (dev's guidance embedding is per sample) and true CFG scale. plans[0] gives the rest (the
        plans share api.batch_key's "samples" key; an image-to-image plan runs alone)."""
        p, counts = plans[0], stages.counts(plans)
        n = sum(counts)
        # > 1 with a negative prompt: real CFG (a second branch per step; the same for every plan, by the key)
        cfg = [q.extra["true_cfg_scale"] > 1 and q.negative_prompt is not None for q in plans]
        if any(c != cfg[0] for c in cfg) or (p.image is not None and len(plans) > 1):
            raise ValueError("these requests cannot share a forward (api.batch_key)")
        h, w = 2 * (p.height // (self.vae_scale * 2)), 2 * (p.width // (self.vae_scale * 2))
        # Order: a text-to-image request's noise is drawn on a background thread from the start
        # (stages.gaussian_later); the text encoders are queued first (T5 is one graph replay), then the adaLN
        # schedule; while the GPU runs them, the host sets up the rest and uploads the noise without waiting
        # for the GPU (stages.upload). No stage boundary waits either (stages.Timings).
        dtype = self.text_encoder_2.dtype  # = the T5 states
        # Each request's noise from its own seed's generator, drawn as alone: the same samples in any batch.
        gens = [stages.cpu_generator(q.seed) for q in plans]
        shapes = [(q.num_outputs, self.transformer_config["in_channels"] // 4, h, w) for q in plans]
        draws = None  # image-to-image: the generator encodes the image first, then draws
        if p.image is None:
            draws = [
                stages.gaussian_later(s, g, self.device, dtype) for s, g in zip(shapes, gens, strict=True)
            ]
        with timings("encode_text"):
            states, pooled = self.encode_samples([q.prompt for q in plans], counts)
            if cfg[0]:
                neg_states, neg_pooled = self.encode_samples([q.negative_prompt for q in plans], counts)
                true_cfg = stages.sample_values(
                    [q.extra["true_cfg_scale"] for q in plans], counts, self.device
                )
            else:
                true_cfg = 1.0
        with timings("prepare_latents"):
            scheduler = stages.fresh_scheduler(self.scheduler)
            sigmas = np.linspace(1.0, 1 / p.steps, p.steps)
            mu = sigma_shift((h // 2) * (w // 2), scheduler.config)
            stages.set_timesteps_async(scheduler, self.device, sigmas=sigmas, mu=mu)
            timesteps = scheduler.timesteps if p.image is None else self.img2img_timesteps(scheduler, p)
            guidance = None
            if self.guidance_embeds:  # per sample; the float32 that torch.full makes for one request
                guidance = stages.sample_values([q.guidance for q in plans], counts, self.device)
                if not isinstance(guidance, torch.Tensor):
                    guidance = torch.full([n], guidance, device=self.device)
            # Every step's adaLN projections in one GEMM before the loop (FluxTransformer.adaln_schedule):
            # the steps then skip a 6.4 GB weight read each. Same rounding of the inputs as the forward's.
            # Queued as early as its inputs allow: ~4 ms of GPU work at FLUX.1 size while the host goes on.
            step_times = timesteps.to(dtype) / 1000
            # (None when the projections are not fused: then each forward projects for itself.)
            schedule = self.transformer.adaln_schedule(step_times, guidance, pooled)
            neg_schedule = (
                self.transformer.adaln_schedule(step_times, guidance, neg_pooled) if cfg[0] else None
            )
            img_ids = stages.upload(image_ids(h // 2, w // 2, "cpu", dtype), self.device)
            txt_ids = torch.zeros(T5_LENGTH, 3, device=self.device, dtype=self.text_encoder.dtype)
            if draws is not None:
                scheduler.set_begin_index(0)
                latents = draws[0]() if len(draws) == 1 else torch.cat([draw() for draw in draws])
            else:
                gen, shape = gens[0], shapes[0]
                image = stages.image_tensor(p.image, p.width, p.height).to(self.device, dtype)
                clean = self.vae.encode(image.to(self.vae.dtype)).latent_dist.sample(gen)
                clean = ((clean - self.vae.config.shift_factor) * self.vae.config.scaling_factor).to(dtype)
                noise = stages.gaussian(shape, gen, self.device, dtype)
                latents = scheduler.scale_noise(clean.expand(n, -1, -1, -1), timesteps[:1].repeat(n), noise)
            latents = pack(latents)

        # Off (the default): every DiT call is self.dit's, as without step caching; only counted.
        cache = step_cache.StepCache.for_run(step_cache.config_for(p, self.step_cache), len(timesteps))

        def predict(x, t, i):
            common = dict(
                hidden_states=x,
                timestep=t.expand(n).to(x.dtype) / 1000,
                guidance=guidance,
                img_ids=img_ids,
                txt_ids=txt_ids,
                return_dict=False,
            )

            def branch(prompt_states, prompt_pooled, adaln):
                kwargs = dict(encoder_hidden_states=prompt_states, pooled_projections=prompt_pooled, **common)
                return dict(kwargs, adaln=None if adaln is None else adaln[i])

            if not cfg[0]:
                return cache.step(i, self.dit, self.dit_parts, {"cond": branch(states, pooled, schedule)})[
                    "cond"
                ]
            # With --cfg-parallel the two branches run on different ranks at once (distributed/cfg.py).
            out, neg = step_cache.guided_pair(
                cache,
                i,
                self.dit,
                self.dit_parts,
                branch(states, pooled, schedule),
                branch(neg_states, neg_pooled, neg_schedule),
            )
            return stages.guided(out, neg, true_cfg)

        with timings("denoise"):
            latents = stages.denoise(scheduler, timesteps, latents, predict, on_step, should_cancel)
        with timings("decode"):
            latents = unpack(latents, h, w) / self.vae.config.scaling_factor + self.vae.config.shift_factor
            images = stages.decode_images(self.vae, latents)
        return [
            GenerationResult(
                images=mine,
                width=q.width,
                height=q.height,
                seed=q.seed,
                dit_forwards=cache.counts(),
                forward_share=q.num_outputs / n,
            )
            for q, mine in zip(plans, stages.split_samples(images, plans), strict=True)
        ]

    @staticmethod
    def img2img_timesteps(scheduler, p: stages.Plan) -> torch.Tensor:
        """Start `strength` of the way into the schedule: strength 1 is text-to-image from the image's noise."""
        start = int(max(p.steps - min(p.steps * p.strength, p.steps), 0))  # < steps for any strength > 0
        scheduler.set_begin_index(start * scheduler.order)
        return scheduler.timesteps[start * scheduler.order :]

    def plan(self, req: GenerationRequest) -> stages.Plan:
        plan = stages.plan_request(req, self.defaults, self.rules, self.image_defaults)
        stages.extra_number(plan, "true_cfg_scale", 1.0, 1.0, 100.0)
        step_cache.check_request(plan)
        return plan
