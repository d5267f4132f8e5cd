"""/docs works offline and without the API key: Swagger UI's files come from this server (a package's copy),
never from a CDN; /docs, its files and /openapi.json are public while the /v1 routes keep needing the key."""

from __future__ import annotations

import re

import httpx


def _assets(html: str) -> dict[str, str]:
    """The page's stylesheet, favicon and script URLs, by kind."""
    css = re.search(r'<link[^>]*rel="stylesheet"[^>]*href="([^"]+)"', html)
    icon = re.search(r'<link[^>]*rel="shortcut icon"[^>]*href="([^"]+)"', html)
    js = re.search(r'<script[^>]*src="([^"]+)"', html)
    assert css and icon and js, html
    return {"css": css.group(1), "icon": icon.group(1), "js": js.group(1)}


def test_docs_page_and_its_assets_come_from_the_server(flux_server):
    with httpx.Client(base_url=flux_server.url, timeout=30) as http:  # no API key
        page = http.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        html = page.text
        # Nothing fetched from elsewhere: an offline browser gets the whole page.
        assert not re.search(r'(src|href)="(https?:)?//', html), html
        assert "url: '/openapi.json'" in html
        assets = _assets(html)
        assert all(url.startswith("/docs/static/") for url in assets.values()), assets
        minimum = {"js": 500_000, "css": 50_000, "icon": 100}  # Swagger UI 5: ~1.5 MB and ~180 kB
        for kind, url in assets.items():
            r = http.get(url)
            assert r.status_code == 200, (url, r.status_code)
            assert len(r.content) > minimum[kind], (url, len(r.content))
        assert "SwaggerUIBundle" in http.get(assets["js"]).text
        assert ".swagger-ui" in http.get(assets["css"]).text
        # FastAPI's CDN pages are gone.
        assert http.get("/redoc").status_code == 401  # an unknown path is not public under a key
        assert http.get("/docs/static/no-such-file.js").status_code == 404


def test_docs_and_schema_are_public_under_an_api_key_and_v1_is_not(flux_server):
    assert flux_server.api_key
    with httpx.Client(base_url=flux_server.url, timeout=30) as http:  # no API key
        assert http.get("/docs").status_code == 200
        schema = http.get("/openapi.json")
        assert schema.status_code == 200
        spec = schema.json()
        assert spec["openapi"].startswith("3.1") and "/v1/images/generations" in spec["paths"]
        assert "/docs" not in spec["paths"]
        # Swagger UI's Authorize button sends the key to the routes that need it, and only to those.
        assert spec["components"]["securitySchemes"]["apiKey"] == {
            "type": "http",
            "scheme": "bearer",
            "description": "The server's API key (--api-key or DIFFSERVE_API_KEY).",
        }
        assert spec["paths"]["/v1/models"]["get"]["security"] == [{"apiKey": []}]
        assert "security" not in spec["paths"]["/health"]["get"]
        assert "security" not in spec["paths"]["/v1/files/images/{name}"]["get"]

        r = http.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/docsx").status_code == 401  # public means these paths, not a prefix
        assert http.get("/openapi.json/x").status_code == 401
    with flux_server.http() as http:  # with the key
        assert http.get("/v1/models").status_code == 200
        assert http.get("/docs").status_code == 200
