"""Twin Delayed DDPG (continuous actions) built on rlweights.

As in Fujimoto et al. (2018) and SB3: a deterministic actor, twin critics (batched,
``TwinQ``), target policy smoothing, and delayed actor
updates. Both targets (actor and critic) share one flat buffer, so their rlweights update at
TD3's update point (SB3's, see ``rlweights.sb3.patching``) is a single pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import gymnasium as gym
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rlweights.agents.agent import ContinuousAgent, make_adam
from rlweights.agents.config import AgentConfig, exploration_noise, policy_delay, setting
from rlweights.agents.networks import BoundedActor, TwinQ, mlp
from rlweights.periodic import Periodic

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
    policy_delay: int = policy_delay(2)
    target_policy_noise: float = setting(
        0.2,
        "std of the noise added to the target policy's actions",
        rule=lambda v: v >= 0.0,
        metavar="STD",
        sb3="target_policy_noise",
    )
    target_noise_clip: float = setting(
        0.5,
        "the target policy noise is clipped to [-CLIP, CLIP]",
        rule=lambda v: v >= 0.0,
        metavar="CLIP",
        sb3="target_noise_clip",
    )
    exploration_noise: float = exploration_noise()


class DeterministicActor(BoundedActor):
    """``tanh`` of an MLP, scaled to the action bounds."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...], low, high):
        super().__init__(low, high)
        self.net = mlp([obs_dim, *hidden, act_dim])

    def forward(self, obs: Tensor) -> Tensor:
        return self.to_bounds(torch.tanh(self.net(obs)))

    def explore(self, obs: Tensor, noise_std: float) -> Tensor:
        """The action with exploration noise (``perturb``)."""
        return self.perturb(self(obs), noise_std)

    def perturb(self, actions: Tensor, noise_std: float) -> Tensor:
        """``actions`` plus Gaussian noise of std ``noise_std`` relative to the bounds (SB3's
        ``NormalActionNoise`` on the [-1, 1] scale), clipped to the bounds."""
        return self.clamp(actions + torch.randn_like(actions) * noise_std * self.scale)


class TD3(ContinuousAgent):
    """Networks ``actor``, ``critic`` and their targets, optimizers and rlweights routines."""

    name = "TD3"

    def __init__(self, config: TD3Config, observation_space: gym.Space, action_space: gym.Space):
        super().__init__(config, observation_space, action_space)
        actor = DeterministicActor(
            self.obs_dim, self.act_dim, config.hidden, action_space.low, action_space.high
        )
        self.networks["actor"] = actor.to(self.device)
        self.networks["critic"] = TwinQ(self.obs_dim + self.act_dim, config.hidden).to(self.device)
        lr = config.learning_rate
        self.optimizers["actor"] = make_adam(self.networks["actor"].parameters(), lr)
        self.optimizers["critic"] = make_adam(self.networks["critic"].parameters(), lr)
        self._setup_routines(("actor", "critic"), "actor")
        # Counts critic steps: the actor steps at every policy_delay-th one.
        self.actor_delay = Periodic(config.policy_delay, name="TD3 policy_delay")

    @torch.no_grad()
    def act(self, obs: Tensor, steps: int = 0) -> Tensor:
        return self.actor.explore(obs, self.config.exploration_noise)

    @torch.no_grad()
    def warmup_actions(self, actions: Tensor) -> Tensor:
        """The warm-up's random actions with the exploration noise added, as SB3 adds its
        action noise to every action it takes, the warm-up's too."""
        return self.actor.perturb(actions, self.config.exploration_noise)

    @torch.no_grad()
    def policy(self, obs: Tensor, network: nn.Module | None = None) -> Tensor:
        return (network or self.actor)(obs)

    def step_inputs(self, batch_size: int) -> tuple[Tensor, bool]:
        """The target smoothing's standard normal draw, and whether the actor steps in this
        gradient step (every ``policy_delay``-th critic step; compiled, one graph for each)."""
        noise = torch.randn(batch_size, self.act_dim, device=self.device)
        return noise, self.actor_delay.step()

    def gradient_step(self, obs, actions, rewards, next_obs, terminated, noise, update_actor):
        """One gradient step in SB3's order: the TD target at the target actor's smoothed
        action, the critic's step; with ``update_actor``, the actor's step (through the
        updated critic's first network), the policy EMA and the target update."""
        cfg = self.config
        actor_target, critic_target = self.networks["actor_target"], self.networks["critic_target"]
        with torch.no_grad():
            next_actions = actor_target(next_obs)
            noise = (noise * cfg.target_policy_noise).clamp(
                -cfg.target_noise_clip, cfg.target_noise_clip
            )
            # SB3 adds the noise in the [-1, 1] action scale before clipping to the bounds.
            next_actions = actor_target.clamp(next_actions + noise * actor_target.scale)
            next_q = critic_target(torch.cat([next_obs, next_actions], -1)).min(0)[0]
            target = rewards + cfg.gamma * (1 - terminated) * next_q

        def critic_loss(critic: nn.Module) -> Tensor:  # SB3's 0.5 * (mse_1 + mse_2)
            q = critic(torch.cat([obs, actions], -1))
            return F.mse_loss(q, target.expand_as(q))

        def actor_loss(actor: nn.Module) -> Tensor:
            q_pi = self.critic(torch.cat([obs, actor(obs)], -1), detach_weights=True, first=1)
            return -q_pi[0].mean()

        losses = {"critic_loss": self.minimize("critic", critic_loss)}
        if update_actor:
            losses["actor_loss"] = self.minimize("actor", actor_loss)
            self.average_policy()
            self.target_routine.step()
        return losses

    def _extra_state(self) -> dict:
        return {"actor_delay": self.actor_delay.state_dict()}

    def _load_extra_state(self, state: dict) -> None:
        self.actor_delay.load_state_dict(state["actor_delay"])
