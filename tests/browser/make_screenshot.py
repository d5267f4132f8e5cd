"""Write docs/playground.png: the playground after a generation with the bundled model (its pictures mean
something; the tests' random tiny models draw noise). Run from the repository root:

    python -m tests.browser.make_screenshot [OUTPUT.png]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from tests.browser import chromium
from tests.integration.conftest import LiveServer

PROMPTS = ("a blue square on a white background", "a red circle on a white background")


def main(out: Path) -> None:
    executable, why = chromium.find_or_install()
    if executable is None:
        raise SystemExit(why)
    with tempfile.TemporaryDirectory() as tmp:
        server = LiveServer(["--warmup-resolutions", "128x128"], Path(tmp) / "out").start(timeout=120)
        try:
            server.wait_healthy(timeout=300)
            with sync_playwright() as p:
                browser = chromium.launch(p, executable)
                page = browser.new_page(viewport={"width": 1100, "height": 1000})
                page.set_default_timeout(120_000)
                page.goto(server.url + "/")
                page.locator("#health[data-state=ok]").wait_for()
                for i, prompt in enumerate(PROMPTS, 1):
                    page.get_by_label("Prompt", exact=True).fill(prompt)
                    page.get_by_label("Seed").fill(str(i))
                    page.get_by_role("button", name="Generate").click()
                    page.locator("#outputs img").nth(i - 1).wait_for()
                    page.get_by_role("button", name="Generate").wait_for(state="visible")
                    page.wait_for_function("!document.getElementById('generate').disabled")
                page.screenshot(path=str(out), full_page=True)
                browser.close()
        finally:
            server.stop()
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/playground.png"))
