"""POST /v1/images/generations and /v1/images/edits, in OpenAI's images API shape.

With stream=true the answer is server-sent events: `<prefix>.progress` after each denoising step (our
extension; OpenAI's partial images have no diffusion equivalent worth the bandwidth), then one
`<prefix>.completed` per image, as OpenAI's ImageGenCompletedEvent, or an `error` event.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from diffserve.runtime.api import GenerationRequest
from diffserve.server.engine import Engine
from diffserve.server.errors import APIError, error_body
from diffserve.server.files import OutputFiles
from diffserve.server.inputs import read_form, read_image, read_json, refuse_other_files
from diffserve.server.messages import Completed, Errored, Idle, Progress, WorkItem
from diffserve.server.routes.common import as_api_error, result_or_cancel, served_model, submit
from diffserve.server.schemas import (
    ImageEditRequest,
    ImageGenerationRequest,
    check_generation,
    model_limits,
    parse_size,
)
from diffserve.server.tickets import Ticket, new_ticket_id

router = APIRouter()


def _generation(body, size: tuple[int, int] | None, **extra: Any) -> GenerationRequest:
    w, h = size or (None, None)
    return GenerationRequest(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        width=w,
        height=h,
        num_inference_steps=body.num_inference_steps,
        guidance_scale=body.guidance_scale,
        seed=body.seed,
        num_outputs=body.n,
        extra=body.extra(),
        **extra,
    )


@router.post("/v1/images/generations")
async def generations(request: Request):
    cfg = request.app.state.cfg
    body = ImageGenerationRequest.model_validate(await read_json(request))
    meta = served_model(request, body.model, "image")
    lim = model_limits(meta, cfg)
    generation = _generation(body, parse_size(body.size, lim))
    check_generation(generation, lim, "image")
    return await _run(request, body, generation, "image_generation")


@router.post("/v1/images/edits")
async def edits(request: Request):
    cfg = request.app.state.cfg
    fields, files = await read_form(request, cfg)
    images, masks = files.pop("image", []), files.pop("mask", [])
    refuse_other_files(files)
    body = ImageEditRequest.model_validate(fields)
    meta = served_model(request, body.model, "image")
    lim = model_limits(meta, cfg)
    # No size: the runtime keeps the input's (to its multiple), as OpenAI's edits do.
    size = parse_size(body.size, lim)
    check_generation(
        _generation(body, size, strength=body.strength), lim, "image"
    )  # before any upload is read
    if not meta["accepts_image"]:
        raise APIError(
            400,
            f"The model '{meta['model_id']}' does not take an input image, so it cannot edit images.",
            "unsupported_task",
            "image",
        )
    if len(images) != 1:
        raise APIError(400, "Give exactly one 'image' file to edit.", "invalid_request", "image")
    if len(masks) > 1:
        raise APIError(400, "Give at most one 'mask' file.", "invalid_request", "mask")
    if masks and not meta.get("accepts_mask"):
        # Refused rather than ignored: an edit that silently repaints the whole image is a wrong answer.
        raise APIError(
            400,
            f"The model '{meta['model_id']}' edits whole images and takes no mask.",
            "unsupported_mask",
            "mask",
        )
    image = (await read_image(images[0], cfg, "image"))[0]
    mask = (await read_image(masks[0], cfg, "mask"))[0] if masks else None
    generation = _generation(body, size, image=image, mask=mask, strength=body.strength)
    return await _run(request, body, generation, "image_edit")


async def _run(request: Request, body, generation: GenerationRequest, event_prefix: str):
    item = WorkItem(new_ticket_id("img"), generation, "image", body.output_format)
    ticket = submit(request, item)
    if body.stream:
        state = request.app.state
        return StreamingResponse(
            _events(state.engine, ticket, body.output_format, event_prefix, state.cfg.sse_keepalive),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    payload = await result_or_cancel(request, ticket)
    files: OutputFiles = request.app.state.files
    if body.response_format == "url":
        base = str(request.base_url).rstrip("/")
        data = [
            {"url": f"{base}/v1/files/images/{files.save_image(b, body.output_format)}"}
            for b in payload["images"]
        ]
    else:
        data = [{"b64_json": base64.b64encode(b).decode()} for b in payload["images"]]
    return {
        "created": int(time.time()),
        "data": data,
        "output_format": body.output_format,
        "size": f"{payload['width']}x{payload['height']}",
        "seed": payload.get("seed"),  # extension: the seed used, drawn at random when none was given
        # extension: DiT forwards computed and reused by the step cache ({} where the runtime counts none)
        "dit_forwards": payload.get("dit_forwards", {}),
    }


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _events(engine: Engine, ticket: Ticket, fmt: str, prefix: str, keepalive: float):
    try:
        async for event in ticket.stream(idle=keepalive):
            now = int(time.time())
            if isinstance(event, Idle):
                yield b": keep-alive\n\n"  # an SSE comment: clients skip it, proxies see traffic
            elif isinstance(event, Progress):
                yield _sse(
                    f"{prefix}.progress",
                    {
                        "type": f"{prefix}.progress",
                        "created_at": now,
                        "step": event.done,
                        "total_steps": event.total,
                        "progress": event.percent(),
                    },
                )
            elif isinstance(event, Completed):
                payload = event.payload
                for i, data in enumerate(payload["images"]):
                    yield _sse(
                        f"{prefix}.completed",
                        {
                            "type": f"{prefix}.completed",
                            "created_at": now,
                            "image_index": i,
                            "b64_json": base64.b64encode(data).decode(),
                            "output_format": fmt,
                            "size": f"{payload['width']}x{payload['height']}",
                            "background": "auto",
                            "quality": "auto",
                        },
                    )
            elif isinstance(event, Errored):
                err = as_api_error(event.error, engine)
                yield _sse("error", {"type": "error", **error_body(err.status, err.message, err.code)})
    finally:
        # Reached early only when the client went away (Starlette cancels the response): stop the work.
        if not ticket.done:
            engine.cancel(ticket.id, message="the client disconnected")
