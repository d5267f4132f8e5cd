"""Reading request bodies: JSON or multipart form into a dict, and uploaded images checked before they go
anywhere near the worker (size in bytes, a real PNG/JPEG/WebP that decodes, bounded dimensions)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import re
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from diffserve.server.config import ServerConfig
from diffserve.server.errors import APIError

_BRACKET_KEY = re.compile(r"^([A-Za-z_]+)\[([A-Za-z_]*)\]$")
_DATA_URL = re.compile(r"^data:image/(png|jpeg|jpg|webp);base64,(.*)$", re.DOTALL)
_FORMATS = {"PNG", "JPEG", "WEBP"}


def is_form(request: Request) -> bool:
    ctype = request.headers.get("content-type", "")
    return ctype.startswith("multipart/form-data") or ctype.startswith("application/x-www-form-urlencoded")


async def read_json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        raise APIError(400, "The request body is empty; expected a JSON object.", "invalid_json")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "The request body is not valid JSON.", "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", "invalid_json")
    return body


async def read_form(
    request: Request, cfg: ServerConfig
) -> tuple[dict[str, Any], dict[str, list[UploadFile]]]:
    """Fields (with OpenAI's 'key[sub]' notation folded into nested dicts and 'key[]' into lists) and files."""
    form = await request.form(
        max_files=4, max_fields=64, max_part_size=4 * cfg.limits.max_prompt_chars + 4096
    )
    fields: dict[str, Any] = {}
    files: dict[str, list[UploadFile]] = {}
    for key, value in form.multi_items():
        m = _BRACKET_KEY.match(key)
        name, sub = (m.group(1), m.group(2)) if m else (key, None)
        if isinstance(value, UploadFile):
            files.setdefault(name, []).append(value)
        elif sub:
            fields.setdefault(name, {})
            if isinstance(fields[name], dict):
                fields[name][sub] = value
        elif sub == "":
            fields.setdefault(name, []).append(value)
        else:
            fields[name] = value
    return fields, files


def refuse_other_files(files: dict[str, list[UploadFile]]) -> None:
    """A 400 naming the first file field the route did not take (what is left after it popped its own)."""
    if files:
        name = next(iter(files))
        raise APIError(400, f"Unexpected file field '{name}'.", "invalid_request", name)


async def read_body(
    request: Request, cfg: ServerConfig
) -> tuple[dict[str, Any], dict[str, list[UploadFile]]]:
    if is_form(request):
        return await read_form(request, cfg)
    return await read_json(request), {}


def _check_image(data: bytes, cfg: ServerConfig, param: str) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in _FORMATS:
                raise APIError(
                    400,
                    f"'{param}' must be a PNG, JPEG or WebP image (got {im.format}).",
                    "invalid_image",
                    param,
                )
            w, h = im.size
            # Bounds come before decoding: a small file may claim a huge canvas (a decompression bomb).
            if max(w, h) > cfg.max_input_side:
                raise APIError(
                    400,
                    f"'{param}' is {w}x{h}; at most {cfg.max_input_side} pixels a side.",
                    "image_too_large",
                    param,
                )
            im.load()  # a truncated or corrupt file fails here, not later in the worker
    except APIError:
        raise
    except Image.DecompressionBombError:  # Pillow refuses the canvas before our own bound can see its size
        raise APIError(
            400,
            f"'{param}' is too large; at most {cfg.max_input_side} pixels a side.",
            "image_too_large",
            param,
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise APIError(400, f"'{param}' is not a readable image.", "invalid_image", param) from None
    return w, h


async def read_image(
    upload: UploadFile | bytes, cfg: ServerConfig, param: str
) -> tuple[bytes, tuple[int, int]]:
    """The bytes of an uploaded image, and its (width, height), or a 400/413 naming the parameter."""
    if isinstance(upload, bytes):
        data = upload
    else:
        data = await upload.read(cfg.max_upload_bytes + 1)
    if len(data) > cfg.max_upload_bytes:
        raise APIError(
            413, f"'{param}' is larger than {cfg.max_upload_bytes} bytes.", "file_too_large", param
        )
    if not data:
        raise APIError(400, f"'{param}' is empty.", "invalid_image", param)
    size = await asyncio.get_running_loop().run_in_executor(None, _check_image, data, cfg, param)
    return data, size


def decode_data_url(url: str, cfg: ServerConfig, param: str) -> bytes:
    """Only inline data URLs: fetching remote URLs from inside the server would open it to SSRF."""
    m = _DATA_URL.match(url)
    if not m:
        raise APIError(
            400,
            f"'{param}' must be a base64 data URL (data:image/png;base64,...); remote URLs are not fetched.",
            "invalid_image",
            param,
        )
    if len(m.group(2)) > cfg.max_upload_bytes * 4 // 3 + 4:
        raise APIError(
            413, f"'{param}' is larger than {cfg.max_upload_bytes} bytes.", "file_too_large", param
        )
    try:
        return base64.b64decode(m.group(2), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"'{param}' is not valid base64.", "invalid_image", param) from None
