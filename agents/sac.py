"""Soft Actor-Critic (continuous actions) built on rlweights.

Small and readable in the CleanRL spirit, but importable. The critic's two Q-networks are
batched (``TwinQ``); the target critic is kept by
``rw.make_target`` and moved by an rlweights routine at SAC's update point (SB3's, see
``rlweights.sb3.patching``); all networks live in flat storage; Adam is fused; the actor's
loss reads the critic through detached weights, so its backward pass computes no critic weight
gradients that would be thrown away.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import gymnasium as gym
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rlweights.agents.agent import ContinuousAgent, make_adam
from rlweights.agents.config import AgentConfig, setting
from rlweights.agents.networks import BoundedActor, TwinQ, mlp

__all__ = ["SAC", "Actor", "SACConfig", "StateDependentActor"]

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # SB3's clamp of the policy's log standard deviation
SDE_CLIP_MEAN = 2.0  # SB3's bound on the mean of a gSDE policy (its ``clip_mean``)
SDE_VARIANCE_FLOOR = 1e-6  # SB3's epsilon added to a gSDE policy's variance


@dataclass
class SACConfig(AgentConfig):
    """Defaults: rl-baselines3-zoo's SAC hyperparameters for Pendulum-v1 (SB3's defaults with
    a learning rate of 1e-3), automatic entropy temperature with target entropy -dim(A).
    Half the zoo's steps, so that the default run of ``rlweights train`` stays short
    (docs/benchmarks.md has the returns it reaches)."""

    algo: ClassVar[str] = "sac"
    env_id: str = "Pendulum-v1"
    total_steps: int = 10_000
    learning_rate: float = 1e-3
    ent_coef: float | None = setting(
        None,
        "a fixed entropy temperature (default: tuned automatically toward entropy -dim(A))",
        rule=lambda v: v is None or v > 0.0,
        metavar="ALPHA",
        sb3="ent_coef",
    )
    # gSDE exploration (SB3's use_sde, log_std_init, sde_sample_freq): a noise matrix drawn at
    # the start of every train_freq steps (and every sde_sample_freq steps if > 0).
    use_sde: bool = setting(
        False, "state-dependent exploration (gSDE) instead of independent noise", sb3="use_sde"
    )
    log_std_init: float = setting(-3.0, "with --use-sde: the initial log std", metavar="LOG_STD")
    sde_sample_freq: int = setting(
        -1,
        "with --use-sde: draw a new noise matrix every N steps (-1: at each rollout's start)",
        rule=lambda v: v == -1 or v >= 1,
        sb3="sde_sample_freq",
    )


class Actor(BoundedActor):
    """A tanh-squashed Gaussian policy scaled to the action bounds. Log-probabilities are those
    of the squashed action in [-1, 1], before the scaling (as in SB3 and the original SAC):
    the target entropy -dim(A) means the same whatever the bounds (Pendulum's are [-2, 2],
    Humanoid's [-0.4, 0.4])."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...], low, high):
        super().__init__(low, high)
        self.trunk = mlp([obs_dim, *hidden], activate_last=True)
        self.mean = nn.Linear(hidden[-1], act_dim)
        self.log_std = nn.Linear(hidden[-1], act_dim)

    def forward(
        self, obs: Tensor, deterministic: bool = False, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(action, log-probability of it); ``noise``: the standard normal draw (drawn here
        if not given)."""
        h = self.trunk(obs)
        mean = self.mean(h)
        if deterministic:
            return self.to_bounds(torch.tanh(mean)), torch.zeros(len(obs), device=obs.device)
        log_std = self.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX)
        if noise is None:
            noise = torch.randn_like(mean)
        pre = mean + log_std.exp() * noise
        squashed = torch.tanh(pre)  # before log_prob: autograd sums in the same order as ever
        log_prob = (-0.5 * noise.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        # Change of variables for tanh (numerically stable form).
        log_prob -= (2 * (math.log(2) - pre - F.softplus(-2 * pre))).sum(-1)
        return self.to_bounds(squashed), log_prob

    def sample(self, obs: Tensor) -> Tensor:
        """An action drawn as ``forward`` draws it, without its log-probability (acting
        needs none): fewer operations per environment step."""
        h = self.trunk(obs)
        log_std = self.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX)
        pre = torch.addcmul(self.mean(h), log_std.exp(), torch.randn_like(log_std))
        return self.to_bounds(torch.tanh(pre))


class StateDependentActor(BoundedActor):
    """gSDE (generalized state-dependent exploration, Raffin et al. 2022; SB3's
    ``use_sde=True``): the exploration noise is the last hidden features times a random matrix
    ``E`` with entries N(0, exp(log_std)^2), drawn every few steps rather than every step, so
    that exploration is smooth in time (what MountainCarContinuous needs). ``log_std`` is one
    learned parameter per (feature, action); the mean is clipped to [-2, 2] as in SB3.

    Acting uses the matrices of ``reset_noise`` (one per environment); a gradient step
    draws its own standard normal matrix, scaled by ``exp(log_std)`` in ``forward``
    (gradients reach ``log_std`` through it)."""

    def __init__(
        self, obs_dim: int, act_dim: int, hidden: tuple[int, ...], low, high, log_std_init: float
    ):
        super().__init__(low, high)
        self.trunk = mlp([obs_dim, *hidden], activate_last=True)
        self.mean = nn.Linear(hidden[-1], act_dim)
        self.log_std_init = float(log_std_init)
        self.log_std = nn.Parameter(torch.full((hidden[-1], act_dim), self.log_std_init))
        self.acting_noise: Tensor | None = None  # (environments, features, actions)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``log_std`` back to ``log_std_init`` (its layers reset themselves)."""
        self.log_std.fill_(self.log_std_init)

    @torch.no_grad()
    def reset_noise(self, n: int) -> None:
        """New noise matrices for acting in ``n`` environments."""
        std = self.log_std.exp()
        self.acting_noise = std * torch.randn(n, *std.shape, device=std.device)

    def _mean(self, h: Tensor) -> Tensor:
        return F.hardtanh(self.mean(h), -SDE_CLIP_MEAN, SDE_CLIP_MEAN)

    def forward(
        self, obs: Tensor, deterministic: bool = False, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(action, log-probability of it) with the gradient step's noise matrix (``noise``:
        its standard normal draw, of ``log_std``'s shape; drawn here if not given)."""
        h = self.trunk(obs)
        mean = self._mean(h)
        if deterministic:
            return self.to_bounds(torch.tanh(mean)), torch.zeros(len(obs), device=obs.device)
        if noise is None:
            noise = torch.randn_like(self.log_std)
        noise = h @ (self.log_std.exp() * noise)
        variance = h.square() @ self.log_std.exp().square() + SDE_VARIANCE_FLOOR
        pre = mean + noise
        log_prob = (
            -0.5 * noise.square() / variance - 0.5 * variance.log() - 0.5 * math.log(2 * math.pi)
        ).sum(-1)
        log_prob -= (2 * (math.log(2) - pre - F.softplus(-2 * pre))).sum(-1)
        return self.to_bounds(torch.tanh(pre)), log_prob

    def sample(self, obs: Tensor) -> Tensor:
        """Actions for ``len(obs)`` environments, each with its own acting matrix."""
        if self.acting_noise is None or len(self.acting_noise) != len(obs):
            self.reset_noise(len(obs))
        h = self.trunk(obs)
        noise = torch.bmm(h.unsqueeze(1), self.acting_noise).squeeze(1)
        return self.to_bounds(torch.tanh(self._mean(h) + noise))


class SAC(ContinuousAgent):
    """Networks ``actor``, ``critic`` (+ ``critic_target``), the entropy temperature, the
    optimizers and the rlweights routines."""

    name = "SAC"

    def __init__(self, config: SACConfig, observation_space: gym.Space, action_space: gym.Space):
        super().__init__(config, observation_space, action_space)
        obs_dim, act_dim, hidden = self.obs_dim, self.act_dim, config.hidden
        bounds = action_space.low, action_space.high
        if config.use_sde:
            actor = StateDependentActor(obs_dim, act_dim, hidden, *bounds, config.log_std_init)
        else:
            actor = Actor(obs_dim, act_dim, hidden, *bounds)
        self.networks["actor"] = actor.to(self.device)
        self.networks["critic"] = self.make_critic().to(self.device)
        self.log_alpha = torch.zeros(1, device=self.device, requires_grad=True)
        self.target_entropy = -float(act_dim)
        lr = config.learning_rate
        self.optimizers["actor"] = make_adam(self.networks["actor"].parameters(), lr)
        self.optimizers["critic"] = make_adam(self.networks["critic"].parameters(), lr)
        self.optimizers["alpha"] = make_adam([self.log_alpha], lr)
        self._setup_routines(("critic",), "actor")

    def make_critic(self) -> TwinQ:
        """The critic: two Q-networks, batched."""
        return TwinQ(self.obs_dim + self.act_dim, self.config.hidden)

    @property
    def critic_target(self) -> TwinQ:
        return self.networks["critic_target"]

    @torch.no_grad()
    def act(self, obs: Tensor, steps: int = 0) -> Tensor:
        cfg = self.config
        if cfg.use_sde:  # new matrices when SB3 draws them: at each rollout's start, and ...
            into = steps % cfg.train_freq
            every = cfg.sde_sample_freq  # ... every sde_sample_freq steps of a rollout
            if into < cfg.num_envs or (every > 0 and into // cfg.num_envs % every == 0):
                self.actor.reset_noise(len(obs))
        return self.actor.sample(obs)

    @torch.no_grad()
    def policy(self, obs: Tensor, network: nn.Module | None = None) -> Tensor:
        return (network or self.actor)(obs, deterministic=True)[0]

    def step_inputs(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """The policy's standard normal draws for the batch's observations and next
        observations (gSDE: the step's one noise matrix, SB3's ``reset_noise`` per gradient
        step, for both)."""
        if self.config.use_sde:
            noise = torch.randn_like(self.actor.log_std)
            return noise, noise
        noise = torch.randn(batch_size, self.act_dim, device=self.device)
        return noise, torch.randn_like(noise)

    def gradient_step(
        self,
        obs,
        actions,
        rewards,
        next_obs,
        terminated,
        noise,
        next_noise,
        update_actor=True,
        dropped=None,
    ):
        """One gradient step in SB3's order: the soft TD target, the critic's step, the
        actor's step (through the updated critic), the temperature's step, the policy EMA,
        the target update. All losses use the temperature before its step (SB3 steps it
        first; it changes no loss of this step, so it comes after the actor, whose forward
        pass gives the log-probabilities it needs). ``update_actor`` False (DroQ's policy
        delay): the critic's step and the target update only. ``dropped``: the units that the
        critics' dropout drops (DroQ: ``TwinQ.draw_dropped``) in the target's, the
        critic's and (with ``update_actor``) the actor loss's evaluation."""
        cfg = self.config
        alpha = self.alpha()
        masks: list = [None, None, None]
        if dropped is not None:
            evaluations = 3 if update_actor else 2
            masks[:evaluations] = self.critic.dropout_masks(dropped, len(obs), evaluations)
        with torch.no_grad():
            next_actions, next_log_prob = self.actor(next_obs, noise=next_noise)
            next_x = torch.cat([next_obs, next_actions], -1)
            next_q = self.critic_target(next_x, masks=masks[0]).min(0)[0]
            target = rewards + cfg.gamma * (1 - terminated) * (next_q - alpha * next_log_prob)

        def critic_loss(critic: nn.Module) -> Tensor:  # SB3's 0.5 * (mse_1 + mse_2)
            q = critic(torch.cat([obs, actions], -1), masks=masks[1])
            return F.mse_loss(q, target.expand_as(q))

        def actor_loss(actor: nn.Module) -> tuple[Tensor, Tensor]:
            acts, log_prob = actor(obs, noise=noise)
            # the critic's weights detached: no critic gradients computed to be thrown away
            x = torch.cat([obs, acts], -1)
            q_pi = self.critic(x, detach_weights=True, masks=masks[2]).min(0)[0]
            return (alpha * log_prob - q_pi).mean(), log_prob

        return self.step_networks(critic_loss, actor_loss, alpha, update_actor)

    def step_networks(
        self,
        critic_loss: Callable[[nn.Module], Tensor],
        actor_loss: Callable[[nn.Module], tuple[Tensor, Tensor]],
        alpha: Tensor,
        update_actor: bool = True,
    ) -> dict[str, Tensor]:
        """The steps that follow the losses, in SB3's order (SAC's, TQC's and DroQ's): the
        critic's; with ``update_actor``, the actor's (through the updated critic), the
        temperature's (loss ``-(log_alpha * (log_prob + target entropy)).mean()``) and the
        policy EMA; the target update (which reads neither the actor nor the temperature:
        SBX's order, target before actor, gives the same numbers). Returns the step's
        losses."""
        losses = {"critic_loss": self.minimize("critic", critic_loss)}
        if update_actor:
            actor_loss_value, log_prob = self.minimize("actor", actor_loss, has_aux=True)
            if self.config.ent_coef is None:
                grad = -(log_prob + self.target_entropy).mean().reshape(1)
                self.apply_gradients("alpha", [self.log_alpha], [grad])
            self.average_policy()
            losses |= {"actor_loss": actor_loss_value, "alpha": alpha, "entropy": -log_prob.mean()}
        self.target_routine.step()
        return losses

    def alpha(self) -> Tensor:
        """The temperature: the fixed ``ent_coef``, or the tuned one."""
        if self.config.ent_coef is not None:
            return torch.full((1,), self.config.ent_coef, device=self.device)
        return self.log_alpha.exp().detach()

    def averaged_tensors(self) -> list[torch.Tensor]:
        return [self.log_alpha]

    def _extra_state(self) -> dict:
        return {"log_alpha": self.log_alpha.detach().clone()}

    def _load_extra_state(self, state: dict) -> None:
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
