"""The server's settings, as one dataclass validated in one place (the CLI builds it; tests build it too)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from diffserve.runtime.config import RuntimeConfig
from diffserve.runtime.limits import Limits

# load_runner itself for one GPU; with --ulysses-degree/--cfg-parallel, rank 0 of a spawned worker group.
DEFAULT_RUNNER_FACTORY = "diffserve.runtime.distributed.launch:load_parallel_runner"


@dataclass
class WorkerConfig:
    """What the worker process needs to build its runner. Picklable: it crosses the spawn boundary."""

    runtime: RuntimeConfig = field(
        default_factory=RuntimeConfig
    )  # model, device, dtype, backend, compile, ...
    warmup_resolutions: list[tuple[int, int]] | None = None  # None -> the runner's own default
    # "module:function" called as factory(runtime) -> runner. Other values exist for tests (a deliberately
    # slow or crashing runner) and for embedding a custom runtime.
    runner_factory: str = DEFAULT_RUNNER_FACTORY
    log_level: str = "info"
    # Batch sizes warmed up at start (CUDA graphs are captured per shape): 1, the powers of two below it,
    # and itself. None -> ServerConfig.max_batch (set there), so the warmed shapes are the dispatched ones.
    warmup_batch: int | None = None
    # Encoder threads (PNG/JPEG/WebP/MP4) that take finished results off the accelerator's critical path,
    # and how many results may wait for one before the worker waits too (bounds the worker's memory).
    # encode_threads=0: the worker's main thread encodes, as before the pipeline (for comparisons).
    encode_threads: int = 2
    encode_backlog: int = 2


@dataclass
class ServerConfig:
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    ui: bool = True  # the playground page at GET / (--no-ui turns it off)
    output_dir: Path = Path("diffserve-output")
    max_queue: int = 16  # requests waiting for the worker (not counting the batch it runs)
    max_batch: int = 4  # samples in one runner call: image requests that share a forward (api.batch_key)
    # How long a request that could share a runner call (tickets.merge_key) may wait, after its admission,
    # for company before it goes alone; 0: never waits. Requests that cannot merge never wait.
    batch_wait_ms: float = 0.0
    request_timeout: float = 600.0  # seconds from admission to result, for an image request
    video_timeout: float = 3600.0  # the same for a video job (a large Wan video takes many minutes)
    drain_timeout: float = 30.0  # SIGTERM: how long in-flight work may finish before the process exits
    kill_grace: float = 30.0  # a worker that ignores a cancel this long after its deadline is killed
    cors_origins: list[str] = field(default_factory=list)  # empty -> no CORS headers at all
    served_model_names: list[str] = field(default_factory=list)  # extra names accepted for `model`
    limits: Limits = field(default_factory=Limits)  # per-request bounds, shared with `diffserve generate`
    max_upload_bytes: int = 20 * 1024 * 1024  # one uploaded image; the whole body may hold two
    max_input_side: int = 4096  # uploaded images: checked before decoding (decompression bombs)
    image_ttl: float = 3600.0  # seconds an image served by URL stays on disk
    # An SSE stream with nothing to send (queued, or a slow step) gets a comment line this often, so that
    # proxies and load balancers do not close it as idle (nginx's default read timeout is 60 s).
    sse_keepalive: float = 15.0
    # Video jobs in PostgreSQL shared by replicas ("postgresql://..."); None: SQLite in output_dir, one node.
    job_store: str | None = None
    # Seconds a replica's claim on a running job lasts without renewal (renewed about every second): after
    # a replica dies, its job waits this long before another replica takes it over.
    job_lease: float = 30.0

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        for name in (
            "max_queue",
            "max_batch",
            "max_upload_bytes",
            "max_input_side",
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
            "job_lease",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.batch_wait_ms < 0:
            raise ValueError("batch_wait_ms must be 0 or more")
        if self.worker.warmup_batch is None:
            self.worker.warmup_batch = self.max_batch
        for name in ("warmup_batch", "encode_backlog"):
            if getattr(self.worker, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.worker.encode_threads < 0:
            raise ValueError("encode_threads must be 0 or more")
        if self.api_key is not None and not self.api_key.strip():
            self.api_key = None
        if self.job_store is not None and not self.job_store.strip():
            self.job_store = None  # an empty $(VARIABLE) in a manifest means "not set"
        if self.job_store is not None and not self.job_store.startswith(("postgresql://", "postgres://")):
            raise ValueError("--job-store takes a postgresql://user:password@host:port/database URL")

    @property
    def max_body_bytes(self) -> int:
        # an edit carries an image and a mask, plus a little form text
        return 2 * self.max_upload_bytes + 64 * 1024
