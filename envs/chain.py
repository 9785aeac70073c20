"""A corridor (chain) MDP whose optimal action values are known exactly."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from gymnasium import Env, spaces

from rlweights.checks import check_choice, check_int

__all__ = ["Chain", "value_iteration"]

LEFT, RIGHT = 0, 1


def value_iteration(
    transitions: np.ndarray, rewards: np.ndarray, gamma: float, tol: float = 1e-12
) -> np.ndarray:
    """Q* of a finite MDP: ``transitions[s, a, s']`` probabilities, ``rewards[s, a, s']``
    rewards, terminal states having all-zero rows. Iterates the Bellman optimality operator
    (a ``gamma``-contraction) until the largest change is below ``tol``."""
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"value_iteration: gamma must be in [0, 1), got {gamma!r}")
    expected = (transitions * rewards).sum(axis=2)
    q = np.zeros(transitions.shape[:2])
    while True:
        new = expected + gamma * transitions @ q.max(axis=1)
        if np.max(np.abs(new - q)) < tol:
            return new
        q = new


class Chain(Env[np.ndarray, np.int64]):
    """
    ## Description

    A corridor of ``length`` cells. The agent starts in the leftmost cell and the episode
    ends with reward 1 when it reaches the rightmost one; every other step gives 0. With
    probability ``slip`` the chosen move goes the other way. The optimal action values are
    known exactly (``optimal_q``, by value iteration over the MDP's transition model),
    so the error of a learned Q-function can be measured against the truth, e.g. to compare
    target-network update routines.

    ## Action Space

    `Discrete(2)`: 0 = left, 1 = right. Moving left in the leftmost cell stays there.

    ## Observation Space

    `Box(0, 1, (length,), float32)`: the one-hot position. ``info["state"]`` holds the cell
    index (0 to ``length - 1``).

    ## Rewards

    1 for the step that enters the rightmost cell, 0 otherwise.

    ## Starting State

    The leftmost cell (0).

    ## Episode End

    Termination: the agent enters the rightmost cell. Truncation: registered with
    ``max_episode_steps=100`` (enough for the default corridor; pass ``max_episode_steps``
    to ``gymnasium.make`` with a longer ``length``). Truncation is not termination:
    ``optimal_q`` gives the values of the discounted MDP without a time limit, which a
    learner that bootstraps through truncations (as the rlweights agents and SB3 do)
    estimates.

    ## Arguments

    ```python
    >>> import gymnasium as gym
    >>> import rlweights.envs  # registers the rlweights/ environments
    >>> env = gym.make("rlweights/Chain-v0", length=5, slip=0.1)
    >>> env.reset(seed=0)
    (array([1., 0., 0., 0., 0.], dtype=float32), {'state': 0})
    >>> env.unwrapped.optimal_q(gamma=0.9).round(3)[:2]  # rows: cells; columns: left, right
    array([[0.614, 0.674],
           [0.623, 0.757]])

    ```

    | Parameter | Type | Default | Description |
    |---|---|---|---|
    | `length` | **int** | `10` | number of cells (>= 2) |
    | `slip` | **float** | `0.1` | probability that a move goes the other way, in [0, 0.5) |

    `render_mode="ansi"` renders the corridor as text.

    ## Version History

    * v0: Initial version.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, length: int = 10, slip: float = 0.1, render_mode: str | None = None):
        check_int(length, "length", "Chain", minimum=2)
        if not isinstance(slip, (int, float)) or not 0.0 <= slip < 0.5:
            raise ValueError(
                f"Chain: slip must be in [0, 0.5) (at 0.5 the actions are the same), got {slip!r}"
            )
        if render_mode is not None:
            check_choice(render_mode, tuple(self.metadata["render_modes"]), "render_mode", "Chain")
        self.length, self.slip, self.render_mode = length, float(slip), render_mode
        self.observation_space = spaces.Box(0.0, 1.0, shape=(length,), dtype=np.float32)
        self.action_space = spaces.Discrete(2)
        self.state: int | None = None

    def _obs(self) -> np.ndarray:
        obs = np.zeros(self.length, dtype=np.float32)
        obs[self.state] = 1.0
        return obs

    def _move(self, state: int, direction: int) -> int:
        return min(max(state + (1 if direction == RIGHT else -1), 0), self.length - 1)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.state = 0
        return self._obs(), {"state": self.state}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self.state is None:
            raise RuntimeError("call reset() before step()")
        if not self.action_space.contains(action):
            raise ValueError(f"action must be 0 (left) or 1 (right), got {action!r}")
        direction = int(action)
        if self.np_random.random() < self.slip:
            direction = 1 - direction
        self.state = self._move(self.state, direction)
        terminated = self.state == self.length - 1
        return self._obs(), float(terminated), terminated, False, {"state": self.state}

    def model(self) -> tuple[np.ndarray, np.ndarray]:
        """The MDP: ``transitions[s, a, s']`` and ``rewards[s, a, s']`` (the rightmost cell is
        terminal: its rows are zero)."""
        n = self.length
        transitions = np.zeros((n, 2, n))
        rewards = np.zeros((n, 2, n))
        for s in range(n - 1):
            for a in (LEFT, RIGHT):
                transitions[s, a, self._move(s, a)] += 1.0 - self.slip
                transitions[s, a, self._move(s, 1 - a)] += self.slip
            rewards[s, :, n - 1] = 1.0
        return transitions, rewards

    def optimal_q(self, gamma: float = 0.99) -> np.ndarray:
        """Q*(s, a) for every cell and action (shape ``(length, 2)``; the terminal cell's
        row is 0), by value iteration to 1e-12."""
        return value_iteration(*self.model(), gamma)

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        cells = ["A" if i == self.state else "." for i in range(self.length)]
        cells[-1] = "G" if self.state != self.length - 1 else "A"
        return "".join(cells) + "\n"
