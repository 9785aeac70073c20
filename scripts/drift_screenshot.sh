#!/usr/bin/env bash
# Make docs/drift-tensorboard.png: a short SAC run with DriftCallback, seen in a real
# TensorBoard through headless Chromium (scripts/tensorboard_screenshot.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
logdir="${LOGDIR:-}"
if [ -z "$logdir" ]; then
  logdir=$(mktemp -d)
  python scripts/drift_demo.py --logdir "$logdir" --steps "${STEPS:-2000}" --every "${EVERY:-100}"
fi
scripts/tensorboard_screenshot.sh "$logdir" 'drift/critic/[a-z_]+$' docs/drift-tensorboard.png 1600x1300
