"""Deep Q-Network (discrete actions) built on rlweights.

As in SB3's DQN: epsilon-greedy exploration with a linear schedule, Huber loss, gradient-norm
clipping, and the target network moved by an rlweights routine at DQN's update point, which
is an environment step, not a gradient step (SB3's, see ``rlweights.sb3.patching``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rlweights.agents.agent import OffPolicyAgent, make_adam
from rlweights.agents.config import AgentConfig, setting
from rlweights.agents.networks import mlp

__all__ = ["DQN", "DQNConfig"]


def _fraction(value: float) -> bool:
    return 0.0 <= value <= 1.0


@dataclass
class DQNConfig(AgentConfig):
    """Defaults: rl-baselines3-zoo's DQN hyperparameters for CartPole-v1 (128 gradient steps
    every 256 environment steps, a hard target copy every 10 environment steps, epsilon from
    1 to 0.04 over the first 16 % of training) and SB3's Huber loss and gradient clipping."""

    algo: ClassVar[str] = "dqn"
    env_id: str = "CartPole-v1"
    total_steps: int = 50_000
    buffer_size: int = 100_000
    batch_size: int = 64
    learning_starts: int = 1000
    learning_rate: float = 2.3e-3
    train_freq: int = 256
    gradient_steps: int = 128
    target_update: str = "hard:10"
    exploration_fraction: float = setting(
        0.16,
        "share of the run over which epsilon falls from its initial to its final value",
        rule=_fraction,
        metavar="F",
        sb3="exploration_fraction",
    )
    exploration_initial_eps: float = setting(
        1.0, "epsilon at the start", rule=_fraction, metavar="EPS", sb3="exploration_initial_eps"
    )
    exploration_final_eps: float = setting(
        0.04, "epsilon at the end", rule=_fraction, metavar="EPS", sb3="exploration_final_eps"
    )
    max_grad_norm: float = setting(
        10.0,
        "clip the gradient's global L2 norm to this value",
        rule=lambda v: v > 0.0,
        metavar="NORM",
        sb3="max_grad_norm",
    )


class DQN(OffPolicyAgent):
    """Network ``q`` (+ ``q_target``), its optimizer and the rlweights routines."""

    name = "DQN"
    actions = (
        gym.spaces.Discrete,
        "discrete",
        "use --algo sac or --algo td3 for continuous actions",
    )

    def __init__(self, config: DQNConfig, observation_space: gym.Space, action_space: gym.Space):
        self.check_spaces(config.env_id, observation_space, action_space)
        super().__init__(config)
        obs_dim = int(np.prod(observation_space.shape))
        self.n_actions = int(action_space.n)
        self.networks["q"] = mlp([obs_dim, *config.hidden, self.n_actions]).to(self.device)
        self.optimizers["q"] = make_adam(self.networks["q"].parameters(), config.learning_rate)
        self._setup_routines(("q",), "q", per_env_step=True)

    @property
    def q(self) -> nn.Module:
        return self.networks["q"]

    def epsilon(self, steps: int) -> float:
        """SB3's linear schedule: from the initial to the final value over the first
        ``exploration_fraction`` of ``total_steps``, then constant."""
        cfg = self.config
        progress = steps / (cfg.exploration_fraction * cfg.total_steps or 1)
        start, end = cfg.exploration_initial_eps, cfg.exploration_final_eps
        return end if progress >= 1.0 else start + progress * (end - start)

    @torch.no_grad()
    def act(self, obs: Tensor, steps: int = 0) -> Tensor:
        greedy = self.q(obs).argmax(-1)
        explore = torch.rand(len(obs), device=obs.device) < self.epsilon(steps)
        random = torch.randint(self.n_actions, (len(obs),), device=obs.device)
        return torch.where(explore, random, greedy)

    @torch.no_grad()
    def policy(self, obs: Tensor, network: nn.Module | None = None) -> Tensor:
        return (network or self.q)(obs).argmax(-1)

    def step_inputs(self, batch_size: int) -> tuple[()]:
        """A DQN step draws nothing."""
        return ()

    def gradient_step(self, obs, actions, rewards, next_obs, terminated):
        """One gradient step of the Q-network, in SB3's order: the TD target from the target
        network, the Huber loss of the taken actions' Q-values, the step (its gradient norm
        clipped), then the policy EMA. The target update is not part of it: it counts
        environment steps (``on_env_step``)."""
        with torch.no_grad():
            next_q = self.networks["q_target"](next_obs).max(-1)[0]
            target = rewards + self.config.gamma * (1 - terminated) * next_q

        def loss(q: nn.Module) -> Tensor:
            taken = q(obs).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
            return F.smooth_l1_loss(taken, target)

        loss_value = self.minimize("q", loss, max_grad_norm=self.config.max_grad_norm)
        self.average_policy()
        return {"loss": loss_value}

    def on_env_step(self) -> None:
        """DQN's update point: the target routine counts environment steps."""
        self.target_routine.step()
