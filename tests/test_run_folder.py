"""Runs are never lost (issue 13): stop signals at every moment of a run, with real processes;
the run folder's lock; what interrupted writes leave behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SUBPROCESS_TIMEOUT

from rlweights.agents.checkpoint import load_checkpoint
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


def _wait_for(condition, seconds: float = SUBPROCESS_TIMEOUT) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _finish(proc: subprocess.Popen) -> str:
    try:
        _, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
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
    _, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
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
    for name in ("config.json", ".rlweights-run"):
        (fresh / name).write_bytes((run / name).read_bytes())
    (fresh / ".model.pt.q1w2e3r4.tmp").write_bytes(b"half")
    assert main([*args[:-1], "fresh"]) == 0
    assert sorted(p.name for p in fresh.iterdir() if p.name.startswith(".")) == [".rlweights-run"]


def _one_line(capsys) -> str:
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("rlweights train: error: ")
    return line


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _train(tmp_path: Path, *flags: str) -> int:
    return main(["train", *TINY_FLAGS, "--logdir", str(tmp_path), *flags])


@pytest.mark.parametrize("how", ["--run-name", "--resume"])
def test_a_folder_rlweights_did_not_create_is_refused_and_left_alone(tmp_path, capsys, how):
    """A folder with a config.json and event files but no model.pt was taken for a run
    stopped before its first checkpoint: its events were deleted, its config.json rewritten."""
    mine = tmp_path / "exp1"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "experiment"}\n')
    (mine / "events.out.tfevents.1700000000.host.1.0").write_bytes(b"my curves")
    before = _contents(mine)
    if how == "--run-name":
        assert _train(tmp_path, "--run-name", "exp1", "--steps", "60") == 2
        assert _one_line(capsys).endswith(
            f"{mine} exists and is not a run folder that rlweights created (it has no "
            ".rlweights-run file): choose another --run-name"
        )
    else:
        assert main(["train", "--resume", str(mine), "--no-progress"]) == 2
        assert _one_line(capsys).endswith(f"no checkpoint at {mine}/model.pt")
    assert _contents(mine) == before


def test_a_run_of_an_earlier_version_without_the_marker_still_resumes(tmp_path):
    assert _train(tmp_path, "--run-name", "r", "--steps", "60") == 0
    run = tmp_path / "r"
    assert (run / ".rlweights-run").is_file()  # what marks a folder that rlweights created
    (run / ".rlweights-run").unlink()
    assert main(["train", "--resume", str(run), "--steps", "80", "--no-progress"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 80


@pytest.mark.parametrize("foreign", [None, b"not a checkpoint"])
def test_resume_of_a_folder_that_is_not_a_run_deletes_nothing(tmp_path, capsys, foreign):
    """--resume of a folder that is not a run removed its files that looked like leftovers
    of an interrupted write, before it found that the folder holds no checkpoint."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / ".draft.20241201.tmp").write_text("keep")
    (notes / ".model.pt.a1b2c3d4.tmp").write_text("keep too")
    if foreign is not None:
        (notes / "model.pt").write_bytes(foreign)
    before = _contents(notes)
    assert main(["train", "--resume", str(notes), "--no-progress"]) == 2
    line = _one_line(capsys)
    assert "no checkpoint at" in line or "is not a readable checkpoint" in line
    assert _contents(notes) == before


def test_a_full_disk_at_a_checkpoint_ends_in_one_line_and_keeps_the_last_one(
    tmp_path, capsys, monkeypatch
):
    """No space left at the second checkpoint: a traceback before; now one line, exit code 2,
    the first checkpoint intact and no temporary file left."""
    import rlweights.agents.checkpoint as checkpoint_module

    real = checkpoint_module.atomic_write
    kept = {}

    def write(path, writer, mode="wb"):
        if not (Path(path).name == "model.pt" and Path(path).exists()):
            return real(path, writer, mode)
        kept["bytes"] = Path(path).read_bytes()

        def full(f):
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return real(path, full, mode)

    monkeypatch.setattr(checkpoint_module, "atomic_write", write)
    assert _train(tmp_path, "--run-name", "r", "--steps", "200", "--eval-every", "100") == 2
    line = _one_line(capsys)
    run = tmp_path / "r"
    assert f"could not write {run / 'model.pt'}: No space left on device" in line
    assert f"the checkpoint of step 100 in {run}/model.pt is as it was" in line
    assert f"rlweights train --resume {run}" in line
    assert (run / "model.pt").read_bytes() == kept["bytes"]
    assert load_checkpoint(run)["steps"] == 100
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_a_run_that_cannot_write_at_its_set_up_leaves_no_folder(tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    assert _train(tmp_path, "--run-name", "r", "--steps", "60") == 2
    assert "No space left on device" in _one_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def read_only():
    """Make a folder read-only, for root too (the immutable attribute), or skip."""
    made, chattr = [], shutil.which("chattr")

    def make(folder: Path) -> None:
        folder.chmod(0o555)
        made.append(folder)
        probe = folder / "probe"
        try:
            probe.touch()
        except OSError:
            return
        probe.unlink()
        if (
            chattr is None
            or subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode
        ):
            pytest.skip("cannot make a folder read-only here")

    yield make
    for folder in made:
        if chattr is not None:
            subprocess.run([chattr, "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


def test_resume_of_a_read_only_run_is_one_line(tmp_path, capsys, read_only):
    assert _train(tmp_path, "--run-name", "r", "--steps", "60") == 0
    run, fresh = tmp_path / "r", tmp_path / "fresh"  # and one stopped before its checkpoint
    fresh.mkdir()
    for name in (".rlweights-run", "config.json", "events.out.tfevents.1.host.1.0"):
        (fresh / name).write_bytes((run / name).read_bytes() if name[0] != "e" else b"x")
    before = {run: _contents(run), fresh: _contents(fresh)}
    capsys.readouterr()
    for folder in (run, fresh):
        read_only(folder)
        assert main(["train", "--resume", str(folder), "--steps", "80", "--no-progress"]) == 2
        assert f"run folder {folder} cannot be written" in _one_line(capsys)
        assert _contents(folder) == before[folder]
    assert _train(tmp_path, "--run-name", "fresh", "--steps", "60") == 2  # its name again
    assert f"run folder {fresh} cannot be written" in _one_line(capsys)
    assert _contents(fresh) == before[fresh]


def test_paths_that_are_not_utf8_are_refused_in_one_line(tmp_path, capsys):
    bad = "bad\udcff"  # the byte 0xff in a file name, as Python reads it
    assert _train(tmp_path, "--logdir", str(tmp_path / bad), "--steps", "60") == 2
    assert "--logdir" in (line := _one_line(capsys)) and "is not valid UTF-8" in line
    assert _train(tmp_path, "--run-name", bad, "--steps", "60") == 2
    assert "--run-name" in (line := _one_line(capsys)) and "is not valid UTF-8" in line
    assert _train(tmp_path, "--run-name", "r", "--seeds", "0", "--logdir", str(tmp_path / bad)) == 2
    assert "is not valid UTF-8" in _one_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_dangling_symbolic_link_is_named_as_such(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r").symlink_to(tmp_path / "nowhere")
    (tmp_path / "logs").symlink_to(tmp_path / "nowhere")
    assert _train(tmp_path / "runs", "--run-name", "r", "--steps", "60") == 2
    line = _one_line(capsys)
    assert f"{tmp_path / 'runs' / 'r'} is a symbolic link to {tmp_path / 'nowhere'}" in line
    assert "which does not exist" in line
    assert _train(tmp_path / "logs", "--steps", "60") == 2
    line = _one_line(capsys)
    assert f"--logdir {tmp_path / 'logs'} is a symbolic link to {tmp_path / 'nowhere'}" in line
    assert not (tmp_path / "nowhere").exists()
