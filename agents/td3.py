"""Twin Delayed DDPG (continuous actions) built on rlweights.

As in Fujimoto et al. (2018) and SB3: a deterministic actor, twin critics (batched, as in
:mod:`agents.sac`), target policy smoothing, and delayed actor updates. Both targets (actor and
critic) share one flat buffer, so their rlweights update every ``policy_delay`` gradient steps
is a single pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import gymnasium as gym
import torch
from rlweights.agents.common import AgentConfig, adam, mlp
from rlweights.agents.sac import ContinuousAgent, TwinQ
from torch import Tensor, nn

__all__ = ["TD3", "DeterministicActor", "TD3Config"]


@dataclass
class TD3Config(AgentConfig):
    """Defaults: rl-baselines3-zoo's TD3 hyperparameters for Pendulum-v1 (gamma 0.98, 200k
    buffer, 10k random steps first, Gaussian exploration noise 0.1, 400-300 networks) and
    SB3's TD3 defaults for the rest (policy delay 2, target noise 0.2 clipped at 0.5)."""

    algo: ClassVar[str] = "td3"
    env_id: str = "Pendulum-v1"
    total_steps: int = 20_000
    gamma: float = 0.98
    buffer_size: int = 200_000
    learning_starts: int = 10_000
    hidden: tuple[int, ...] = (400, 300)
    policy_delay: int = 2
    target_policy_noise: float = 0.2
    target_noise_clip: float = 0.5
    exploration_noise: float = 0.1  # std of the Gaussian action noise, relative to the bounds

    def _rules(self) -> dict[str, bool]:
        return {
            **super()._rules(),
            "policy_delay": self.policy_delay >= 1,
            "target_policy_noise": self.target_policy_noise >= 0.0,
            "target_noise_clip": self.target_noise_clip >= 0.0,
            "exploration_noise": self.exploration_noise >= 0.0,
        }


class DeterministicActor(nn.Module):
    """``tanh`` of an MLP, scaled to the action bounds."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...], low, high):
        super().__init__()
        self.net = mlp([obs_dim, *hidden, act_dim])
        low = torch.as_tensor(low, dtype=torch.float32)
        high = torch.as_tensor(high, dtype=torch.float32)
        self.register_buffer("scale", (high - low) / 2)
        self.register_buffer("bias", (high + low) / 2)

    def forward(self, obs: Tensor) -> Tensor:
        return torch.tanh(self.net(obs)) * self.scale + self.bias


class TD3(ContinuousAgent):
    """Networks ``actor``, ``critic`` and their targets, optimizers and rlweights routines.

    The target routine steps after every delayed actor update (SB3's update point), so
    ``hard:EVERY`` copies every EVERY actor updates."""

    name = "TD3"

    def __init__(self, config: TD3Config, observation_space: gym.Space, action_space: gym.Space):
        super().__init__(config, observation_space, action_space)
        actor = DeterministicActor(
            self.obs_dim, self.act_dim, config.hidden, action_space.low, action_space.high
        )
        self.networks["actor"] = actor.to(self.device)
        self.networks["critic"] = TwinQ(self.obs_dim + self.act_dim, config.hidden).to(self.device)
        lr = config.learning_rate
        self.optimizers["actor"] = adam(self.networks["actor"].parameters(), lr)
        self.optimizers["critic"] = adam(self.networks["critic"].parameters(), lr)
        self._setup_routines(("actor", "critic"), "actor")

    @torch.no_grad()
    def act(self, obs: Tensor, steps: int = 0) -> Tensor:
        action = self.actor(obs)
        scale, bias = self.actor.scale, self.actor.bias
        noisy = action + torch.randn_like(action) * self.config.exploration_noise * scale
        return noisy.clamp(bias - scale, bias + scale)

    @torch.no_grad()
    def policy(self, obs: Tensor, network: nn.Module | None = None) -> Tensor:
        return (network or self.actor)(obs)

    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """A critic step; every ``policy_delay`` steps an actor step and the target update."""
        cfg = self.config
        actor_target, critic_target = self.networks["actor_target"], self.networks["critic_target"]
        scale, bias = self.actor.scale, self.actor.bias
        with torch.no_grad():
            next_actions = actor_target(batch["next_obs"])
            noise = (torch.randn_like(next_actions) * cfg.target_policy_noise).clamp(
                -cfg.target_noise_clip, cfg.target_noise_clip
            )
            # SB3 adds the noise in the [-1, 1] action scale before clipping to the bounds.
            next_actions = (next_actions + noise * scale).clamp(bias - scale, bias + scale)
            next_q = critic_target(torch.cat([batch["next_obs"], next_actions], -1)).min(0)[0]
            target = batch["rewards"] + cfg.gamma * (1 - batch["dones"]) * next_q
        critic_loss = self.critic_step(batch, target)
        self.gradient_updates += 1
        losses = {"critic_loss": critic_loss}
        if self.gradient_updates % cfg.policy_delay == 0:
            q_pi = self.critic(
                torch.cat([batch["obs"], self.actor(batch["obs"])], -1), detach_weights=True
            )[0]
            actor_loss = -q_pi.mean()
            self.optimizers["actor"].zero_grad(set_to_none=True)
            actor_loss.backward()
            self.optimizers["actor"].step()
            self.after_policy_step()
            self.target_update.step()
            losses["actor_loss"] = actor_loss
        return losses
