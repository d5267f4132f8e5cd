"""One loaded model and the way to run it: `load_runner(...)` -> Runner.generate / Runner.warmup.

The server's worker process, the CLI and the Python API (`diffserve.generate`) all go through this.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from diffserve.runtime.api import (
    CancelCheck,
    GenerationRequest,
    GenerationResult,
    InvalidRequest,
    Outcome,
    StepCallback,
    batch_key,
    batch_shapes,
    run_grouped,
)
from diffserve.runtime.config import RuntimeConfig
from diffserve.runtime.loader import ModelLoadError, default_device, inspect_model, parse_dtype

logger = logging.getLogger(__name__)


class OutOfMemory(RuntimeError):
    """The accelerator ran out of memory for one request; the message says what to lower."""


class Runner:
    def __init__(self, pipeline, model_id: str, path: Path, device: str, dtype):
        self.pipeline = pipeline
        self.model_id = model_id
        self.path = path
        self.device = device
        self.dtype = dtype
        self.family: str = pipeline.family
        self.task: str = pipeline.task
        self.accepts_image: bool = pipeline.accepts_image
        self.defaults: dict[str, Any] = dict(pipeline.defaults)
        # Several requests' samples in one forward (generate_batch); else only identical ones merge.
        self.batches_samples: bool = bool(getattr(pipeline, "batches_samples", False))
        self.loras = None  # runtime/lora.LoraManager when the config has --lora adapters

    @property
    def lora_names(self) -> list[str]:
        return self.loras.names if self.loras is not None else []

    def _adapters(self, req: GenerationRequest):
        """The request's LoRA adapter set (extra["lora"]), applied for the duration of its runner call."""
        import contextlib

        scales = (req.extra or {}).get("lora")
        if self.loras is None:
            if scales:
                raise InvalidRequest("this model serves no LoRA adapters (start it with --lora NAME=PATH)")
            return contextlib.nullcontext()
        return self.loras.applied(scales)

    @property
    def step_cache(self) -> bool:
        """Whether step caching is on by default (a request's step_cache_threshold overrides it)."""
        config = getattr(self.pipeline, "step_cache", None)
        return bool(config is not None and config.enabled)

    def generate(
        self,
        req: GenerationRequest,
        on_step: StepCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> GenerationResult:
        import torch

        try:
            with self._adapters(req):
                return self.pipeline(req, on_step=on_step, should_cancel=should_cancel)
        except torch.OutOfMemoryError:
            raise self._out_of_memory(req, req.num_outputs) from None

    def generate_batch(
        self,
        reqs: list[GenerationRequest],
        on_step: StepCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> list[Outcome]:
        """Several requests in as few runner calls as api.batch_key allows (one when they share its key, as
        the server's engine sends them), one outcome per request, in order: its GenerationResult (its own
        seed; forward_share its part of the call) or its own exception (a request's bad values fail it
        alone; an error of a shared call fails that call's requests). A request's samples are what it gets
        alone, up to float rounding (each sample's noise comes from its own seed's generator)."""
        import torch

        def run_samples(group: list[GenerationRequest]) -> list[Outcome]:
            try:
                with self._adapters(group[0]):  # one batch_key: one adapter set
                    return self.pipeline.generate_samples(group, on_step=on_step, should_cancel=should_cancel)
            except torch.OutOfMemoryError:
                raise self._out_of_memory(group[0], sum(r.num_outputs for r in group)) from None

        def key(req: GenerationRequest):
            return batch_key(
                req, self.family, self.defaults, samples=self.batches_samples, step_cache=self.step_cache
            )

        return run_grouped(
            reqs,
            key,
            lambda req: self.generate(req, on_step=on_step, should_cancel=should_cancel),
            run_samples if self.batches_samples else None,
        )

    def _out_of_memory(self, req: GenerationRequest, outputs: int) -> OutOfMemory:
        size = f"{req.width or self.defaults['width']}x{req.height or self.defaults['height']}"
        if self.task == "video":
            size += f", {req.num_frames or self.defaults['num_frames']} frames"
        batch = "" if outputs == req.num_outputs else " (requests batched together: lower --max-batch)"
        return OutOfMemory(
            f"out of {self.device} memory generating {outputs} x {size} with {self.model_id}{batch}: "
            "lower the size, frame count or number of outputs, or use a larger GPU"
        )

    def warmup(self, resolutions: list[tuple[int, int]] | None = None, max_batch: int = 1) -> None:
        """One one-step generation per (width, height) and batch size: compiles/selects kernels for the text
        encoders, the DiT and the VAE, and captures the DiT's CUDA graphs (one per input shape), before the
        first real request.

        Batch sizes: 1, 2, 4, ... (powers of two) below `max_batch`, and `max_batch` itself; for videos 1
        only (video requests are never merged). Not every size up to max_batch: each warmed shape costs a
        generation at start and a graph pool (GPU memory) for as long as it is cached, and the DiT keeps
        only a few graphs (GraphedForward.max_graphs, least recently used out). Powers of two cover the
        n=2 request and a full batch (the usual shape under load, when the queue fills batches) at a cost
        that grows with log2(max_batch); the server's engine forms batches of these sizes when it can
        (tickets.batch_for), and a size in between (3, 5..7) that it cannot avoid captures on first use.
        A batch size that runs out of memory here is reported, not fatal: the server starts, and larger
        batches at that size are skipped (a request that large would fail with out_of_memory)."""
        sizes = resolutions or [(self.defaults["width"], self.defaults["height"])]
        frame_step = getattr(getattr(self.pipeline, "rules", None), "frame_step", None)
        batches = batch_shapes(1 if self.task == "video" else max_batch)
        cap = getattr(getattr(self.pipeline, "dit", None), "max_graphs", None)
        if isinstance(cap, int) and len(sizes) * len(batches) > cap:
            logger.warning(
                "warmup: %d shapes (%d sizes x batch %s) exceed the DiT's %d cached CUDA graphs: the first "
                "ones warmed will be captured again on first use",
                len(sizes) * len(batches),
                len(sizes),
                batches,
                cap,
            )
        for width, height in sizes:
            for n in batches:
                start = time.perf_counter()
                req = GenerationRequest(
                    prompt="warmup",
                    width=width,
                    height=height,
                    num_inference_steps=1,
                    seed=0,
                    num_outputs=n,
                    num_frames=(frame_step + 1) if self.task == "video" else None,
                    is_warmup=True,
                )
                try:
                    self.generate(req)
                except OutOfMemory as e:
                    if n == 1:
                        raise
                    logger.warning(
                        "warmup %dx%d: a batch of %d does not fit (%s); lower --max-batch",
                        width,
                        height,
                        n,
                        e,
                    )
                    break
                logger.info("warmup %dx%d batch %d: %.2f s", width, height, n, time.perf_counter() - start)


def check_device(device: str) -> str:
    """A device string torch accepts and that exists here, else ModelLoadError."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ModelLoadError(f"unknown device {device!r}: use cpu, cuda, cuda:N or xpu") from None
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "xpu": hasattr(torch, "xpu") and torch.xpu.is_available(),
    }.get(dev.type, False)
    if not available:
        raise ModelLoadError(f"device {device!r} is not available in this torch build ({torch.__version__})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    return str(dev)


def load_runner(
    model: str | RuntimeConfig | None = None,
    device: str | None = None,
    dtype: str | None = None,
    attention_backend: str | None = None,
    *,
    compile: bool = False,
) -> Runner:
    """Load `model` (a diffusers directory or a cached Hugging Face id; None -> the bundled default model)
    onto `device` (default: the first accelerator, else the CPU) in `dtype` (default bf16 on GPUs, fp32 on
    the CPU). `model` may instead be a whole RuntimeConfig (what the CLI and the server's worker pass).
    Raises ModelLoadError with a one-line message for anything the user can fix."""
    from diffserve.runtime.cuda_graphs import configure_blas_workspace
    from diffserve.runtime.pipelines import pipeline_class
    from diffserve.runtime.pipelines.stages import fit_defaults

    if isinstance(model, RuntimeConfig):
        config = model
    else:
        try:
            config = RuntimeConfig(model, device, dtype, attention_backend, compile)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
    spec = inspect_model(config.model)
    device = check_device(config.device or default_device())
    # before the first GEMM of the process (see its docstring); ranks of a parallel group run eagerly
    configure_blas_workspace(device, eager=config.parallel.enabled)
    torch_dtype = parse_dtype(config.dtype, device)
    check_attention_backend(config.attention_backend, spec, device, torch_dtype)
    start = time.perf_counter()
    pipeline = pipeline_class(spec.family).load(spec, device, torch_dtype, config)
    pipeline.defaults = fit_defaults(pipeline.defaults, pipeline.rules)
    logger.info(
        "loaded %s (%s, %s) on %s in %s in %.1f s",
        spec.model_id,
        spec.family,
        spec.pipeline_class,
        device,
        str(torch_dtype).replace("torch.", ""),
        time.perf_counter() - start,
    )
    runner = Runner(pipeline, spec.model_id, spec.path, device, torch_dtype)
    if config.loras:
        runner.loras = attach_pipeline_loras(pipeline, spec, config)
    return runner


def attach_pipeline_loras(pipeline, spec, config: RuntimeConfig):
    """The config's LoRA adapters on the pipeline's native DiT (runtime/lora.py); ModelLoadError otherwise."""
    from diffserve.runtime.lora import LoraFileError, attach_loras
    from diffserve.runtime.models.base import NativeDiT

    # Wan2.2 A14B (T2V and I2V) has a second expert, pipeline.transformer_2: the adapters go on
    # pipeline.transformer only, as diffusers' WanLoraLoaderMixin.load_lora_weights does by default
    # (load_into_transformer_2=False), so a file made for diffusers gives the same video here.
    dit = getattr(pipeline, "transformer", None)
    if spec.family not in ("flux", "wan", "wan-i2v") or not isinstance(dit, NativeDiT):
        raise ModelLoadError(
            f"--lora: LoRA adapters run on the native FLUX and Wan DiTs; {spec.model_id} is {spec.family}"
        )
    try:
        return attach_loras(dit, config.loras, config.max_loras)
    except LoraFileError as e:
        raise ModelLoadError(str(e)) from None


def check_attention_backend(name: str | None, spec, device: str, dtype) -> None:
    """Choose the attention backend for this process and resolve it now for the DiT's head size, so that an
    explicit choice that cannot run here (fa3 without FA3) fails before any weight loads, with one line."""
    from diffserve.platforms import AttentionBackendUnavailable
    from diffserve.runtime.layers.attention import get_attention_backend, set_attention_backend
    from diffserve.runtime.loader import device_type

    if name is not None:
        set_attention_backend(name)  # already validated by RuntimeConfig
    try:
        head_size = int(spec.config("transformer").get("attention_head_dim") or 128)
    except (ModelLoadError, KeyError, TypeError, ValueError, OSError):
        head_size = 128  # a generic pipeline without a transformer/ folder: the common head size
    try:
        get_attention_backend(head_size, dtype, device_type(device))
    except (AttentionBackendUnavailable, ValueError) as e:
        raise ModelLoadError(str(e).strip().splitlines()[0]) from None


_cached: tuple[tuple, Runner] | None = None


def generate(
    prompt: str,
    *,
    model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    attention_backend: str | None = None,
    output: str | Path | None = None,
    on_step: StepCallback | None = None,
    **fields,
) -> GenerationResult:
    """One generation without the server. `fields` are GenerationRequest's (width, height, num_frames,
    num_inference_steps, guidance_scale, seed, image, strength, ...). The last loaded model stays loaded
    for the next call with the same model/device/dtype/backend. With `output`, the result is also written
    there (.png/.jpg/.webp/.mp4)."""
    global _cached
    key = (model, device, dtype, attention_backend)
    if _cached is None or _cached[0] != key:
        _cached = None  # free the previous model before loading the next
        _cached = (key, load_runner(model, device, dtype, attention_backend))
    result = _cached[1].generate(GenerationRequest(prompt=prompt, **fields), on_step=on_step)
    if output is not None:
        from diffserve.runtime.outputs import save_result

        save_result(result, output)
    return result
