"""The playground page at GET /, driven in headless Chromium (the distribution's, through Playwright) against
live servers: an image generated through the page under --api-key, with its step progress; an uploaded image
edited; a video job run to its MP4; the API's own error message for a bad input; and --no-ui."""

from __future__ import annotations

import argparse
import base64
import os
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.browser import chromium
from tests.integration.conftest import API_KEY, CLEAN_EXIT, LiveServer

# Where to write the page's screenshot after a generation (for docs/); a temporary file otherwise.
SCREENSHOT_ENV = "DIFFSERVE_PLAYGROUND_SCREENSHOT"


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the 'playwright' package (test extra)")
    executable, why = chromium.find_or_install()
    if executable is None:
        pytest.skip(why)
    with sync_api.sync_playwright() as p:
        b = chromium.launch(p, executable)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    # A context per test: its own sessionStorage, so no test inherits another's key.
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="module")
def wan_server(tiny_wan_dir, tmp_path_factory):
    server = LiveServer(
        ["--model", str(tiny_wan_dir), "--warmup-resolutions", "64x64"], tmp_path_factory.mktemp("ui-wan-out")
    )
    server.start().wait_healthy()
    yield server
    assert server.stop() in CLEAN_EXIT, server.log_tail()


def record_progress(page) -> None:
    """Keep every value the progress bar takes (window.progressSeen), however fast the steps go."""
    page.evaluate(
        """() => {
        window.progressSeen = [];
        const bar = document.getElementById("progress");
        new MutationObserver(() => window.progressSeen.push(Number(bar.value)))
            .observe(bar, {attributes: true, attributeFilter: ["value"]});
    }"""
    )


def natural_size(img) -> list[int]:
    """The <img>'s decoded width and height (decode() fails if the bytes are not a picture)."""
    return img.evaluate("async (i) => { await i.decode(); return [i.naturalWidth, i.naturalHeight]; }")


def enter_key(page, key: str) -> None:
    """Type the key and press Enter, as a keyboard user would."""
    page.get_by_label("API key").fill(key)
    page.get_by_label("API key").press("Enter")


def test_image_through_the_page_under_api_key(page, flux_server, tmp_path):
    requests = []
    page.on("request", lambda r: requests.append((r.url, r.headers.get("authorization"))))
    page.goto(flux_server.url + "/")
    # The page loads without the key; the model's description needs it, and the page says so in the API's words.
    status = page.locator("#key-status")
    status.get_by_text("Missing or invalid API key").wait_for()
    page.locator("#health[data-state=ok]").wait_for()
    enter_key(page, "wrong-key")
    page.wait_for_function("document.getElementById('key-status').textContent.includes('invalid API key')")
    enter_key(page, API_KEY)
    status.get_by_text("Key accepted.").wait_for()
    assert page.locator("#model-name").inner_text() == flux_server.wait_healthy()["model"]
    assert page.evaluate("sessionStorage.getItem('diffserve.apiKey')") == API_KEY
    keyed_from = len(requests)

    page.get_by_label("Prompt", exact=True).fill("a red circle")
    page.get_by_label("Width").fill("96")
    page.get_by_label("Height").fill("64")
    page.get_by_label("Steps").fill("4")
    page.get_by_label("Seed").fill("7")
    record_progress(page)
    generate = page.get_by_role("button", name="Generate")
    generate.focus()
    page.keyboard.press("Enter")  # keyboard-usable: Enter on the focused button
    img = page.locator("#outputs img")
    img.wait_for()
    assert natural_size(img) == [96, 64]  # the picture decodes at the requested size

    seen = page.evaluate("window.progressSeen")
    assert seen[-1] == 100 and any(0 < v < 100 for v in seen), seen  # real step progress, then 100%
    assert page.locator("#progress-text").inner_text().startswith("100%")
    card = page.locator("#outputs li").first
    assert "a red circle" in card.inner_text() and "96x64" in card.inner_text()
    link = card.get_by_role("link", name="Download")
    assert link.get_attribute("download").endswith(".png") and link.get_attribute("href").startswith("blob:")
    assert generate.is_enabled()  # ready for the next one

    # The key travels in the Authorization header of every API call, and never in a URL.
    api_calls = [(url, auth) for url, auth in requests[keyed_from:] if "/v1/" in url or "/ui/model" in url]
    assert any("/v1/images/generations" in url for url, _ in api_calls)
    assert all(auth == f"Bearer {API_KEY}" for _, auth in api_calls), api_calls
    assert not any(API_KEY in url or "wrong-key" in url for url, _ in requests)

    shot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "playground.png")
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 0


def test_edit_an_uploaded_image(page, flux_server, tmp_path):
    from PIL import Image

    source = tmp_path / "start.png"
    Image.new("RGB", (64, 48), "white").save(source)
    page.goto(flux_server.url + "/")
    enter_key(page, API_KEY)
    page.locator("#key-status").get_by_text("Key accepted.").wait_for()
    page.get_by_label("Image to edit").set_input_files(str(source))
    page.get_by_label("Prompt", exact=True).fill("a red circle")
    page.get_by_label("Steps").fill("2")
    page.get_by_label("Strength").fill("0.8")
    page.get_by_role("button", name="Generate").click()
    img = page.locator("#outputs img")
    img.wait_for()
    # No size given: an edit keeps the input's (FLUX's multiple of 16 fits 64x48 as it is).
    assert natural_size(img) == [64, 48]
    assert "start.png" in page.locator("#outputs li").first.inner_text()


def test_bad_input_shows_the_api_message(page, flux_server):
    page.goto(flux_server.url + "/")
    enter_key(page, API_KEY)
    page.locator("#key-status").get_by_text("Key accepted.").wait_for()
    page.get_by_label("Prompt", exact=True).fill("a square")
    page.get_by_label("Width").fill("97")
    page.get_by_label("Height").fill("64")
    page.get_by_role("button", name="Generate").click()
    alert = page.get_by_role("alert")
    alert.wait_for()
    # The same request straight to the API: the page shows its message word for word.
    with flux_server.http() as client:
        r = client.post(
            "/v1/images/generations",
            json={"prompt": "a square", "size": "97x64", "output_format": "png", "n": 1, "stream": True},
        )
    assert r.status_code == 400
    assert alert.inner_text() == r.json()["error"]["message"]
    assert page.locator("#outputs li").count() == 0


def test_video_job_through_the_page(page, wan_server):
    page.goto(wan_server.url + "/")
    page.locator("#model-task").get_by_text("video").wait_for()
    assert page.get_by_label("Frames").is_visible() and not page.get_by_label("Images (n)").is_visible()
    page.get_by_label("Prompt", exact=True).fill("waves on a beach")
    page.get_by_label("Width").fill("64")
    page.get_by_label("Height").fill("48")
    page.get_by_label("Frames").fill("5")
    page.get_by_label("Steps").fill("2")
    record_progress(page)
    page.get_by_role("button", name="Generate").click()
    video = page.locator("#outputs video")
    video.wait_for()
    assert page.evaluate("window.progressSeen")[-1] == 100
    assert video.get_attribute("data-content-type") == "video/mp4"
    job_id = video.get_attribute("data-video-id")
    # The element plays the job's MP4: the bytes behind its src are the server's /content, an ISO BMFF file.
    src_b64 = video.evaluate(
        """async (v) => {
        const bytes = new Uint8Array(await (await fetch(v.src)).arrayBuffer());
        let text = ""; for (const b of bytes) text += String.fromCharCode(b);
        return btoa(text);
    }"""
    )
    data = base64.b64decode(src_b64)
    assert data[4:8] == b"ftyp"
    assert data == httpx.get(f"{wan_server.url}/v1/videos/{job_id}/content", timeout=30).content
    dims = video.evaluate(
        """(v) => new Promise((resolve) => {
        const done = () => resolve([v.videoWidth, v.videoHeight, v.error && v.error.message]);
        if (v.readyState >= 1) done(); else { v.onloadedmetadata = done; v.onerror = done; }
    })"""
    )
    assert dims[:2] == [64, 48], dims
    job = httpx.get(f"{wan_server.url}/v1/videos/{job_id}", timeout=30).json()
    assert job["status"] == "completed" and job["size"] == "64x48"


def test_no_ui_and_the_public_page(flux_server):
    # Under --api-key the page and its files load without the key; what they call does not.
    r = httpx.get(flux_server.url + "/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert ">Generate</button>" in r.text
    for name in ("app.js", "api.js", "gallery.js", "style.css"):
        assert httpx.get(f"{flux_server.url}/ui/static/{name}", timeout=30).status_code == 200, name
    assert httpx.get(flux_server.url + "/ui/model", timeout=30).status_code == 401
    with flux_server.http() as client:
        model = client.get("/ui/model").json()
    assert model["task"] == "image" and model["limits"]["multiple"] > 1
    assert "step_cache_threshold" in model["extensions"]


def test_no_ui_flag_removes_the_page():
    from diffserve.server.app import create_app
    from diffserve.server.cli import add_serve_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert config_from_args(parser.parse_args(["--model", "x"])).ui
    cfg = config_from_args(parser.parse_args(["--model", "x", "--no-ui", "--api-key", "k"]))
    assert not cfg.ui
    # Not entered as a context manager: the lifespan (and so the model) never starts; routing alone is tested.
    client = TestClient(create_app(cfg))
    assert client.get("/").status_code == 404
    assert client.get("/ui/static/app.js").status_code == 404
    assert client.get("/v1/models").status_code == 401  # the rest of the app is unchanged
