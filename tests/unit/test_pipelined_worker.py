"""The pipelined worker and the engine in front of it (issue 23): the worker takes the next batch while
encoder threads encode the previous one; memory stays bounded; a failed encode fails only its request;
cancels reach a ticket at every stage; a lone request waits at most --batch-wait-ms for company; a crash
or a kill loses only the batch in flight.

Two levels, both on the CPU with a fake runner (no torch, no model):
  * the worker's loop (worker.serve) in a thread of this process, with plain queues and an encoder whose
    encode functions the test controls (an Event that holds an encode);
  * the engine with a real spawned worker process whose runner factory is `make_runner` below (selected
    by WorkerConfig.runner_factory, as `--runner-factory` does).

Timing bounds are generous on purpose (a loaded 2-core CI machine): they check what waits for what, never
how fast anything is.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from urllib.parse import parse_qs

import pytest
from PIL import Image

from diffserve.runtime.api import GenerationCancelled, GenerationRequest, GenerationResult, InvalidRequest
from diffserve.runtime.config import RuntimeConfig
from diffserve.runtime.outputs import encode_image as real_encode_image
from diffserve.server import messages as m
from diffserve.server.config import ServerConfig, WorkerConfig
from diffserve.server.metrics import Metrics
from diffserve.server.tickets import EngineError
from diffserve.server.worker import Encoder, _Cancels, serve

# ---- a fake runner ---------------------------------------------------------------------------------


class _SlowImage:
    """An output whose encode takes `seconds` (the encoder calls image.convert first)."""

    def __init__(self, image, seconds: float):
        self.image, self.seconds = image, seconds

    def convert(self, mode):
        time.sleep(self.seconds)
        return self.image.convert(mode)


class _BrokenImage:
    """An output that cannot be encoded (as a truncated or corrupt frame from a runtime bug would be)."""

    def convert(self, mode):
        raise OSError("cannot write mode P as PNG: broken output")


class FakeRunner:
    """Steps of `step` seconds, honouring cancels unless ignore_cancel=1. A prompt containing "slow-encode"
    gives outputs that take 0.5 s each to encode; "bad-encode", outputs that cannot be encoded."""

    family, task, accepts_image, model_id = "flux", "image", False, "fake"
    defaults = {"width": 16, "height": 16, "num_inference_steps": 2, "guidance_scale": 3.5}

    def __init__(self, spec: str = ""):
        opts = {k: v[-1] for k, v in parse_qs(spec).items()}
        self.step = float(opts.get("step", "0.005"))
        self.ignore_cancel = opts.get("ignore_cancel") == "1"
        self.calls: list[GenerationRequest] = []

    def warmup(self, resolutions=None, max_batch=1):
        self.warmed = max_batch

    def generate(self, req, on_step=None, should_cancel=None):
        self.calls.append(req)
        steps = req.num_inference_steps or 2
        for i in range(steps):
            if should_cancel is not None and should_cancel() and not self.ignore_cancel:
                raise GenerationCancelled()
            time.sleep(self.step)
            if on_step is not None:
                on_step(i + 1, steps)
        images = [Image.new("RGB", (16, 16), (40 * i % 256, 0, 0)) for i in range(req.num_outputs)]
        if "slow-encode" in req.prompt:
            images = [_SlowImage(im, 0.5) for im in images]
        if "bad-encode" in req.prompt:
            images = [_BrokenImage() for _ in images]
        return GenerationResult(images=images, width=16, height=16, seed=req.seed)


class BatchingFakeRunner(FakeRunner):
    """generate_batch as the native pipelines have it (Runner.generate_batch): several requests' samples in
    one call of the steps, each result with its own seed and its share of the call; a request whose prompt
    holds "invalid" fails alone (as one that the pipeline's plan() refuses)."""

    batches_samples = True

    def __init__(self, spec: str = ""):
        super().__init__(spec)
        self.batches: list[list[str]] = []

    def generate_batch(self, reqs, on_step=None, should_cancel=None):
        self.batches.append([r.prompt for r in reqs])
        valid = [r for r in reqs if "invalid" not in r.prompt]
        total = sum(r.num_outputs for r in valid)
        steps = valid[0].num_inference_steps or 2
        shared = self.generate(
            GenerationRequest(
                prompt=" ".join(r.prompt for r in valid), num_inference_steps=steps, num_outputs=total
            ),
            on_step,
            should_cancel,
        )
        out, offset = [], 0
        for r in reqs:
            if r not in valid:
                out.append(InvalidRequest(f"cannot draw {r.prompt!r}"))
                continue
            out.append(
                GenerationResult(
                    images=shared.images[offset : offset + r.num_outputs],
                    width=16,
                    height=16,
                    seed=4242 if r.seed is None else r.seed,
                    dit_forwards={"computed": steps, "cached": 0},
                    forward_share=r.num_outputs / total,
                )
            )
            offset += r.num_outputs
        return out


def make_runner(config: RuntimeConfig) -> FakeRunner:
    """The runner factory of the spawned worker (WorkerConfig.runner_factory)."""
    spec = config.model or ""
    return (BatchingFakeRunner if "batching=1" in spec else FakeRunner)(spec)


def item(ticket_id: str, prompt: str = "a fox", fmt: str = "png", steps: int = 2, **kw) -> m.WorkItem:
    request = GenerationRequest(prompt=prompt, width=16, height=16, num_inference_steps=steps, **kw)
    return m.WorkItem(ticket_id, request, "image", fmt)


# ---- the worker's loop, in a thread ------------------------------------------------------------------


class Loop:
    """worker.serve in a thread over plain queues, with a collector of what it sends."""

    def __init__(self, runner=None, threads=1, backlog=2, encode_image=real_encode_image):
        self.runner = runner or FakeRunner()
        self.req_q, self.cancel_q, self.res_q = queue.Queue(), queue.Queue(), queue.Queue()
        self.cancels = _Cancels(self.cancel_q, parent=os.getppid())
        self.encoder = Encoder(
            self.res_q, self.cancels, threads, backlog, encode_image=encode_image, encode_video=None
        )
        self.got: list = []
        self.thread = threading.Thread(
            target=serve, args=(self.runner, self.req_q, self.cancels, self.res_q, self.encoder), daemon=True
        )
        self.thread.start()

    def send(self, *items: m.WorkItem) -> None:
        self.req_q.put(m.Batch(tuple(items)))

    def until(self, pred, timeout: float = 20.0) -> list:
        """Collect messages until pred(message) holds for one; return everything collected so far."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.res_q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"timed out; got {self.got}") from None
            self.got.append(msg)
            if pred(msg):
                return self.got

    def quiet_for(self, seconds: float) -> list:
        """What arrives within `seconds` (the test expects nothing, or nothing of some kind)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                self.got.append(self.res_q.get(timeout=left))
            except queue.Empty:
                break
        return self.got

    def stop(self) -> None:
        self.req_q.put(m.Stop())
        self.thread.join(20)
        assert not self.thread.is_alive()
        self.quiet_for(0)

    def index(self, kind, ticket_id: str) -> int:
        for i, msg in enumerate(self.got):
            ids = (msg.ticket_id,) if isinstance(msg, m.Output) else getattr(msg, "ids", ())
            if isinstance(msg, kind) and ticket_id in ids:
                return i
        raise AssertionError(f"no {kind.__name__} for {ticket_id} in {self.got}")


def started(ticket_id):
    return lambda msg: isinstance(msg, m.BatchStarted) and ticket_id in msg.ids


def answered(ticket_id):
    return lambda msg: (
        (isinstance(msg, m.Output) and msg.ticket_id == ticket_id)
        or (isinstance(msg, m.BatchFailed) and ticket_id in msg.ids)
    )


class Gate:
    """An encode_image that waits until the gate opens (or fails for one format)."""

    def __init__(self, fail_format: str | None = None):
        self.open = threading.Event()
        self.entered = threading.Semaphore(0)
        self.fail_format = fail_format

    def __call__(self, image, fmt="png"):
        self.entered.release()
        assert self.open.wait(20)
        if fmt == self.fail_format:
            raise OSError(f"encoder {fmt} not available")
        return real_encode_image(image, fmt)


def test_the_next_batch_starts_while_the_previous_one_encodes():
    gate = Gate()
    loop = Loop(encode_image=gate)
    loop.send(item("a"))
    loop.send(item("b", prompt="another"))
    loop.until(started("b"))
    assert gate.entered.acquire(timeout=20)  # a's encode is in progress, held by the gate
    loop.until(lambda msg: isinstance(msg, m.BatchProgress) and msg.ids == ("b",) and msg.progress.done == 2)
    assert not any(isinstance(x, m.Output) for x in loop.got)  # b generated while a was still encoding
    gate.open.set()
    loop.until(answered("a"))
    loop.until(answered("b"))
    loop.stop()
    assert loop.index(m.BatchStarted, "b") < loop.index(m.Output, "a")
    for ticket_id in ("a", "b"):
        out = loop.got[loop.index(m.Output, ticket_id)]
        assert out.payload["images"][0][:8] == b"\x89PNG\r\n\x1a\n"
        assert out.payload["timings"]["encode_output"] > 0  # reported as a stage of its own
    assert loop.cancels.ids == set()


def test_memory_is_bounded_the_worker_waits_when_the_encoder_is_full():
    """One encoder thread and a backlog of one: a encodes (held), b waits for the thread, c is generated
    and then the worker waits to hand it over; d is not started until the encoder moves."""
    gate = Gate()
    loop = Loop(threads=1, backlog=1, encode_image=gate)
    for ticket_id in "abcd":
        loop.send(item(ticket_id, prompt=ticket_id))
    loop.until(lambda msg: isinstance(msg, m.BatchProgress) and msg.ids == ("c",) and msg.progress.done == 2)
    loop.quiet_for(0.5)
    assert not any(started("d")(x) for x in loop.got), loop.got
    assert len(loop.runner.calls) == 3  # at most threads + backlog + 1 results exist at once
    gate.open.set()
    for ticket_id in "abcd":
        loop.until(answered(ticket_id))
    loop.stop()
    assert all(isinstance(loop.got[loop.index(m.Output, t)], m.Output) for t in "abcd")


def test_a_failed_encode_fails_only_its_own_request():
    """Two requests merged into one runner call (identical prompt, different output formats): the WebP
    encode fails, the PNG one is delivered, and the worker goes on with the next batch."""
    gate = Gate(fail_format="webp")
    gate.open.set()
    loop = Loop(encode_image=gate)
    loop.send(item("png", fmt="png"), item("webp", fmt="webp"))
    loop.send(item("next", prompt="next"))
    for ticket_id in ("png", "webp", "next"):
        loop.until(answered(ticket_id))
    loop.stop()
    assert len(loop.runner.calls) == 2 and loop.runner.calls[0].num_outputs == 2
    failed = loop.got[loop.index(m.BatchFailed, "webp")]
    assert failed.ids == ("webp",) and failed.kind == "generation_failed"
    assert failed.message == "encoding the output as webp failed: OSError: encoder webp not available"
    assert isinstance(loop.got[loop.index(m.Output, "png")], m.Output)
    assert isinstance(loop.got[loop.index(m.Output, "next")], m.Output)


def test_cancels_reach_every_stage_of_the_pipeline():
    gate = Gate()
    loop = Loop(runner=FakeRunner("step=0.02"), threads=1, backlog=2, encode_image=gate)
    # a: generated, its encode held by the gate. b: generated, waiting for the encoder thread.
    loop.send(item("a", prompt="a"))
    loop.send(item("b", prompt="b"))
    loop.until(lambda msg: isinstance(msg, m.BatchProgress) and msg.ids == ("b",) and msg.progress.done == 2)
    # c: running (many steps); d: still in the request queue behind it.
    loop.send(item("c", prompt="c", steps=400))
    loop.send(item("d", prompt="d"))
    loop.until(started("c"))
    for ticket_id in ("b", "c", "d"):
        loop.cancel_q.put(m.Cancel(ticket_id))
    loop.until(answered("c"))  # stopped between two steps
    loop.until(answered("d"))  # skipped without starting
    gate.open.set()
    loop.until(answered("a"))
    loop.until(answered("b"))  # never encoded
    loop.stop()
    assert isinstance(loop.got[loop.index(m.Output, "a")], m.Output)
    for ticket_id in ("b", "c", "d"):
        failed = loop.got[loop.index(m.BatchFailed, ticket_id)]
        assert failed.kind == "cancelled" and failed.ids == (ticket_id,)
    assert not any(started("d")(x) for x in loop.got)
    assert loop.runner.calls[-1].prompt == "c"  # d never reached the runner
    # Nothing is kept: each id left the set when its ticket was answered, and a cancel that races its
    # ticket's result (it arrives after the answer) is recognised and never stored.
    assert loop.cancels.ids == set()
    loop.cancel_q.put(m.Cancel("a"))
    loop.cancels.drain()
    assert loop.cancels.ids == set()


def test_a_cancel_can_arrive_before_its_batch():
    """With a batch queued ahead, the worker may read the cancel first: it must keep it for the batch."""
    loop = Loop(runner=FakeRunner("step=0.02"))
    loop.cancel_q.put(m.Cancel("later"))
    loop.cancels.drain()
    assert loop.cancels.ids == {"later"}
    loop.send(item("later"))
    loop.until(answered("later"))
    loop.stop()
    assert loop.got == [m.BatchFailed(("later",), "cancelled", "the request was cancelled")]
    assert loop.cancels.ids == set()


# ---- the engine, with a spawned worker -----------------------------------------------------------------

FACTORY = f"{__name__}:make_runner"


def engine_config(spec: str = "", **server) -> ServerConfig:
    worker = WorkerConfig(
        runtime=RuntimeConfig(model=spec or "fake"), runner_factory=FACTORY, log_level="warning"
    )
    return ServerConfig(worker=worker, **server)


async def started_engine(cfg: ServerConfig):
    from diffserve.server.engine import Engine

    engine = Engine(cfg, Metrics())
    await engine.start()
    deadline = time.monotonic() + 60
    while not engine.ready:
        assert time.monotonic() < deadline, "the worker never got ready"
        await asyncio.sleep(0.02)
    return engine


async def stopped(engine) -> None:
    await engine.drain(10)
    await engine.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def batch_sizes(engine) -> list[float]:
    """diffserve_batch_requests as (count, sum)."""
    samples = {s.name: s.value for f in engine.metrics.batch_size.collect() for s in f.samples}
    return [samples["diffserve_batch_requests_count"], samples["diffserve_batch_requests_sum"]]


def test_a_lone_request_waits_at_most_batch_wait_ms():
    """--batch-wait-ms 1000: a lone mergeable request is dispatched 1 s after its admission, not later
    (bound: +1 s, for an event loop on a busy machine; the wait itself is a timer, so the lower bound is
    exact; the wait is long so that the companion below arrives within it even on a loaded machine); a
    request that cannot merge (seeded) never waits; a companion that fills the batch sends it at once,
    before the wait is over."""

    async def main():
        engine = await started_engine(engine_config(batch_wait_ms=1000, max_batch=2))
        try:
            lone = engine.submit(item("lone"))
            await lone.wait()
            lone_delay = lone.dispatched - lone.created

            seeded = engine.submit(item("seeded", seed=7))
            seeded_dispatched_in_submit = seeded.dispatched is not None
            await seeded.wait()

            before = batch_sizes(engine)
            first = engine.submit(item("pair-1", prompt="pair"))
            await asyncio.sleep(0.05)
            second = engine.submit(item("pair-2", prompt="pair"))
            await asyncio.gather(first.wait(), second.wait())
            after = batch_sizes(engine)
            return lone_delay, seeded_dispatched_in_submit, first, second, before, after
        finally:
            await stopped(engine)

    lone_delay, seeded_at_once, first, second, before, after = run(main())
    assert 1.0 <= lone_delay < 2.0, lone_delay
    assert seeded_at_once
    assert first.dispatched == second.dispatched  # one batch
    assert first.dispatched - first.created < 1.0  # sent when the batch was full, not at the deadline
    assert after[0] - before[0] == 1 and after[1] - before[1] == 2  # diffserve_batch_requests saw a 2


def test_different_prompts_and_seeds_share_a_batch_each_with_its_own_seed():
    """With a runner that batches samples (the worker reports "batching": "samples"): seeded requests with
    different prompts wait for company and go as one batch; each answer carries its own seed and its
    share of the forwards (diffserve_dit_forwards_total counts the shared forwards once); a request the
    runtime refuses fails alone. A lone seeded request now waits too, at most --batch-wait-ms."""

    async def main():
        engine = await started_engine(engine_config("batching=1", batch_wait_ms=1000, max_batch=4))
        try:
            assert engine.meta["batching"] == "samples" and engine.meta["step_cache"] is False
            lone = engine.submit(item("lone", seed=1))
            await lone.wait()
            lone_delay = lone.dispatched - lone.created

            before = batch_sizes(engine)
            forwards = engine.metrics.dit_forwards.labels(outcome="computed")._value.get()
            tickets = [engine.submit(item(f"r{i}", prompt=f"prompt {i}", seed=10 + i)) for i in range(3)]
            bad = engine.submit(item("bad", prompt="invalid one", seed=99))
            payloads = await asyncio.gather(*(t.wait() for t in tickets))
            with pytest.raises(EngineError) as e:
                await bad.wait()
            forwards = engine.metrics.dit_forwards.labels(outcome="computed")._value.get() - forwards
            return lone_delay, tickets, bad, payloads, e.value, batch_sizes(engine), before, forwards
        finally:
            await stopped(engine)

    lone_delay, tickets, bad, payloads, error, after, before, forwards = run(main())
    assert 1.0 <= lone_delay < 2.0, lone_delay
    assert len({t.dispatched for t in [*tickets, bad]}) == 1  # one batch, sent when it was full
    assert tickets[0].dispatched - tickets[0].created < 1.0
    assert after[0] - before[0] == 1 and after[1] - before[1] == 4
    assert [p["seed"] for p in payloads] == [10, 11, 12]
    assert [p["forward_share"] for p in payloads] == [1 / 3] * 3
    assert all(p["dit_forwards"] == {"computed": 2, "cached": 0} for p in payloads)
    assert forwards == pytest.approx(2)  # 2 steps of one shared forward, counted once over three requests
    assert error.kind == "invalid_request" and "cannot draw" in error.message


def test_the_worker_splits_a_batch_per_request_and_fails_only_the_bad_one():
    """worker.run_batch with generate_batch: each item its own Output (own seed), the refused one its own
    BatchFailed; and a runner without generate_batch never gets different requests in one call."""
    loop = Loop(runner=BatchingFakeRunner())
    loop.send(item("x", prompt="x", seed=3), item("y", prompt="invalid y", seed=4), item("z", prompt="z"))
    loop.until(lambda _: all(any(answered(t)(msg) for msg in loop.got) for t in "xyz"))
    loop.stop()
    assert loop.runner.batches == [["x", "invalid y", "z"]]
    assert loop.got[loop.index(m.Output, "x")].payload["seed"] == 3
    assert loop.got[loop.index(m.Output, "z")].payload["seed"] == 4242  # drawn by the runtime, reported
    failed = loop.got[loop.index(m.BatchFailed, "y")]
    assert failed.ids == ("y",) and failed.kind == "invalid_request"

    plain = Loop()  # FakeRunner: no generate_batch
    plain.send(item("p", prompt="p", seed=1), item("q", prompt="q", seed=2), item("r", prompt="p", seed=1))
    plain.until(lambda _: all(any(answered(t)(msg) for msg in plain.got) for t in "pqr"))
    plain.stop()
    assert [(c.prompt, c.num_outputs) for c in plain.runner.calls] == [("p", 1), ("q", 1), ("p", 1)]


def test_the_engine_sends_the_next_batch_before_the_previous_result_returns():
    """Batch 1's outputs take 0.5 s to encode; batch 2 is started by the worker before batch 1's result is
    back (Started of 2 before Completed of 1), and both complete."""

    async def main():
        engine = await started_engine(engine_config())
        try:
            events: list[tuple[str, str]] = []

            async def watch(t):
                async for event in t.stream():
                    events.append((t.id, type(event).__name__))

            one = engine.submit(item("one", prompt="slow-encode", seed=1))
            two = engine.submit(item("two", prompt="next", seed=2))
            await asyncio.gather(watch(one), watch(two))
            return events, await one.wait(), await two.wait()
        finally:
            await stopped(engine)

    events, one, two = run(main())
    assert events.index(("two", "Started")) < events.index(("one", "Completed")), events
    assert one["images"] and two["images"]


def test_an_encode_failure_through_the_engine_fails_that_request_only():
    async def main():
        engine = await started_engine(engine_config())
        try:
            bad = engine.submit(item("bad", prompt="bad-encode", seed=1))
            good = engine.submit(item("good", prompt="fine", seed=2))
            with pytest.raises(EngineError) as e:
                await bad.wait()
            payload = await good.wait()
            return e.value, payload, engine.worker_pid, engine.metrics.worker_restarts._value.get()
        finally:
            await stopped(engine)

    error, payload, pid, restarts = run(main())
    assert error.kind == "generation_failed"
    assert error.message.startswith("encoding the output as png failed: OSError: ")
    assert payload["images"] and pid is not None and restarts == 0


def test_a_cancel_of_the_batch_queued_ahead_and_of_the_running_one():
    async def main():
        engine = await started_engine(engine_config("step=0.02"))
        try:
            running = engine.submit(item("running", seed=1, steps=400))
            ahead = engine.submit(item("ahead", seed=2))
            while running.started is None:
                await asyncio.sleep(0.01)
            assert ahead.state == "dispatched"  # in the worker's queue, behind the running one
            assert engine.cancel("ahead") and engine.cancel("running")
            for t in (running, ahead):
                with pytest.raises(EngineError) as e:
                    await t.wait()
                assert e.value.kind == "cancelled"
            deadline = time.monotonic() + 20
            while engine._current:  # the worker answers both: nothing is left held
                assert time.monotonic() < deadline, engine._current
                await asyncio.sleep(0.02)
            after = engine.submit(item("after", seed=3))
            return await after.wait(), engine.metrics.worker_cancelled._value.get()
        finally:
            await stopped(engine)

    payload, stopped_by_worker = run(main())
    assert payload["images"] and stopped_by_worker == 2


def test_a_killed_worker_loses_the_running_batch_only():
    """The running request fails with worker_crashed; the one queued ahead in the dead worker had not
    started: it goes back to the queue and completes on the new worker."""

    async def main():
        engine = await started_engine(engine_config("step=0.02"))
        try:
            running = engine.submit(item("running", seed=1, steps=400))
            ahead = engine.submit(item("ahead", seed=2))
            while running.started is None:
                await asyncio.sleep(0.01)
            engine._worker.process.kill()
            with pytest.raises(EngineError) as e:
                await running.wait()
            return e.value, await ahead.wait(), ahead.requeued
        finally:
            await stopped(engine)

    error, payload, requeued = run(main())
    assert error.kind == "worker_crashed"
    assert payload["images"] and requeued


def test_a_worker_stuck_in_a_cancelled_batch_is_killed_and_the_batch_ahead_survives():
    """The runner ignores cancels: once the running request is cancelled, nobody waits for it; after
    --kill-grace the worker is killed, and the live request queued ahead of it runs on the next worker."""

    async def main():
        engine = await started_engine(engine_config("step=0.02&ignore_cancel=1", kill_grace=0.5))
        try:
            stuck = engine.submit(item("stuck", seed=1, steps=2000))
            ahead = engine.submit(item("ahead", seed=2))
            while stuck.started is None:
                await asyncio.sleep(0.01)
            first_pid = engine.worker_pid
            engine.cancel("stuck")
            return first_pid, await ahead.wait(), engine.worker_pid
        finally:
            await stopped(engine)

    first_pid, payload, pid = run(main())
    assert payload["images"] and pid != first_pid


def test_batches_are_cut_to_the_warmed_up_sizes():
    """batch_for with the warmed sizes (api.batch_shapes(8) = 1, 2, 4, 8): seven compatible requests
    go as the first four (the other three lead the next batch); a prefix of a warmed size is kept when
    outputs differ (n=2 + n=1 + n=1 -> 4); no such prefix: the whole batch. Incompatible requests are
    skipped, never reordered. Samples batching (meta "batching": "samples") merges different prompts and
    seeds; without it, only identical unseeded requests merge."""
    from collections import deque
    from types import SimpleNamespace

    from diffserve.runtime.api import batch_shapes
    from diffserve.server.tickets import batch_for

    assert batch_shapes(8) == [1, 2, 4, 8] and batch_shapes(6) == [1, 2, 4, 6] and batch_shapes(1) == [1]
    meta = {"family": "flux", "defaults": FakeRunner.defaults, "batching": "samples", "step_cache": False}

    def queue(*requests):
        return deque(SimpleNamespace(item=r, id=r.ticket_id) for r in requests)

    def ids(batch):
        return [t.id for t in batch[0]], batch[1]

    shapes = batch_shapes(8)
    seven = queue(*(item(f"r{i}", prompt=f"p{i}", seed=i) for i in range(7)))
    assert ids(batch_for(seven, 8, meta, shapes)) == (["r0", "r1", "r2", "r3"], 4)
    assert ids(batch_for(seven, 8, meta)) == ([f"r{i}" for i in range(7)], 7)  # no shapes: no cut
    mixed = queue(
        item("a", seed=1, num_outputs=2),
        item("steps", seed=2, steps=3),  # other steps: another batch
        item("b", prompt="b", seed=3),
        item("c", prompt="c"),
        item("d", prompt="d", seed=4, num_outputs=3),
    )
    assert ids(batch_for(mixed, 8, meta, shapes)) == (["a", "b", "c"], 4)
    odd = queue(item("a", seed=1, num_outputs=3), item("b", seed=2, num_outputs=2))
    assert ids(batch_for(odd, 8, meta, shapes)) == (["a", "b"], 5)
    # without sample batching (the generic path, a parallel runner, no meta yet): identical unseeded only
    plain = queue(item("a"), item("b", prompt="other"), item("c", seed=1), item("d"))
    assert ids(batch_for(plain, 8, {**meta, "batching": "merge"}, shapes)) == (["a", "d"], 2)
    assert ids(batch_for(plain, 8, None, shapes)) == (["a", "d"], 2)


# ---- warmup of batch shapes ----------------------------------------------------------------------------


class _RecordingPipeline:
    family, task, accepts_image = "flux", "image", False
    defaults = {"width": 32, "height": 32}

    def __init__(self, oom_from: int | None = None):
        self.calls: list[tuple[int, int, int]] = []
        self.oom_from = oom_from

    def __call__(self, req, on_step=None, should_cancel=None):
        import torch

        self.calls.append((req.width, req.height, req.num_outputs))
        if self.oom_from is not None and req.num_outputs >= self.oom_from:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return GenerationResult(width=req.width, height=req.height)


def _runner(pipeline):
    from diffserve.runtime.runner import Runner

    return Runner(pipeline, "rec", None, "cpu", None)


@pytest.mark.parametrize(
    "max_batch, sizes",
    [(1, [1]), (2, [1, 2]), (4, [1, 2, 4]), (6, [1, 2, 4, 6]), (8, [1, 2, 4, 8])],
)
def test_warmup_runs_each_resolution_at_the_batch_sizes_a_batch_can_have(max_batch, sizes):
    pipeline = _RecordingPipeline()
    _runner(pipeline).warmup([(64, 48), (32, 32)], max_batch=max_batch)
    assert pipeline.calls == [(64, 48, n) for n in sizes] + [(32, 32, n) for n in sizes]


def test_warmup_of_a_batch_that_does_not_fit_is_reported_not_fatal(caplog):
    pipeline = _RecordingPipeline(oom_from=4)
    _runner(pipeline).warmup([(64, 48)], max_batch=8)
    assert pipeline.calls == [(64, 48, 1), (64, 48, 2), (64, 48, 4)]  # 8 is not tried after 4 failed
    assert "a batch of 4 does not fit" in caplog.text and "--max-batch" in caplog.text
    with pytest.raises(Exception, match="out of cpu memory"):  # batch 1 not fitting stays fatal
        _runner(_RecordingPipeline(oom_from=1)).warmup([(64, 48)], max_batch=4)


def test_the_worker_passes_max_batch_only_to_a_warmup_that_takes_it():
    from diffserve.server.worker import warmup

    cfg = engine_config(max_batch=4).worker
    assert cfg.warmup_batch == 4  # ServerConfig hands --max-batch to the worker's config

    class Old:
        def warmup(self, resolutions=None):
            self.args = (resolutions,)

    old, new = Old(), FakeRunner()
    warmup(old, cfg)
    warmup(new, cfg)
    assert old.args == (None,) and new.warmed == 4


def test_the_worker_warms_the_output_encoders(monkeypatch, caplog):
    """After the runner's warmup the worker encodes once in every image format (a video model: an MP4 too),
    so the first request does not pay for loading the codecs; a broken codec is logged, not fatal."""
    from diffserve.runtime import outputs
    from diffserve.server import worker

    seen = []
    monkeypatch.setattr(outputs, "encode_image", lambda image, fmt="png", quality=None: seen.append(fmt))
    monkeypatch.setattr(outputs, "encode_video", lambda frames, **kw: seen.append(("mp4", len(frames))))
    worker.warm_encoders("image")
    assert seen == ["png", "jpeg", "webp"]
    seen.clear()
    worker.warm_encoders("video")
    assert seen == ["png", "jpeg", "webp", ("mp4", 2)]

    def broken(frames, **kw):
        raise RuntimeError("libx264 missing")

    monkeypatch.setattr(outputs, "encode_video", broken)
    worker.warm_encoders("video")
    assert "warming the output encoders failed: libx264 missing" in caplog.text


def test_flags_travel_to_the_server_and_worker_configs():
    import argparse

    from diffserve.server.cli import add_serve_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    flags = ["--model", "x", "--max-batch", "8", "--batch-wait-ms", "7.5", "--encode-threads", "0"]
    cfg = config_from_args(parser.parse_args(flags))
    assert (cfg.max_batch, cfg.batch_wait_ms) == (8, 7.5)
    assert (cfg.worker.warmup_batch, cfg.worker.encode_threads) == (8, 0)
    defaults = config_from_args(parser.parse_args(["--model", "x"]))
    assert (defaults.batch_wait_ms, defaults.worker.encode_threads, defaults.worker.warmup_batch) == (0, 2, 4)
    with pytest.raises(ValueError, match="batch_wait_ms"):
        config_from_args(parser.parse_args(["--model", "x", "--batch-wait-ms", "-1"]))
