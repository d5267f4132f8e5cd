"""A request's life on the API side: its ticket (outcome future and event stream), the error it may end
with, and which requests may share one runner call."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from diffserve.server.worker import WorkItem

TERMINAL = ("result", "error")


class EngineError(Exception):
    """A request that did not produce an output. `kind`: queue_full, shutting_down, timeout, cancelled,
    worker_crashed, invalid_request, out_of_memory, generation_failed."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(eq=False)
class Ticket:
    item: WorkItem
    created: float = field(default_factory=time.monotonic)
    state: str = "queued"  # queued -> running -> done
    dispatched: float | None = None
    timer: Any = None
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

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

    async def stream(self, idle: float | None = None):
        """Events until the terminal one: ("started",), ("progress", done, total), ("result", payload),
        ("error", EngineError); with `idle`, also ("idle",) after every `idle` seconds without one."""
        while True:
            try:
                event = await asyncio.wait_for(self.events.get(), idle)
            except TimeoutError:  # the queue keeps its events: a timed-out get takes none
                yield ("idle",)
                continue
            yield event
            if event[0] in TERMINAL:
                return


def merge_key(item: WorkItem):
    """Requests with equal keys may share one runner call (num_outputs = the sum of their n). Only unseeded
    image requests without an input image: a seed fixes one request's noise, which a shared call would not
    reproduce."""
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


def new_ticket_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"
