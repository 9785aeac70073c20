"""Twin Delayed DDPG (continuous actions) built on rlweights.

As in Fujimoto et al. (2018) and SB3: a deterministic actor, twin critics (batched,
:class:`~rlweights.agents.networks.TwinQ`), target policy smoothing, and delayed actor
updates. Both targets (actor and critic) share one flat buffer, so their rlweights update at
TD3's update point (SB3's, see :mod:`rlweights.sb3.patching`) is a single pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import gymnasium as gym
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value

from rlweights.agents.common import AgentConfig, ContinuousAgent, adam
from rlweights.agents.compiled import CompiledStep, adam_, prepare_adam
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


class DeterministicActor(BoundedActor):
    """``tanh`` of an MLP, scaled to the action bounds."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...], low, high):
        super().__init__(low, high)
        self.net = mlp([obs_dim, *hidden, act_dim])

    def forward(self, obs: Tensor) -> Tensor:
        return self.to_bounds(torch.tanh(self.net(obs)))


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
        self.optimizers["actor"] = adam(self.networks["actor"].parameters(), lr)
        self.optimizers["critic"] = adam(self.networks["critic"].parameters(), lr)
        self._setup_routines(("actor", "critic"), "actor")
        # Counts critic steps: the actor steps at every policy_delay-th one.
        self.actor_delay = Periodic(config.policy_delay, name="TD3 policy_delay")
        # --compile: two graphs, a critic step and a critic + actor step; the host counter
        # above says which one runs (it needs no value from the device).
        self.compiled: tuple[CompiledStep, CompiledStep] | None = None
        if config.compile:
            for optimizer in self.optimizers.values():
                prepare_adam(optimizer)
            self.compiled = (
                self.compiled_step(self.functional_critic_step, "TD3's critic step"),
                self.compiled_step(self.functional_full_step, "TD3's critic and actor step"),
            )

    @torch.no_grad()
    def act(self, obs: Tensor, steps: int = 0) -> Tensor:
        action = self.actor(obs)
        noise = torch.randn_like(action) * self.config.exploration_noise * self.actor.scale
        return self.actor.clamp(action + noise)

    @torch.no_grad()
    def policy(self, obs: Tensor, network: nn.Module | None = None) -> Tensor:
        return (network or self.actor)(obs)

    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """A critic step; at every ``policy_delay``-th one, an actor step (then the policy
        EMA) and the target update. ``--compile``: the compiled forms of the two, with the
        same draws."""
        if self.compiled is not None and not any(c.failed for c in self.compiled):
            fields = [batch[k] for k in ("obs", "actions", "rewards", "next_obs", "dones")]
            noise = torch.randn(len(batch["obs"]), self.act_dim, device=self.device)
            counter = self.actor_delay.state_dict()
            full = self.actor_delay.step()
            out = self.compiled[int(full)](*fields, noise)
            if out is not None:
                self.count_update()
                names = ("critic_loss", "actor_loss")[: len(out)]
                return dict(zip(names, out, strict=True))
            self.actor_delay.load_state_dict(counter)  # not compiled: the eager step counts
        critic_loss = self.critic_loss(batch, self.td_target(batch))
        self.optimizer_step("critic", critic_loss)
        self.count_update()
        losses = {"critic_loss": critic_loss}
        if self.actor_delay.step():
            actions = self.actor(batch["obs"])
            q_pi = self.critic(
                torch.cat([batch["obs"], actions], -1), detach_weights=True, first=1
            )[0]
            actor_loss = -q_pi.mean()
            self.optimizer_step("actor", actor_loss)
            self.average_policy()
            self.target_routine.step()
            losses["actor_loss"] = actor_loss
        return losses

    def functional_critic_step(self, *fields: Tensor) -> tuple[Tensor]:
        """:meth:`update`'s critic step for ``torch.compile(fullgraph=True)``: ``fields`` are
        the batch's obs, actions, rewards, next_obs, dones and the target smoothing draw."""
        return (self._critic_step(*fields),)

    def functional_full_step(self, *fields: Tensor) -> tuple[Tensor, Tensor]:
        """The critic step, then the actor step, the policy EMA and the target update."""
        critic_loss = self._critic_step(*fields)
        obs = fields[0]
        actor, critic = self.actor, self.critic
        params = dict(actor.named_parameters())

        def actor_loss(p: dict[str, Tensor]) -> Tensor:
            acts = functional_call(actor, p, (obs,))
            return -critic(torch.cat([obs, acts], -1), detach_weights=True, first=1)[0].mean()

        detached = {name: t.detach() for name, t in params.items()}
        grads, actor_loss_value = grad_and_value(actor_loss)(detached)
        adam_(self.optimizers["actor"], list(params.values()), grads.values())
        self.constrain_bound("actor")
        self.average_policy()
        self.target_routine.step()
        return critic_loss, actor_loss_value.detach()

    def _critic_step(self, obs, actions, rewards, next_obs, dones, noise) -> Tensor:
        batch = {"obs": obs, "actions": actions, "rewards": rewards, "next_obs": next_obs}
        batch["dones"] = dones
        target = self.td_target(batch, noise)
        params = dict(self.critic.named_parameters())
        detached = {name: t.detach() for name, t in params.items()}
        grads, loss = grad_and_value(lambda p: self.critic_loss(batch, target, p))(detached)
        adam_(self.optimizers["critic"], list(params.values()), grads.values())
        self.constrain_bound("critic")
        return loss.detach()

    @torch.no_grad()
    def td_target(self, batch: dict[str, Tensor], noise: Tensor | None = None) -> Tensor:
        """reward + gamma * min of the target critics at the target actor's smoothed action
        (``noise``: the standard normal draw of the smoothing, drawn here if not given)."""
        cfg = self.config
        actor_target = self.networks["actor_target"]
        next_actions = actor_target(batch["next_obs"])
        if noise is None:
            noise = torch.randn_like(next_actions)
        noise = (noise * cfg.target_policy_noise).clamp(
            -cfg.target_noise_clip, cfg.target_noise_clip
        )
        # SB3 adds the noise in the [-1, 1] action scale before clipping to the bounds.
        next_actions = actor_target.clamp(next_actions + noise * actor_target.scale)
        critic_target = self.networks["critic_target"]
        next_q = critic_target(torch.cat([batch["next_obs"], next_actions], -1)).min(0)[0]
        return batch["rewards"] + cfg.gamma * (1 - batch["dones"]) * next_q

    def _extra_state(self) -> dict:
        return {"actor_delay": self.actor_delay.state_dict()}

    def _load_extra_state(self, state: dict) -> None:
        self.actor_delay.load_state_dict(state["actor_delay"])
