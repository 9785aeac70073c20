"""Soft Actor-Critic (continuous actions) built on rlweights.

Small and readable in the CleanRL spirit, but importable. The critic's two Q-networks are
batched (one ``baddbmm`` per layer for both); the target critic is kept by ``rw.make_target``
and updated by an rlweights routine after every gradient step; all networks live in flat
storage; Adam is fused; the actor's loss reads the critic through detached weights, so its
backward pass computes no critic weight gradients that would be thrown away.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import gymnasium as gym
import numpy as np
import torch
from rlweights.agents.common import AgentConfig, OffPolicyAgent, adam, mlp
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["SAC", "Actor", "ContinuousAgent", "SACConfig", "TwinQ"]

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


@dataclass
class SACConfig(AgentConfig):
    """Defaults: rl-baselines3-zoo's SAC hyperparameters for Pendulum-v1 (SB3's defaults with
    a learning rate of 1e-3), automatic entropy temperature with target entropy -dim(A).
    10k steps instead of the zoo's 20k: the evaluation return is already at the zoo's level
    then (docs/benchmarks.md), and the default run of ``rlweights train`` stays short."""

    algo: ClassVar[str] = "sac"
    env_id: str = "Pendulum-v1"
    total_steps: int = 10_000
    learning_rate: float = 1e-3


class Actor(nn.Module):
    """A tanh-squashed Gaussian policy scaled to the action bounds."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...], low, high):
        super().__init__()
        self.trunk = mlp([obs_dim, *hidden], activate_last=True)
        self.mean = nn.Linear(hidden[-1], act_dim)
        self.log_std = nn.Linear(hidden[-1], act_dim)
        low, high = (
            torch.as_tensor(low, dtype=torch.float32),
            torch.as_tensor(high, dtype=torch.float32),
        )
        self.register_buffer("scale", (high - low) / 2)
        self.register_buffer("bias", (high + low) / 2)

    def forward(self, obs: Tensor, deterministic: bool = False) -> tuple[Tensor, Tensor]:
        """(action, log-probability of it)."""
        h = self.trunk(obs)
        mean = self.mean(h)
        if deterministic:
            return torch.tanh(mean) * self.scale + self.bias, torch.zeros(
                len(obs), device=obs.device
            )
        log_std = self.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX)
        noise = torch.randn_like(mean)
        pre = mean + log_std.exp() * noise
        squashed = torch.tanh(pre)
        log_prob = (-0.5 * noise.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        # Change of variables for tanh and the affine scaling (numerically stable form).
        log_prob -= (2 * (math.log(2) - pre - F.softplus(-2 * pre))).sum(-1)
        log_prob -= torch.log(self.scale).sum()
        return squashed * self.scale + self.bias, log_prob


class TwinQ(nn.Module):
    """Two Q-networks evaluated together: every layer is one batched matmul for both.

    Weights are stored as (networks, inputs, outputs) so that ``baddbmm`` needs no transpose;
    :meth:`unit_weights` gives the (outputs, inputs) view of each network's layer that a
    per-unit constraint such as max-norm works on.
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...], n: int = 2):
        super().__init__()
        sizes = [in_dim, *hidden, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for n_in, n_out in itertools.pairwise(sizes):
            bound = 1 / math.sqrt(n_in)  # nn.Linear's default initialisation, per network
            self.weights.append(nn.Parameter(torch.empty(n, n_in, n_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(n, 1, n_out).uniform_(-bound, bound)))

    def forward(self, x: Tensor, detach_weights: bool = False) -> Tensor:
        """Q-values of shape (n, batch). ``detach_weights``: gradients flow to ``x`` only."""
        h = x.unsqueeze(0).expand(len(self.weights[0]), -1, -1)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            if detach_weights:
                w, b = w.detach(), b.detach()
            h = torch.baddbmm(b, h, w)
            if i < last:
                h = F.relu(h)
        return h.squeeze(-1)

    def unit_weights(self) -> list[Tensor]:
        return [w[i].t() for w in self.weights for i in range(len(w))]


class ContinuousAgent(OffPolicyAgent):
    """The part SAC and TD3 share: Box actions, the sizes of observations and actions."""

    actions = (gym.spaces.Box, "continuous (Box)", "use --algo dqn for discrete actions")

    def __init__(self, config: AgentConfig, observation_space: gym.Space, action_space: gym.Space):
        self.check_spaces(config.env_id, observation_space, action_space)
        super().__init__(config)
        self.obs_dim = int(np.prod(observation_space.shape))
        self.act_dim = int(np.prod(action_space.shape))

    @property
    def actor(self) -> nn.Module:
        return self.networks["actor"]

    @property
    def critic(self) -> TwinQ:
        return self.networks["critic"]

    def critic_step(self, batch: dict[str, Tensor], target: Tensor) -> Tensor:
        """One optimizer step of the twin critic toward the TD ``target``; the loss, the mean
        over both networks' squared errors (SB3's 0.5 * (mse_1 + mse_2))."""
        q = self.critic(torch.cat([batch["obs"], batch["actions"]], -1))
        loss = F.mse_loss(q, target.expand_as(q))
        self.optimizers["critic"].zero_grad(set_to_none=True)
        loss.backward()
        self.optimizers["critic"].step()
        return loss


class SAC(ContinuousAgent):
    """Networks ``actor``, ``critic`` (+ ``critic_target``), the entropy temperature, the
    optimizers and the rlweights routines."""

    name = "SAC"

    def __init__(self, config: SACConfig, observation_space: gym.Space, action_space: gym.Space):
        super().__init__(config, observation_space, action_space)
        obs_dim, act_dim, hidden = self.obs_dim, self.act_dim, config.hidden
        actor = Actor(obs_dim, act_dim, hidden, action_space.low, action_space.high)
        self.networks["actor"] = actor.to(self.device)
        self.networks["critic"] = TwinQ(obs_dim + act_dim, hidden).to(self.device)
        self.log_alpha = torch.zeros(1, device=self.device, requires_grad=True)
        self.target_entropy = -float(act_dim)
        lr = config.learning_rate
        self.optimizers["actor"] = adam(self.networks["actor"].parameters(), lr)
        self.optimizers["critic"] = adam(self.networks["critic"].parameters(), lr)
        self.optimizers["alpha"] = adam([self.log_alpha], lr)
        self._setup_routines(("critic",), "actor")

    @property
    def critic_target(self) -> TwinQ:
        return self.networks["critic_target"]

    @torch.no_grad()
    def act(self, obs: Tensor, steps: int = 0) -> Tensor:
        actor = self.actor  # a sample without its log-probability (not needed to act)
        h = actor.trunk(obs)
        log_std = actor.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX)
        pre = torch.addcmul(actor.mean(h), log_std.exp(), torch.randn_like(log_std))
        return torch.tanh(pre) * actor.scale + actor.bias

    @torch.no_grad()
    def policy(self, obs: Tensor, network: nn.Module | None = None) -> Tensor:
        return (network or self.actor)(obs, deterministic=True)[0]

    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """One gradient step of critic, actor and temperature, then the target update."""
        cfg = self.config
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            next_actions, next_log_prob = self.actor(batch["next_obs"])
            next_q = self.critic_target(torch.cat([batch["next_obs"], next_actions], -1)).min(0)[0]
            soft = next_q - alpha * next_log_prob
            target = batch["rewards"] + cfg.gamma * (1 - batch["dones"]) * soft
        critic_loss = self.critic_step(batch, target)

        actions, log_prob = self.actor(batch["obs"])
        q_pi = self.critic(torch.cat([batch["obs"], actions], -1), detach_weights=True).min(0)[0]
        actor_loss = (alpha * log_prob - q_pi).mean()
        self.optimizers["actor"].zero_grad(set_to_none=True)
        actor_loss.backward()
        self.optimizers["actor"].step()
        self.after_policy_step()

        # The temperature's loss is -(log_alpha * (log_prob + target_entropy)).mean(); its
        # gradient is written directly (a scalar: no autograd pass needed), then Adam steps.
        with torch.no_grad():
            self.log_alpha.grad = -(log_prob + self.target_entropy).mean().reshape(1)
        self.optimizers["alpha"].step()

        self.target_update.step()
        self.gradient_updates += 1
        entropy = -log_prob.detach().mean()
        return {
            "critic_loss": critic_loss,
            "actor_loss": actor_loss,
            "alpha": alpha,
            "entropy": entropy,
        }

    def averaged_tensors(self) -> list[torch.Tensor]:
        return [self.log_alpha]

    def _extra_state(self) -> dict:
        return {"log_alpha": self.log_alpha.detach().clone()}

    def _load_extra_state(self, state: dict) -> None:
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
