"""The videos API, as asynchronous jobs in the shape of OpenAI's video object:
POST /v1/videos, GET /v1/videos, GET /v1/videos/{id}, GET /v1/videos/{id}/content, DELETE /v1/videos/{id}.

DELETE cancels a queued or running job (it stays listed, status "cancelled", and the answer says
deleted: false); on a finished job it deletes the record and its file (deleted: true).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse

from diffserve.runtime.api import GenerationRequest
from diffserve.server.errors import APIError
from diffserve.server.files import VIDEO_ID, OutputFiles
from diffserve.server.inputs import decode_data_url, read_body, read_image, refuse_other_files
from diffserve.server.jobs import IN_FLIGHT, VideoJobs, video_object
from diffserve.server.messages import WorkItem
from diffserve.server.routes.common import as_api_error, served_model
from diffserve.server.schemas import (
    VideoCreateRequest,
    check_generation,
    model_limits,
    parse_size,
    video_frames,
)
from diffserve.server.tickets import EngineError, new_ticket_id

if TYPE_CHECKING:  # psycopg is an optional extra: imported only with --job-store postgresql://
    from diffserve.server.jobs_shared import SharedVideoJobs

router = APIRouter()

POLL_AFTER_MS = "250"  # the openai client's poll helpers read this header


@router.post("/v1/videos")
async def create_video(request: Request):
    cfg = request.app.state.cfg
    fields, files = await read_body(request, cfg)
    refs = files.pop("input_reference", [])
    refuse_other_files(files)
    body = VideoCreateRequest.model_validate(fields)
    meta = served_model(request, body.model, "video")
    defaults = meta["defaults"]
    lim = model_limits(meta, cfg)
    size = parse_size(body.size, lim)
    width, height = size or (defaults.get("width"), defaults.get("height"))
    generation = GenerationRequest(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        width=size[0] if size else None,
        height=size[1] if size else None,
        num_frames=body.num_frames,
        num_inference_steps=body.num_inference_steps,
        guidance_scale=body.guidance_scale,
        seed=body.seed,
        fps=body.fps,
        extra=body.extra(),
    )
    check_generation(generation, lim, "video")  # the checks `diffserve generate` runs too
    fps = body.fps or defaults.get("fps") or 16
    frames, seconds = video_frames(body, fps, defaults.get("num_frames"), lim)

    image = None
    if refs or body.input_reference:
        if not meta["accepts_image"]:
            raise APIError(
                400,
                f"The model '{meta['model_id']}' does not take an input image.",
                "unsupported_task",
                "input_reference",
            )
        if len(refs) > 1:
            raise APIError(400, "Give at most one 'input_reference'.", "invalid_request", "input_reference")
        if refs:
            image = (await read_image(refs[0], cfg, "input_reference"))[0]
        else:
            url = body.input_reference.get("image_url")
            if not url:
                raise APIError(
                    400,
                    "'input_reference' must carry an 'image_url' data URL (file ids are not supported).",
                    "invalid_value",
                    "input_reference",
                )
            image = (await read_image(decode_data_url(url, cfg, "input_reference"), cfg, "input_reference"))[
                0
            ]

    job_id = new_ticket_id("video")
    generation = dataclasses.replace(generation, num_frames=frames, image=image, fps=fps)
    jobs: VideoJobs | SharedVideoJobs = request.app.state.jobs
    try:
        # this server's engine (SQLite store), or the queue every replica pulls from (PostgreSQL store)
        row = await jobs.submit(
            WorkItem(job_id, generation, "video"),
            model=meta["model_id"],
            prompt=body.prompt,
            seconds=seconds,
            size=f"{width}x{height}",
        )
    except EngineError as err:
        raise as_api_error(err, request.app.state.engine) from None
    return video_object(row)


@router.get("/v1/videos")
async def list_videos(
    request: Request,
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
    order: Literal["asc", "desc"] = "desc",
):
    rows, more = await request.app.state.jobs.list(after=after, limit=limit, order=order)
    data = [video_object(r) for r in rows]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }


async def _job(request: Request, video_id: str) -> dict:
    row = await request.app.state.jobs.get(video_id) if VIDEO_ID.fullmatch(video_id) else None
    if row is None:
        raise APIError(404, f"No video with id '{video_id[:80]}'.", "video_not_found", "video_id")
    return row


@router.get("/v1/videos/{video_id}")
async def retrieve_video(request: Request, response: Response, video_id: str):
    row = await _job(request, video_id)
    if row["status"] in IN_FLIGHT:
        response.headers["openai-poll-after-ms"] = POLL_AFTER_MS
    return video_object(row)


@router.get("/v1/videos/{video_id}/content")
async def video_content(request: Request, video_id: str, variant: Literal["video"] = "video"):
    row = await _job(request, video_id)
    if row["status"] != "completed":
        raise APIError(
            409, f"The video is not ready (status: {row['status']}).", "video_not_ready", "video_id"
        )
    files: OutputFiles = request.app.state.files
    path = files.video_path(video_id)
    if not path.is_file():
        raise APIError(404, "The video's file is missing from the output directory.", "video_file_missing")
    return FileResponse(path, media_type="video/mp4", filename=f"{video_id}.mp4")


@router.delete("/v1/videos/{video_id}")
async def delete_video(request: Request, video_id: str):
    row = await _job(request, video_id)
    jobs: VideoJobs | SharedVideoJobs = request.app.state.jobs
    if row["status"] in IN_FLIGHT:
        # with a shared store the job may run on another replica: it sees the cancel at its next renewal
        status = await jobs.cancel(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": False, "status": status}
    await jobs.delete(video_id)
    return {"id": video_id, "object": "video.deleted", "deleted": True}
