"""Every message the server's parts exchange, as small frozen dataclasses (picklable, no torch).

  engine -> worker, request queue:  Batch(items) ... Stop()
  engine -> worker, cancel queue:   Cancel(ticket_id)
  worker -> engine, result queue:   Loaded(meta)  Ready(seconds)  Fatal(message)
                                    BatchStarted(ids)  BatchProgress(ids, progress, step_seconds)
                                    Output(ticket_id, payload)  BatchFailed(ids, kind, message)
  ticket -> routes (Ticket.stream): Started()  Progress(done, total)  Completed(payload)  Errored(error)
                                    and Idle() when asked for keep-alives

Every item of a Batch gets exactly one last message, an Output or a BatchFailed naming it; with the
pipelined worker these come from its encoder threads, so the answers of one batch may follow the
BatchStarted of the next (per ticket the order stays BatchStarted, BatchProgress..., then the answer).

The worker and the API process are separate processes (spawned), so what crosses the queues is pickled:
module-level classes of plain fields only. `Progress.percent` is the one place that turns denoising steps
into the percentage that clients see (images' SSE events, video jobs' `progress`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diffserve.runtime.api import GenerationRequest

if TYPE_CHECKING:
    from diffserve.server.tickets import EngineError


@dataclass(frozen=True)
class WorkItem:
    """One API request as the worker runs it."""

    ticket_id: str
    request: GenerationRequest
    kind: str  # "image" | "video"
    image_format: str = "png"  # images only


# ---- engine -> worker -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Batch:
    """Items that share one runner call (the engine groups only compatible ones; see tickets.merge_key)."""

    items: tuple[WorkItem, ...]


@dataclass(frozen=True)
class Stop:
    """Finish the batches in hand (generating or encoding) and exit."""


@dataclass(frozen=True)
class Cancel:
    ticket_id: str


# ---- progress (worker -> engine -> ticket) ----------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    """Denoising steps done out of total, as reported after each step."""

    done: int
    total: int

    def percent(self, ceiling: int = 100) -> int:
        """Whole percent done, rounded down, at most `ceiling` (integer arithmetic: 29 of 100 is 29, which
        int(100 * 0.29) is not)."""
        return min(ceiling, 100 * self.done // max(1, self.total))


# ---- worker -> engine -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Loaded:
    meta: dict[str, Any]  # see worker.runner_meta


@dataclass(frozen=True)
class Ready:
    seconds: float  # the warmup's duration


@dataclass(frozen=True)
class Fatal:
    """The model could not be loaded or warmed up; the worker exits after sending this."""

    message: str


@dataclass(frozen=True)
class BatchStarted:
    ids: tuple[str, ...]


@dataclass(frozen=True)
class BatchProgress:
    ids: tuple[str, ...]
    progress: Progress
    # The time of this one denoising step; None for the first, whose interval also holds text encoding.
    step_seconds: float | None


@dataclass(frozen=True)
class Output:
    """One item's encoded outputs (images or videos as bytes, sizes, timings, seed)."""

    ticket_id: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class BatchFailed:
    ids: tuple[str, ...]
    kind: str  # an EngineError kind: cancelled, invalid_request, out_of_memory, generation_failed
    message: str


WorkerMessage = Loaded | Ready | Fatal | BatchStarted | BatchProgress | Output | BatchFailed


# ---- ticket -> routes -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Started:
    """The worker took the request (it left the queue)."""


@dataclass(frozen=True)
class Completed:
    payload: dict[str, Any]  # an Output's payload


@dataclass(frozen=True)
class Errored:
    error: EngineError


@dataclass(frozen=True)
class Idle:
    """Nothing happened for the stream's `idle` seconds (a cue for keep-alives)."""


TicketEvent = Started | Progress | Completed | Errored | Idle
TERMINAL = (Completed, Errored)
