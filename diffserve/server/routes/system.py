"""Probes, model list, metrics, and the image files behind response_format=url."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from diffserve.server.engine import Engine
from diffserve.server.errors import APIError, error_body
from diffserve.server.files import IMAGE_MEDIA_TYPES

router = APIRouter()

_UNHEALTHY = {
    "loading": "The worker is loading the model.",
    "warming_up": "The worker is warming up.",
    "worker_dead": "The worker process is not running; it is being restarted.",
    "draining": "The server is shutting down.",
}


@router.get("/health")
async def health(request: Request):
    """Readiness: 200 only when the worker is warm and alive (load balancers route on this)."""
    engine: Engine = request.app.state.engine
    ok, status = engine.health()
    if ok:
        return {
            "status": "ok",
            "model": engine.meta["model_id"],
            "worker_pid": engine.worker_pid,
            "world_size": engine.meta.get("world_size", 1),
            "queue_depth": engine.queue_depth,
        }
    message = _UNHEALTHY[status] + (f" Last error: {engine.last_error}" if engine.last_error else "")
    body = error_body(503, message, status)
    body["status"] = status
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@router.get("/liveness")
async def liveness():
    """200 while this process can answer, warm or not (Kubernetes restarts the pod when it fails)."""
    return {"status": "alive"}


@router.get("/metrics")
async def metrics(request: Request):
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(request: Request):
    meta = request.app.state.engine.meta
    if meta is None:
        return {"object": "list", "data": []}
    names = [meta["model_id"], *request.app.state.cfg.served_model_names]
    return {
        "object": "list",
        "data": [
            {
                "id": name,
                "object": "model",
                "created": request.app.state.started,
                "owned_by": "diffserve",
                "family": meta["family"],
                "task": meta["task"],
                "accepts_image": meta["accepts_image"],
            }
            for name in names
        ]
        + [
            # LoRA adapters as vLLM lists its LoRA modules: an id a request names (extension `lora`), the
            # base model as parent, the file as root
            {
                "id": lora["name"],
                "object": "model",
                "created": request.app.state.started,
                "owned_by": "diffserve",
                "parent": meta["model_id"],
                "root": lora["path"],
                "family": meta["family"],
                "task": meta["task"],
                "accepts_image": meta["accepts_image"],
            }
            for lora in meta.get("loras", [])
        ],
    }


@router.get("/v1/files/images/{name}")
async def image_file(request: Request, name: str):
    """Unauthenticated on purpose, like OpenAI's image URLs: the 128-bit random name is the capability."""
    path = request.app.state.files.image_path(name)
    if path is None:
        raise APIError(404, "No such image (image URLs expire).", "image_not_found")
    return FileResponse(path, media_type=IMAGE_MEDIA_TYPES[path.suffix[1:]])
