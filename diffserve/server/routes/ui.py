"""The playground: GET / serves one static page (diffserve/server/ui/, committed, no build step, no CDN: deployments
are often offline) that drives the public API from the browser, as any client would.

/ and /ui/static/* answer without the API key (see middleware.is_public): the page holds no data, and it needs
to load before the user can type the key. Everything the page then asks for goes through the keyed API, and
so does GET /ui/model: the served model's limits and defaults, which the page uses to bound its size, steps
and frame fields, and which no OpenAI route reports.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from diffserve.runtime.limits import MAX_GUIDANCE
from diffserve.server.errors import APIError
from diffserve.server.schemas import EXTENSIONS, model_limits

STATIC = "/ui/static"
_FILES = Path(__file__).resolve().parent.parent / "ui"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def playground() -> FileResponse:
    # no-cache: a server upgraded in place must not leave browsers on an old page that calls old fields
    return FileResponse(_FILES / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/ui/model")
async def model(request: Request) -> dict:
    meta = request.app.state.engine.meta
    if meta is None:
        raise APIError(
            503, "The model is still loading; retry shortly.", "model_loading", headers={"Retry-After": "5"}
        )
    cfg = request.app.state.cfg
    lim = model_limits(meta, cfg)
    return {
        "model_id": meta["model_id"],
        "names": [meta["model_id"], *cfg.served_model_names],
        "family": meta["family"],
        "task": meta["task"],
        "accepts_image": meta["accepts_image"],
        "accepts_mask": bool(meta.get("accepts_mask")),
        "defaults": meta.get("defaults") or {},
        "limits": {
            "multiple": lim.multiple,
            "max_side": lim.max_side,
            "max_steps": lim.policy.max_steps,
            "max_n": lim.policy.max_n,
            "max_prompt_chars": lim.policy.max_prompt_chars,
            "frame_step": lim.frame_step,
            "max_frames": lim.max_frames,
            "max_fps": lim.policy.max_fps,
            "max_guidance": MAX_GUIDANCE,
        },
        # The request's extension fields (schemas.EXTENSIONS): the page offers each one it finds here, so a
        # new extension appears in it without a change to the page.
        "extensions": list(EXTENSIONS),
    }


def install_ui(app: FastAPI) -> None:
    app.mount(STATIC, StaticFiles(directory=_FILES), name="ui-static")
    app.include_router(router)
