#!/bin/bash
# Train the bundled default model on the lent GPU machine, then evaluate it there; results go to $OUT.
#
# Here, once:  ../shared/gpu/fetch-wheels.sh          (diffusers wheels into .whl/, which git ignores)
# Device run:  bash diffserve/bundled/gpu_train.sh [training seconds, default 470]     (carry: [".whl"])
# Afterwards, here:  cat $FILES_AT/model.tar.part* | tar x -C diffserve/assets/   (replaces default_model/)
#
# The whole run stays under the device's 10-minute limit: ~15 s install, ~25 s preflight, the training
# budget plus ~30 s of start-up and saving, ~40 s of evaluation.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/diffusers*.whl .whl/importlib*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bundled-out}
mkdir -p "$OUT"
budget=${1:-470}
quiet() { grep -v "Writing model\|kept in float32\|rms_norm\|Mismatch dtype\|Loading"; }

# A few synchronous steps first (CUDA_LAUNCH_BLOCKING): a failing kernel is named, and it costs seconds.
CUDA_LAUNCH_BLOCKING=1 python3 -m diffserve.bundled.train --out /tmp/preflight --vae-steps 2 --dit-steps 3 \
  --log-every 1 2>&1 | quiet | tail -15
[ "${PIPESTATUS[0]}" = 0 ] || { echo "preflight failed"; exit 1; }

model=/tmp/model/default_model
python3 -m diffserve.bundled.train --out $model --tar "$OUT/model.tar" --budget-s "$budget" --vae-share 0.12 \
  --checkpoint-s 120 --log-every 250 --log-file "$OUT/train.log" 2>&1 | quiet
python3 -m diffserve.bundled.evaluate --model $model --device cuda --count 128 --json "$OUT/heldout.json" \
  --grid "$OUT/heldout.png" 2>&1 | quiet
python3 -m diffserve.bundled.evaluate --model $model --device cuda --split train --count 64 \
  --json "$OUT/train.json" 2>&1 | quiet
