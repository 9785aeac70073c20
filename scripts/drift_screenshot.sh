#!/usr/bin/env bash
# Make docs/drift-tensorboard.png: a short SAC run with DriftCallback, served by a real
# TensorBoard on 127.0.0.1, captured by headless Chromium (Debian: apt-get install chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
logdir="${LOGDIR:-}"
if [ -z "$logdir" ]; then
  logdir=$(mktemp -d)
  python scripts/drift_demo.py --logdir "$logdir" --steps "${STEPS:-2000}" --every "${EVERY:-100}"
fi
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python -m tensorboard.main --logdir "$logdir" --host 127.0.0.1 --port "$port" >/dev/null 2>&1 &
server=$!
trap 'kill "$server"' EXIT
python - "$port" <<'PY'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/data/plugin/scalars/tags"
for _ in range(120):
    try:
        if b"target_distance" in urllib.request.urlopen(url, timeout=2).read():
            break
    except OSError:
        pass
    time.sleep(0.5)
else:
    sys.exit("TensorBoard did not serve the drift tags in time")
PY
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1300 \
  --virtual-time-budget=30000 --screenshot=docs/drift-tensorboard.png \
  "http://127.0.0.1:$port/#scalars&_smoothingWeight=0&tagFilter=drift%2Fcritic%2F%5Ba-z_%5D%2B%24"
echo "wrote docs/drift-tensorboard.png"
