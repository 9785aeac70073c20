"""Parallel learners that average their weights (issue 6): ``train`` in two real processes
joined by gloo on 127.0.0.1, the ``rlweights train`` command under torchrun, a learner that
dies, and the command's refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SUBPROCESS_TIMEOUT, launch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlweights.agents.checkpoint import load_checkpoint
from rlweights.agents.registry import make_config
from rlweights.agents.train import train
from rlweights.cli import main
from rlweights.distributed import PeerError

TINY = {
    "total_steps": 300,
    "learning_starts": 50,
    "hidden": (16, 16),
    "batch_size": 32,
    "buffer_size": 1000,
    "eval_every": 0,
    "eval_episodes": 1,
    "drift_every": 0,
    "average_every": 100,
}
RUNS = {
    "dqn": ("CartPole-v1", {"train_freq": 4, "gradient_steps": 2}),
    "sac": ("Pendulum-v1", {"policy_ema": 0.1}),
}


def flat_weights(agent) -> dict[str, torch.Tensor]:
    found = {
        f"{name}.{key}": value.clone()
        for name, state in agent.weights_state().items()
        for key, value in state.items()
    }
    found.update({f"extra{i}": t.detach().clone() for i, t in enumerate(agent.averaged_tensors())})
    return found


def training_worker(rank, out):
    results = {}
    for algo, (env_id, extra) in RUNS.items():
        config = make_config(algo, env_id, **TINY, **extra)
        agent, summary = train(config, Path(out) / algo)
        results[algo] = {"weights": flat_weights(agent), "summary": summary}
    torch.save(results, f"{out}/rank{rank}.pt")


def test_learners_average_every_k_steps_and_only_rank_0_writes(tmp_path):
    codes = launch(training_worker, tmp_path)
    errors = [p.read_text() for p in tmp_path.glob("error*.txt")]
    assert codes == [0, 0], errors
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for algo in RUNS:
        zero, one = ranks[0][algo], ranks[1][algo]
        # Step 300 is an averaging point: every network (online, target, EMA, SAC's
        # temperature) is the same in both learners afterwards.
        assert zero["weights"].keys() == one["weights"].keys()
        for name, value in zero["weights"].items():
            assert torch.equal(value, one["weights"][name]), (algo, name)
        summary = zero["summary"]
        assert summary["processes"] == 2 and summary["averages"] == 3
        assert one["summary"] == {"rank": 1, "steps": 300, "averages": 3}
        run = tmp_path / algo
        saved = load_checkpoint(run / "model.pt")
        for name, state in saved["weights"].items():
            for key, value in state.items():
                assert torch.equal(value, zero["weights"][f"{name}.{key}"])
        events = EventAccumulator(str(run))
        events.Reload()
        moved = events.Scalars("distributed/distance_to_average")
        assert [e.step for e in moved] == [100, 200, 300]
        # Before the first averaging the learners had trained apart: the weights moved.
        assert all(e.value > 0 for e in moved)
    # Rank 1 wrote nothing: one event file per run, rank 0's.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["dqn", "sac"]
    for algo in RUNS:
        assert len(list((tmp_path / algo).glob("events.out.tfevents.*"))) == 1


def dying_learner_worker(rank, out):
    config = make_config("dqn", "CartPole-v1", **TINY)

    def progress(steps, info):
        if rank == 1 and steps == 150:
            os._exit(1)  # dies without a word, between two averaging points

    try:
        train(config, Path(out) / "run", progress=progress)
        message = "no error"
    except PeerError as exc:
        message = str(exc)
    torch.save({"message": message}, f"{out}/seen.pt")


def test_a_learner_that_dies_stops_the_others_with_a_clear_error(tmp_path):
    codes = launch(dying_learner_worker, tmp_path, timeout_s=20)
    assert codes[1] == 1
    seen = torch.load(tmp_path / "seen.pt", weights_only=True)
    assert "a peer process died or did not answer" in seen["message"]


def test_torchrun_trains_parallel_learners_from_the_command(tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "rlweights",
        "train",
        "--algo",
        "dqn",
        "--steps",
        "200",
        "--learning-starts",
        "50",
        "--hidden",
        "16,16",
        "--batch-size",
        "32",
        "--eval-episodes",
        "1",
        "--average-every",
        "100",
        "--no-progress",
        "--logdir",
        str(tmp_path),
        "--run-name",
        "r",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("rlweights train: native dqn on CartPole-v1 (2 learners)") == 1
    assert done.stdout.count("final eval return") == 1
    assert "per learner, 2 learners averaged 2 times" in done.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["r"]
    summary = (tmp_path / "r" / "summary.json").read_text()
    assert '"processes": 2' in summary and '"averages": 2' in summary
    assert '"average_every": 100' in (tmp_path / "r" / "config.json").read_text()


GLOO_THREADS_SCRIPT = """
import json, os, sys
from pathlib import Path
from rlweights.agents.registry import make_config
from rlweights.agents.train import train

def gloo_threads():
    tasks = Path("/proc/self/task")
    names = [(task / "comm").read_text().strip() for task in tasks.iterdir()]
    return sorted(name for name in names if "gloo" in name)

seen = {}
def progress(steps, info):
    seen.setdefault("during", gloo_threads())

out = Path(sys.argv[1])
config = make_config("dqn", "CartPole-v1", **TINY)
train(config, out / "run", progress=progress)
seen["after"] = gloo_threads()
(out / f"rank{os.environ['RANK']}.txt").write_text(json.dumps(seen))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
def test_a_learner_that_owns_the_process_group_leaves_no_gloo_thread_behind(tmp_path):
    # Learners that start the group themselves (as under torchrun) destroy it at the end; a
    # gloo thread alive after that makes the process abort at exit (SIGABRT, now and then).
    script = tmp_path / "learner.py"
    script.write_text(f"TINY = {TINY!r}\n" + GLOO_THREADS_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", str(script), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in range(2):
        seen = json.loads((tmp_path / f"rank{rank}.txt").read_text())
        assert seen["during"], seen  # the group's threads, while it lives
        assert seen["after"] == [], seen


@pytest.mark.parametrize(
    ("world", "args", "message"),
    [
        ("1", ["--average-every", "100"], "--average-every needs several learners"),
        ("2", [], "launched as 2 processes: pass --average-every K"),
        ("2", ["--average-every", "100", "--impl", "sb3"], "not --impl sb3"),
        ("1", ["--average-every", "-1"], "average_every=-1"),
        ("1", ["--peer-timeout", "0"], "peer_timeout=0"),
        ("2", ["--resume", "runs/x"], "--resume of parallel learners is not supported"),
    ],
)
def test_parallel_refusals_are_one_line_exit_2_and_write_nothing(
    tmp_path, capsys, monkeypatch, world, args, message
):
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", "0")
    code = main(["train", "--algo", "dqn", *args, "--logdir", str(tmp_path / "runs")])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("rlweights train: error: ") and message in line
    assert not (tmp_path / "runs").exists()
