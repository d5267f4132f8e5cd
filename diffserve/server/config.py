"""The server's settings, as one dataclass validated in one place (the CLI builds it; tests build it too)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

# load_runner itself for one GPU; with --ulysses-degree/--cfg-parallel, rank 0 of a spawned worker group.
DEFAULT_RUNNER_FACTORY = "diffserve.runtime.distributed.launch:load_parallel_runner"
_RESOLUTION = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_resolutions(text: str | None) -> list[tuple[int, int]] | None:
    """'1024x1024,768x1344' -> [(1024, 1024), (768, 1344)] (width, height). None/'' -> None."""
    if not text:
        return None
    out = []
    for part in text.split(","):
        m = _RESOLUTION.match(part)
        if not m:
            raise ValueError(f"bad resolution {part.strip()!r}: expected WIDTHxHEIGHT, e.g. 1024x1024")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


@dataclass
class WorkerConfig:
    """What the worker process needs to build its runner. Picklable: it crosses the spawn boundary."""

    model: str | None = None  # None -> the bundled default model
    device: str | None = None
    dtype: str | None = None
    attention_backend: str | None = None
    warmup_resolutions: list[tuple[int, int]] | None = None  # None -> the runner's own default
    # "module:function" called like load_runner(model=, device=, dtype=, attention_backend=). Other values
    # exist for tests (a deliberately slow or crashing runner) and for embedding a custom runtime.
    runner_factory: str = DEFAULT_RUNNER_FACTORY
    ulysses_degree: int = 1  # --ulysses-degree: every DiT forward split over this many GPUs
    cfg_parallel: bool = False  # --cfg-parallel: the two guidance branches on two GPU groups
    log_level: str = "info"


@dataclass
class ServerConfig:
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    output_dir: Path = Path("diffserve-output")
    max_queue: int = 16  # requests waiting for the worker (not counting the batch it runs)
    max_batch: int = 4  # outputs merged into one runner call (identical unseeded image requests)
    request_timeout: float = 600.0  # seconds from admission to result, for an image request
    video_timeout: float = 3600.0  # the same for a video job (a large Wan video takes many minutes)
    drain_timeout: float = 30.0  # SIGTERM: how long in-flight work may finish before the process exits
    kill_grace: float = 30.0  # a worker that ignores a cancel this long after its deadline is killed
    cors_origins: list[str] = field(default_factory=list)  # empty -> no CORS headers at all
    served_model_names: list[str] = field(default_factory=list)  # extra names accepted for `model`
    max_prompt_chars: int = 8192
    max_upload_bytes: int = 20 * 1024 * 1024  # one uploaded image; the whole body may hold two
    max_image_side: int = 2048  # output width and height
    max_input_side: int = 4096  # uploaded images: checked before decoding (decompression bombs)
    max_steps: int = 200
    max_n: int = 10
    max_frames: int = 257
    image_ttl: float = 3600.0  # seconds an image served by URL stays on disk
    # An SSE stream with nothing to send (queued, or a slow step) gets a comment line this often, so that
    # proxies and load balancers do not close it as idle (nginx's default read timeout is 60 s).
    sse_keepalive: float = 15.0

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        for name in (
            "max_queue",
            "max_batch",
            "max_prompt_chars",
            "max_upload_bytes",
            "max_image_side",
            "max_input_side",
            "max_steps",
            "max_n",
            "max_frames",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in (
            "request_timeout",
            "video_timeout",
            "drain_timeout",
            "kill_grace",
            "image_ttl",
            "sse_keepalive",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.api_key is not None and not self.api_key.strip():
            self.api_key = None

    @property
    def max_body_bytes(self) -> int:
        # an edit carries an image and a mask, plus a little form text
        return 2 * self.max_upload_bytes + 64 * 1024
