"""What the image and video routes share: the served model's checks, admission, and engine errors as HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request

from diffserve.server.engine import Engine
from diffserve.server.errors import APIError
from diffserve.server.messages import WorkItem
from diffserve.server.tickets import EngineError, Ticket

# EngineError.kind -> HTTP status
_STATUS = {
    "queue_full": 429,
    "shutting_down": 503,
    "worker_crashed": 503,
    "timeout": 504,
    "cancelled": 499,  # the client went away (nginx's convention); nobody reads this answer
    "invalid_request": 400,
    "out_of_memory": 500,
    "generation_failed": 500,
}


def as_api_error(err: EngineError, engine: Engine) -> APIError:
    headers = (
        {"Retry-After": str(engine.retry_after())} if err.kind in ("queue_full", "worker_crashed") else None
    )
    return APIError(_STATUS.get(err.kind, 500), err.message, err.kind, headers=headers)


def served_model(request: Request, name: str | None, task: str) -> dict[str, Any]:
    """The loaded model's description, if `name` names it (None means the served model) and it does `task`."""
    engine: Engine = request.app.state.engine
    meta = engine.meta
    if meta is None:
        raise APIError(
            503, "The model is still loading; retry shortly.", "model_loading", headers={"Retry-After": "5"}
        )
    names = {meta["model_id"], *request.app.state.cfg.served_model_names}
    if name is not None and name not in names:
        raise APIError(
            404,
            f"The model '{name[:200]}' does not exist; this server serves '{meta['model_id']}'.",
            "model_not_found",
            "model",
        )
    if meta["task"] != task:
        other = "/v1/videos" if meta["task"] == "video" else "/v1/images/generations"
        raise APIError(
            400,
            f"The model '{meta['model_id']}' generates {meta['task']}s, not {task}s; use {other}.",
            "unsupported_task",
            "model",
        )
    return meta


def submit(request: Request, item: WorkItem) -> Ticket:
    engine: Engine = request.app.state.engine
    try:
        return engine.submit(item)
    except EngineError as err:
        raise as_api_error(err, engine) from None


async def result_or_cancel(request: Request, ticket: Ticket) -> dict[str, Any]:
    """Wait for the ticket's outputs; if the client disconnects first, cancel the request (the worker
    stops at its next denoising step)."""
    engine: Engine = request.app.state.engine
    while not ticket.done:
        await asyncio.wait({ticket.future}, timeout=0.5)
        if not ticket.done and await request.is_disconnected():
            engine.cancel(ticket.id, message="the client disconnected")
    try:
        return await ticket.wait()
    except EngineError as err:
        raise as_api_error(err, engine) from None
