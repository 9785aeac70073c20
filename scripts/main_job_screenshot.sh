#!/usr/bin/env bash
# Make docs/main-job-tensorboard.png: the README's main job ('rlweights train', defaults),
# its eval/ and losses/ charts in a real TensorBoard through headless Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
logdir="${LOGDIR:-}"
if [ -z "$logdir" ]; then
  logdir=$(mktemp -d)
  rlweights train --logdir "$logdir" --no-progress
fi
scripts/tensorboard_screenshot.sh "$logdir" '^(eval|losses)/' docs/main-job-tensorboard.png 1600x900
