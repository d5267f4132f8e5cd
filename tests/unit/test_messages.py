"""The typed messages between worker, engine and tickets (diffserve.server.messages): they cross a process
boundary by pickling, carry no torch, and `Progress.percent` is the one progress rule; the asyncio timeouts
around them are caught as asyncio.TimeoutError, which is not the builtin TimeoutError before Python 3.11."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pickle
import queue
import subprocess
import sys
from types import SimpleNamespace

import pytest
from PIL import Image

from diffserve.runtime.api import GenerationCancelled, GenerationRequest, GenerationResult
from diffserve.server import messages as m
from diffserve.server.tickets import EngineError, Ticket

ITEM = m.WorkItem("img_1", GenerationRequest(prompt="a fox", width=64, height=48, seed=3), "image", "webp")

EXAMPLES = [
    ITEM,
    m.Batch((ITEM,)),
    m.Stop(),
    m.Cancel("img_1"),
    m.Progress(2, 3),
    m.Loaded({"model_id": "tiny", "defaults": {"width": 64}}),
    m.Ready(1.5),
    m.Fatal("ModelLoadError: no such model"),
    m.BatchStarted(("img_1", "img_2")),
    m.BatchProgress(("img_1",), m.Progress(1, 3), None),
    m.Output("img_1", {"images": [b"\x89PNG"], "width": 64, "height": 48}),
    m.BatchFailed(("img_1",), "out_of_memory", "the accelerator ran out of memory"),
    m.Started(),
    m.Completed({"images": []}),
    m.Idle(),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda x: type(x).__name__)
def test_messages_are_frozen_and_survive_pickling(message):
    assert dataclasses.is_dataclass(message)
    assert pickle.loads(pickle.dumps(message)) == message
    fields = dataclasses.fields(message)
    if fields:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(message, fields[0].name, None)


def test_an_engine_error_event_pickles_too():
    event = pickle.loads(pickle.dumps(m.Errored(EngineError("timeout", "too slow"))))
    assert (event.error.kind, event.error.message) == ("timeout", "too slow")


def test_messages_import_no_torch():
    code = "import sys, diffserve.server.messages, diffserve.server.tickets; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize(
    "done, total, ceiling, percent",
    [
        (0, 3, 100, 0),
        (1, 3, 100, 33),
        (2, 3, 100, 66),  # rounded down, as the SSE stream always reported
        (3, 3, 100, 100),
        (3, 3, 99, 99),  # video jobs: 100 waits for the file
        (29, 100, 100, 29),  # integer arithmetic: int(100 * (29 / 100)) would be 28
        (1, 0, 100, 100),  # a runner reporting no total does not divide by zero
    ],
)
def test_progress_percent(done, total, ceiling, percent):
    assert m.Progress(done, total).percent(ceiling) == percent


class _Runner:
    def generate(self, request, on_step=None, should_cancel=None):
        for i in range(3):
            if should_cancel():
                raise GenerationCancelled()
            on_step(i + 1, 3)
        images = [Image.new("RGB", (8, 8)) for _ in range(request.num_outputs)]
        return GenerationResult(images=images, width=8, height=8, seed=request.seed)


def _drain(q) -> list:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


def test_worker_reports_a_batch_as_typed_messages():
    from diffserve.server.worker import _Cancels, run_batch

    cancel_q, res_q = queue.Queue(), queue.Queue()
    other = m.WorkItem("img_2", GenerationRequest(prompt="a fox", num_outputs=2), "image")
    cancel_q.put(m.Cancel("img_2"))
    run_batch(_Runner(), [ITEM, other], _Cancels(cancel_q, parent=os.getppid()), res_q)
    got = _drain(res_q)
    assert got[0] == m.BatchFailed(("img_2",), "cancelled", "the request was cancelled")
    assert got[1] == m.BatchStarted(("img_1",))
    assert [(p.progress, p.step_seconds is None) for p in got[2:5]] == [
        (m.Progress(1, 3), True),
        (m.Progress(2, 3), False),
        (m.Progress(3, 3), False),
    ]
    (output,) = got[5:]
    assert isinstance(output, m.Output) and output.ticket_id == "img_1"
    assert output.payload["seed"] == 3 and output.payload["images"][0][8:12] == b"WEBP"


def test_ticket_stream_yields_typed_events_until_the_terminal_one():
    async def main():
        ticket = Ticket(ITEM)
        seen = []

        async def consume():
            async for event in ticket.stream(idle=0.01):
                seen.append(event)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)  # some Idle events first
        for event in (m.Started(), m.Progress(1, 2), m.Completed({"images": []}), m.Progress(2, 2)):
            ticket.events.put_nowait(event)
        await asyncio.wait_for(task, 5)
        return seen

    seen = asyncio.run(main())
    assert isinstance(seen[0], m.Idle)
    # Stops at Completed: what follows a terminal event is never yielded.
    assert [e for e in seen if not isinstance(e, m.Idle)] == [
        m.Started(),
        m.Progress(1, 2),
        m.Completed({"images": []}),
    ]


class _OldTimeoutError(Exception):
    """asyncio.TimeoutError as it was before Python 3.11: not a subclass of the builtin TimeoutError."""


@pytest.fixture
def python310_timeouts(monkeypatch):
    async def wait_for(aw, timeout):
        aw.close()  # the coroutine is never awaited, as when the real wait_for times out at once
        raise _OldTimeoutError()

    monkeypatch.setattr(asyncio, "TimeoutError", _OldTimeoutError)
    monkeypatch.setattr(asyncio, "wait_for", wait_for)


def test_ticket_stream_survives_python310_timeouts(python310_timeouts):
    async def main():
        stream = Ticket(ITEM).stream(idle=0.01)
        first = await stream.__anext__()
        await stream.aclose()
        return first

    assert isinstance(asyncio.run(main()), m.Idle)


def test_engine_drain_survives_python310_timeouts(python310_timeouts):
    from diffserve.server.engine import Engine
    from diffserve.server.metrics import Metrics

    async def main():
        engine = Engine(SimpleNamespace(), Metrics())  # only drain's bookkeeping is used
        await engine.drain(0.01)  # never idle: the wait times out, the (empty) rest is failed
        return engine.health()

    assert asyncio.run(main()) == (False, "draining")
