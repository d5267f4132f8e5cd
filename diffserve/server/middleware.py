"""Pure ASGI middleware (no BaseHTTPMiddleware: it would break streaming and disconnect detection):
request latency per route, the optional API key, and a bound on request bodies."""

from __future__ import annotations

import hmac
import json
import time

from diffserve.server.errors import APIError, error_body
from diffserve.server.metrics import Metrics

# Paths that never need the key: probes and metrics (for load balancers and Prometheus), image URLs (their
# random names are the credential, as with OpenAI's), and the API's documentation (the Swagger UI page, its
# static files and the OpenAPI schema: they describe the API, they serve nothing), and the playground page
# and its files (it must load before the user can type the key; its API calls then carry it).
_OPEN_PATHS = frozenset({"/", "/docs", "/openapi.json"})
_OPEN_PREFIXES = (
    "/health",
    "/liveness",
    "/metrics",
    "/v1/files/images/",
    "/docs/static/",
    "/ui/static/",
)


def is_public(path: str) -> bool:
    """Whether `path` is answered without the API key."""
    return path in _OPEN_PATHS or path.startswith(_OPEN_PREFIXES)


async def _send_error(send, status: int, message: str, code: str, headers: list | None = None) -> None:
    body = json.dumps(error_body(status, message, code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class LatencyMiddleware:
    """Observes each request's time until its last byte, labelled by the route's template (/v1/videos/{video_id},
    never the concrete path, which would give one series per id)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.http_latency.labels(method=scope["method"], route=route).observe(
                time.perf_counter() - start
            )


class ApiKeyMiddleware:
    def __init__(self, app, api_key: str, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or is_public(scope["path"]):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        # Constant time: the comparison must not reveal how many leading bytes of a guess were right.
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        self.metrics.errors.labels(kind="invalid_api_key").inc()
        await _send_error(
            send,
            401,
            "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
            "invalid_api_key",
            [(b"www-authenticate", b"Bearer")],
        )


class BodyLimitMiddleware:
    """Refuses bodies above `limit` bytes: by Content-Length before reading, or while reading a chunked one."""

    def __init__(self, app, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_large = f"The request body is larger than {self.limit} bytes."
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            self.metrics.errors.labels(kind="request_too_large").inc()
            return await _send_error(send, 413, too_large, "request_too_large")
        seen = 0

        async def bounded_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise APIError(413, too_large, "request_too_large")
            return message

        await self.app(scope, bounded_receive, send)
