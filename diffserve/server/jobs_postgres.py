"""Video jobs in PostgreSQL, shared by every replica (`--job-store postgresql://...`).

The table is the queue: POST inserts a queued row; a replica whose worker is free claims the oldest queued
row of its model with `FOR UPDATE SKIP LOCKED` (two replicas never wait for, nor take, the same row) and
holds it under a lease that it renews while it runs the job. Every state change of a running job is
guarded by `replica = me AND status = 'in_progress'`, so a replica that lost its job (cancelled through
another replica, or re-queued after its lease expired) can no longer write over it.

Times that leases compare come from the database's clock (now()), never from a replica's: replicas'
clocks may disagree, the database's is the one they share. psycopg 3 with a small async pool: queries run
on the event loop without blocking it, and a connection broken by a database restart is replaced.
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from typing import Any

from diffserve.server.files import write_atomic

log = logging.getLogger("diffserve.jobs")

# The columns clients see (jobs.video_object), then who ran the job.
COLUMNS = (
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
    "replica",
)
_SELECT = ", ".join(COLUMNS)
_EPOCH = "extract(epoch from now())::bigint"
# Serialises schema creation and the output-directory check of replicas that start together.
_ADVISORY_LOCK = 0x64696666  # "diff"
MARKER = ".diffserve-job-store"

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS diffserve_videos (
        seq BIGSERIAL PRIMARY KEY,
        id TEXT UNIQUE NOT NULL,
        created_at BIGINT NOT NULL,
        completed_at BIGINT,
        status TEXT NOT NULL,
        progress INTEGER NOT NULL DEFAULT 0,
        model TEXT NOT NULL,
        prompt TEXT,
        seconds TEXT NOT NULL,
        size TEXT NOT NULL,
        error_code TEXT,
        error_message TEXT,
        request JSONB NOT NULL,
        replica TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        lease_until TIMESTAMPTZ
    )""",
    # the claim's scan and the lease reaper's, each over a handful of rows however long the history
    "CREATE INDEX IF NOT EXISTS diffserve_videos_queued ON diffserve_videos (model, seq) "
    "WHERE status = 'queued'",
    "CREATE INDEX IF NOT EXISTS diffserve_videos_leased ON diffserve_videos (lease_until) "
    "WHERE status = 'in_progress'",
    "CREATE TABLE IF NOT EXISTS diffserve_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)


class JobStoreError(RuntimeError):
    """The store cannot be used (unreachable, or the output directory is not the replicas' shared one)."""


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        info = conninfo_to_dict(url)
    except Exception:
        return "postgresql://..."
    host, port, db = info.get("host", ""), info.get("port", ""), info.get("dbname", "")
    return f"postgresql://{host}{':' + str(port) if port else ''}/{db}"


class PostgresJobStore:
    def __init__(self, pool, lease: float):
        self._pool = pool
        self.lease = lease  # seconds a claim lasts without renewal

    @classmethod
    async def open(cls, url: str, lease: float, timeout: float = 10.0) -> PostgresJobStore:
        try:
            import psycopg
            from psycopg_pool import AsyncConnectionPool
        except ImportError:
            raise JobStoreError(
                "--job-store postgresql://... needs psycopg 3: pip install 'diffserve[postgres]'"
            ) from None
        try:  # once alone first: the pool would retry a wrong URL until its timeout, and say less
            await (await psycopg.AsyncConnection.connect(url, connect_timeout=max(1, int(timeout)))).close()
        except psycopg.Error as e:
            reason = (
                " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
            )
            raise JobStoreError(f"cannot connect to the job store {redact(url)}: {reason}") from None
        # check: a connection broken by a database restart is found and replaced before it is handed out.
        pool = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=4,
            open=False,
            check=AsyncConnectionPool.check_connection,
            timeout=timeout,  # a request waits this long for a connection, then answers 503
        )
        try:
            await pool.open(wait=True, timeout=timeout)
        except Exception as e:
            await pool.close()
            raise JobStoreError(f"cannot connect to the job store {redact(url)}: {e}") from None
        store = cls(pool, lease)
        async with pool.connection() as conn:  # one transaction: committed on a clean exit
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_ADVISORY_LOCK,))
            for statement in _SCHEMA:
                await conn.execute(statement)
        return store

    async def close(self) -> None:
        await self._pool.close()

    async def _one(self, sql: str, params: Any = ()) -> tuple | None:
        async with self._pool.connection() as conn:
            return await (await conn.execute(sql, params)).fetchone()

    async def _all(self, sql: str, params: Any = ()) -> list[tuple]:
        async with self._pool.connection() as conn:
            return await (await conn.execute(sql, params)).fetchall()

    @staticmethod
    def _row(row) -> dict[str, Any] | None:
        return None if row is None else dict(zip(COLUMNS, row, strict=True))

    # ---- what every replica's routes do ----------------------------------------------------------
    async def create(self, request: dict[str, Any], **fields: Any) -> dict[str, Any]:
        names = ", ".join(fields)
        marks = ", ".join("%s" for _ in fields)
        row = await self._one(
            f"INSERT INTO diffserve_videos ({names}, request, created_at, status) "
            f"VALUES ({marks}, %s, {_EPOCH}, 'queued') RETURNING {_SELECT}",
            (*fields.values(), json.dumps(request)),
        )
        return self._row(row)

    async def get(self, job_id: str) -> dict[str, Any] | None:
        return self._row(await self._one(f"SELECT {_SELECT} FROM diffserve_videos WHERE id = %s", (job_id,)))

    async def list(
        self, after: str | None = None, limit: int = 20, order: str = "desc"
    ) -> tuple[list[dict[str, Any]], bool]:
        desc = order == "desc"
        where, params = "", []
        if after is not None:
            where = f"WHERE seq {'<' if desc else '>'} (SELECT seq FROM diffserve_videos WHERE id = %s)"
            params.append(after)
        rows = await self._all(
            f"SELECT {_SELECT} FROM diffserve_videos {where} ORDER BY seq {'DESC' if desc else 'ASC'} "
            "LIMIT %s",
            (*params, limit + 1),
        )
        return [self._row(r) for r in rows[:limit]], len(rows) > limit

    async def count_queued(self) -> int:
        return (await self._one("SELECT count(*) FROM diffserve_videos WHERE status = 'queued'"))[0]

    async def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Mark a queued or running job cancelled; the replica running it sees that at its next renewal."""
        await self._one(
            f"UPDATE diffserve_videos SET status = 'cancelled', error_code = 'cancelled', "
            f"error_message = 'the request was cancelled', completed_at = {_EPOCH}, lease_until = NULL "
            "WHERE id = %s AND status IN ('queued', 'in_progress') RETURNING id",
            (job_id,),
        )
        return await self.get(job_id)

    async def delete(self, job_id: str) -> bool:
        return (
            await self._one("DELETE FROM diffserve_videos WHERE id = %s RETURNING id", (job_id,)) is not None
        )

    # ---- what a replica's puller does ------------------------------------------------------------
    async def claim(self, replica: str, model: str) -> tuple[str, dict[str, Any]] | None:
        """Take the oldest queued job of `model` (rows other replicas are claiming are skipped, not waited
        for): (id, its GenerationRequest fields), or None."""
        row = await self._one(
            "UPDATE diffserve_videos SET status = 'in_progress', progress = 0, replica = %s, "
            "attempts = attempts + 1, lease_until = now() + make_interval(secs => %s) "
            "WHERE seq = (SELECT seq FROM diffserve_videos WHERE status = 'queued' AND model = %s "
            "ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id, request",
            (replica, self.lease, model),
        )
        return None if row is None else (row[0], row[1])

    async def renew(self, replica: str, ids: list[str]) -> set[str]:
        """Extend the leases of the jobs this replica runs; returns those it still holds (a job missing
        from the answer was cancelled, deleted or re-queued: stop running it)."""
        rows = await self._all(
            "UPDATE diffserve_videos SET lease_until = now() + make_interval(secs => %s) "
            "WHERE id = ANY(%s) AND replica = %s AND status = 'in_progress' RETURNING id",
            (self.lease, ids, replica),
        )
        return {r[0] for r in rows}

    async def progress(self, job_id: str, replica: str, percent: int) -> bool:
        return (
            await self._one(
                "UPDATE diffserve_videos SET progress = %s, lease_until = now() + make_interval(secs => %s) "
                "WHERE id = %s AND replica = %s AND status = 'in_progress' RETURNING id",
                (percent, self.lease, job_id, replica),
            )
            is not None
        )

    async def finish(
        self,
        job_id: str,
        replica: str,
        status: str,
        error_code: str | None = None,
        error_message: str | None = None,
    ) -> bool:
        """completed, failed or cancelled; False if the job was no longer this replica's."""
        progress = ", progress = 100" if status == "completed" else ""
        return (
            await self._one(
                f"UPDATE diffserve_videos SET status = %s, error_code = %s, error_message = %s, "
                f"completed_at = {_EPOCH}, lease_until = NULL{progress} "
                "WHERE id = %s AND replica = %s AND status = 'in_progress' RETURNING id",
                (status, error_code, error_message, job_id, replica),
            )
            is not None
        )

    async def release(self, job_id: str, replica: str) -> bool:
        """Give a claimed job back to the queue (this replica shuts down): not counted as an attempt."""
        return (
            await self._one(
                "UPDATE diffserve_videos SET status = 'queued', progress = 0, replica = NULL, "
                "lease_until = NULL, attempts = greatest(attempts - 1, 0) "
                "WHERE id = %s AND replica = %s AND status = 'in_progress' RETURNING id",
                (job_id, replica),
            )
            is not None
        )

    async def reap(self, max_attempts: int, queue_timeout: float) -> list[tuple[str, str, str | None]]:
        """Jobs whose replica stopped renewing its lease (it died, or lost the database): back to the
        queue, or failed once they have had max_attempts; and queued jobs nobody started within
        queue_timeout, failed. Any replica may run this: each row is updated once. Returns
        (id, new status, replica that lost it)."""
        lost = await self._all(
            "WITH expired AS (SELECT seq, replica FROM diffserve_videos "
            "WHERE status = 'in_progress' AND lease_until < now() FOR UPDATE SKIP LOCKED) "
            "UPDATE diffserve_videos v SET "
            "status = CASE WHEN v.attempts >= %(max)s THEN 'failed' ELSE 'queued' END, "
            "error_code = CASE WHEN v.attempts >= %(max)s THEN 'replica_lost' END, "
            "error_message = CASE WHEN v.attempts >= %(max)s THEN 'the replica running this job (' || "
            "v.replica || ') stopped renewing its lease, ' || v.attempts || ' times in all; not retried' END, "
            f"completed_at = CASE WHEN v.attempts >= %(max)s THEN {_EPOCH} END, "
            "replica = CASE WHEN v.attempts >= %(max)s THEN v.replica END, "
            "progress = CASE WHEN v.attempts >= %(max)s THEN v.progress ELSE 0 END, lease_until = NULL "
            "FROM expired WHERE v.seq = expired.seq RETURNING v.id, v.status, expired.replica",
            {"max": max_attempts},
        )
        overdue = await self._all(
            "UPDATE diffserve_videos SET status = 'failed', error_code = 'timeout', "
            "error_message = 'no replica started this job within ' || %s::text || ' s', "
            f"completed_at = {_EPOCH} WHERE status = 'queued' AND created_at < {_EPOCH} - %s "
            "RETURNING id, status, replica",
            (f"{queue_timeout:g}", queue_timeout),
        )
        return [*lost, *overdue]

    # ---- the shared output directory -------------------------------------------------------------
    async def check_output_dir(self, output_dir: Path) -> None:
        """Every replica must see the same output directory (its MP4s are served by all). The first
        replica to use this store writes the store's random id into MARKER there; a replica that later
        finds no marker, or another store's, is looking at a different directory: JobStoreError."""
        marker = Path(output_dir) / MARKER
        async with self._pool.connection() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_ADVISORY_LOCK,))
            row = await (
                await conn.execute("SELECT value FROM diffserve_meta WHERE key = 'store_id'")
            ).fetchone()
            if row is None:  # the first replica ever: this directory becomes the shared one
                store_id = secrets.token_hex(16)
                write_atomic(marker, store_id.encode())
                await conn.execute("INSERT INTO diffserve_meta VALUES ('store_id', %s)", (store_id,))
                log.info("job store: %s marks %s as the replicas' output directory", MARKER, output_dir)
                return
        try:
            found = marker.read_text().strip()
        except OSError:
            found = None
        if found != row[0]:
            what = "has no" if found is None else "has another job store's"
            raise JobStoreError(
                f"--output-dir {output_dir} {what} {MARKER} file: it is not the directory the other "
                "replicas of this job store write to. Mount the same shared (ReadWriteMany) volume on every "
                "replica; see README, 'Two replicas'"
            )
