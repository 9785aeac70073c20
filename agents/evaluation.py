"""Evaluation: deterministic episodes of a policy on evaluation seeds that no training episode
uses."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from rlweights.agents.environments import make_envs

__all__ = ["EVAL_SEED_OFFSET", "evaluate"]


EVAL_SEED_OFFSET = 1_000_000  # evaluation episodes never reuse a training seed
"""Added to a run's seed for its evaluation episodes, so that they never reuse a training seed."""


def evaluate(
    policy: Callable[[torch.Tensor], torch.Tensor],
    env_id: str,
    episodes: int,
    seed: int,
    device: torch.device | str = "cpu",
    interrupted: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Returns of ``episodes`` episodes with the deterministic ``policy``, run side by side
    (one environment per episode, seeded ``seed``, ``seed + 1``, ...). When
    ``interrupted()`` becomes true (while the environments are made, or during the
    episodes) the evaluation stops with ``KeyboardInterrupt``."""
    envs = make_envs(env_id, episodes, interrupted)
    try:
        obs, _ = envs.reset(seed=seed)
        returns = np.zeros(episodes)
        done = np.zeros(episodes, dtype=bool)
        while not done.all():
            if interrupted is not None and interrupted():
                raise KeyboardInterrupt("evaluation")
            with torch.no_grad():
                actions = policy(torch.as_tensor(obs, dtype=torch.float32, device=device))
            obs, rewards, terminated, truncated, _ = envs.step(actions.cpu().numpy())
            returns += np.where(done, 0.0, rewards)
            done |= terminated | truncated
    finally:
        envs.close()
    return returns
