#!/usr/bin/env bash
# Install diffserve and what it needs into the current Python. Keeps an installed torch (your CUDA or ROCm
# build); where none is present it installs torch==2.13.0 first (on CI and dev machines here, a CPU build
# from a local file), which pyproject's torch range accepts.
#   bash scripts/setup.sh          # runtime + server
#   bash scripts/setup.sh test     # plus the test tools
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
"$PY" -m pip install -q -e ".${extra}"
