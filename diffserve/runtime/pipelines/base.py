"""What every family pipeline shares: its components as attributes, the call that times the stages, and
the three facts the server needs (family, task, accepts_image) plus the defaults it fills in."""

from __future__ import annotations

import time
from typing import Any

import torch

from diffserve.runtime.api import (
    CancelCheck,
    GenerationRequest,
    GenerationResult,
    InvalidRequest,
    Outcome,
    StepCallback,
)
from diffserve.runtime.pipelines import stages


class NativePipeline:
    """A pipeline over our loaded components. Subclasses implement setup(), plan() and run(), and may
    implement run_samples() (several requests' samples in one forward; then batches_samples = True)."""

    family: str
    task: str  # "image" | "video"
    accepts_image: bool = False
    batches_samples: bool = False  # run_samples is implemented (api.batch_key's "samples" groups)
    defaults: dict[str, Any]

    def __init__(
        self,
        components: dict[str, Any],
        transformer_config: dict[str, Any],
        device,
        pipeline_config: dict[str, Any] | None = None,
    ):
        for name, component in components.items():
            setattr(self, name, component)
        self.components = components
        self.transformer_config = transformer_config
        self.pipeline_config = pipeline_config or {}
        self.device = torch.device(device)
        self.setup()

    @classmethod
    def load(cls, spec, device: str, dtype, config) -> NativePipeline:
        """Load `spec` onto `device` in `dtype` (a torch.dtype) with the rest of `config` (RuntimeConfig)."""
        from diffserve.runtime import offload
        from diffserve.runtime.loader import load_components

        components = load_components(
            spec, device, dtype, config.attention_backend, config.compile, config.quantization, config.offload
        )
        index = {k: v for k, v in spec.index.items() if not isinstance(v, list)}
        pipeline = cls(components, spec.config("transformer"), device, index)
        offload.apply(pipeline, config.offload)  # --offload: host memory, hooks, graphs off where they move
        pipeline.defaults.update(spec.runtime_defaults())
        pipeline.step_cache = config.step_cache_config()  # None: off (a request may still turn it on)
        return pipeline

    def _drop_cuda_graphs(self) -> bool:
        """Turn off this pipeline's CUDA graphs (cuda_graphs.GraphedForward attributes, or lists of them);
        True when one of them held a graph, i.e. when retrying without them can help."""
        from diffserve.runtime.cuda_graphs import GraphedForward

        freed = False
        for value in vars(self).values():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, GraphedForward):
                    freed = item.disable("a generation ran out of memory with graphs cached") or freed
        return freed

    def setup(self) -> None:
        raise NotImplementedError

    def plan(self, req: GenerationRequest) -> stages.Plan:
        raise NotImplementedError

    def run(self, plan: stages.Plan, timings: stages.Timings, on_step, should_cancel) -> GenerationResult:
        raise NotImplementedError

    def run_samples(
        self, plans: list[stages.Plan], timings: stages.Timings, on_step, should_cancel
    ) -> list[GenerationResult]:
        """One result per plan, all the plans' samples in one forward. The plans share api.batch_key's
        "samples" key (Runner.generate_batch groups them so): plans[0] gives the shared settings."""
        raise NotImplementedError

    def _retrying(self, run):
        """run(), once more without CUDA graphs when it runs out of memory with graphs cached."""
        try:
            return run()
        except torch.OutOfMemoryError:
            # The CUDA graphs' pools keep a forward's activations reserved between steps, which can leave
            # the VAE decode (or a larger request) without room. Free them, stay eager, retry once.
            if not self._drop_cuda_graphs():
                raise
            torch.cuda.empty_cache()
            return run()
        finally:
            for manager in getattr(self, "offload", None) or ():  # --offload: the VAE goes home too
                manager.release()

    @torch.inference_mode()
    def __call__(
        self,
        req: GenerationRequest,
        on_step: StepCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> GenerationResult:
        start, timings = time.perf_counter(), stages.Timings()
        with timings("validate"):
            plan = self.plan(req)
        result = self._retrying(lambda: self.run(plan, timings, on_step, should_cancel))
        result.fps = plan.fps
        result.timings = {**timings.settle(), "total": time.perf_counter() - start}
        return result

    @torch.inference_mode()
    def generate_samples(
        self,
        reqs: list[GenerationRequest],
        on_step: StepCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> list[Outcome]:
        """Requests of one "samples" batch key in one run (run_samples), one outcome per request: its
        result, or the InvalidRequest its own values raised (the others run without it). A single valid
        request runs exactly as alone (run_samples of one plan is run)."""
        start, timings = time.perf_counter(), stages.Timings()
        outcomes: list[Outcome | None] = [None] * len(reqs)
        valid: list[tuple[int, stages.Plan]] = []
        with timings("validate"):
            for i, req in enumerate(reqs):
                try:
                    valid.append((i, self.plan(req)))
                except InvalidRequest as e:
                    outcomes[i] = e
        if valid:
            plans = [plan for _, plan in valid]
            results = self._retrying(lambda: self.run_samples(plans, timings, on_step, should_cancel))
            timings = {**timings.settle(), "total": time.perf_counter() - start}
            for (i, plan), result in zip(valid, results, strict=True):
                result.fps, result.timings = plan.fps, dict(timings)
                outcomes[i] = result
        return outcomes  # type: ignore[return-value]
