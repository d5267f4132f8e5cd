#!/usr/bin/env bash
# Install the distribution's Chromium where it is missing: the playground's browser tests
# (tests/integration/test_playground.py) drive the page in it through Playwright. Not Playwright's own
# browser download: offline CI reaches package registries only, so the tests point Playwright at this
# executable. Idempotent, and one `command -v` when Chromium is already there. Never fails the caller:
# where Chromium cannot be installed the browser tests skip and say why.
set -uo pipefail

for name in chromium chromium-browser; do
  command -v "$name" >/dev/null 2>&1 && exit 0
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-chromium: no apt-get on this system; install Chromium to run the browser tests" >&2
  exit 0
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install-chromium: not root and no sudo; Chromium not installed" >&2; exit 0; }
  SUDO=(sudo -n)
fi
install() { "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }
# A fresh container has empty package lists: update only when the first attempt finds nothing to install.
if ! install >/tmp/install-chromium.log 2>&1; then
  "${SUDO[@]}" apt-get update -q >>/tmp/install-chromium.log 2>&1
  if ! install >>/tmp/install-chromium.log 2>&1; then
    echo "install-chromium: apt-get install chromium failed (log: /tmp/install-chromium.log)" >&2
    tail -n 5 /tmp/install-chromium.log >&2
    exit 0
  fi
fi
echo "install-chromium: $(chromium --version 2>/dev/null | head -n 1)"
