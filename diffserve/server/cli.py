"""`diffserve serve`: arguments, and running the app under uvicorn (imports nothing heavy until run).

Mistakes found before the model loads end with one line and exit status 2: a bad flag value, a model
directory that does not exist, a port another process holds.
"""

from __future__ import annotations

import argparse
import errno
import logging
import socket
import sys
import time

from diffserve.runtime.config import add_runtime_arguments, runtime_config_from_args
from diffserve.runtime.limits import LimitError, Limits, parse_sizes
from diffserve.server.config import DEFAULT_RUNNER_FACTORY, ServerConfig, WorkerConfig


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    d, lim = ServerConfig(), Limits()
    a = parser.add_argument
    add_runtime_arguments(parser)  # --model, --device, --dtype, --attention-backend, --compile, parallel
    a("--host", default=d.host, help=f"address to bind (default {d.host})")
    a("--port", type=int, default=d.port, help=f"port (default {d.port})")
    a(
        "--api-key",
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $DIFFSERVE_API_KEY, else none; "
        "prefer the env variable, which other users cannot read from the process list)",
    )
    a("--no-ui", action="store_true", help="do not serve the playground page at / (default: served)")
    a(
        "--max-queue",
        type=int,
        default=d.max_queue,
        help=f"requests waiting for the worker; beyond, 429 (default {d.max_queue})",
    )
    a(
        "--max-batch",
        type=int,
        default=d.max_batch,
        help=f"samples in one runner call: image requests of the same model, size, steps and settings share a "
        f"forward (each keeps its prompt, seed, guidance); batch sizes 1, 2, 4, ... up to it are warmed up at "
        f"start (default {d.max_batch})",
    )
    a(
        "--batch-wait-ms",
        type=float,
        default=d.batch_wait_ms,
        help="milliseconds a request that could share a runner call may wait after admission for company "
        "before it runs alone; requests that cannot be merged never wait. Under load batches form anyway "
        "from the requests queued while the accelerator is busy, so the wait only helps bursts reaching an "
        "idle server, at the cost of delaying every lone mergeable request: hence the default "
        f"{d.batch_wait_ms:g}; try 5-20 for bursty clients",
    )
    a(
        "--encode-threads",
        type=int,
        default=d.worker.encode_threads,
        help="threads in the worker that encode PNG/JPEG/WebP/MP4 while the accelerator runs the next batch; "
        f"0: the worker encodes between batches, leaving the accelerator idle (default {d.worker.encode_threads})",
    )
    a(
        "--request-timeout",
        type=float,
        default=d.request_timeout,
        help=f"seconds per image request, queue included (default {d.request_timeout:g})",
    )
    a(
        "--video-timeout",
        type=float,
        default=d.video_timeout,
        help=f"seconds per video job, queue included (default {d.video_timeout:g})",
    )
    a(
        "--drain-timeout",
        type=float,
        default=d.drain_timeout,
        help="on SIGTERM, seconds in-flight work may take to finish before the server exits "
        f"(default {d.drain_timeout:g})",
    )
    a(
        "--kill-grace",
        type=float,
        default=d.kill_grace,
        help="seconds a worker may ignore the cancel of a timed-out request before it is killed and restarted "
        f"(default {d.kill_grace:g})",
    )
    a(
        "--sse-keepalive",
        type=float,
        default=d.sse_keepalive,
        help="seconds between keep-alive comments on an image stream (stream=true) that has nothing to send "
        f"(default {d.sse_keepalive:g})",
    )
    a(
        "--warmup-resolutions",
        metavar="WxH[,WxH...]",
        help="sizes warmed up at start (default: the model's default size)",
    )
    a(
        "--output-dir",
        default=str(d.output_dir),
        help=f"generated files and the video job database (default {d.output_dir})",
    )
    a(
        "--job-store",
        metavar="URL",
        help="postgresql://user:password@host:port/db: keep video jobs in PostgreSQL, shared by replicas that "
        "all mount --output-dir (default: SQLite in --output-dir, one server; README, 'Two replicas')",
    )
    a(
        "--job-lease",
        type=float,
        default=d.job_lease,
        help="with --job-store: seconds after which a job whose replica stopped renewing its claim goes to "
        f"another replica (default {d.job_lease:g})",
    )
    a("--cors-origins", help="comma-separated origins allowed by CORS (default: CORS off)")
    a(
        "--served-model-name",
        action="append",
        default=[],
        help="another name clients may pass as 'model' (repeatable; the model's own name always works: "
        "its directory's name, or its Hugging Face id)",
    )
    a(
        "--max-prompt-chars",
        type=int,
        default=lim.max_prompt_chars,
        help=f"longest prompt (default {lim.max_prompt_chars})",
    )
    a(
        "--max-image-side",
        type=int,
        default=lim.max_side,
        help=f"largest output width or height (default {lim.max_side}, or less where the model allows less)",
    )
    a("--max-steps", type=int, default=lim.max_steps, help=f"most denoising steps (default {lim.max_steps})")
    a("--max-n", type=int, default=lim.max_n, help=f"most outputs per image request (default {lim.max_n})")
    a("--max-frames", type=int, default=lim.max_frames, help=f"most video frames (default {lim.max_frames})")
    a(
        "--max-upload-bytes",
        type=int,
        default=d.max_upload_bytes,
        help=f"largest uploaded image (default {d.max_upload_bytes})",
    )
    a("--runner-factory", default=DEFAULT_RUNNER_FACTORY, help=argparse.SUPPRESS)  # tests, custom runtimes
    a(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="(default info)",
    )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The flags (and the environment variables that stand in for them) -> ServerConfig; raises ValueError
    with a one-line message."""
    from diffserve import envs

    runtime = runtime_config_from_args(args)
    try:
        warmup = parse_sizes(args.warmup_resolutions, "--warmup-resolutions")
    except LimitError as e:
        raise ValueError(f"--warmup-resolutions: {e}") from None
    worker = WorkerConfig(
        runtime=runtime,
        warmup_resolutions=warmup,
        runner_factory=args.runner_factory,
        log_level=args.log_level,
        warmup_batch=args.max_batch,
        encode_threads=args.encode_threads,
    )
    limits = Limits(
        max_prompt_chars=args.max_prompt_chars,
        max_side=args.max_image_side,
        max_steps=args.max_steps,
        max_n=args.max_n,
        max_frames=args.max_frames,
    )
    return ServerConfig(
        worker=worker,
        host=args.host,
        port=args.port,
        api_key=args.api_key or envs.DIFFSERVE_API_KEY,
        ui=not args.no_ui,
        output_dir=args.output_dir,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        request_timeout=args.request_timeout,
        video_timeout=args.video_timeout,
        drain_timeout=args.drain_timeout,
        kill_grace=args.kill_grace,
        sse_keepalive=args.sse_keepalive,
        job_store=args.job_store,
        job_lease=args.job_lease,
        cors_origins=[o.strip() for o in (args.cors_origins or "").split(",") if o.strip()],
        served_model_names=args.served_model_name,
        limits=limits,
        max_upload_bytes=args.max_upload_bytes,
    )


def check_port(host: str, port: int) -> None:
    """Raise OSError when (host, port) cannot be bound now: found in milliseconds, not after the model loads.
    SO_REUSEADDR as uvicorn sets it, so a port in TIME_WAIT after a restart is not taken for busy."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))


def preflight(cfg: ServerConfig) -> None:
    """What can fail before the worker starts: raises ValueError (one line) for the user to fix."""
    try:
        check_port(cfg.host, cfg.port)
    except OSError as e:
        reason = "is in use by another process" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e})"
        raise ValueError(f"port {cfg.port} on {cfg.host} {reason}: choose another with --port") from None
    if cfg.worker.runner_factory == DEFAULT_RUNNER_FACTORY:
        # The model's files and config (no torch, no weights read): a wrong --model fails here, not in the worker.
        from diffserve.runtime.loader import ModelLoadError, inspect_model

        try:
            inspect_model(cfg.worker.runtime.model)
        except ModelLoadError as e:
            raise ValueError(str(e)) from None
    try:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--output-dir {cfg.output_dir}: {e.strerror or e}") from None
    if cfg.job_store is not None:  # reachable, and --output-dir the replicas' shared one
        from diffserve.server.jobs_shared import check_job_store

        check_job_store(cfg)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from diffserve.server.app import ShutdownClock, create_app

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = config_from_args(args)
        preflight(cfg)
    except ValueError as exc:
        print(f"diffserve serve: error: {exc}", file=sys.stderr)
        return 2
    clock = ShutdownClock()

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM/SIGINT: start the drain clock
            if clock.started is None:
                clock.started = time.monotonic()
            super().handle_exit(sig, frame)

    exit_code = 0

    def fatal(message: str) -> None:
        nonlocal exit_code
        logging.getLogger("diffserve.server").error("cannot serve the model: %s", message)
        exit_code = 2
        server.should_exit = True

    config = uvicorn.Config(
        create_app(cfg, clock, fatal),
        host=cfg.host,
        port=cfg.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=int(cfg.drain_timeout) or 1,
    )
    server = Server(config)
    server.run()
    return exit_code
