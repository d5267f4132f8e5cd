"""Wan2.1 / Wan2.2 text-to-video.

Same numbers as diffusers' WanPipeline for the same seed: UMT5 states with the padding zeroed,
float32 latents, classifier-free guidance as two passes when guidance_scale > 1, the scheduler that ships
with the model (UniPC flow for Wan2.1, stepped by schedulers/unipc.py without host syncs). Wan2.2 A14B's second expert (transformer_2, below
boundary_ratio) and TI2V-5B's per-token timesteps (expand_timesteps) follow the pipeline config. TI2V-5B
also takes an image (its first frame): that request runs wan_i2v.run_i2v.
"""

from __future__ import annotations

import torch

from diffserve.runtime import step_cache
from diffserve.runtime.api import GenerationRequest, GenerationResult
from diffserve.runtime.cuda_graphs import GraphedForward
from diffserve.runtime.pipelines import stages, text
from diffserve.runtime.pipelines.base import NativePipeline
from diffserve.runtime.schedulers import sync_free_scheduler

TEXT_LENGTH = 512  # diffusers' max_sequence_length default


class WanPipeline(NativePipeline):
    family, task, accepts_image = "wan", "video", False
    batches_samples = True  # run_samples: several requests' prompts, seeds and guidance in one forward

    def setup(self):
        self.scale_t = self.vae.config.get("scale_factor_temporal") or 4
        self.scale_s = self.vae.config.get("scale_factor_spatial") or 8
        patch = self.transformer_config.get("patch_size", (1, 2, 2))
        # The latent grid must fit the DiT's RoPE table along every axis.
        rope_len = self.transformer_config.get("rope_max_seq_len", 1024)
        self.rules = stages.Rules(
            multiple=self.scale_s * patch[1],
            max_side=rope_len * self.scale_s * patch[1],
            frame_step=self.scale_t,
            max_frames=(rope_len - 1) * self.scale_t + 1,
            label="Wan",
        )
        self.defaults = {
            "width": 832,
            "height": 480,
            "num_frames": 81,
            "num_inference_steps": 50,
            "guidance_scale": 5.0,
            "fps": 16,
        }  # diffusers' WanPipeline defaults; 16 fps as Wan
        ratio = self.pipeline_config.get("boundary_ratio")
        has_second = getattr(self, "transformer_2", None) is not None
        self.boundary = ratio * self.scheduler.config.num_train_timesteps if ratio and has_second else None
        self.expand_timesteps = bool(self.pipeline_config.get("expand_timesteps", False))
        # Wan2.2 TI2V-5B: an image, if sent, is the first frame (pipelines/wan_i2v.py)
        if self.expand_timesteps:
            self.accepts_image = self.rules.accepts_image = True
        # CUDA graphs on a GPU, the plain modules elsewhere; one per expert.
        self.dits = [GraphedForward(self.transformer)]
        if has_second:
            self.dits.append(GraphedForward(self.transformer_2))
        # Step caching (runtime/step_cache.py): the default policy (None: off; a request's
        # extra["step_cache_threshold"] overrides the threshold) and each expert's head/tail/reuse parts
        # (each expert caches separately).
        self.step_cache: step_cache.StepCacheConfig | None = None
        self.dit_parts = [step_cache.DiTParts(dit.fn) for dit in self.dits]
        self.step_cache_graphs = [graph for parts in self.dit_parts for graph in parts.graphs]
        self.t5 = text.TextEncoder(self.text_encoder, "last_hidden_state")

    def schedule(self, steps: int):
        """A fresh scheduler set for `steps`, and the expert (0 or 1) each step runs."""
        scheduler = stages.fresh_scheduler(self.scheduler)
        scheduler.set_timesteps(steps, device=self.device)
        scheduler.set_begin_index(0)
        # UniPC with its coefficients worked out here, on the host: diffusers' own step waits for the GPU.
        scheduler = sync_free_scheduler(scheduler)
        # Wan2.2 A14B: the second expert (dits[1]) takes the steps below the boundary. Decided here from one
        # copy of the timesteps: comparing a GPU timestep in Python would wait for the GPU at every step.
        expert = [0] * len(scheduler.timesteps)
        if self.boundary is not None:
            expert = [int(low) for low in (scheduler.timesteps < self.boundary).tolist()]
        return scheduler, expert

    def encode(self, prompts: list[str]) -> torch.Tensor:
        prompts = [text.clean_prompt(p) for p in prompts]
        states = text.t5_states(self.tokenizer, self.t5, prompts, TEXT_LENGTH, zero_padding=True)
        return states.to(self.device, self.transformer.dtype)

    def run(self, p: stages.Plan, timings, on_step, should_cancel) -> GenerationResult:
        if p.image is not None:  # TI2V with an image (plan_i2v); image requests never batch (api.batch_key)
            from diffserve.runtime.pipelines.wan_i2v import run_i2v

            return run_i2v(self, p, timings, on_step, should_cancel)
        return self.run_samples([p], timings, on_step, should_cancel)[0]

    def run_samples(
        self, plans: list[stages.Plan], timings, on_step, should_cancel
    ) -> list[GenerationResult]:
        """One forward per step (per CFG branch) over every plan's samples; each plan keeps its prompt,
        negative prompt, seed and guidance scales. plans[0] gives the rest (the plans share api.batch_key's
        "samples" key: size, frames, steps, and CFG on or off)."""
        p, counts = plans[0], stages.counts(plans)
        n, cfg = sum(counts), p.guidance > 1.0
        if any((q.guidance > 1.0) != cfg for q in plans):
            raise ValueError("these requests cannot share a forward (api.batch_key)")
        # each expert's CFG scale: a float, or one per sample
        scales = [
            stages.sample_values([q.guidance for q in plans], counts, self.device),
            stages.sample_values([q.extra["guidance_scale_2"] for q in plans], counts, self.device),
        ]
        # Order: the schedule first, while the GPU is still idle, since setting it up waits for the GPU (its
        # copy to the device, the host-side UniPC coefficients, the expert per step); then the text encoders,
        # queued; then the noise, drawn on the CPU while they run. (FLUX's schedule uploads asynchronously,
        # so there the encoders go first.)
        with timings("prepare_latents"):
            scheduler, expert = self.schedule(p.steps)
        with timings("encode_text"):
            cond = stages.repeat_per_sample(
                stages.encode_each(self.encode, [q.prompt for q in plans]), counts
            )
            uncond = None
            if cfg:
                negatives = stages.encode_each(self.encode, [q.negative_prompt or "" for q in plans])
                uncond = stages.repeat_per_sample(negatives, counts)
        with timings("prepare_latents"):
            frames = (p.num_frames - 1) // self.scale_t + 1
            latent_hw = (p.height // self.scale_s, p.width // self.scale_s)
            # Each request's noise from its own seed's generator, drawn as alone: the same in any batch.
            noise = [
                stages.gaussian(
                    (q.num_outputs, self.transformer_config["in_channels"], frames, *latent_hw),
                    stages.cpu_generator(q.seed),
                    self.device,
                    torch.float32,
                )
                for q in plans
            ]
            latents = noise[0] if len(noise) == 1 else torch.cat(noise)

        # Off (the default): every DiT call is self.dits[...]'s, as without step caching; only counted.
        cache = step_cache.StepCache.for_run(
            step_cache.config_for(p, self.step_cache), len(scheduler.timesteps)
        )

        def predict(x, t, i):
            dit, scale = self.dits[expert[i]], scales[expert[i]]
            parts = self.dit_parts[expert[i]]
            x = x.to(dit.fn.dtype)
            if self.expand_timesteps:  # one timestep per latent token (Wan2.2 TI2V)
                tokens = x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2)
                timestep = (torch.ones(tokens, device=x.device) * t).expand(n, -1)
            else:
                timestep = t.expand(n)

            def branch(prompt_states):
                return dict(
                    hidden_states=x, timestep=timestep, encoder_hidden_states=prompt_states, return_dict=False
                )

            if not cfg:
                return cache.step(i, dit, parts, {"cond": branch(cond)})["cond"]
            # With --cfg-parallel the two branches run on different ranks at once (distributed/cfg.py).
            out, neg = step_cache.guided_pair(cache, i, dit, parts, branch(cond), branch(uncond))
            return stages.guided(out, neg, scale)

        with timings("denoise"):
            latents = stages.denoise(scheduler, scheduler.timesteps, latents, predict, on_step, should_cancel)
        with timings("decode"):
            latents = latents.to(self.vae.dtype)
            view = (1, self.vae.config.z_dim, 1, 1, 1)
            mean = torch.tensor(self.vae.config.latents_mean).view(view).to(latents)
            inv_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(view).to(latents)
            videos = stages.decode_videos(self.vae, latents / inv_std + mean)
        return [
            GenerationResult(
                videos=mine,
                width=q.width,
                height=q.height,
                seed=q.seed,
                dit_forwards=cache.counts(),
                forward_share=q.num_outputs / n,
            )
            for q, mine in zip(plans, stages.split_samples(videos, plans), strict=True)
        ]

    def plan(self, req: GenerationRequest) -> stages.Plan:
        if req.image is not None and self.accepts_image:
            from diffserve.runtime.pipelines.wan_i2v import plan_i2v

            return plan_i2v(self, req)
        plan = stages.plan_request(req, self.defaults, self.rules)
        # Wan2.2 A14B's guidance for the second expert; the same as guidance_scale unless given.
        stages.extra_number(plan, "guidance_scale_2", plan.guidance, 0.0, 100.0)
        step_cache.check_request(plan)
        return plan
