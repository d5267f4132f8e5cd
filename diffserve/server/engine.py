"""The engine, API side: a bounded admission queue in front of ONE worker process (spawned; it owns torch).

Everything here runs on the event loop, except one reader thread per worker that moves the worker's
messages onto the loop. The queue lives in this process, and the worker holds at most one batch at a time,
so that cancelling a queued request is a list removal, a timeout needs no cooperation, and a crash can
only lose the batch in flight: those requests fail with a clear error, the others wait for the new worker.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import multiprocessing as mp
import queue
import threading
import time
from collections import deque
from typing import Any

from diffserve.server.config import ServerConfig
from diffserve.server.metrics import Metrics
from diffserve.server.tickets import EngineError, Ticket, merge_key
from diffserve.server.worker import WorkItem, worker_main

log = logging.getLogger("diffserve.engine")


class _Worker:
    """One incarnation of the worker process and its three queues."""

    def __init__(self, gen: int, process, req_q, cancel_q, res_q):
        self.gen, self.process, self.req_q, self.cancel_q, self.res_q = gen, process, req_q, cancel_q, res_q
        self.dead = False  # the process has exited (its sentinel fired)
        self.exited = False  # the exit has been handled
        self.reader: threading.Thread | None = None
        self.fatal = False  # it reported a load or warmup error before exiting

    def abandon(self) -> None:
        # Nobody reads these any more: never let their feeder threads block this process's exit.
        for q in (self.req_q, self.cancel_q):
            q.cancel_join_thread()
            q.close()
        # Dropping the last references frees the queues' semaphores now, not as 'leaked' at exit.
        self.req_q = self.cancel_q = None


class Engine:
    def __init__(self, cfg: ServerConfig, metrics: Metrics, on_fatal=None):
        self.cfg = cfg
        self.metrics = metrics
        # Called with the error when the FIRST worker cannot load the model (a wrong path, a missing
        # dependency): the CLI exits then, rather than retrying forever. Without it, retries back off.
        self._on_fatal = on_fatal
        self._ever_ready = False
        self.meta: dict[str, Any] | None = None  # the runner's model_id/family/task/... once loaded
        self.ready = False
        self.last_error: str | None = None
        self._queue: deque[Ticket] = deque()
        self._current: dict[str, Ticket] = {}  # the batch the worker holds
        self._worker: _Worker | None = None
        self._gens = itertools.count(1)
        self._failures = 0  # consecutive worker exits before becoming ready
        self._accepting = True
        self._stopping = False
        self._restart: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._ewma_seconds: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle.set()
        self._spawn()

    def _spawn(self) -> None:
        self._restart = None
        if self._stopping:
            return
        ctx = mp.get_context("spawn")
        req_q, cancel_q, res_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
        gen = next(self._gens)
        process = ctx.Process(
            target=worker_main, args=(self.cfg.worker, req_q, cancel_q, res_q), name=f"diffserve-worker-{gen}"
        )
        process.start()
        log.info("worker %d started (pid %d)", gen, process.pid)
        w = self._worker = _Worker(gen, process, req_q, cancel_q, res_q)
        w.reader = threading.Thread(target=self._read, args=(w,), name=f"diffserve-reader-{gen}", daemon=True)
        w.reader.start()
        self._loop.add_reader(process.sentinel, self._on_sentinel, w)

    def _read(self, w: _Worker) -> None:
        """Reader thread: forward every message; report the exit once everything sent has been read."""
        while True:
            try:
                msg = w.res_q.get(timeout=0.2)
            except queue.Empty:
                if not w.process.is_alive():
                    break
                continue
            except (EOFError, OSError):
                break
            self._post(self._on_message, w, msg)
        w.res_q = None  # nothing reads it any more (see _Worker.abandon)
        self._post(self._on_exit, w)

    def _post(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server is gone
            pass

    def _on_sentinel(self, w: _Worker) -> None:
        w.dead = True
        self._loop.remove_reader(w.process.sentinel)
        if w is self._worker:
            self.ready = False
            self.metrics.worker_ready.set(0)
        # The reader normally reports the exit after draining; this covers a reader stuck on a message the
        # dying process only half wrote.
        self._loop.call_later(2.0, self._on_exit, w)

    def _on_exit(self, w: _Worker) -> None:
        if w.exited:
            return
        w.exited = True
        w.dead = True
        w.process.join(timeout=0)
        w.abandon()
        if w is not self._worker:
            return
        self._worker = None
        was_ready, self.ready = self.ready, False
        self.metrics.worker_ready.set(0)
        code = w.process.exitcode
        crashed = EngineError(
            "worker_crashed",
            f"the worker process exited (exit code {code}) while running this request; it is being restarted",
        )
        for t in list(self._current.values()):
            self._finish(t, error=crashed)
        self._current.clear()
        self.metrics.running.set(0)
        if self._stopping or not self._accepting:
            # Shutting down: no new worker; what waits for one fails now rather than at the drain timeout.
            gone = EngineError("shutting_down", "the worker exited while the server was shutting down")
            for t in list(self._queue):
                self._abort(t, gone)
            self._check_idle()
            return
        if w.fatal and not self._ever_ready and self._on_fatal is not None:
            self._on_fatal(self.last_error)
            return
        # A worker that never got ready (bad model, broken install) is retried with a growing delay.
        self._failures = 0 if was_ready else self._failures + 1
        delay = 0.0 if was_ready else min(30.0, 2.0 ** (self._failures - 1))
        log.error("worker %d exited with code %s; restarting in %.0f s", w.gen, code, delay)
        self.metrics.worker_restarts.inc()
        self._restart = self._loop.call_later(delay, self._spawn)

    # ---- worker messages -------------------------------------------------------------------------
    def _on_message(self, w: _Worker, msg: tuple) -> None:
        if w is not self._worker:
            return
        kind = msg[0]
        if kind == "loaded":
            self.meta = msg[1]
        elif kind == "ready":
            self.ready = not w.dead
            self._ever_ready = True
            self._failures = 0
            self.last_error = None
            self.metrics.worker_ready.set(1 if self.ready else 0)
            log.info(
                "worker %d ready: %s warmed up in %.1f s", w.gen, (self.meta or {}).get("model_id"), msg[1]
            )
            self._kick()
        elif kind == "fatal":
            self.last_error = msg[1]  # the worker has logged it; /health and on_fatal report it
            w.fatal = True
        elif kind == "started":
            for t in self._tickets(msg[1]):
                t.events.put_nowait(("started",))
        elif kind == "progress":
            _, ids, done, total, step = msg
            if step is not None:
                self.metrics.step.observe(step)
            for t in self._tickets(ids):
                t.events.put_nowait(("progress", done, total))
        elif kind == "result":
            t = self._current.pop(msg[1], None)
            if t is not None:
                self._record_success(t, msg[2])
                self._finish(t, payload=msg[2])
            self._after_item()
        elif kind == "error":
            _, ids, ekind, message = msg
            log.debug("worker: %s %s", ids, ekind)
            if ekind == "cancelled":
                self.metrics.worker_cancelled.inc(len(ids))
            for i in ids:
                t = self._current.pop(i, None)
                if t is not None:
                    self._finish(t, error=EngineError(ekind, message))
            self._after_item()

    def _tickets(self, ids) -> list[Ticket]:
        return [t for i in ids if (t := self._current.get(i)) is not None and not t.done]

    def _record_success(self, t: Ticket, payload: dict[str, Any]) -> None:
        seconds = time.monotonic() - (t.dispatched or t.created)
        self.metrics.generation.labels(task=t.item.kind).observe(seconds)
        self._ewma_seconds = (
            seconds if self._ewma_seconds is None else 0.8 * self._ewma_seconds + 0.2 * seconds
        )
        for stage, s in payload.get("timings", {}).items():
            self.metrics.stage.labels(stage=stage).observe(s)

    def _after_item(self) -> None:
        if not self._current:
            self.metrics.running.set(0)
            self._kick()
            self._check_idle()

    # ---- admission and dispatch ------------------------------------------------------------------
    def submit(self, item: WorkItem) -> Ticket:
        if not self._accepting:
            raise EngineError("shutting_down", "the server is shutting down")
        if len(self._queue) >= self.cfg.max_queue:
            raise EngineError(
                "queue_full", f"the queue is full ({self.cfg.max_queue} requests waiting); retry later"
            )
        t = Ticket(item)
        log.debug("admit %s (%d waiting)", t.id, len(self._queue))
        t.timer = self._loop.call_later(self._timeout(t), self._expire, t)
        self._queue.append(t)
        self._idle.clear()
        self.metrics.queue_depth.set(len(self._queue))
        self._kick()
        return t

    def retry_after(self) -> int:
        per_request = self._ewma_seconds or 1.0
        return int(min(60, max(1, math.ceil(per_request * (len(self._queue) + 1)))))

    def _kick(self) -> None:
        w = self._worker
        if not self.ready or w is None or w.dead or self._current or not self._queue:
            return
        batch = [self._queue.popleft()]
        key = merge_key(batch[0].item)
        if key is not None:
            outputs = batch[0].item.request.num_outputs
            for t in list(self._queue):
                n = t.item.request.num_outputs
                if outputs + n <= self.cfg.max_batch and merge_key(t.item) == key:
                    self._queue.remove(t)
                    batch.append(t)
                    outputs += n
        now = time.monotonic()
        for t in batch:
            t.state, t.dispatched = "running", now
            self._current[t.id] = t
            self.metrics.queue_wait.labels(task=t.item.kind).observe(now - t.created)
        self.metrics.queue_depth.set(len(self._queue))
        self.metrics.running.set(len(batch))
        self.metrics.batch_size.observe(len(batch))
        log.debug("dispatch %s", [t.id for t in batch])
        w.req_q.put(("batch", [t.item for t in batch]))

    # ---- ending requests -------------------------------------------------------------------------
    def _finish(
        self, t: Ticket, payload: dict[str, Any] | None = None, error: EngineError | None = None
    ) -> None:
        if t.done:
            return
        if t.timer is not None:
            t.timer.cancel()
        t.state = "done"
        t.future.set_result((payload, error))
        t.events.put_nowait(("result", payload) if error is None else ("error", error))
        self.metrics.finished.labels(
            task=t.item.kind, outcome="completed" if error is None else error.kind
        ).inc()

    def cancel(
        self, ticket_id: str, kind: str = "cancelled", message: str = "the request was cancelled"
    ) -> bool:
        """Cancel a queued or running request. A running one stops at the worker's next denoising step; its
        ticket ends now. False if the ticket is unknown or already finished."""
        t = next((t for t in self._queue if t.id == ticket_id), None) or self._current.get(ticket_id)
        if t is None or t.done:
            return False
        self._abort(t, EngineError(kind, message))
        return True

    def _timeout(self, t: Ticket) -> float:
        return self.cfg.video_timeout if t.item.kind == "video" else self.cfg.request_timeout

    def _expire(self, t: Ticket) -> None:
        self._abort(t, EngineError("timeout", f"the request did not finish within {self._timeout(t):g} s"))

    def _abort(self, t: Ticket, error: EngineError) -> None:
        if t.done:
            return
        log.debug("%s %s: %s", t.state, t.id, error.kind)
        if t.state == "queued":
            self._queue.remove(t)
            self.metrics.queue_depth.set(len(self._queue))
            self._finish(t, error=error)
            self._check_idle()
            return
        self._finish(t, error=error)
        w = self._worker
        if w is not None and not w.dead:
            try:
                w.cancel_q.put(t.id)
            except ValueError:  # queue closed: the worker is going away anyway
                pass
        if self._current and all(x.done for x in self._current.values()):
            # Nobody waits for this batch any more; if the worker does not let go, kill it.
            self._loop.call_later(self.cfg.kill_grace, self._kill_if_stuck, w, frozenset(self._current))

    def _kill_if_stuck(self, w: _Worker | None, ids: frozenset) -> None:
        if w is not None and w is self._worker and not w.dead and ids & set(self._current):
            log.error("worker %d ignored a cancel for %.0f s; killing it", w.gen, self.cfg.kill_grace)
            w.process.kill()

    def _check_idle(self) -> None:
        if not self._queue and not self._current:
            self._idle.set()

    # ---- status and shutdown ---------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def worker_pid(self) -> int | None:
        w = self._worker
        return None if w is None or w.dead else w.process.pid

    def health(self) -> tuple[bool, str]:
        if not self._accepting:
            return False, "draining"
        w = self._worker
        if w is None or w.dead:
            return False, "worker_dead"
        if not self.ready:
            return False, "warming_up" if self.meta else "loading"
        return True, "ok"

    async def drain(self, timeout: float) -> None:
        """Stop admitting; let queued and running work finish for up to `timeout` seconds; fail the rest."""
        self._accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning(
                "drain timeout (%.0f s): failing %d queued and %d running requests",
                timeout,
                len(self._queue),
                len(self._current),
            )
        for t in list(self._queue) + list(self._current.values()):
            self._abort(t, EngineError("shutting_down", "the server shut down before this request finished"))

    async def close(self) -> None:
        self._stopping = True
        if self._restart is not None:
            self._restart.cancel()
        w = self._worker
        if w is None:
            return
        if not w.dead:
            try:
                w.req_q.put(None)
            except ValueError:
                pass
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, w.process.join, 10)
        if w.process.is_alive():  # it ignores SIGTERM (see worker_main), so SIGKILL
            w.process.kill()
            await loop.run_in_executor(None, w.process.join, 5)
        await loop.run_in_executor(None, w.reader.join, 2)
        self._on_exit(w)
