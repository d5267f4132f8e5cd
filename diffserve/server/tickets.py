"""A request's life on the API side: its ticket (outcome future and event stream), the error it may end
with, and which requests may share one runner call."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

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


def merge_key(item: WorkItem):
    """Requests with equal keys may share one runner call (num_outputs = the sum of their n); None: never
    merged. The engine's one batching rule (and --batch-wait-ms waits only for a head that has a key).

    Today: identical unseeded image requests without an input image, because the runtime takes one request
    per call (the worker merges them by summing num_outputs) and a seed fixes one request's noise, which a
    shared call would not reproduce. Widening it to different prompts and seeds needs a runtime call that
    takes a list of requests, each keeping its own seed; then this key becomes (model settings, size,
    steps, scheduler, adapters) and the worker's merge in run_batch changes with it."""
    r = item.request
    if item.kind != "image" or r.seed is not None or r.image is not None or r.mask is not None:
        return None
    return (
        r.prompt,
        r.negative_prompt,
        r.width,
        r.height,
        r.num_inference_steps,
        r.guidance_scale,
        r.strength,
        repr(sorted(r.extra.items())),
    )


def batch_for(queue, max_batch: int) -> tuple[list[Ticket], int]:
    """The queue's head and the queued requests that may share its runner call (merge_key, the one rule),
    oldest first, up to max_batch outputs in all; and that number of outputs."""
    head = queue[0]
    batch, outputs = [head], head.item.request.num_outputs
    key = merge_key(head.item)
    if key is None:
        return batch, outputs
    for t in itertools.islice(queue, 1, None):
        n = t.item.request.num_outputs
        if outputs + n <= max_batch and merge_key(t.item) == key:
            batch.append(t)
            outputs += n
    return batch, outputs


def new_ticket_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"
