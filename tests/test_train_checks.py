"""What ``rlweights train`` and ``rlweights evaluate`` check before they write or allocate
anything, and what a run reports about itself: one line and exit code 2 for bad input."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from rlweights.agents.checkpoint import load_checkpoint
from rlweights.agents.registry import make_config
from rlweights.agents.train import train
from rlweights.cli import main

TINY_FLAGS = ["--hidden", "8,8", "--batch-size", "16", "--learning-starts", "20"]
TINY_FLAGS += ["--eval-episodes", "2", "--no-progress"]


def _one_error(capsys, command: str = "train") -> str:
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"rlweights {command}: error: "), line
    return line


def _refused(tmp_path: Path, capsys, *args: str) -> str:
    """Run ``rlweights train ARGS``: it must fail with one line and write nothing."""
    code = main(["train", "--steps", "40", *TINY_FLAGS, *args, "--logdir", str(tmp_path / "runs")])
    line = _one_error(capsys)
    assert code == 2
    assert not (tmp_path / "runs").exists()
    return line


class _Actions(gym.Env):
    """An environment with the action space given at registration."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)

    def __init__(self, low=-1.0, high=1.0, shape=(1,)):
        self.action_space = gym.spaces.Box(low, high, shape, np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(3, np.float32), {}

    def step(self, action):
        return np.zeros(3, np.float32), float(np.sum(action)), False, False, {}


@pytest.fixture
def registered():
    """Register ``rlweights-test/Actions-vN`` environments for one test."""
    made = []

    def register(version: int, **kwargs) -> str:
        env_id = f"rlweights-test/Actions-v{version}"
        gym.register(env_id, entry_point=_Actions, max_episode_steps=20, kwargs=kwargs)
        made.append(env_id)
        return env_id

    yield register
    for env_id in made:
        gym.registry.pop(env_id, None)


@pytest.mark.parametrize("env_id", [":", "a:b:c", ":Pendulum-v1", "gymnasium:", "a b:Env-v0"])
def test_a_malformed_environment_id_is_one_line_naming_the_format(tmp_path, capsys, env_id):
    line = _refused(tmp_path, capsys, "--env", env_id)
    assert f"--env {env_id!r}" in line and "[module:]Name-vN" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--reset-layers", "critic.*"], "--reset-layers 'critic.*' chooses what --reset-every"),
        (["--reset-every", "50", "--reset-layers", ","], "--reset-layers ',' names no pattern"),
        (["--shrink-perturb", "0.5,0.5", "--sp-every", "50", "--reset-layers", " , "], "names no"),
        (["--unit-sphere", ","], "--unit-sphere ',' names no pattern"),
    ],
)
@pytest.mark.parametrize("impl", ["native", "sb3"])
def test_reset_layers_alone_or_without_patterns_is_refused(tmp_path, capsys, args, message, impl):
    """--reset-layers without --reset-every or --shrink-perturb did nothing; a list of no
    patterns (',') reset every tensor."""
    if impl == "sb3":
        pytest.importorskip("stable_baselines3")
    line = _refused(tmp_path, capsys, "--impl", impl, *args)
    assert message in line


def test_the_library_refuses_empty_reset_patterns_too():
    with pytest.raises(ValueError, match="names no pattern"):
        train(make_config("sac", hidden=(8,), reset_every=10, reset_layers=",", total_steps=20))
    with pytest.raises(ValueError, match="chooses what --reset-every"):
        make_config("sac", reset_layers="critic.*")


@pytest.mark.parametrize(
    ("space", "words"),
    [
        ({"shape": (2, 2)}, "Box(-1.0, 1.0, (2, 2), float32)"),
        ({"low": -np.inf, "high": np.inf}, "Box(-inf, inf, (1,), float32)"),
        ({"low": 0.0, "high": np.inf}, "Box(0.0, inf, (1,), float32)"),
    ],
)
@pytest.mark.parametrize(("algo", "impl"), [("sac", "native"), ("td3", "native"), ("sac", "sb3")])
def test_action_boxes_the_agents_cannot_act_in_are_one_line(
    tmp_path, capsys, registered, space, words, algo, impl
):
    """A (2, 2) action Box crashed; an unbounded one trained on NaN actions (native) or
    raised an AssertionError (--impl sb3)."""
    if impl == "sb3":
        pytest.importorskip("stable_baselines3")
    env_id = registered(0, **space)
    line = _refused(tmp_path, capsys, "--algo", algo, "--impl", impl, "--env", env_id)
    assert f"{env_id} has {words}" in line
    assert "a 1-D Box with finite bounds" in line and "gymnasium.ActionWrapper" in line


def test_a_bounded_flat_action_box_still_trains(tmp_path, registered):
    env_id = registered(1, low=-2.0, high=3.0, shape=(2,))
    args = ["train", "--env", env_id, "--steps", "40", *TINY_FLAGS]
    assert main([*args, "--logdir", str(tmp_path), "--run-name", "r"]) == 0


@pytest.mark.parametrize("impl", ["native", "sb3"])
@pytest.mark.parametrize(
    ("args", "part", "fix"),
    [
        (["--batch-size", "1e10"], "a gradient step's batch", "lower --batch-size"),
        (["--eval-episodes", "1e9"], "evaluation environments", "lower --eval-episodes"),
    ],
)
def test_a_batch_or_environments_larger_than_the_memory_are_refused_first(
    tmp_path, capsys, impl, args, part, fix
):
    """A batch was allocated at the first gradient step: after the run's files were
    written, until the memory ran out. The fix named is the flag of the largest part."""
    if impl == "sb3":
        pytest.importorskip("stable_baselines3")
    line = _refused(tmp_path, capsys, "--impl", impl, *args)
    assert "this run needs about" in line and f"{part} " in line and fix in line


def test_the_memory_estimate_counts_a_gradient_step_s_batch():
    from rlweights.agents.memory import memory_needed

    config = make_config("sac", "Pendulum-v1", batch_size=100)
    space = gym.make("Pendulum-v1")
    need = memory_needed(config, space.observation_space, space.action_space, "native")
    row = 4 * (2 * 3 + 2) + 4 * 1  # obs, next obs, reward, done; one action
    assert need["a gradient step's batch"] >= 100 * (row + 4 * (256 + 256))  # the outputs
    evaluation = memory_needed(config, space.observation_space, space.action_space, "native", True)
    assert evaluation["a gradient step's batch"] == 0  # an evaluation trains nothing


def _poison(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.fill_(float("nan"))


@pytest.mark.parametrize("algo", ["dqn", "sac", "td3"])
def test_non_finite_weights_mark_a_native_run_diverged(algo):
    """A DQN whose weights were NaN acted by argmax (action 0) and reported a finite return
    with diverged: false."""

    def poison_policy(steps, agent):
        _poison(agent.policy_network)
        return {}

    config = make_config(
        algo, hidden=(8,), total_steps=40, learning_starts=20, batch_size=16, eval_episodes=1
    )
    _, summary = train(config, monitor=poison_policy, monitor_every=40)
    assert summary["diverged"] is True
    _, healthy = train(config)
    assert healthy["diverged"] is False


def test_non_finite_weights_mark_an_sb3_run_diverged(tmp_path, monkeypatch, capsys):
    pytest.importorskip("stable_baselines3")
    from rlweights.agents import sb3_train

    evaluate = sb3_train.SB3Run.evaluate

    def poisoned_final_evaluation(run, interruptible=False):
        if interruptible:  # the final one
            _poison(run.model.q_net)
        return evaluate(run, interruptible)

    monkeypatch.setattr(sb3_train.SB3Run, "evaluate", poisoned_final_evaluation)
    args = ["train", "--impl", "sb3", "--algo", "dqn", "--steps", "40", *TINY_FLAGS]
    assert main([*args, "--logdir", str(tmp_path), "--run-name", "r"]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["final_eval_return"] is not None  # argmax of NaN: a finite return
    assert summary["diverged"] is True
    assert "the run diverged" in capsys.readouterr().out


def test_evaluate_names_a_stable_baselines3_zip_and_what_to_run(tmp_path, capsys):
    """evaluate on SB3's own model.zip said 'not a readable checkpoint ([enforce fail at
    inline_container.cc:180])'."""
    sb3 = pytest.importorskip("stable_baselines3")
    model = sb3.DQN("MlpPolicy", "CartPole-v1", policy_kwargs={"net_arch": [8]}, device="cpu")
    model.save(tmp_path / "model.zip")
    before = (tmp_path / "model.zip").read_bytes()
    assert main(["evaluate", str(tmp_path / "model.zip")]) == 2
    line = _one_error(capsys, "evaluate")
    assert f"{tmp_path / 'model.zip'} is a Stable-Baselines3 model" in line
    assert "stable_baselines3.DQN.load" in line and "evaluate_policy" in line
    assert (tmp_path / "model.zip").read_bytes() == before


class _Signalling(_Actions):
    """Sends this process SIGTERM when it is made while ``armed`` (once); counts the
    environments made after that."""

    armed = False
    made_after = 0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if _Signalling.armed:
            _Signalling.armed = False
            os.kill(os.getpid(), signal.SIGTERM)
        elif _Signalling.made_after >= 0:
            _Signalling.made_after += 1


def _signal_while_making(monkeypatch, count: int) -> None:
    """SIGTERM as the first of ``count`` environments made together is being made."""
    from rlweights.agents import evaluation, train
    from rlweights.agents.environments import make_envs

    def arming(env_id, num_envs, *args, **kwargs):
        if num_envs == count:
            _Signalling.armed, _Signalling.made_after = True, 0
        return make_envs(env_id, num_envs, *args, **kwargs)

    _Signalling.armed, _Signalling.made_after = False, -1  # -1: no signal sent yet
    for module in (train, evaluation):  # a run's environments, an evaluation's
        monkeypatch.setattr(module, "make_envs", arming)


@pytest.fixture
def signalling():
    env_id = "rlweights-test/Signalling-v0"
    gym.register(env_id, entry_point=_Signalling, max_episode_steps=20)
    yield env_id
    gym.registry.pop(env_id, None)


def test_a_stop_signal_while_the_environments_are_made_stops_at_once(
    tmp_path, capsys, monkeypatch, signalling
):
    """SIGTERM while the run's environments were made was honoured only once all of them
    (and the networks and the replay buffer) existed."""
    _signal_while_making(monkeypatch, 6)
    args = ["train", "--env", signalling, "--num-envs", "6", "--steps", "60", *TINY_FLAGS]
    code = main([*args, "--logdir", str(tmp_path), "--run-name", "r"])
    assert code == 128 + signal.SIGTERM
    assert _Signalling.made_after == 0
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        "rlweights train: stopped by SIGTERM before the first checkpoint; start the run "
        f"again with: rlweights train --resume {tmp_path / 'r'}"
    )
    assert not (tmp_path / "r" / "model.pt").exists()
    monkeypatch.undo()  # no more signals
    assert main(["train", "--resume", str(tmp_path / "r"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["steps"] == 60


@pytest.mark.parametrize("impl", ["native", "sb3"])
def test_a_stop_signal_while_an_evaluation_makes_its_environments_stops_at_once(
    tmp_path, capsys, monkeypatch, signalling, impl
):
    """An evaluation makes one environment per episode; a stop signal waited for all of
    them and the evaluation's episodes."""
    if impl == "sb3":
        pytest.importorskip("stable_baselines3")
    _signal_while_making(monkeypatch, 7)
    args = ["train", "--impl", impl, "--env", signalling, "--steps", "60", "--eval-every", "30"]
    args += TINY_FLAGS
    code = main([*args, "--eval-episodes", "7", "--logdir", str(tmp_path), "--run-name", "r"])
    assert code == 128 + signal.SIGTERM
    assert _Signalling.made_after == 0
    run = tmp_path / "r"
    assert load_checkpoint(run)["steps"] == 30
    err = capsys.readouterr().err
    assert f"stopped by SIGTERM during training; the checkpoint of step 30 is in {run}" in err
    monkeypatch.undo()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 60
