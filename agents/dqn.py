"""Deep Q-Network (discrete actions) built on rlweights.

As in SB3's DQN: epsilon-greedy exploration with a linear schedule, Huber loss, gradient-norm
clipping, and the target network moved by an rlweights routine at DQN's update point, which
is an environment step, not a gradient step (SB3's, see :mod:`rlweights.sb3.patching`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value
from torch.nn import functional as F

from rlweights.agents.common import AgentConfig, OffPolicyAgent, adam
from rlweights.agents.compiled import CompiledStep, adam_, prepare_adam
from rlweights.agents.networks import mlp

__all__ = ["DQN", "DQNConfig"]


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
    exploration_fraction: float = 0.16
    exploration_initial_eps: float = 1.0
    exploration_final_eps: float = 0.04
    max_grad_norm: float = 10.0

    def _rules(self) -> dict[str, bool]:
        return {
            **super()._rules(),
            "exploration_fraction": 0.0 <= self.exploration_fraction <= 1.0,
            "exploration_initial_eps": 0.0 <= self.exploration_initial_eps <= 1.0,
            "exploration_final_eps": 0.0 <= self.exploration_final_eps <= 1.0,
            "max_grad_norm": self.max_grad_norm > 0.0,
        }


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
        self.optimizers["q"] = adam(self.networks["q"].parameters(), config.learning_rate)
        self._setup_routines(("q",), "q", per_env_step=True)
        self.compiled: CompiledStep | None = None
        if config.compile:
            prepare_adam(self.optimizers["q"])
            self.compiled = self.compiled_step(self.functional_update, "DQN's gradient step")

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

    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """One gradient step of the Q-network (then the policy EMA); the target update is
        not part of it (:meth:`on_env_step`). ``--compile``: :meth:`functional_update`."""
        if self.compiled is not None and not self.compiled.failed:
            fields = [batch[k] for k in ("obs", "actions", "rewards", "next_obs", "dones")]
            out = self.compiled(*fields)
            if out is not None:
                self.count_update()
                return {"loss": out}
        loss = self.loss(batch, self.td_target(batch))
        self.optimizer_step("q", loss, max_grad_norm=self.config.max_grad_norm)
        self.average_policy()
        self.count_update()
        return {"loss": loss}

    def loss(
        self, batch: dict[str, Tensor], target: Tensor, params: dict[str, Tensor] | None = None
    ) -> Tensor:
        """The Huber loss of the taken actions' Q-values toward the TD ``target``
        (``params``: the Q-network's parameters to use instead of its own)."""
        q_all = (
            self.q(batch["obs"])
            if params is None
            else functional_call(self.q, params, (batch["obs"],))
        )
        q = q_all.gather(-1, batch["actions"].long().unsqueeze(-1)).squeeze(-1)
        return F.smooth_l1_loss(q, target)

    def functional_update(self, obs, actions, rewards, next_obs, dones) -> Tensor:
        """:meth:`update` for ``torch.compile(fullgraph=True)``: gradients by ``torch.func``,
        their norm clipped as ``clip_grad_norm_`` clips it, Adam on the optimizer's state, the
        bound constraints, the policy EMA."""
        batch = {"obs": obs, "actions": actions, "rewards": rewards, "next_obs": next_obs}
        batch["dones"] = dones
        target = self.td_target(batch)
        params = dict(self.q.named_parameters())
        detached = {name: t.detach() for name, t in params.items()}
        grads, loss = grad_and_value(lambda p: self.loss(batch, target, p))(detached)
        grads = list(grads.values())
        max_norm = self.config.max_grad_norm
        if max_norm is not None:
            total = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads])
            )
            scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
            grads = [g * scale for g in grads]
        adam_(self.optimizers["q"], list(params.values()), grads)
        self.constrain_bound("q")
        self.average_policy()
        return loss.detach()

    @torch.no_grad()
    def td_target(self, batch: dict[str, Tensor]) -> Tensor:
        """reward + gamma * max over actions of the target network."""
        next_q = self.networks["q_target"](batch["next_obs"]).max(-1)[0]
        return batch["rewards"] + self.config.gamma * (1 - batch["dones"]) * next_q

    def on_env_step(self) -> None:
        """DQN's update point: the target routine counts environment steps."""
        self.target_routine.step()
