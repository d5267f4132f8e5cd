"""The worker process: loads the runtime, warms it up, then runs the batches the engine sends it.

It is started with multiprocessing's "spawn" method, so torch and CUDA are initialised only here, never in
the API process (this module imports no torch at the top either: the engine imports it to name the target).

Messages (requests, cancels, results) are the dataclasses of diffserve.server.messages; no torch object
crosses a queue.

A pipeline, so that the accelerator never waits for the CPU: the main thread runs one batch on the runner,
hands the finished images/frames to a small pool of encoder threads (PNG/JPEG/WebP/MP4; Pillow and PyAV
release the GIL while they compress) and takes the next batch at once, which the engine has already put
in the request queue (it keeps one batch queued beyond the running one). The encoder threads send each
request's Output (or its own BatchFailed) through the same result queue; multiprocessing queues are
thread-safe. Memory stays bounded: at most `encode_backlog` results wait for an encoder thread, and when
they are all taken the main thread waits before it takes another batch.

    main thread:    [generate B1][generate B2][generate B3] ...
    encoder thread:              [encode B1  ][encode B2  ] ...
"""

from __future__ import annotations

import collections
import importlib
import inspect
import logging
import os
import queue
import signal
import threading
import time
import traceback
from typing import Any

from diffserve.runtime.api import GenerationCancelled, InvalidRequest, batch_key, run_grouped
from diffserve.runtime.limits import lora_rules
from diffserve.server.config import WorkerConfig
from diffserve.server.messages import (
    Batch,
    BatchFailed,
    BatchProgress,
    BatchStarted,
    Cancel,
    Fatal,
    Loaded,
    Output,
    Progress,
    Ready,
    Stop,
    WorkItem,
)

log = logging.getLogger("diffserve.worker")


def resolve_factory(spec: str):
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"runner factory must be 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def runner_meta(runner) -> dict[str, Any]:
    # The pipeline's size/frame rules let the API process reject a bad video size at once instead of
    # failing the job later; a runner without them is still served (the runtime validates anyway).
    rules = getattr(getattr(runner, "pipeline", None), "rules", None)
    return {
        "model_id": str(runner.model_id),
        "family": runner.family,
        "task": runner.task,
        "accepts_image": bool(runner.accepts_image),
        # Inpainting masks: not in the runner contract yet, so only a runner that says so gets them.
        "accepts_mask": bool(getattr(runner, "accepts_mask", False)),
        "defaults": dict(runner.defaults),
        # How many processes (GPUs) serve each request: ulysses_degree x (2 with --cfg-parallel), else 1.
        "world_size": int(getattr(getattr(runner, "parallel", None), "world_size", 1)),
        "rules": {
            **{k: getattr(rules, k, None) for k in ("multiple", "max_side", "frame_step", "max_frames")},
            **lora_rules(runner),  # the adapter names the API checks requests against, and --max-loras
        },
        # LoRA adapters as GET /v1/models lists them
        "loras": [
            {"name": a.name, "path": a.path}
            for a in getattr(getattr(runner, "loras", None), "adapters", {}).values()
        ],
        # How the engine may batch (tickets.merge_key): "samples" when the runner's generate_batch runs
        # different requests' samples in one forward; "merge" (identical unseeded requests only) otherwise.
        # Looked up on the class: a wrapper that forwards unknown attributes (the parallel runner) must not
        # pass for one that batches.
        "batching": "samples" if _batches_samples(runner) else "merge",
        "step_cache": bool(getattr(runner, "step_cache", False)),  # on by default: no sample batching
    }


def _batches_samples(runner) -> bool:
    return callable(getattr(type(runner), "generate_batch", None)) and bool(
        getattr(runner, "batches_samples", False)
    )


def classify(exc: BaseException) -> tuple[str, str]:
    """(kind, message) for an exception raised by the runner; kind maps to an HTTP status in the engine."""
    if isinstance(exc, GenerationCancelled):
        return "cancelled", "the request was cancelled"
    if isinstance(exc, InvalidRequest):
        return "invalid_request", str(exc)
    if "OutOfMemory" in type(exc).__name__:  # torch.OutOfMemoryError, or the runtime's own OutOfMemory
        return "out_of_memory", str(exc) or (
            "the accelerator ran out of memory for this request; retry with a smaller size, fewer frames "
            "or n=1, or start the server with a smaller --max-batch"
        )
    return "generation_failed", f"generation failed: {type(exc).__name__}: {exc}"


class _Cancels:
    """Cancel requests arrive on their own queue; the runner polls them between denoising steps and the
    encoder threads before each output. Shared by the main thread and the encoder threads (one lock).

    With a pipelined worker several batches are in the worker at once (one generating, one waiting in the
    request queue, some encoding), and a cancel may arrive before its batch does, so the set cannot be
    cleared after a batch. A ticket's id leaves it when the ticket's last message is sent (`answered`); a
    cancel that arrives after that (it raced the result) is recognised by the ids answered recently and
    never stored, so the set holds at most the tickets the worker has or is about to get."""

    RECENT = 4096  # answered ids remembered; far more than can be in flight (max_queue + a few batches)

    def __init__(self, cancel_q, parent: int):
        self._q = cancel_q
        self._parent = parent
        self._lock = threading.Lock()
        self.ids: set[str] = set()
        self._recent: collections.deque[str] = collections.deque()
        self._recent_set: set[str] = set()

    def drain(self) -> None:
        with self._lock:
            while True:
                try:
                    msg: Cancel = self._q.get_nowait()
                except queue.Empty:
                    return
                if msg.ticket_id not in self._recent_set:
                    self.ids.add(msg.ticket_id)

    def answered(self, ids) -> None:
        """These tickets' last messages are sent: their cancels, present or still to come, are moot."""
        with self._lock:
            for i in ids:
                self.ids.discard(i)
                if i in self._recent_set:
                    continue
                if len(self._recent) >= self.RECENT:
                    self._recent_set.discard(self._recent.popleft())
                self._recent.append(i)
                self._recent_set.add(i)

    def orphaned(self) -> bool:
        return os.getppid() != self._parent  # the API process died without stopping us

    def cancelled(self, ticket_id: str) -> bool:
        self.drain()
        return ticket_id in self.ids

    def all_cancelled(self, ids: list[str] | tuple[str, ...]) -> bool:
        self.drain()
        return self.orphaned() or all(i in self.ids for i in ids)


def _send(res_q, cancels: _Cancels, msg: Output | BatchFailed) -> None:
    """A ticket's last message (an Output, or a BatchFailed for its ids)."""
    res_q.put(msg)
    cancels.answered((msg.ticket_id,) if isinstance(msg, Output) else msg.ids)


def _encode_one(item: WorkItem, result, encode_image, encode_video) -> dict:
    """`result`: this item's own GenerationResult (its outputs, its seed, its share of the call)."""
    start = time.perf_counter()
    payload: dict[str, Any] = {
        "width": result.width,
        "height": result.height,
        "fps": result.fps,
        # The seed that reproduces the request alone: its own, also when its samples shared a forward with
        # other requests'; None for a share of a merged call of identical requests (one seed for all).
        "seed": result.seed,
        # The DiT forwards of the call it ran in (computed / reused by the step cache), and its share of them
        # (its outputs / the call's) for the Prometheus counter, so that a batched forward counts once.
        "dit_forwards": dict(result.dit_forwards),
        "forward_share": getattr(result, "forward_share", 1.0),
    }
    if item.kind == "video":
        fps = result.fps or item.request.fps or 16
        payload["videos"] = [encode_video(v, fps) for v in result.videos]
    else:
        payload["images"] = [encode_image(im, item.image_format) for im in result.images]
    payload["timings"] = {**result.timings, "encode_output": time.perf_counter() - start}
    return payload


class Encoder:
    """A bounded pool of encoder threads. `submit` hands over one generated batch and returns at once,
    unless `backlog` batches already wait for a thread: then it blocks until one is taken, which is what
    bounds the worker's memory (at most threads + backlog results held, plus the one being generated).

    Each request of a batch is encoded and answered on its own: a failed encode fails only its request.
    threads=0: no threads, `submit` encodes in the caller's thread (the unpipelined worker, for comparison)."""

    def __init__(
        self,
        res_q,
        cancels: _Cancels,
        threads: int = 2,
        backlog: int = 2,
        encode_image=None,
        encode_video=None,
    ):
        if encode_image is None or encode_video is None:
            from diffserve.runtime import outputs

            encode_image = encode_image or outputs.encode_image
            encode_video = encode_video or outputs.encode_video
        self._encode_image, self._encode_video = encode_image, encode_video
        self._res_q, self._cancels = res_q, cancels
        self._jobs: queue.Queue = queue.Queue(maxsize=backlog)
        # Daemon threads: an orphaned worker returns without waiting for them (see serve).
        self._threads = [
            threading.Thread(target=self._run, name=f"diffserve-encode-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def submit(self, items: list[WorkItem], results: list) -> None:
        """items[i]'s GenerationResult is results[i]."""
        if not self._threads:
            self._encode(items, results)
            return
        self._jobs.put((items, results))

    def close(self) -> None:
        """Encode and send everything submitted, then stop the threads."""
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._encode(*job)
            del job  # free the batch's images before waiting for the next

    def _encode(self, items: list[WorkItem], results: list) -> None:
        for item, result in zip(items, results, strict=True):
            try:
                if self._cancels.cancelled(item.ticket_id):  # nobody waits for it: spare the CPU
                    msg = BatchFailed((item.ticket_id,), "cancelled", "the request was cancelled")
                else:
                    payload = _encode_one(item, result, self._encode_image, self._encode_video)
                    msg = Output(item.ticket_id, payload)
            except Exception as exc:  # one bad output must not take the others (or the thread) down
                fmt = "mp4" if item.kind == "video" else item.image_format
                log.error("encoding %s as %s failed:\n%s", item.ticket_id, fmt, traceback.format_exc())
                message = f"encoding the output as {fmt} failed: {type(exc).__name__}: {exc}"
                msg = BatchFailed((item.ticket_id,), "generation_failed", message)
            _send(self._res_q, self._cancels, msg)


def run_batch(
    runner, items: list[WorkItem], cancels: _Cancels, res_q, encoder: Encoder | None = None
) -> None:
    """One runner call for the batch, then each item's result to the encoder (None: encoded here, before
    this returns). The engine only groups items that may share a call (tickets.merge_key): a lone item is
    runner.generate; several go to runner.generate_batch, which gives each its own result (its samples,
    its seed) or its own error; a runner without generate_batch gets identical requests as one request of
    their summed num_outputs, split back by count (and anything else one by one: api.run_grouped). Every
    item gets exactly one last message: an Output, or a BatchFailed naming it."""
    cancels.drain()
    live = [it for it in items if it.ticket_id not in cancels.ids]
    gone = tuple(it.ticket_id for it in items if it.ticket_id in cancels.ids)
    if gone:
        _send(res_q, cancels, BatchFailed(gone, "cancelled", "the request was cancelled"))
    if not live:
        return
    ids = tuple(it.ticket_id for it in live)
    last = [time.perf_counter()]

    def on_step(done: int, total: int) -> None:
        now = time.perf_counter()
        # The first interval also holds text encoding and latent setup: not a denoising step time.
        step = now - last[0] if done > 1 else None
        last[0] = now
        res_q.put(BatchProgress(ids, Progress(done, total), step))

    def should_cancel() -> bool:
        return cancels.all_cancelled(ids)

    requests = [it.request for it in live]
    res_q.put(BatchStarted(ids))
    try:
        if len(live) == 1:
            outcomes = [runner.generate(requests[0], on_step=on_step, should_cancel=should_cancel)]
        elif callable(getattr(type(runner), "generate_batch", None)):
            outcomes = runner.generate_batch(requests, on_step=on_step, should_cancel=should_cancel)
        else:
            defaults = getattr(runner, "defaults", {})
            outcomes = run_grouped(
                requests,
                lambda r: batch_key(r, runner.family, defaults, samples=False),
                lambda r: runner.generate(r, on_step=on_step, should_cancel=should_cancel),
            )
    except Exception as exc:  # the worker must outlive any one bad request
        outcomes = [exc] * len(live)
    done, results = [], []
    failed: dict[tuple[str, str], list[str]] = {}
    for it, outcome in zip(live, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            kind, message = classify(outcome)
            if kind == "generation_failed":
                log.error(
                    "generation failed:\n%s",
                    "".join(traceback.format_exception(type(outcome), outcome, outcome.__traceback__)),
                )
            failed.setdefault((kind, message), []).append(it.ticket_id)
        else:
            done.append(it)
            results.append(outcome)
    for (kind, message), failed_ids in failed.items():  # one message per error, as for a whole batch
        _send(res_q, cancels, BatchFailed(tuple(failed_ids), kind, message))
    if not done:
        return
    if encoder is None:
        encoder = Encoder(res_q, cancels, threads=0)
    encoder.submit(done, results)  # waits only while the encoder's backlog is full


def serve(runner, req_q, cancels: _Cancels, res_q, encoder: Encoder) -> bool:
    """Run batches until Stop (True) or until the API process is gone (False)."""
    while True:
        try:
            msg: Batch | Stop | None = req_q.get(timeout=1.0)
        except queue.Empty:
            msg = None
        if isinstance(msg, Stop):
            encoder.close()  # the batches in hand are answered before the worker exits
            return True
        if isinstance(msg, Batch):
            run_batch(runner, list(msg.items), cancels, res_q, encoder)
        if cancels.orphaned():
            return False


def warmup(runner, cfg: WorkerConfig) -> None:
    """The runner's warmup, with the batch sizes up to cfg.warmup_batch where its warmup takes them (a
    custom or older runner's warmup(resolutions) is still called as before)."""
    params = inspect.signature(runner.warmup).parameters
    takes_batch = "max_batch" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    if takes_batch:
        runner.warmup(cfg.warmup_resolutions, max_batch=cfg.warmup_batch or 1)
    else:
        if (cfg.warmup_batch or 1) > 1:
            log.info("this runner's warmup takes no max_batch: batch shapes above 1 are not warmed up")
        runner.warmup(cfg.warmup_resolutions)
    warm_encoders(getattr(runner, "task", "image"))


def warm_encoders(task: str) -> None:
    """Encode a tiny picture in every image format (and, for video models, a tiny MP4) once: the first
    encode in a process loads Pillow's plugins (and PyAV, libx264), which the first request would otherwise
    wait for (issue 23: the first n=2 request must be no slower than the second). A failure here is
    logged, not fatal: the request that needs the codec will report it."""
    from PIL import Image

    from diffserve.runtime.outputs import IMAGE_FORMATS, encode_image, encode_video

    tiny = Image.new("RGB", (16, 16))
    try:
        for fmt in dict.fromkeys(IMAGE_FORMATS.values()):
            encode_image(tiny, fmt.lower())
        if task == "video":
            encode_video([tiny, tiny])
    except Exception as exc:  # noqa: BLE001 - a missing codec fails its own requests, with its message
        log.warning("warming the output encoders failed: %s", exc)


def worker_main(cfg: WorkerConfig, req_q, cancel_q, res_q) -> None:
    # Ctrl+C, and SIGTERM from a supervisor that signals the whole group or cgroup (systemd, `timeout`),
    # reach this process too: the API process decides when the worker stops, after draining.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parent = os.getppid()
    try:
        factory = resolve_factory(cfg.runner_factory)
        runner = factory(cfg.runtime)  # every runtime setting travels in this one object
        res_q.put(Loaded(runner_meta(runner)))
        start = time.perf_counter()
        warmup(runner, cfg)
        res_q.put(Ready(time.perf_counter() - start))
    except Exception as exc:
        from diffserve.runtime.loader import ModelLoadError

        # A ModelLoadError is a one-line message for the user; anything else deserves its traceback.
        log.error(
            "worker failed to start: %s", exc if isinstance(exc, ModelLoadError) else traceback.format_exc()
        )
        res_q.put(Fatal(f"{type(exc).__name__}: {exc}"))
        res_q.close()
        res_q.join_thread()
        raise SystemExit(1) from None
    cancels = _Cancels(cancel_q, parent)
    encoder = Encoder(res_q, cancels, cfg.encode_threads, cfg.encode_backlog)
    if not serve(runner, req_q, cancels, res_q, encoder):
        # Orphaned: nobody will read what is left; this process holds the pipe's read end itself, so a full
        # pipe would block the exit forever (the encoder threads are daemons: they do not hold it either).
        res_q.cancel_join_thread()
        return
    res_q.close()
    res_q.join_thread()
