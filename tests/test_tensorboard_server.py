"""A real TensorBoard server reads the drift events (its HTTP API, on 127.0.0.1)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

from conftest import SUBPROCESS_TIMEOUT, logged_drift_run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_tensorboard_serves_the_drift_scalars(tmp_path):
    logged = logged_drift_run(tmp_path / "run", range(3))

    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(tmp_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--reload_interval",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    tag = "drift/critic/target_distance"
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        tags = {}
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stderr.read().decode()
            try:
                tags = _get(f"{base}/data/plugin/scalars/tags")
            except OSError:
                tags = {}
            if tag in tags.get("run", {}):
                break
            time.sleep(0.5)
        assert tag in tags.get("run", {}), tags
        assert "drift/critic/layers/0.weight/weight_norm" in tags["run"]
        query = urllib.parse.urlencode({"tag": tag, "run": "run"})
        points = _get(f"{base}/data/plugin/scalars/scalars?{query}")
        assert [p[1] for p in points] == [0, 1, 2]  # [wall_time, step, value]
        for _, step, value in points:
            assert abs(value - logged[step][tag]) <= 1e-6 * abs(logged[step][tag])
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
