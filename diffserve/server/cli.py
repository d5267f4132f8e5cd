"""`diffserve serve`: arguments, and running the app under uvicorn (imports nothing heavy until run)."""

from __future__ import annotations

import argparse
import logging
import os
import time

from diffserve.runtime.distributed.config import add_parallel_arguments
from diffserve.server.config import DEFAULT_RUNNER_FACTORY, ServerConfig, WorkerConfig, parse_resolutions


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServerConfig()
    a = parser.add_argument
    a("--model", help="model directory or id (default: the bundled default model)")
    a("--host", default=d.host, help=f"address to bind (default {d.host})")
    a("--port", type=int, default=d.port, help=f"port (default {d.port})")
    a(
        "--api-key",
        help="require 'Authorization: Bearer KEY' on /v1 routes (env DIFFSERVE_API_KEY; "
        "prefer the env variable, which other users cannot read from the process list)",
    )
    a("--max-queue", type=int, default=d.max_queue, help="requests waiting for the worker; beyond, 429")
    a(
        "--max-batch",
        type=int,
        default=d.max_batch,
        help="outputs merged into one runner call for identical unseeded image requests",
    )
    a(
        "--request-timeout",
        type=float,
        default=d.request_timeout,
        help="seconds per image request, queue included",
    )
    a("--video-timeout", type=float, default=d.video_timeout, help="seconds per video job, queue included")
    a(
        "--drain-timeout",
        type=float,
        default=d.drain_timeout,
        help="on SIGTERM, seconds in-flight work may take to finish before the server exits",
    )
    a(
        "--kill-grace",
        type=float,
        default=d.kill_grace,
        help="seconds a worker may ignore the cancel of a timed-out request before it is killed and restarted",
    )
    a(
        "--sse-keepalive",
        type=float,
        default=d.sse_keepalive,
        help="seconds between keep-alive comments on an image stream (stream=true) that has nothing to send",
    )
    a(
        "--warmup-resolutions",
        help="WIDTHxHEIGHT[,WIDTHxHEIGHT...] warmed up at start (default: the model's default size)",
    )
    a(
        "--attention-backend",
        help="attention backend, e.g. fa3, fa2, torch_sdpa (default: the platform's best)",
    )
    a(
        "--compile",
        action="store_true",
        help="torch.compile the DiT blocks during warmup (kernels cached in ~/.cache/diffserve or "
        "$DIFFSERVE_CACHE_DIR, so a restart is warm in seconds)",
    )
    a("--device", help="device for the runtime, e.g. cuda, cuda:1, cpu (default: the platform's)")
    a("--dtype", help="weights dtype, e.g. bfloat16, float16, float32 (default: the runtime's choice)")
    a("--output-dir", default=str(d.output_dir), help="generated files and the video job database")
    a("--cors-origins", help="comma-separated origins allowed by CORS (default: CORS off)")
    a(
        "--served-model-name",
        action="append",
        default=[],
        help="another name clients may pass as 'model' (repeatable)",
    )
    a("--max-prompt-chars", type=int, default=d.max_prompt_chars)
    a("--max-upload-bytes", type=int, default=d.max_upload_bytes)
    a("--max-image-side", type=int, default=d.max_image_side, help="largest output width or height")
    a("--runner-factory", default=DEFAULT_RUNNER_FACTORY, help=argparse.SUPPRESS)  # tests, custom runtimes
    a("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_parallel_arguments(parser)  # --ulysses-degree, --cfg-parallel: one worker group over N GPUs


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    worker = WorkerConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        attention_backend=args.attention_backend,
        warmup_resolutions=parse_resolutions(args.warmup_resolutions),
        runner_factory=args.runner_factory,
        ulysses_degree=args.ulysses_degree,
        cfg_parallel=args.cfg_parallel,
        log_level=args.log_level,
    )
    return ServerConfig(
        worker=worker,
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("DIFFSERVE_API_KEY"),
        output_dir=args.output_dir,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        request_timeout=args.request_timeout,
        video_timeout=args.video_timeout,
        drain_timeout=args.drain_timeout,
        kill_grace=args.kill_grace,
        sse_keepalive=args.sse_keepalive,
        cors_origins=[o.strip() for o in (args.cors_origins or "").split(",") if o.strip()],
        served_model_names=args.served_model_name,
        max_prompt_chars=args.max_prompt_chars,
        max_upload_bytes=args.max_upload_bytes,
        max_image_side=args.max_image_side,
    )


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from diffserve.server.app import ShutdownClock, create_app

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"diffserve serve: {exc}")
        return 2
    if args.compile:  # an environment switch: the spawned worker (and its ranks) inherit it
        from diffserve.runtime.compile import request_compile

        request_compile()
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
