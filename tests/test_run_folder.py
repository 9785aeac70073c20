"""Runs are never lost (issue 13): stop signals at every moment of a run, with real processes;
the run folder's lock; what interrupted writes leave behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlweights.agents.train import load_checkpoint
from rlweights.cli import main

TINY_FLAGS = ["--hidden", "16,16", "--batch-size", "32", "--learning-starts", "50"]
TINY_FLAGS += ["--eval-episodes", "1", "--no-progress"]

# An environment whose construction and steps take as long as the test needs, so that a
# signal lands in the set-up or in the final evaluation (SLOW_INIT, SLOW_STEP seconds).
SLOW_ENVS = """
import os, time
import gymnasium as gym
import numpy as np


class Slow(gym.Env):
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self):
        time.sleep(float(os.environ.get("SLOW_INIT", "0")))
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        if os.environ.get("SLOW_STEP_AFTER") and os.path.exists(os.environ["SLOW_STEP_AFTER"]):
            time.sleep(float(os.environ.get("SLOW_STEP", "0")))
        obs = np.full(2, np.tanh(self.t / 10), np.float32)
        return obs, -float(np.square(action).sum()), False, self.t >= 50, {}


gym.register("Slow-v0", entry_point=Slow)
"""


def _start(tmp_path: Path, *args: str, **env: str) -> subprocess.Popen:
    (tmp_path / "slowenvs.py").write_text(SLOW_ENVS)
    environ = os.environ | {"PYTHONPATH": str(tmp_path), **env}
    command = [sys.executable, "-m", "rlweights", "train", *TINY_FLAGS, *args]
    command += ["--logdir", str(tmp_path / "runs"), "--run-name", "r"]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ
    )


def _wait_for(condition, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _finish(proc: subprocess.Popen) -> str:
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert "Traceback" not in err, err
    return err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_during_training_checkpoints(tmp_path, signum):
    """SIGTERM and SIGHUP (schedulers, timeout, docker stop, a closed terminal) killed the run
    without a checkpoint; now every stop signal checkpoints like Ctrl-C."""
    proc = _start(tmp_path, "--steps", "100000")
    assert proc.stdout.readline().startswith("rlweights train: native sac")
    time.sleep(3)  # inside the training loop
    proc.send_signal(signum)
    err = _finish(proc)
    assert proc.returncode == 128 + signum
    how = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    assert f"stopped by {how} during training; the checkpoint of step" in err
    run = tmp_path / "runs" / "r"
    steps = load_checkpoint(run)["steps"]
    assert f"of step {steps} is in {run}/model.pt" in err
    assert 0 < steps < 100_000
    if signum == signal.SIGTERM:  # and the run continues where it stopped
        resume = ["train", "--resume", str(run), "--steps", str(steps + 40), "--no-progress"]
        assert main(resume) == 0
        assert json.loads((run / "summary.json").read_text())["steps"] == steps + 40


def test_a_stop_signal_during_the_set_up_leaves_a_checkpoint(tmp_path):
    """Ctrl-C while the environments and networks were built printed 'the last checkpoint
    is in RUN/model.pt' with no model.pt there; now the run stops at its first step."""
    proc = _start(tmp_path, "--env", "slowenvs:Slow-v0", "--steps", "100", SLOW_INIT="3")
    assert proc.stdout.readline().startswith("rlweights train:")  # the folder exists
    time.sleep(0.5)  # the run's environments are being made
    proc.send_signal(signal.SIGINT)
    err = _finish(proc)
    assert proc.returncode == 130
    run = tmp_path / "runs" / "r"
    assert load_checkpoint(run)["steps"] == 0
    assert "the checkpoint of step 0 is in" in err


def test_a_run_stopped_before_its_first_checkpoint_can_be_started_again(tmp_path, capsys):
    """A second Ctrl-C acts at once: no checkpoint, and the message says so; then both
    '--resume RUN' and the same command (same --run-name) start the run again."""
    proc = _start(tmp_path, "--env", "slowenvs:Slow-v0", "--steps", "100", SLOW_INIT="3")
    assert proc.stdout.readline().startswith("rlweights train:")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    run = tmp_path / "runs" / "r"
    assert not (run / "model.pt").exists()
    assert "before the first checkpoint; start the run again with: rlweights train --resume" in err
    assert err.strip().endswith(f"--resume {tmp_path / 'runs' / 'r'} --env slowenvs:Slow-v0")
    sys.path.insert(0, str(tmp_path))
    try:
        assert main(["train", "--resume", str(run), "--env", "slowenvs:Slow-v0"]) == 0
        assert json.loads((run / "summary.json").read_text())["steps"] == 100
        (run / "model.pt").unlink()
        (run / "summary.json").unlink()
        again = ["train", *TINY_FLAGS, "--env", "slowenvs:Slow-v0", "--steps", "100"]
        assert main([*again, "--logdir", str(tmp_path / "runs"), "--run-name", "r"]) == 0
    finally:
        sys.path.remove(str(tmp_path))
    assert (run / "summary.json").is_file()
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # the stopped start's are gone


def test_a_stop_signal_during_the_final_evaluation_keeps_the_trained_agent(tmp_path):
    """Ctrl-C during the final evaluation lost the run; now its checkpoint is written first
    and --resume finishes it (the evaluation and summary)."""
    run = tmp_path / "runs" / "r"
    proc = _start(  # the environment slows down once the final checkpoint exists
        tmp_path,
        *("--env", "slowenvs:Slow-v0", "--steps", "100", "--eval-every", "0"),
        SLOW_STEP="0.2",
        SLOW_STEP_AFTER=str(run / "model.pt"),
    )
    _wait_for(lambda: (run / "model.pt").exists())  # the final checkpoint, then evaluation
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    err = _finish(proc)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "during the final evaluation; the checkpoint of step 100" in err
    assert "Finish it (final evaluation, summary) with: rlweights train --resume" in err
    assert not (run / "summary.json").exists()
    sys.path.insert(0, str(tmp_path))
    try:
        assert main(["train", "--resume", str(run), "--env", "slowenvs:Slow-v0"]) == 0
    finally:
        sys.path.remove(str(tmp_path))
    assert json.loads((run / "summary.json").read_text())["steps"] == 100


def test_a_run_in_use_is_refused_and_left_alone(tmp_path, capsys):
    """Two concurrent --resume of one run both ran; now the run folder is locked."""
    proc = _start(tmp_path, "--steps", "100000", "--eval-every", "200")
    run = tmp_path / "runs" / "r"
    try:
        _wait_for(lambda: (run / "model.pt").exists())
        assert main(["train", "--resume", str(run), "--steps", "200000"]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line == (
            f"rlweights train: error: run {run.resolve()} is in use by another process: wait "
            "until it ends, or choose another --run-name"
        )
        assert len(list(run.glob("events.out.tfevents.*"))) == 1  # no second writer
    finally:
        proc.send_signal(signal.SIGINT)
        _finish(proc)
    steps = load_checkpoint(run)["steps"]  # the lock went with the process
    assert main(["train", "--resume", str(run), "--steps", str(steps + 20)]) == 0


def test_temporary_files_of_a_killed_write_are_removed_at_resume_and_rerun(tmp_path):
    args = ["train", "--steps", "60", *TINY_FLAGS, "--logdir", str(tmp_path), "--run-name", "r"]
    assert main(args) == 0
    run = tmp_path / "r"
    leftovers = [run / ".model.pt.a1b2c3d4.tmp", run / ".summary.json.x_y9z8w7.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a checkpoint")
    keep = run / "notes.txt.tmp"  # not one of ours
    keep.write_text("mine")
    assert main(["train", "--resume", str(run), "--steps", "90", "--no-progress"]) == 0
    assert not any(p.exists() for p in leftovers) and keep.read_text() == "mine"
    fresh = tmp_path / "fresh"  # a run folder that never got its first checkpoint
    fresh.mkdir()
    (fresh / "config.json").write_text((run / "config.json").read_text())
    (fresh / ".model.pt.q1w2e3r4.tmp").write_bytes(b"half")
    assert main([*args[:-1], "fresh"]) == 0
    assert sorted(p.name for p in fresh.iterdir() if p.name.startswith(".")) == []
