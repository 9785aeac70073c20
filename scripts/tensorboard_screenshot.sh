#!/usr/bin/env bash
# Serve LOGDIR with a real TensorBoard on 127.0.0.1 and capture the Scalars dashboard, with
# its default settings (smoothing 0.6, outliers ignored in chart scaling), filtered to the
# tags matching TAG_REGEX, in headless Chromium (Debian: apt-get install chromium).
#   scripts/tensorboard_screenshot.sh LOGDIR TAG_REGEX OUT.png [WIDTHxHEIGHT]
set -euo pipefail
logdir=$1 tag_regex=$2 out=$3 size=${4:-1600x1000}
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python -m tensorboard.main --logdir "$logdir" --host 127.0.0.1 --port "$port" >/dev/null 2>&1 &
server=$!
trap 'kill "$server"' EXIT
filter=$(python - "$port" "$tag_regex" <<'PY'
import re, sys, time, urllib.parse, urllib.request, json
port, regex = sys.argv[1], sys.argv[2]
url = f"http://127.0.0.1:{port}/data/plugin/scalars/tags"
for _ in range(120):
    try:
        tags = json.loads(urllib.request.urlopen(url, timeout=2).read())
        if any(re.search(regex, tag) for run in tags.values() for tag in run):
            break
    except OSError:
        pass
    time.sleep(0.5)
else:
    sys.exit(f"TensorBoard did not serve tags matching {regex} in time")
print(urllib.parse.quote(regex, safe=""))
PY
)
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$(mktemp -d)" --hide-scrollbars --window-size="${size/x/,}" \
  --virtual-time-budget=30000 --screenshot="$out" \
  "http://127.0.0.1:$port/#scalars&tagFilter=$filter" 2>/dev/null
echo "wrote $out"
