"""Deep Deterministic Policy Gradient (continuous actions) built on rlweights.

SB3's DDPG, which is TD3 with one critic, no target policy smoothing and no policy delay
(Lillicrap et al. 2016, as SB3 writes it): a deterministic actor (TD3's
``DeterministicActor``), one Q-network (a
``TwinQ`` of one), Gaussian exploration noise; both targets
share one flat buffer, moved by an rlweights routine after every gradient step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import gymnasium as gym
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rlweights.agents.agent import ContinuousAgent, make_adam
from rlweights.agents.config import AgentConfig, exploration_noise
from rlweights.agents.networks import TwinQ
from rlweights.agents.td3 import DeterministicActor

__all__ = ["DDPG", "DDPGConfig"]


@dataclass
class DDPGConfig(AgentConfig):
    """Defaults: rl-baselines3-zoo's DDPG hyperparameters for Pendulum-v1 (gamma 0.98, 200k
    buffer, 10k random steps first, Gaussian exploration noise 0.1, 400-300 networks), SB3's
    DDPG defaults for the rest."""

    algo: ClassVar[str] = "ddpg"
    env_id: str = "Pendulum-v1"
    total_steps: int = 20_000
    gamma: float = 0.98
    buffer_size: int = 200_000
    learning_starts: int = 10_000
    hidden: tuple[int, ...] = (400, 300)
    exploration_noise: float = exploration_noise()


class DDPG(ContinuousAgent):
    """Networks ``actor``, ``critic`` and their targets, optimizers and rlweights routines."""

    name = "DDPG"

    def __init__(self, config: DDPGConfig, observation_space: gym.Space, action_space: gym.Space):
        super().__init__(config, observation_space, action_space)
        actor = DeterministicActor(
            self.obs_dim, self.act_dim, config.hidden, action_space.low, action_space.high
        )
        self.networks["actor"] = actor.to(self.device)
        critic = TwinQ(self.obs_dim + self.act_dim, config.hidden, n=1)
        self.networks["critic"] = critic.to(self.device)
        for name, net in self.networks.items():
            self.optimizers[name] = make_adam(net.parameters(), config.learning_rate)
        self._setup_routines(("actor", "critic"), "actor")

    @torch.no_grad()
    def act(self, obs: Tensor, steps: int = 0) -> Tensor:
        return self.actor.explore(obs, self.config.exploration_noise)

    @torch.no_grad()
    def warmup_actions(self, actions: Tensor) -> Tensor:  # as TD3's: SB3's action noise
        return self.actor.perturb(actions, self.config.exploration_noise)

    @torch.no_grad()
    def policy(self, obs: Tensor, network: nn.Module | None = None) -> Tensor:
        return (network or self.actor)(obs)

    def step_inputs(self, batch_size: int) -> tuple[()]:
        """A DDPG step draws nothing."""
        return ()

    def gradient_step(self, obs, actions, rewards, next_obs, terminated):
        """One gradient step in SB3's order: the TD target at the target actor's action, the
        critic's step, the actor's step (through the updated critic), the policy EMA, the
        target update."""
        with torch.no_grad():
            next_actions = self.networks["actor_target"](next_obs)
            next_x = torch.cat([next_obs, next_actions], -1)
            next_q = self.networks["critic_target"](next_x)[0]
            target = rewards + self.config.gamma * (1 - terminated) * next_q

        def critic_loss(critic: nn.Module) -> Tensor:
            q = critic(torch.cat([obs, actions], -1))
            return F.mse_loss(q, target.expand_as(q))

        def actor_loss(actor: nn.Module) -> Tensor:
            q_pi = self.critic(torch.cat([obs, actor(obs)], -1), detach_weights=True)
            return -q_pi[0].mean()

        critic_loss_value = self.minimize("critic", critic_loss)
        actor_loss_value = self.minimize("actor", actor_loss)
        self.average_policy()
        self.target_routine.step()
        return {"critic_loss": critic_loss_value, "actor_loss": actor_loss_value}
