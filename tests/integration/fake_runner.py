"""A runner with the runtime's interface that IGNORES cancellation, for the one server behaviour the real
runtime cannot show: a worker stuck past a request's deadline (the real pipelines always honour a cancel
between steps), which the engine must kill and replace after its grace period. Every other integration
test runs the real runtime on the tiny FLUX and Wan models.

Selected with `diffserve serve --runner-factory tests.integration.fake_runner:make_runner --model SPEC`,
SPEC a query string: step=seconds per denoising step, ignore_cancel=0|1.
"""

from __future__ import annotations

import time
from urllib.parse import parse_qs

from PIL import Image

from diffserve.runtime.api import GenerationCancelled, GenerationRequest, GenerationResult


class FakeRunner:
    family = "flux"
    task = "image"
    accepts_image = False

    def __init__(self, spec: str):
        opts = {k: v[-1] for k, v in parse_qs(spec or "").items()}
        self.model_id = "fake"
        self.step_seconds = float(opts.get("step", "0.01"))
        self.ignore_cancel = opts.get("ignore_cancel", "0") == "1"
        self.defaults = {"width": 64, "height": 48, "num_inference_steps": 4, "guidance_scale": 3.5}

    def warmup(self, resolutions=None) -> None:
        pass

    def generate(self, req: GenerationRequest, on_step=None, should_cancel=None) -> GenerationResult:
        w, h = req.width or self.defaults["width"], req.height or self.defaults["height"]
        steps = req.num_inference_steps or self.defaults["num_inference_steps"]
        for i in range(steps):
            if should_cancel is not None and should_cancel() and not self.ignore_cancel:
                raise GenerationCancelled()
            time.sleep(self.step_seconds)
            if on_step is not None:
                on_step(i + 1, steps)
        images = [Image.new("RGB", (w, h), (i * 40 % 256, 0, 0)) for i in range(req.num_outputs)]
        return GenerationResult(images=images, width=w, height=h)


def make_runner(config) -> FakeRunner:
    """A runner factory: called with the worker's RuntimeConfig, as the real one is."""
    return FakeRunner(config.model or "")
