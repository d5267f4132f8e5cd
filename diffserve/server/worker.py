"""The worker process: loads the runtime, warms it up, then runs the batches the engine sends it.

It is started with multiprocessing's "spawn" method, so torch and CUDA are initialised only here, never in
the API process (this module imports no torch at the top either: the engine imports it to name the target).

Messages, as plain tuples (picklable, no torch objects cross the pipe):
  engine -> worker (requests):  ("batch", [WorkItem, ...])   or None to stop
  engine -> worker (cancels):   ticket id (str)
  worker -> engine (results):   ("loaded", meta) ("ready", seconds) ("fatal", message)
                                ("started", ids) ("progress", ids, done, total, step_seconds | None)
                                ("result", id, payload) ("error", ids, kind, message)
"""

from __future__ import annotations

import importlib
import logging
import os
import queue
import signal
import time
import traceback
from dataclasses import dataclass, replace
from typing import Any

from diffserve.runtime.api import GenerationCancelled, GenerationRequest, InvalidRequest
from diffserve.server.config import WorkerConfig

log = logging.getLogger("diffserve.worker")


@dataclass
class WorkItem:
    ticket_id: str
    request: GenerationRequest
    kind: str  # "image" | "video"
    image_format: str = "png"  # images only


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
        "rules": {k: getattr(rules, k, None) for k in ("multiple", "max_side", "frame_step", "max_frames")},
    }


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
    """Cancel requests arrive on their own queue; the runner polls them between denoising steps."""

    def __init__(self, cancel_q, parent: int):
        self._q = cancel_q
        self._parent = parent
        self.ids: set[str] = set()

    def drain(self) -> None:
        while True:
            try:
                self.ids.add(self._q.get_nowait())
            except queue.Empty:
                return

    def orphaned(self) -> bool:
        return os.getppid() != self._parent  # the API process died without stopping us

    def all_cancelled(self, ids: list[str]) -> bool:
        self.drain()
        return self.orphaned() or all(i in self.ids for i in ids)


def _encode(items: list[WorkItem], counts: list[int], result) -> list[dict[str, Any]]:
    from diffserve.runtime.outputs import encode_image, encode_video

    payloads, offset = [], 0
    for item, n in zip(items, counts, strict=True):
        base = {
            "width": result.width,
            "height": result.height,
            "fps": result.fps,
            "timings": dict(result.timings),
            # The seed reproduces a request that ran alone; a share of a merged call has none of its own.
            "seed": result.seed if len(items) == 1 else None,
        }
        if item.kind == "video":
            fps = result.fps or item.request.fps or 16
            base["videos"] = [encode_video(v, fps) for v in result.videos[offset : offset + n]]
        else:
            base["images"] = [
                encode_image(im, item.image_format) for im in result.images[offset : offset + n]
            ]
        payloads.append(base)
        offset += n
    return payloads


def run_batch(runner, items: list[WorkItem], cancels: _Cancels, res_q) -> None:
    """One runner call for the batch. The engine only groups items that may share a call (identical
    unseeded image requests), so their outputs are simply concatenated and split back by count."""
    try:
        _run_batch(runner, items, cancels, res_q)
    finally:
        # The engine sends the next batch only once this one's outcome has reached it, so every cancel seen
        # so far is for this batch or an earlier one (a cancel can race its request's result): none is of
        # use any more, and keeping them would grow the set for as long as the worker lives.
        cancels.ids.clear()


def _run_batch(runner, items: list[WorkItem], cancels: _Cancels, res_q) -> None:
    cancels.drain()
    live = [it for it in items if it.ticket_id not in cancels.ids]
    gone = [it.ticket_id for it in items if it.ticket_id in cancels.ids]
    if gone:
        res_q.put(("error", gone, "cancelled", "the request was cancelled"))
    if not live:
        return
    ids = [it.ticket_id for it in live]
    counts = [it.request.num_outputs for it in live]
    request = live[0].request if len(live) == 1 else replace(live[0].request, num_outputs=sum(counts))
    last = [time.perf_counter()]

    def on_step(done: int, total: int) -> None:
        now = time.perf_counter()
        # The first interval also holds text encoding and latent setup: not a denoising step time.
        step = now - last[0] if done > 1 else None
        last[0] = now
        res_q.put(("progress", ids, done, total, step))

    res_q.put(("started", ids))
    try:
        result = runner.generate(request, on_step=on_step, should_cancel=lambda: cancels.all_cancelled(ids))
        payloads = _encode(live, counts, result)
    except Exception as exc:  # the worker must outlive any one bad request
        kind, message = classify(exc)
        if kind == "generation_failed":
            log.error("generation failed:\n%s", traceback.format_exc())
        res_q.put(("error", ids, kind, message))
        return
    for item, payload in zip(live, payloads, strict=True):
        res_q.put(("result", item.ticket_id, payload))


def worker_main(cfg: WorkerConfig, req_q, cancel_q, res_q) -> None:
    # Ctrl+C, and SIGTERM from a supervisor that signals the whole group or cgroup (systemd, `timeout`),
    # reach this process too: the API process decides when the worker stops, after draining.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parent = os.getppid()
    try:
        factory = resolve_factory(cfg.runner_factory)
        # Parallel arguments only when asked for, so that one-GPU custom factories keep their signature.
        parallel = {}
        if cfg.ulysses_degree > 1 or cfg.cfg_parallel:
            parallel = {"ulysses_degree": cfg.ulysses_degree, "cfg_parallel": cfg.cfg_parallel}
        runner = factory(
            model=cfg.model,
            device=cfg.device,
            dtype=cfg.dtype,
            attention_backend=cfg.attention_backend,
            **parallel,
        )
        res_q.put(("loaded", runner_meta(runner)))
        start = time.perf_counter()
        runner.warmup(cfg.warmup_resolutions)
        res_q.put(("ready", time.perf_counter() - start))
    except Exception as exc:
        from diffserve.runtime.loader import ModelLoadError

        # A ModelLoadError is a one-line message for the user; anything else deserves its traceback.
        log.error(
            "worker failed to start: %s", exc if isinstance(exc, ModelLoadError) else traceback.format_exc()
        )
        res_q.put(("fatal", f"{type(exc).__name__}: {exc}"))
        res_q.close()
        res_q.join_thread()
        raise SystemExit(1) from None
    cancels = _Cancels(cancel_q, parent)
    while True:
        try:
            msg = req_q.get(timeout=1.0)
        except queue.Empty:
            msg = False
        if msg is None:
            break
        if msg:
            run_batch(runner, msg[1], cancels, res_q)
        if cancels.orphaned():
            # Nobody will read what is left; this process holds the pipe's read end itself, so a full pipe
            # would block the exit forever.
            res_q.cancel_join_thread()
            return
    res_q.close()
    res_q.join_thread()
