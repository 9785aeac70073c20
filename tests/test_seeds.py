"""rlweights train --seeds / --workers / --threads (issue 15): several seeds in one command,
one process each, side by side, each with its own run folder; a stop reaches them all."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SUBPROCESS_TIMEOUT

from rlweights.agents.checkpoint import load_checkpoint
from rlweights.agents.cli import _child_arguments, _prepare_seeds
from rlweights.agents.side_by_side import Finished, SideBySide
from rlweights.cli import build_parser, main

TINY = ["--hidden", "16,16", "--batch-size", "32", "--learning-starts", "50"]
TINY += ["--eval-episodes", "1"]


def test_several_seeds_train_side_by_side_in_their_own_folders(tmp_path, capsys):
    args = ["train", "--seeds", "3", "5", "--steps", "200", *TINY, "--threads", "1"]
    assert main([*args, "--logdir", str(tmp_path), "--run-name", "pend"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"rlweights train: 2 seeds, 2 at a time with 1 thread(s) each -> {tmp_path}"
    assert out[1].startswith("  seed ") and out[2].startswith("  seed ")
    assert out[3].startswith("rlweights train: 2 of 2 seeds finished: final eval return mean")
    assert out[3].endswith("steps/s in total") and "400 steps in" in out[3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pend-s3", "pend-s5"]
    for seed in (3, 5):
        config = json.loads((tmp_path / f"pend-s{seed}" / "config.json").read_text())
        assert config["seed"] == seed and config["hidden"] == [16, 16]
        summary = json.loads((tmp_path / f"pend-s{seed}" / "summary.json").read_text())
        assert summary["steps"] == 200


def test_each_seed_gets_the_flags_given(tmp_path):
    flags = ["--algo", "td3", "--seeds", "0", "1", "--steps", "1e3", "--compile"]
    flags += ["--policy-ema", "0.01", "--hidden", "8,8", "--threads", "2", "--workers", "1"]
    args = build_parser().parse_args(["train", *flags])
    child = _child_arguments(args)
    assert child[0] == "--algo=td3" and not any(a.startswith(("--seeds", "--w")) for a in child)
    for flag in ("--steps=1000", "--policy-ema=0.01", "--hidden=8,8", "--threads=2"):
        assert flag in child
    assert "--compile=on" in child


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--seeds", "0", "0"], "--seeds 0 0: each seed once"),
        (["--workers", "2"], "--workers goes with --seeds"),
        (["--seeds", "0", "--seed", "1"], "--seeds trains new runs: give it without --seed"),
        (["--seeds", "0", "-1"], "seed"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--seeds", "0", "--workers", "-5"], "--workers must be >= 1, got -5"),
        (["--seeds", "0", "--workers", "0"], "--workers must be >= 1, got 0"),
    ],
)
def test_bad_seeds_workers_or_threads_are_refused_before_anything_runs(
    tmp_path, capsys, flags, line
):
    assert main(["train", *flags, "--logdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlweights train: error: ") and line in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_stop_signal_reaches_every_seed_and_each_keeps_a_checkpoint(tmp_path):
    command = [sys.executable, "-m", "rlweights", "train", "--seeds", "0", "1"]
    command += ["--steps", "100000", "--eval-every", "100", *TINY]
    command += ["--logdir", str(tmp_path), "--run-name", "r"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while not all((tmp_path / f"r-s{s}" / "model.pt").exists() for s in (0, 1)):
            assert time.monotonic() < deadline and proc.poll() is None, "did not start"
            time.sleep(0.1)  # the first checkpoint (step 100) is written: both train
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped; resume each stopped run with: rlweights train --resume RUN" in err
    for seed in (0, 1):
        steps = load_checkpoint(tmp_path / f"r-s{seed}")["steps"]
        assert 100 <= steps < 100_000
        assert not (tmp_path / f"r-s{seed}" / "summary.json").exists()


def test_threads_sets_the_training_threads_and_restores_them(tmp_path, monkeypatch):
    import torch

    import rlweights.agents.train as train_module

    seen = []
    real = train_module.train

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        flags = ["--steps", "60", *TINY, "--logdir", str(tmp_path), "--no-progress"]
        assert main(["train", "--threads", "1", *flags, "--run-name", "a"]) == 0
        assert seen == [1] and torch.get_num_threads() == 2
        assert main(["train", *flags, "--run-name", "b"]) == 0  # the default: one thread
        assert seen == [1, 1]
    finally:
        torch.set_num_threads(before)


def test_values_that_begin_with_a_dash_reach_each_seed_intact(tmp_path, monkeypatch):
    """--run-name=-dash and --logdir=-weird were passed on as two arguments each, which the
    seeds' processes read as unknown flags."""
    monkeypatch.chdir(tmp_path)
    flags = ["--seeds", "0", "1", "--run-name=-dash", "--logdir=-weird", "--hidden", "8,8"]
    args = build_parser().parse_args(["train", *flags, "--steps", "100"])
    _, folders, commands = _prepare_seeds(args)
    assert folders == [Path("-weird", "-dash-s0"), Path("-weird", "-dash-s1")]
    for seed, command in zip((0, 1), commands, strict=True):
        assert command[1:4] == ["-m", "rlweights", "train"]
        child = build_parser().parse_args(command[3:])
        assert (child.logdir, child.run_name, child.seed) == ("-weird", f"-dash-s{seed}", seed)
        assert (child.hidden, child.total_steps) == ((8, 8), 100)


@pytest.mark.parametrize("left", [[], ["model.pt"], ["config.json", ".rlweights-run"]])
def test_a_stop_names_only_the_runs_that_can_resume(tmp_path, capsys, monkeypatch, left):
    """A stop before a seed's process had made its folder printed '--resume' for a folder
    that did not exist."""
    logs, made = tmp_path / "logs", tmp_path / "made"
    if "model.pt" in left:  # a run with a checkpoint
        flags = ["--steps", "60", *TINY, "--no-progress", "--logdir", str(made)]
        assert main(["train", *flags, "--run-name", "r-s0"]) == 0
    elif left:  # a run stopped before its first checkpoint
        (made / "r-s0").mkdir(parents=True)
        for name in left:
            (made / "r-s0" / name).write_text("{}")

    def stopped(self, commands, on_done):
        if left:  # seed 0's process made its folder, seed 1's never started
            shutil.copytree(made / "r-s0", logs / "r-s0")
        self.stopped = signal.SIGTERM
        return [Finished(0, 128 + signal.SIGTERM), Finished(1, None)]

    monkeypatch.setattr(SideBySide, "run", stopped)
    capsys.readouterr()
    flags = ["--seeds", "0", "1", "--steps", "100", *TINY, "--logdir", str(logs)]
    assert main(["train", *flags, "--run-name", "r"]) == 128 + signal.SIGTERM
    (line,) = capsys.readouterr().err.strip().splitlines()
    if left:
        assert line == (
            "rlweights train: stopped; resume each stopped run with: rlweights train --resume "
            f"RUN ({logs / 'r-s0'})"
        )
    else:
        assert line == "rlweights train: stopped before any run had a folder to resume"
