"""The learning goals of the native agents with the CLI defaults, seed 0 (slow).

Run with ``python -m pytest -m slow tests/test_learning.py``; measured results are recorded
in docs/benchmarks.md. Same seed, same run on the CPU, so the numbers there reproduce.
"""

from __future__ import annotations

import pytest

from rlweights.agents.train import make_config, train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("algo", "env_id", "max_steps", "goal"),
    [
        ("sac", "Pendulum-v1", 20_000, -200.0),
        ("td3", "Pendulum-v1", 20_000, -200.0),
        ("dqn", "CartPole-v1", 50_000, 475.0),
    ],
)
def test_learning_goal_with_cli_defaults(tmp_path, algo, env_id, max_steps, goal):
    config = make_config(algo)
    assert config.env_id == env_id and config.total_steps <= max_steps and config.seed == 0
    _, summary = train(config, tmp_path)
    assert summary["eval_episodes"] == 10
    assert summary["final_eval_return"] >= goal, summary
