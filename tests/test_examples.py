"""The worked examples (scripts/example_*.py), each run as a user runs it, with a tiny budget,
and checked for what it promises: drift in TensorBoard, an averaged policy, a soup that is
the mean of its ingredients."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SUBPROCESS_TIMEOUT
from stable_baselines3 import SAC
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.testing import assert_close

ROOT = Path(__file__).resolve().parents[1]
TOTALS = ("weight_norm", "init_distance", "update_ratio", "nonfinite", "target_distance")
WORST_PENDULUM_RETURN = -16.2736044 * 200  # the largest cost at every step of an episode
TINY = ("--steps", "300", "--learning-starts", "100")  # 200 gradient steps


def run_script(name: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, f"scripts/{name}", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_example_sac_logs_drift_and_evaluates_its_ema(tmp_path):
    logdir = tmp_path / "run"
    options = ("--drift-every", "100", "--eval-episodes", "1", "--logdir", str(logdir))
    out = run_script("example_sac.py", *TINY, *options)
    found = re.fullmatch(r"after 300 steps: return (\S+), ema_return (\S+)\n", out)
    assert found, out
    online, ema = map(float, found.groups())
    logged = scalars(logdir)
    # drift after each 100 steps of training (none during the random warm-up), and at the end
    for module in ("actor", "critic"):
        for metric in TOTALS:
            values = logged[f"drift/{module}/{metric}"]
            assert [step for step, _ in values] == [200, 300]
            assert all(math.isfinite(v) for _, v in values)
        assert all(v == 0 for _, v in logged[f"drift/{module}/nonfinite"])
        # the target lags its critic (Polyak), the EMA lags its actor: neither is a copy
        assert all(v > 0 for _, v in logged[f"drift/{module}/target_distance"])
    assert len(logged["drift/critic/layers/q1.0.weight/target_distance"]) == 2
    assert len(logged["drift/actor/layers/trunk.4.weight/init_distance"]) == 2
    assert [step for step, _ in logged["losses/critic"]] == [200, 300]
    ((step, value),) = logged["charts/episodic_return"]  # Pendulum's episodes: 200 steps
    assert step == 200 and WORST_PENDULUM_RETURN <= value <= 0
    assert logged["eval/return"] == [(300, pytest.approx(online, abs=0.051))]
    assert logged["eval/ema_return"] == [(300, pytest.approx(ema, abs=0.051))]


def test_example_sb3_attaches_averages_and_saves_the_average(tmp_path):
    options = ("--drift-every", "100", "--eval-episodes", "1", "--logdir", str(tmp_path))
    out = run_script("example_sb3.py", *TINY, *options, "--seed", "3")
    # one EMA update per gradient step of the actor: SB3 trains from step 101 to 300
    assert out.startswith("after 300 steps (200 EMA updates):\n"), out
    printed = dict(re.findall(r"^  (eval/\w+) (\S+)$", out, re.MULTILINE))
    assert set(printed) == {"eval/online_return", "eval/ema_return"}
    run_dir = tmp_path / "sac_1"
    logged = scalars(run_dir)
    for metric in TOTALS:
        assert [step for step, _ in logged[f"drift/critic/{metric}"]] == [100, 200, 300]
    # the target equals the critic until training starts, then lags behind it
    distances = [v for _, v in logged["drift/critic/target_distance"]]
    assert distances[0] == 0 and all(d > 0 for d in distances[1:])
    assert "drift/critic/layers/qf0.0.weight/target_distance" in logged
    for tag, value in printed.items():
        assert logged[tag] == [(300, pytest.approx(float(value), abs=0.051))]
    # The saved average loads in plain SB3 and plays as the averaged policy did.
    model = SAC.load(run_dir / "sac_ema.zip", device="cpu")
    env = make_vec_env("Pendulum-v1", n_envs=1)
    env.seed(10_000 + 3)
    mean, _ = evaluate_policy(model, env, n_eval_episodes=1, deterministic=True)
    assert mean == pytest.approx(float(printed["eval/ema_return"]), abs=0.051)


def test_example_soup_averages_the_seeds_and_evaluates_each(tmp_path):
    options = ("--seeds", "0", "1", "--logdir", str(tmp_path), "--episodes", "1")
    for_train = ("--learning-starts", "100", "--eval-every", "0", "--eval-episodes", "1")
    out = run_script("example_soup.py", *options, "--steps", "300", *for_train)
    runs = [tmp_path / "sac-s0" / "model.pt", tmp_path / "sac-s1" / "model.pt"]
    for command in ("train", "soup", "evaluate"):
        assert f"$ rlweights {command} " in out
    soup = torch.load(tmp_path / "soup.pt", weights_only=True)
    assert soup["averaged_from"] == [str(r) for r in runs]
    a, b = (torch.load(r, weights_only=True)["weights"] for r in runs)
    assert set(soup["weights"]) == set(a) >= {"actor", "critic", "critic_target"}
    assert not torch.equal(a["actor"]["trunk.0.weight"], b["actor"]["trunk.0.weight"])
    for net, weights in a.items():
        assert set(soup["weights"][net]) == set(weights)
        for key, value in weights.items():
            got = soup["weights"][net][key]
            if value.is_floating_point():  # the float64 mean, rounded to the weights' dtype
                want = (value.double() + b[net][key].double()) / 2
                assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(got, value)
    table = dict(re.findall(r"^\| (\S+) \| (-?[\d.]+) \| [\d.]+ \|$", out, re.MULTILINE))
    assert set(table) == {"sac-s0", "sac-s1", "soup"}, out
    assert all(WORST_PENDULUM_RETURN <= float(v) <= 0 for v in table.values())
