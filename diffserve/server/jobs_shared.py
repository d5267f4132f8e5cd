"""Video jobs shared by replicas (`--job-store postgresql://...`): pulled from the store, not pushed.

Any replica accepts POST /v1/videos (a queued row) and answers GET, DELETE and /content for any job. Each
replica runs one loop (`_pull`) that, about once a second or at once when something changed here:

  1. renews the leases of the jobs its worker runs, and stops (engine.cancel) any the store says it no
     longer holds: cancelled through another replica, deleted, or re-queued because its lease expired;
  2. reaps jobs whose replica stopped renewing: re-queued once, then failed with the reason;
  3. claims the oldest queued job of its model when its worker is free (one video job at a time per
     replica: a replica holding a job it cannot start would keep it from a free one).

The MP4 goes to the output directory, which every replica must mount (jobs_postgres.check_output_dir).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import os
import socket
from typing import Any

from diffserve.runtime.api import GenerationRequest
from diffserve.server.config import ServerConfig
from diffserve.server.engine import Engine
from diffserve.server.errors import APIError
from diffserve.server.files import OutputFiles, write_atomic
from diffserve.server.jobs import IN_FLIGHT
from diffserve.server.jobs_postgres import JobStoreError, PostgresJobStore
from diffserve.server.messages import Completed, Errored, Progress, WorkItem
from diffserve.server.tickets import EngineError, Ticket

log = logging.getLogger("diffserve.jobs")

MAX_ATTEMPTS = 2  # a job whose replica died is re-queued once; dying twice fails it (it may be the cause)
_BYTES = ("image", "mask")


def encode_request(request: GenerationRequest) -> dict[str, Any]:
    """A GenerationRequest as JSON for the store (never pickle: the rows are data, not code to run)."""
    fields = dataclasses.asdict(request)
    for name in _BYTES:
        if fields[name] is not None:
            fields[name] = base64.b64encode(fields[name]).decode("ascii")
    return fields


def decode_request(fields: dict[str, Any]) -> GenerationRequest:
    known = {f.name for f in dataclasses.fields(GenerationRequest)}
    # a field that a newer replica wrote and this one does not know is dropped rather than crash the claim
    fields = {k: v for k, v in fields.items() if k in known}
    for name in _BYTES:
        if fields.get(name) is not None:
            fields[name] = base64.b64decode(fields[name])
    return GenerationRequest(**fields)


def replica_name(cfg: ServerConfig) -> str:
    """Unique per process: a restarted replica is a new one (its predecessor's leases simply expire). In
    Kubernetes the host name is the pod's name."""
    return f"{socket.gethostname()}:{cfg.port}:{os.getpid()}"


def check_job_store(cfg: ServerConfig) -> None:
    """For `serve`'s preflight, before the model loads: the store answers and --output-dir is the shared
    one; raises ValueError with a one-line message otherwise."""

    async def check() -> None:
        store = await PostgresJobStore.open(cfg.job_store, cfg.job_lease)
        try:
            await store.check_output_dir(cfg.output_dir)
        finally:
            await store.close()

    try:
        asyncio.run(check())
    except JobStoreError as e:
        raise ValueError(str(e)) from None


@contextlib.asynccontextmanager
async def _answerable():
    """The database unreachable (restarting, network): a 503 that says so and when to retry, not a 500."""
    import psycopg

    try:
        yield
    except psycopg.Error as e:  # the pool's errors (PoolTimeout, PoolClosed) are psycopg's too
        log.error("video jobs: the job store failed: %s", e)
        raise APIError(
            503,
            "The video job store (PostgreSQL) cannot be reached; retry shortly.",
            "job_store_unavailable",
            headers={"Retry-After": "5"},
        ) from None


class SharedVideoJobs:
    def __init__(self, store: PostgresJobStore, files: OutputFiles, engine: Engine, cfg: ServerConfig):
        self.store, self.files, self.engine, self.cfg = store, files, engine, cfg
        self.replica = replica_name(cfg)
        # renewals well inside the lease (three chances before it expires), and at least once a second so
        # that a cancel through another replica and a job queued there are seen promptly
        self._interval = min(1.0, cfg.job_lease / 3)
        self._held: dict[str, Ticket] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._wake = asyncio.Event()
        self._puller: asyncio.Task | None = None
        self._stopping = False

    @classmethod
    async def open(cls, cfg: ServerConfig, files: OutputFiles, engine: Engine) -> SharedVideoJobs:
        store = await PostgresJobStore.open(cfg.job_store, cfg.job_lease)
        try:
            await store.check_output_dir(cfg.output_dir)
        except Exception:
            await store.close()
            raise
        return cls(store, files, engine, cfg)

    def start(self) -> None:
        self._puller = asyncio.get_running_loop().create_task(self._pull())
        log.info("video jobs: shared store, this replica is %s", self.replica)

    # ---- the routes' side (the same methods as jobs.VideoJobs) ----------------------------------------
    async def submit(self, item: WorkItem, **fields: Any) -> dict[str, Any]:
        async with _answerable():
            # The queue is the store's, shared: --max-queue bounds it for all replicas together.
            if await self.store.count_queued() >= self.cfg.max_queue:
                raise EngineError(
                    "queue_full", f"the queue is full ({self.cfg.max_queue} video jobs waiting); retry later"
                )
            row = await self.store.create(encode_request(item.request), id=item.ticket_id, **fields)
        self._wake.set()  # this replica may be free: no need to wait for the next tick
        return row

    async def get(self, job_id: str) -> dict[str, Any] | None:
        async with _answerable():
            return await self.store.get(job_id)

    async def list(self, **page: Any) -> tuple[list[dict[str, Any]], bool]:
        async with _answerable():
            return await self.store.list(**page)

    async def cancel(self, job_id: str) -> str:
        async with _answerable():
            row = await self.store.cancel(job_id)
        if job_id in self._held:  # running here: stop it now rather than at the next renewal
            self.engine.cancel(job_id)
            await self.settle(job_id)
        return row["status"] if row else "cancelled"

    async def delete(self, job_id: str) -> None:
        async with _answerable():
            await self.store.delete(job_id)
        self.files.remove_video(job_id)

    # ---- pulling ---------------------------------------------------------------------------------
    async def _pull(self) -> None:
        # After stop_pulling it goes on renewing (and noticing cancels) until the jobs in hand have ended.
        while not (self._stopping and not self._held):
            try:
                await self._tick()
            except Exception as e:  # the database may be restarting: keep trying, leases cover the gap
                log.error("video jobs: the job store failed (%s); retrying", e)
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def _tick(self) -> None:
        if self._held:
            mine = await self.store.renew(self.replica, list(self._held))
            for job_id in set(self._held) - mine:
                log.info(
                    "video job %s is no longer this replica's (cancelled or re-queued): stopping", job_id
                )
                self.engine.cancel(job_id)
        for job_id, status, lost_by in await self.store.reap(MAX_ATTEMPTS, self.cfg.video_timeout):
            if lost_by:
                log.warning(
                    "video job %s: replica %s stopped renewing its lease; %s", job_id, lost_by, status
                )
            else:
                log.warning("video job %s: never started; %s", job_id, status)
        while self._free():
            claimed = await self.store.claim(self.replica, self.engine.meta["model_id"])
            if claimed is None or not await self._run(*claimed):
                break

    def _free(self) -> bool:
        """One video job at a time, and only on a warm worker whose queue has room."""
        return (
            not self._stopping
            and not self._held
            and self.engine.ready
            and self.engine.queue_depth < self.cfg.max_queue
        )

    async def _run(self, job_id: str, request: dict[str, Any]) -> bool:
        """Start a claimed job on this replica's engine; False if it could not start here."""
        try:
            ticket = self.engine.submit(WorkItem(job_id, decode_request(request), "video"))
        except EngineError as e:  # shutting down, or the queue filled meanwhile: another replica may take it
            log.info("video job %s: %s; back to the queue", job_id, e.message)
            await self.store.release(job_id, self.replica)
            return False
        except Exception as e:  # a row this replica cannot even read: no replica can
            log.exception("video job %s: unreadable request", job_id)
            await self._fail(
                job_id, EngineError("invalid_request", f"the stored request cannot be read: {e}")
            )
            return True
        log.info("video job %s: claimed", job_id)
        self._held[job_id] = ticket
        self._tasks[job_id] = asyncio.get_running_loop().create_task(self._follow(job_id, ticket))
        return True

    async def _follow(self, job_id: str, ticket: Ticket) -> None:
        try:
            last = 0
            async for event in ticket.stream():
                if isinstance(event, Progress):
                    progress = event.percent(ceiling=99)  # 100 waits for the file, as in jobs.VideoJobs
                    if progress != last:
                        try:
                            await self.store.progress(job_id, self.replica, progress)
                            last = progress
                        except Exception as e:  # a missed progress update is no reason to stop the job
                            log.warning("video job %s: progress not recorded (%s)", job_id, e)
                elif isinstance(event, Completed):
                    await self._complete(job_id, event.payload)
                elif isinstance(event, Errored):
                    await self._ended(job_id, event.error)
        except Exception:
            # the store unreachable: the lease expires and another replica runs the job again, so this
            # worker need not finish it
            log.exception("video job %s: could not record its outcome", job_id)
            self.engine.cancel(job_id, message="the job store could not be reached")
        finally:
            self._held.pop(job_id, None)
            self._tasks.pop(job_id, None)
            self._wake.set()  # free again: claim the next job now

    async def _complete(self, job_id: str, payload: dict[str, Any]) -> None:
        if job_id not in await self.store.renew(self.replica, [job_id]):
            return  # cancelled, deleted or re-queued meanwhile: the file is not ours to write
        path = self.files.video_path(job_id)
        await asyncio.get_running_loop().run_in_executor(None, write_atomic, path, payload["videos"][0])
        if not await self.store.finish(job_id, self.replica, "completed"):
            row = await self.store.get(job_id)
            if row is None or row["status"] not in ("completed", *IN_FLIGHT):
                self.files.remove_video(job_id)  # lost while writing; a re-run elsewhere writes its own

    async def _ended(self, job_id: str, error: EngineError) -> None:
        if error.kind == "shutting_down":  # this replica is going away, the job is fine: another runs it
            if await self.store.release(job_id, self.replica):
                log.info("video job %s: released to the other replicas", job_id)
            return
        await self._fail(job_id, error)

    async def _fail(self, job_id: str, error: EngineError) -> None:
        status = "cancelled" if error.kind == "cancelled" else "failed"
        await self.store.finish(job_id, self.replica, status, error.kind, error.message)

    async def settle(self, job_id: str, timeout: float = 5.0) -> None:
        task = self._tasks.get(job_id)
        if task is not None:
            await asyncio.wait({task}, timeout=timeout)

    # ---- shutdown --------------------------------------------------------------------------------
    def stop_pulling(self) -> None:
        """Before the drain: claim nothing more. The job in hand may finish within the drain timeout (its
        lease still renewed); if it does not, the drain's shutting_down error gives it back (_ended)."""
        self._stopping = True
        self._wake.set()

    async def wait_all(self, timeout: float) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks.values()), timeout=timeout)

    async def close(self) -> None:
        if self._puller is not None:
            self._puller.cancel()
            await asyncio.gather(self._puller, return_exceptions=True)
        await self.store.close()
