"""GET /docs: Swagger UI over /openapi.json, its JavaScript and CSS served by this app under /docs/static
from the files of the `fastapi-offline` package (Swagger UI 5, which renders FastAPI's OpenAPI 3.1), never
from a CDN: deployments are often offline, and FastAPI's own /docs page is blank there.

/docs, /docs/static/* and /openapi.json answer without the API key (see middleware.is_public): they
describe the API and serve nothing. Under --api-key the schema names the bearer key on the routes that
need it, so that Swagger UI's "Authorize" button can send it.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from diffserve.server.middleware import is_public

STATIC = "/docs/static"
# The package's folder of files (swagger-ui-bundle.js, swagger-ui.css, favicon.png, redoc.standalone.js).
_PACKAGE_FILES = ("fastapi_offline", "static")
_SCHEME = "apiKey"

router = APIRouter()


@router.get("/docs", include_in_schema=False)
async def swagger_ui(request: Request) -> HTMLResponse:
    app: FastAPI = request.app
    root = request.scope.get("root_path", "")  # behind a proxy that strips a prefix
    return get_swagger_ui_html(
        openapi_url=f"{root}{app.openapi_url}",
        title=f"{app.title} - Swagger UI",
        swagger_js_url=f"{root}{STATIC}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{STATIC}/swagger-ui.css",
        swagger_favicon_url=f"{root}{STATIC}/favicon.png",
        swagger_ui_parameters=app.swagger_ui_parameters,
    )


def install_docs(app: FastAPI, api_key: bool) -> None:
    """Add /docs and its static files to an app created with docs_url=None and redoc_url=None."""
    app.mount(STATIC, StaticFiles(packages=[_PACKAGE_FILES]), name="docs-static")
    app.include_router(router)
    if api_key:
        _declare_api_key(app)


def _declare_api_key(app: FastAPI) -> None:
    build = app.openapi  # FastAPI's: builds the schema once and caches it in app.openapi_schema

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {}).setdefault("securitySchemes", {})[_SCHEME] = {
                "type": "http",
                "scheme": "bearer",
                "description": "The server's API key (--api-key or DIFFSERVE_API_KEY).",
            }
            for path, operations in schema.get("paths", {}).items():
                if not is_public(path):
                    for operation in operations.values():
                        operation["security"] = [{_SCHEME: []}]
        return app.openapi_schema

    app.openapi = openapi
