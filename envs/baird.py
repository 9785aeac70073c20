"""Baird's counterexample (Baird 1995; Sutton & Barto, *Reinforcement Learning: An
Introduction*, 2nd ed., example 11.1), as a Gymnasium environment."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from gymnasium import Env, spaces

from rlweights.checks import check_choice

__all__ = ["BairdCounterexample"]

N_STATES = 7
DASHED, SOLID = 0, 1


def _features() -> np.ndarray:
    """The book's linear features, one row per state: the six upper states ``i`` have
    ``2 w_i + w_8`` (x = 2 e_i + e_8), the lower state has ``w_7 + 2 w_8``."""
    x = np.zeros((N_STATES, 8), dtype=np.float32)
    for i in range(6):
        x[i, i] = 2.0
        x[i, 7] = 1.0
    x[6, 6] = 1.0
    x[6, 7] = 2.0
    return x


class BairdCounterexample(Env[np.ndarray, np.int64]):
    """
    ## Description

    Baird's counterexample, the classic case where off-policy semi-gradient TD(0) with linear
    function approximation diverges (Sutton & Barto, 2nd ed., example 11.1 and figure 11.2):
    seven states, two actions, every reward zero, so every true value is 0, and yet the
    weights of the book's linear value function grow without bound when the state
    distribution is the behaviour policy's.

    The *dashed* action moves to one of the six upper states, uniformly; the *solid* action
    moves to the seventh, lower state. The book's behaviour policy takes dashed with
    probability 6/7 (``BEHAVIOUR_PROBS``), which makes the next state uniform over all seven;
    its target policy always takes solid (``TARGET_PROBS``), so the importance-sampling
    ratio of a transition is 7 for solid and 0 for dashed. The book uses ``gamma = 0.99``,
    step size 0.01 and the initial weights ``INITIAL_WEIGHTS`` = (1, 1, 1, 1, 1, 1, 10, 1).

    ## Action Space

    `Discrete(2)`: 0 = dashed (to an upper state, uniformly), 1 = solid (to the lower state).

    ## Observation Space

    `Box(0, 2, (8,), float32)`: the book's feature vector of the current state (``FEATURES``,
    one row per state): upper state ``i`` (0-5) is ``2 e_i + e_7``, the lower state (6) is
    ``e_6 + 2 e_7``, so the value is ``FEATURES[s] @ w`` for a weight vector ``w`` of 8.
    ``info["state"]`` holds the state index (0-6).

    ## Rewards

    0 on every transition.

    ## Starting State

    Uniform over the seven states (the behaviour policy's stationary distribution).

    ## Episode End

    The task is continuing: it never terminates. Registered with
    ``max_episode_steps=1000`` (truncation); with a time limit of your own or none, use
    ``gymnasium.make(..., max_episode_steps=N)``.

    ## Arguments

    ```python
    >>> import gymnasium as gym
    >>> import rlweights.envs  # registers the rlweights/ environments
    >>> env = gym.make("rlweights/BairdCounterexample-v0")
    >>> env.reset(seed=0)
    (array([0., 0., 0., 0., 0., 2., 0., 1.], dtype=float32), {'state': 5})

    ```

    `render_mode="ansi"` renders the state as text.

    ## Version History

    * v0: Initial version.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi"], "render_fps": 4}

    FEATURES = _features()
    INITIAL_WEIGHTS = np.array([1, 1, 1, 1, 1, 1, 10, 1], dtype=np.float64)
    BEHAVIOUR_PROBS = np.array([6 / 7, 1 / 7])
    TARGET_PROBS = np.array([0.0, 1.0])
    GAMMA = 0.99

    def __init__(self, render_mode: str | None = None):
        if render_mode is not None:
            check_choice(
                render_mode,
                tuple(self.metadata["render_modes"]),
                "render_mode",
                "BairdCounterexample",
            )
        self.render_mode = render_mode
        self.observation_space = spaces.Box(0.0, 2.0, shape=(8,), dtype=np.float32)
        self.action_space = spaces.Discrete(2)
        self.state: int | None = None

    def _obs(self) -> np.ndarray:
        return self.FEATURES[self.state].copy()

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.state = int(self.np_random.integers(N_STATES))
        return self._obs(), {"state": self.state}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self.state is None:
            raise RuntimeError("call reset() before step()")
        if not self.action_space.contains(action):
            raise ValueError(f"action must be 0 (dashed) or 1 (solid), got {action!r}")
        if int(action) == SOLID:
            self.state = N_STATES - 1
        else:
            self.state = int(self.np_random.integers(N_STATES - 1))
        return self._obs(), 0.0, False, False, {"state": self.state}

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        upper = " ".join("*" if i == self.state else "o" for i in range(N_STATES - 1))
        lower = "*" if self.state == N_STATES - 1 else "o"
        return f"upper: {upper} | lower: {lower}\n"
