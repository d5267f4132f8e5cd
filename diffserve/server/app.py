"""The FastAPI application factory. Starting the app starts the engine (and so the worker process); the
app answers /liveness at once and /health only once the worker is warm."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from diffserve import __version__
from diffserve.server.config import ServerConfig
from diffserve.server.engine import Engine
from diffserve.server.errors import install_error_handlers
from diffserve.server.files import OutputFiles
from diffserve.server.jobs import JobStore, VideoJobs
from diffserve.server.metrics import Metrics
from diffserve.server.middleware import ApiKeyMiddleware, BodyLimitMiddleware, LatencyMiddleware
from diffserve.server.routes import images, system, videos
from diffserve.server.routes.docs import install_docs
from diffserve.server.routes.ui import install_ui

log = logging.getLogger("diffserve.server")


class ShutdownClock:
    """When SIGTERM arrived (set by the CLI's uvicorn server), so that draining in-flight HTTP requests and
    then queued jobs share ONE drain timeout."""

    def __init__(self) -> None:
        self.started: float | None = None

    def remaining(self, budget: float) -> float:
        if self.started is None:
            return budget
        return max(0.0, budget - (time.monotonic() - self.started))


async def _expire_images(files: OutputFiles, ttl: float) -> None:
    while True:
        await asyncio.sleep(min(60.0, ttl / 2))
        await asyncio.get_running_loop().run_in_executor(None, files.expire_images, ttl)


def create_app(cfg: ServerConfig, shutdown_clock: ShutdownClock | None = None, on_fatal=None) -> FastAPI:
    """on_fatal(message): called if the model cannot be loaded at all (see Engine)."""
    metrics = Metrics()
    clock = shutdown_clock or ShutdownClock()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        files = OutputFiles(cfg.output_dir)
        engine = Engine(cfg, metrics, on_fatal)
        if cfg.job_store is None:  # single node: SQLite beside the files, jobs pushed to this engine
            jobs = VideoJobs(JobStore(cfg.output_dir / "jobs.sqlite3"), files, engine)
            jobs.recover()
        else:  # replicas: PostgreSQL, jobs pulled by whichever replica is free (psycopg: optional extra)
            from diffserve.server.jobs_shared import SharedVideoJobs

            jobs = await SharedVideoJobs.open(cfg, files, engine)
        app.state.files, app.state.jobs, app.state.engine = files, jobs, engine
        await engine.start()
        jobs.start()
        expiry = asyncio.create_task(_expire_images(files, cfg.image_ttl))
        try:
            yield
        finally:
            log.info("shutting down: draining for up to %.0f s", clock.remaining(cfg.drain_timeout))
            jobs.stop_pulling()
            await engine.drain(clock.remaining(cfg.drain_timeout))
            await jobs.wait_all(5.0)
            expiry.cancel()
            await engine.close()
            await jobs.close()

    # FastAPI's own /docs and /redoc load their scripts from a CDN (a blank page offline): ours serves them.
    app = FastAPI(title="diffserve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.cfg = cfg
    app.state.metrics = metrics
    app.state.started = int(time.time())
    install_error_handlers(app)
    for module in (images, videos, system):
        app.include_router(module.router)
    install_docs(app, api_key=bool(cfg.api_key))
    if cfg.ui:
        install_ui(app)  # GET /: the playground page
    # add_middleware wraps what is there, so the last added runs first: latency sees every answer (401s
    # included), CORS answers preflights before the key check, the body limit applies to authorised calls.
    app.add_middleware(BodyLimitMiddleware, limit=cfg.max_body_bytes, metrics=metrics)
    if cfg.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=cfg.api_key, metrics=metrics)
    if cfg.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cfg.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(LatencyMiddleware, metrics=metrics)
    return app
