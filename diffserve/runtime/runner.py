"""One loaded model and the way to run it: `load_runner(...)` -> Runner.generate / Runner.warmup.

The server's worker process, the CLI and the Python API (`diffserve.generate`) all go through this.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from diffserve.runtime.api import CancelCheck, GenerationRequest, GenerationResult, StepCallback
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

    def generate(
        self,
        req: GenerationRequest,
        on_step: StepCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> GenerationResult:
        import torch

        try:
            return self.pipeline(req, on_step=on_step, should_cancel=should_cancel)
        except torch.OutOfMemoryError:
            size = f"{req.width or self.defaults['width']}x{req.height or self.defaults['height']}"
            if self.task == "video":
                size += f", {req.num_frames or self.defaults['num_frames']} frames"
            raise OutOfMemory(
                f"out of {self.device} memory generating {req.num_outputs} x {size} with {self.model_id}: "
                "lower the size, frame count or number of outputs, or use a larger GPU"
            ) from None

    def warmup(self, resolutions: list[tuple[int, int]] | None = None) -> None:
        """One one-step generation per (width, height): compiles/selects kernels for the text encoders, the DiT
        and the VAE before the first real request."""
        sizes = resolutions or [(self.defaults["width"], self.defaults["height"])]
        frame_step = getattr(getattr(self.pipeline, "rules", None), "frame_step", None)
        for width, height in sizes:
            start = time.perf_counter()
            req = GenerationRequest(
                prompt="warmup",
                width=width,
                height=height,
                num_inference_steps=1,
                seed=0,
                num_frames=(frame_step + 1) if self.task == "video" else None,
                is_warmup=True,
            )
            self.generate(req)
            logger.info("warmup %dx%d: %.2f s", width, height, time.perf_counter() - start)


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
    model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    attention_backend: str | None = None,
) -> Runner:
    """Load `model` (a diffusers directory or a cached Hugging Face id; None -> the bundled default model)
    onto `device` (default: the first accelerator, else the CPU) in `dtype` (default bf16 on GPUs, fp32 on
    the CPU). Raises ModelLoadError with a one-line message for anything the user can fix."""
    from diffserve.runtime.cuda_graphs import configure_blas_workspace
    from diffserve.runtime.layers.attention import set_attention_backend
    from diffserve.runtime.pipelines import pipeline_class
    from diffserve.runtime.pipelines.stages import fit_defaults

    spec = inspect_model(model)
    device = check_device(device or default_device())
    configure_blas_workspace(device)  # before the first GEMM of the process (see its docstring)
    torch_dtype = parse_dtype(dtype, device)
    if attention_backend is not None:
        try:
            set_attention_backend(attention_backend)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
    start = time.perf_counter()
    pipeline = pipeline_class(spec.family).load(spec, device, torch_dtype, attention_backend)
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
    return Runner(pipeline, spec.model_id, spec.path, device, torch_dtype)


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
