"""A request's life on the API side: its ticket (outcome future and event stream), the error it may end
with, and which requests may share one runner call."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from typing import Any

from diffserve.runtime.api import batch_key
from diffserve.server.messages import TERMINAL, Idle, TicketEvent, WorkItem


class EngineError(Exception):
    """A request that did not produce an output. `kind`: queue_full, shutting_down, timeout, cancelled,
    worker_crashed, invalid_request, out_of_memory, generation_failed."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __reduce__(self):  # Exception pickles only its args (the message); an Errored event carries a kind
        return type(self), (self.kind, self.message)


@dataclass(eq=False)
class Ticket:
    item: WorkItem
    created: float = field(default_factory=time.monotonic)
    state: str = "queued"  # queued -> dispatched (in the worker's queue) -> running -> done
    dispatched: float | None = None  # sent to the worker
    started: float | None = None  # the worker reported its start (BatchStarted)
    batch: tuple[str, ...] = ()  # the ids of the batch it was sent in
    requeued: bool = False  # a dead worker had it queued, unstarted: it went back to the queue once
    timer: Any = None
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    events: asyncio.Queue[TicketEvent] = field(default_factory=asyncio.Queue)

    @property
    def id(self) -> str:
        return self.item.ticket_id

    @property
    def done(self) -> bool:
        return self.future.done()

    async def wait(self) -> dict[str, Any]:
        """The payload (encoded outputs), or raises EngineError. Cancelling the caller leaves the ticket."""
        await asyncio.wait({self.future})
        payload, error = self.future.result()
        if error is not None:
            raise error
        return payload

    async def stream(self, idle: float | None = None) -> AsyncIterator[TicketEvent]:
        """Events until the terminal one: Started, Progress (after each step), then Completed or Errored;
        with `idle`, also Idle after every `idle` seconds without one."""
        while True:
            try:
                event = await asyncio.wait_for(self.events.get(), idle)
            # asyncio's own TimeoutError (not the builtin before Python 3.11). The queue keeps its events: a
            # timed-out get takes none.
            except asyncio.TimeoutError:
                yield Idle()
                continue
            yield event
            if isinstance(event, TERMINAL):
                return


def merge_key(item: WorkItem, meta: dict[str, Any] | None = None):
    """Requests with equal keys may share one runner call; None: never merged. The engine's one batching
    rule (and --batch-wait-ms waits only for a head that has a key).

    The runtime's own rule (runtime.api.batch_key, which Runner.generate_batch groups by), from what the
    worker reported about its runner (`meta`: family, defaults, "batching", "step_cache"): with a runner
    that batches samples ("batching": "samples", the native FLUX pipeline), image requests of the same
    size, steps and settings share a forward whatever their prompts, seeds and guidance, each keeping its
    own seed; otherwise (the generic diffusers path, a parallel runner, step caching on, no meta yet) only
    identical unseeded requests merge, their num_outputs summed. Never: videos (a video forward is
    compute-bound on its own, and only batch 1 is warmed up for them), edits (an input image)."""
    if item.kind != "image":
        return None
    meta = meta or {}
    return batch_key(
        item.request,
        meta.get("family", ""),
        meta.get("defaults") or {},
        samples=meta.get("batching") == "samples",
        step_cache=bool(meta.get("step_cache")),
    )


def batch_for(
    queue, max_batch: int, meta: dict[str, Any] | None = None, shapes: Collection[int] | None = None
) -> tuple[list[Ticket], int]:
    """The queue's head and the queued requests that may share its runner call (merge_key, the one rule),
    oldest first, up to max_batch outputs in all; and that number of outputs.

    shapes: the batch sizes warmed up at start (api.batch_shapes). A batch of another size is cut to its
    longest prefix of a warmed size (7 outputs -> the first 4; the other 3 lead the next batch), unless no
    prefix has one: a size captured on first use would evict a warmed CUDA graph of the DiT (it keeps only
    a few), and recapturing costs a few forwards, about what a 4-step batch takes."""
    head = queue[0]
    batch, outputs = [head], head.item.request.num_outputs
    key = merge_key(head.item, meta)
    if key is None:
        return batch, outputs
    for t in itertools.islice(queue, 1, None):
        n = t.item.request.num_outputs
        if outputs + n <= max_batch and merge_key(t.item, meta) == key:
            batch.append(t)
            outputs += n
    if shapes and outputs not in shapes:
        sums = list(itertools.accumulate(t.item.request.num_outputs for t in batch))
        fit = [k for k, total in enumerate(sums, 1) if total in shapes]
        if fit:
            batch, outputs = batch[: fit[-1]], sums[fit[-1] - 1]
    return batch, outputs


def new_ticket_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"
