"""Headless Chromium for the playground tests: the distribution's build (scripts/install-chromium.sh), driven
by Playwright's Python package through `executable_path`, since Playwright's own browser download is not
reachable from CI."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find() -> str | None:
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def find_or_install() -> tuple[str | None, str]:
    """(executable, why not): installs Chromium with the script test.sh runs when it is missing."""
    path = find()
    if path:
        return path, ""
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "install-chromium.sh")], capture_output=True, text=True, timeout=900
    )
    path = find()
    why = (done.stderr.strip().splitlines() or ["no chromium executable after the install"])[-1]
    return path, f"Chromium could not be installed (scripts/install-chromium.sh: {why})"


def launch(playwright, executable: str):
    # --no-sandbox: CI runs as root in a container, where Chromium's sandbox cannot start.
    return playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
