"""A runner with the runtime's interface and deliberately controllable timing, for the server tests that the
real tiny models cannot drive on demand: a worker whose steps take a fixed time (so that a queue fills or a
cancel lands mid-generation deterministically), a warmup that takes long enough to observe /health at 503,
and a runner that ignores cancellation (so that the engine's kill-after-grace path runs).

Selected with `diffserve serve --runner-factory tests.integration.fake_runner:make_runner --model SPEC`,
SPEC being a query string: task=image|video, step=seconds, warmup=seconds, accepts_image=0|1,
ignore_cancel=0|1. Everything else (model behaviour, encoding) is real: outputs are PIL images encoded by
diffserve.runtime.outputs in the worker, as the real runtime's are.
"""

from __future__ import annotations

import random
import time
from urllib.parse import parse_qs

from PIL import Image

from diffserve.runtime.api import GenerationCancelled, GenerationRequest, GenerationResult, InvalidRequest


class FakeRunner:
    def __init__(self, spec: str):
        opts = {k: v[-1] for k, v in parse_qs(spec or "").items()}
        self.task = opts.get("task", "image")
        self.family = "wan" if self.task == "video" else "flux"
        self.model_id = f"fake-{self.task}"
        self.accepts_image = opts.get("accepts_image", "1" if self.task == "image" else "0") == "1"
        self.step_seconds = float(opts.get("step", "0.01"))
        self.warmup_seconds = float(opts.get("warmup", "0"))
        self.ignore_cancel = opts.get("ignore_cancel", "0") == "1"
        self.defaults = {"width": 64, "height": 48, "num_inference_steps": 4, "guidance_scale": 3.5}
        if self.task == "video":
            self.defaults.update(num_frames=5, fps=8)

    def warmup(self, resolutions=None) -> None:
        time.sleep(self.warmup_seconds)

    def generate(self, req: GenerationRequest, on_step=None, should_cancel=None) -> GenerationResult:
        if req.image is not None and not self.accepts_image:
            raise InvalidRequest("this model does not take an input image")
        w, h = req.width or self.defaults["width"], req.height or self.defaults["height"]
        steps = req.num_inference_steps or self.defaults["num_inference_steps"]
        for i in range(steps):
            if should_cancel is not None and should_cancel() and not self.ignore_cancel:
                raise GenerationCancelled()
            time.sleep(self.step_seconds)
            if on_step is not None:
                on_step(i + 1, steps)
        rng = random.Random(req.seed)

        def frame():
            return Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))

        if self.task == "video":
            n = req.num_frames or self.defaults["num_frames"]
            videos = [[frame() for _ in range(n)] for _ in range(req.num_outputs)]
            return GenerationResult(videos=videos, fps=req.fps or self.defaults["fps"], width=w, height=h)
        return GenerationResult(images=[frame() for _ in range(req.num_outputs)], width=w, height=h)


def make_runner(model=None, device=None, dtype=None, attention_backend=None) -> FakeRunner:
    return FakeRunner(model or "")
