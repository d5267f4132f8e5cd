#!/usr/bin/env bash
# Set up (see setup.sh) and run the whole test suite: unit tests, live-server integration tests, lint.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh test
bash scripts/install-postgres.sh || echo "test.sh: PostgreSQL not installed; the replica tests will skip" >&2
"$PY" -m ruff check diffserve tests benchmarks
bash scripts/install-chromium.sh  # the playground tests drive the page in the distribution's Chromium
"$PY" -m pytest -q tests "$@"
