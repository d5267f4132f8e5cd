"""Video jobs: a SQLite table (stdlib sqlite3) next to the MP4 files, so a restart loses no completed job.

A job's row is the truth for clients; the engine ticket that computes it lives only in this process. At
start, rows left queued or in progress by a crash or a restart are marked failed with the reason.

This is the single-node default. Replicas share PostgreSQL instead (jobs_shared.SharedVideoJobs, the same
route-facing methods: submit, get, list, cancel, delete).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffserve.server.files import OutputFiles, write_atomic
from diffserve.server.messages import Completed, Errored, Progress, Started, WorkItem
from diffserve.server.tickets import EngineError, Ticket

if TYPE_CHECKING:
    from diffserve.server.engine import Engine

log = logging.getLogger("diffserve.jobs")

IN_FLIGHT = ("queued", "in_progress")
_COLUMNS = (
    "id",
    "created_at",
    "completed_at",
    "status",
    "progress",
    "model",
    "prompt",
    "seconds",
    "size",
    "error_code",
    "error_message",
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS videos (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    created_at INTEGER NOT NULL,
    completed_at INTEGER,
    status TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    model TEXT NOT NULL,
    prompt TEXT,
    seconds TEXT NOT NULL,
    size TEXT NOT NULL,
    error_code TEXT,
    error_message TEXT
)"""


class JobStore:
    def __init__(self, path: Path):
        # One connection shared under a lock: statements are tiny, and the store is used from the event
        # loop and from the executor that writes files.
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _row(self, row) -> dict[str, Any] | None:
        return None if row is None else dict(zip(_COLUMNS, row, strict=True))

    def create(self, **fields: Any) -> dict[str, Any]:
        fields.setdefault("created_at", int(time.time()))
        fields.setdefault("status", "queued")
        names = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        with self._lock:
            self._db.execute(f"INSERT INTO videos ({names}) VALUES ({marks})", tuple(fields.values()))
        return self.get(fields["id"])

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            cur = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM videos WHERE id = ?", (job_id,))
            return self._row(cur.fetchone())

    def update(self, job_id: str, only_if_in_flight: bool = False, **fields: Any) -> bool:
        """Set fields; with only_if_in_flight, only while the job is still queued or in progress (a job
        already cancelled or failed keeps its final state)."""
        sets = ", ".join(f"{k} = ?" for k in fields)
        where = "id = ?" + (" AND status IN ('queued', 'in_progress')" if only_if_in_flight else "")
        with self._lock:
            cur = self._db.execute(f"UPDATE videos SET {sets} WHERE {where}", (*fields.values(), job_id))
            return cur.rowcount > 0

    def delete(self, job_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM videos WHERE id = ?", (job_id,)).rowcount > 0

    def list(
        self, after: str | None = None, limit: int = 20, order: str = "desc"
    ) -> tuple[list[dict[str, Any]], bool]:
        """A page of jobs by creation order, and whether more follow (OpenAI's cursor pagination)."""
        desc = order == "desc"
        params: list[Any] = []
        where = ""
        if after is not None:
            where = f"WHERE seq {'<' if desc else '>'} (SELECT seq FROM videos WHERE id = ?)"
            params.append(after)
        sql = (
            f"SELECT {', '.join(_COLUMNS)} FROM videos {where} ORDER BY seq {'DESC' if desc else 'ASC'} "
            "LIMIT ?"
        )
        with self._lock:
            rows = self._db.execute(sql, (*params, limit + 1)).fetchall()
        return [self._row(r) for r in rows[:limit]], len(rows) > limit

    def fail_in_flight(self, reason: str) -> list[str]:
        """Mark every queued/in-progress job failed (they belonged to a process that is gone)."""
        with self._lock:
            ids = [
                r[0]
                for r in self._db.execute(
                    "SELECT id FROM videos WHERE status IN ('queued', 'in_progress')"
                ).fetchall()
            ]
            self._db.execute(
                "UPDATE videos SET status = 'failed', error_code = 'server_restarted', error_message = ?, "
                "completed_at = ? WHERE status IN ('queued', 'in_progress')",
                (reason, int(time.time())),
            )
        return ids


def video_object(row: dict[str, Any]) -> dict[str, Any]:
    """A job row in the shape of OpenAI's video object (plus status 'cancelled')."""
    error = None
    if row["error_code"]:
        error = {"code": row["error_code"], "message": row["error_message"] or ""}
    obj = {
        "id": row["id"],
        "object": "video",
        "created_at": row["created_at"],
        "completed_at": row["completed_at"],
        "expires_at": None,
        "model": row["model"],
        "progress": row["progress"],
        "prompt": row["prompt"],
        "remixed_from_video_id": None,
        "seconds": row["seconds"],
        "size": row["size"],
        "status": row["status"],
        "error": error,
    }
    if "replica" in row:  # a shared store records which replica ran the job (not OpenAI's field)
        obj["replica"] = row["replica"]
    return obj


class VideoJobs:
    """Follows each job's engine ticket and writes its progress, outcome and MP4."""

    def __init__(self, store: JobStore, files: OutputFiles, engine: Engine):
        self.store = store
        self.files = files
        self.engine = engine
        self._tasks: dict[str, asyncio.Task] = {}

    # ---- the routes' side (async, as in jobs_shared.SharedVideoJobs, whose store is remote) ----------
    async def submit(self, item: WorkItem, **fields: Any) -> dict[str, Any]:
        """Admit the job to this server's engine (raises EngineError when full) and record it."""
        ticket = self.engine.submit(item)
        row = self.store.create(id=item.ticket_id, **fields)
        self.track(item.ticket_id, ticket)
        return row

    async def get(self, job_id: str) -> dict[str, Any] | None:
        return self.store.get(job_id)

    async def list(self, **page: Any) -> tuple[list[dict[str, Any]], bool]:
        return self.store.list(**page)

    async def cancel(self, job_id: str) -> str:
        """Cancel a queued or running job; its status afterwards."""
        self.engine.cancel(job_id)
        await self.settle(job_id)
        # The follower records the cancel; this covers a job whose ticket had already ended.
        self.store.update(
            job_id,
            only_if_in_flight=True,
            status="cancelled",
            error_code="cancelled",
            error_message="the request was cancelled",
        )
        return self.store.get(job_id)["status"]

    async def delete(self, job_id: str) -> None:
        self.store.delete(job_id)
        self.files.remove_video(job_id)

    # ---- lifecycle (what app.py calls on either kind of job store) -------------------------------------
    def start(self) -> None:
        """Nothing to pull: jobs go to this server's engine as they arrive."""

    def stop_pulling(self) -> None:
        pass

    async def close(self) -> None:
        self.store.close()

    def recover(self) -> None:
        ids = self.store.fail_in_flight("the server restarted before this job finished")
        for job_id in ids:  # a half-written file of an interrupted job is of no use
            self.files.remove_video(job_id)
        if ids:
            log.warning("marked %d interrupted video jobs failed", len(ids))

    def track(self, job_id: str, ticket: Ticket) -> None:
        self._tasks[job_id] = asyncio.get_running_loop().create_task(self._follow(job_id, ticket))

    async def _follow(self, job_id: str, ticket: Ticket) -> None:
        try:
            last = -1
            async for event in ticket.stream():
                if isinstance(event, Started):
                    self.store.update(job_id, only_if_in_flight=True, status="in_progress")
                elif isinstance(event, Progress):
                    # Denoising is most of the work; decoding and encoding follow, so 100 waits for the file.
                    progress = event.percent(ceiling=99)
                    if progress != last:
                        self.store.update(
                            job_id, only_if_in_flight=True, status="in_progress", progress=progress
                        )
                        last = progress
                elif isinstance(event, Completed):
                    await self._complete(job_id, event.payload)
                elif isinstance(event, Errored):
                    self._fail(job_id, event.error)
        except Exception:  # never leave a job in flight forever
            log.exception("video job %s failed in the server", job_id)
            self._fail(job_id, EngineError("internal_error", "the server failed to store this video"))
        finally:
            self._tasks.pop(job_id, None)

    async def _complete(self, job_id: str, payload: dict[str, Any]) -> None:
        row = self.store.get(job_id)
        if row is None or row["status"] not in IN_FLIGHT:
            return  # deleted or cancelled meanwhile
        path = self.files.video_path(job_id)
        await asyncio.get_running_loop().run_in_executor(None, write_atomic, path, payload["videos"][0])
        if not self.store.update(
            job_id, only_if_in_flight=True, status="completed", progress=100, completed_at=int(time.time())
        ):
            self.files.remove_video(job_id)

    def _fail(self, job_id: str, error: EngineError) -> None:
        status = "cancelled" if error.kind == "cancelled" else "failed"
        self.store.update(
            job_id,
            only_if_in_flight=True,
            status=status,
            error_code=error.kind,
            error_message=error.message,
            completed_at=int(time.time()),
        )

    async def settle(self, job_id: str, timeout: float = 5.0) -> None:
        """Wait until the job's follower has recorded its final state (after a cancel)."""
        task = self._tasks.get(job_id)
        if task is not None:
            await asyncio.wait({task}, timeout=timeout)

    async def wait_all(self, timeout: float) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks.values()), timeout=timeout)
