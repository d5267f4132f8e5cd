"""The engine, API side: a bounded admission queue in front of ONE worker process (spawned; it owns torch).

Everything here runs on the event loop, except one reader thread per worker that moves the worker's
messages onto the loop. The queue lives in this process, so that cancelling a queued request is a list
removal, a timeout needs no cooperation, and a crash can only lose the batch in flight.

The worker is a pipeline (see worker.py): while it generates one batch, earlier ones are being encoded
by its encoder threads, and the engine keeps at most one more batch waiting in the worker's request
queue (`_ahead`), so that the accelerator never waits for the round trip: the next batch is sent when the
worker reports that it started the previous one (BatchStarted), not when that one's result comes back.
Every ticket the worker holds, whatever its stage, is in `_current` until the worker answers it.

  * A crash or a kill fails the requests the worker had started (generating or encoding); those it had
    not started (the batch ahead) go back to the front of the queue, once (a request that crashes the
    worker before its start is reported fails the second time, it cannot loop).
  * A cancel reaches the worker through its cancel queue whatever the ticket's stage; a batch whose
    requests have all ended (cancelled, timed out) and that the worker has started must be let go within
    --kill-grace, or the worker is killed (a batch still waiting in the worker is not the worker's fault:
    its clock starts when it starts).
  * Batching: the queue's head goes with the queued requests that merge_key says may share its runner
    call (different prompts and seeds too, with a runner that batches samples), up to --max-batch
    outputs, cut to a warmed-up batch size where it can be (tickets.batch_for). A head that could have company (merge_key is not None) and has not filled the batch waits up
    to --batch-wait-ms after its admission for more; any other head goes at once.
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

from diffserve.runtime.api import batch_shapes
from diffserve.server.config import ServerConfig
from diffserve.server.messages import (
    Batch,
    BatchFailed,
    BatchProgress,
    BatchStarted,
    Cancel,
    Completed,
    Errored,
    Fatal,
    Loaded,
    Output,
    Ready,
    Started,
    Stop,
    WorkerMessage,
    WorkItem,
)
from diffserve.server.metrics import Metrics
from diffserve.server.tickets import EngineError, Ticket, batch_for, merge_key
from diffserve.server.worker import worker_main

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
        self._current: dict[str, Ticket] = {}  # what the worker holds: queued there, generating or encoding
        self._ahead: frozenset[str] | None = None  # the batch sent to the worker that it has not started yet
        self._wait_timer: asyncio.TimerHandle | None = None  # --batch-wait-ms: when the head may go alone
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
        requeue = []
        for t in list(self._current.values()):
            if t.done:
                continue
            if t.started is None and not t.requeued:
                requeue.append(t)  # it was only waiting in the worker's queue: the next worker runs it
            else:
                self._finish(t, error=crashed)
        self._current.clear()
        self._ahead = None
        for t in reversed(requeue):  # ahead of later arrivals, in their own order
            t.state, t.dispatched, t.batch, t.requeued = "queued", None, (), True
            self._queue.appendleft(t)
        if requeue:
            log.warning("%d request(s) the worker had not started go back to the queue", len(requeue))
        self.metrics.queue_depth.set(len(self._queue))
        self.metrics.running.set(0)
        self._check_idle()
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
    def _on_message(self, w: _Worker, msg: WorkerMessage) -> None:
        if w is not self._worker:
            return
        if isinstance(msg, Loaded):
            self.meta = msg.meta
        elif isinstance(msg, Ready):
            self.ready = not w.dead
            self._ever_ready = True
            self._failures = 0
            self.last_error = None
            self.metrics.worker_ready.set(1 if self.ready else 0)
            log.info(
                "worker %d ready: %s warmed up in %.1f s",
                w.gen,
                (self.meta or {}).get("model_id"),
                msg.seconds,
            )
            self._kick()
        elif isinstance(msg, Fatal):
            self.last_error = msg.message  # the worker has logged it; /health and on_fatal report it
            w.fatal = True
        elif isinstance(msg, BatchStarted):
            now = time.monotonic()
            if self._ahead is not None and not self._ahead.isdisjoint(msg.ids):
                self._ahead = None  # the worker took it: time to send the next one
            for i in msg.ids:
                t = self._current.get(i)
                if t is None:
                    continue
                t.started = now
                if not t.done:
                    t.state = "running"
                    self.metrics.queue_wait.labels(task=t.item.kind).observe(now - t.created)
                    t.events.put_nowait(Started())
            self._update_running()
            self._watch_abandoned(msg.ids)  # all of it ended while it waited in the worker
            self._kick()
        elif isinstance(msg, BatchProgress):
            if msg.step_seconds is not None:
                self.metrics.step.observe(msg.step_seconds)
            for t in self._tickets(msg.ids):
                t.events.put_nowait(msg.progress)
        elif isinstance(msg, Output):
            t = self._current.pop(msg.ticket_id, None)
            if t is not None:
                self._record_success(t, msg.payload)
                self._finish(t, payload=msg.payload)
            self._after_answer()
        elif isinstance(msg, BatchFailed):
            log.debug("worker: %s %s", msg.ids, msg.kind)
            if msg.kind == "cancelled":
                self.metrics.worker_cancelled.inc(len(msg.ids))
            for i in msg.ids:
                t = self._current.pop(i, None)
                if t is not None:
                    self._finish(t, error=EngineError(msg.kind, msg.message))
            self._after_answer()
        else:
            log.error("worker %d sent an unknown message: %r", w.gen, msg)

    def _tickets(self, ids) -> list[Ticket]:
        return [t for i in ids if (t := self._current.get(i)) is not None and not t.done]

    def _record_success(self, t: Ticket, payload: dict[str, Any]) -> None:
        # From the start of its generation: a batch sent ahead waits in the worker for the previous one.
        seconds = time.monotonic() - (t.started or t.dispatched or t.created)
        self.metrics.generation.labels(task=t.item.kind).observe(seconds)
        self._ewma_seconds = (
            seconds if self._ewma_seconds is None else 0.8 * self._ewma_seconds + 0.2 * seconds
        )
        for stage, s in payload.get("timings", {}).items():
            self.metrics.stage.labels(stage=stage).observe(s)
        for outcome, count in payload.get("dit_forwards", {}).items():
            self.metrics.dit_forwards.labels(outcome=outcome).inc(count * payload.get("forward_share", 1.0))

    def _after_answer(self) -> None:
        if self._ahead is not None and self._ahead.isdisjoint(self._current):
            self._ahead = None  # answered without a start: all of it was cancelled before the worker took it
        self._update_running()
        self._kick()
        self._check_idle()

    def _update_running(self) -> None:
        self.metrics.running.set(sum(1 for t in self._current.values() if t.state == "running"))

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
        """Send the next batch if the worker has none waiting; see the module docstring for the rules."""
        w = self._worker
        if not self.ready or w is None or w.dead or self._ahead is not None or not self._queue:
            return
        head = self._queue[0]
        shapes = batch_shapes(self.cfg.worker.warmup_batch or self.cfg.max_batch)  # the warmed ones
        batch, outputs = batch_for(self._queue, self.cfg.max_batch, self.meta, shapes)
        wait = head.created + self.cfg.batch_wait_ms / 1000 - time.monotonic()
        if wait > 0 and outputs < self.cfg.max_batch and merge_key(head.item, self.meta) is not None:
            if self._wait_timer is None:
                self._wait_timer = self._loop.call_later(wait, self._wait_over)
            return
        self._dispatch(w, batch)

    def _wait_over(self) -> None:
        self._wait_timer = None
        self._kick()

    def _dispatch(self, w: _Worker, batch: list[Ticket]) -> None:
        if self._wait_timer is not None:
            self._wait_timer.cancel()
            self._wait_timer = None
        now = time.monotonic()
        ids = tuple(t.id for t in batch)
        for t in batch:
            self._queue.remove(t)
            t.state, t.dispatched, t.batch = "dispatched", now, ids
            self._current[t.id] = t
        self._ahead = frozenset(ids)
        self.metrics.queue_depth.set(len(self._queue))
        self.metrics.batch_size.observe(len(batch))
        log.debug("dispatch %s", ids)
        w.req_q.put(Batch(tuple(t.item for t in batch)))

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
        t.events.put_nowait(Completed(payload) if error is None else Errored(error))
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
                w.cancel_q.put(Cancel(t.id))
            except ValueError:  # queue closed: the worker is going away anyway
                pass
        self._update_running()
        self._watch_abandoned(t.batch)

    def _watch_abandoned(self, ids) -> None:
        """Nobody waits for this started batch any more: if the worker does not let go of it within
        --kill-grace, kill it (a worker stuck in a runner that ignores cancels would hold every later
        request). A batch still waiting in the worker is watched from its start (BatchStarted calls this)."""
        held = [t for i in ids if (t := self._current.get(i)) is not None]
        if held and all(t.done for t in held) and any(t.started is not None for t in held):
            watched = frozenset(t.id for t in held)
            self._loop.call_later(self.cfg.kill_grace, self._kill_if_stuck, self._worker, watched)

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
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
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
        if self._wait_timer is not None:
            self._wait_timer.cancel()
        w = self._worker
        if w is None:
            return
        if not w.dead:
            try:
                w.req_q.put(Stop())
            except ValueError:
                pass
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, w.process.join, 10)
        if w.process.is_alive():  # it ignores SIGTERM (see worker_main), so SIGKILL
            w.process.kill()
            await loop.run_in_executor(None, w.process.join, 5)
        await loop.run_in_executor(None, w.reader.join, 2)
        self._on_exit(w)
