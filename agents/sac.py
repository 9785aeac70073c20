"""Soft Actor-Critic (continuous actions) built on rlweights.

Small and readable in the CleanRL spirit, but importable. The critic's two Q-networks are
batched (:class:`~rlweights.agents.networks.TwinQ`); the target critic is kept by
``rw.make_target`` and moved by an rlweights routine at SAC's update point (SB3's, see
:mod:`rlweights.sb3.patching`); all networks live in flat storage; Adam is fused; the actor's
loss reads the critic through detached weights, so its backward pass computes no critic weight
gradients that would be thrown away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import gymnasium as gym
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value
from torch.nn import functional as F

from rlweights.agents.common import AgentConfig, ContinuousAgent, adam
from rlweights.agents.compiled import CompiledStep, adam_, prepare_adam
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
    ent_coef: float | None = None  # a fixed temperature; None: tuned automatically
    # gSDE exploration (SB3's use_sde, log_std_init, sde_sample_freq): a noise matrix drawn at
    # the start of every train_freq steps (and every sde_sample_freq steps if > 0).
    use_sde: bool = False
    log_std_init: float = -3.0
    sde_sample_freq: int = -1

    def _rules(self) -> dict[str, bool]:
        return {
            **super()._rules(),
            "ent_coef": self.ent_coef is None or self.ent_coef > 0.0,
            "sde_sample_freq": self.sde_sample_freq == -1 or self.sde_sample_freq >= 1,
        }


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
        """An action drawn as :meth:`forward` draws it, without its log-probability (acting
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

    Acting uses the matrices of :meth:`reset_noise` (one per environment); a gradient step
    draws its own standard normal matrix with :meth:`draw_noise`, scaled by ``exp(log_std)``
    in :meth:`forward` (gradients reach ``log_std`` through it)."""

    def __init__(
        self, obs_dim: int, act_dim: int, hidden: tuple[int, ...], low, high, log_std_init: float
    ):
        super().__init__(low, high)
        self.trunk = mlp([obs_dim, *hidden], activate_last=True)
        self.mean = nn.Linear(hidden[-1], act_dim)
        self.log_std_init = float(log_std_init)
        self.log_std = nn.Parameter(torch.full((hidden[-1], act_dim), self.log_std_init))
        self.acting_noise: Tensor | None = None  # (environments, features, actions)
        self.train_noise: Tensor | None = None  # (features, actions), standard normal

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``log_std`` back to ``log_std_init`` (its layers reset themselves)."""
        self.log_std.fill_(self.log_std_init)

    def draw_noise(self) -> None:
        """A new standard normal matrix for the gradient step."""
        self.train_noise = torch.randn_like(self.log_std)

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
        its standard normal draw, else the one of :meth:`draw_noise`)."""
        h = self.trunk(obs)
        mean = self._mean(h)
        if deterministic:
            return self.to_bounds(torch.tanh(mean)), torch.zeros(len(obs), device=obs.device)
        if noise is None:
            if self.train_noise is None:
                self.draw_noise()
            noise = self.train_noise
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
        self.networks["critic"] = TwinQ(obs_dim + act_dim, hidden).to(self.device)
        self.log_alpha = torch.zeros(1, device=self.device, requires_grad=True)
        self.target_entropy = -float(act_dim)
        lr = config.learning_rate
        self.optimizers["actor"] = adam(self.networks["actor"].parameters(), lr)
        self.optimizers["critic"] = adam(self.networks["critic"].parameters(), lr)
        self.optimizers["alpha"] = adam([self.log_alpha], lr)
        self._setup_routines(("critic",), "actor")
        self.compiled: CompiledStep | None = None
        if config.compile:
            for optimizer in self.optimizers.values():
                prepare_adam(optimizer)
            self.compiled = self.compiled_step(self.functional_update, "SAC's gradient step")

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

    def update(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """One gradient step in SB3's order: the policy's actions for the batch, the
        temperature, the critic, the actor (through the updated critic; then the policy EMA),
        then the target update. The temperature of all losses is the one before its step.
        gSDE: one noise matrix for the step (SB3's ``reset_noise`` per gradient step).
        ``--compile``: :meth:`functional_update`, compiled, with the same draws."""
        if self.compiled is not None and not self.compiled.failed:
            if self.config.use_sde:
                noise = next_noise = torch.randn_like(self.actor.log_std)
            else:
                noise = torch.randn(len(batch["obs"]), self.act_dim, device=self.device)
                next_noise = torch.randn_like(noise)
            fields = [batch[k] for k in ("obs", "actions", "rewards", "next_obs", "dones")]
            out = self.compiled(*fields, noise, next_noise)
            if out is not None:
                self.count_update()
                return dict(
                    zip(("critic_loss", "actor_loss", "alpha", "entropy"), out, strict=True)
                )
        if self.config.use_sde:
            self.actor.draw_noise()
        actions, log_prob = self.actor(batch["obs"])
        alpha = self.alpha()
        if self.config.ent_coef is None:
            self.temperature_step(log_prob.detach())
        critic_loss = self.critic_loss(batch, self.td_target(batch, alpha))
        self.optimizer_step("critic", critic_loss)

        q_pi = self.critic(torch.cat([batch["obs"], actions], -1), detach_weights=True).min(0)[0]
        actor_loss = (alpha * log_prob - q_pi).mean()
        self.optimizer_step("actor", actor_loss)
        self.average_policy()
        self.target_routine.step()
        self.count_update()
        if self.config.use_sde:
            self.actor.train_noise = None  # the next step draws its own matrix
        return {
            "critic_loss": critic_loss,
            "actor_loss": actor_loss,
            "alpha": alpha,
            "entropy": -log_prob.detach().mean(),
        }

    def functional_update(
        self,
        obs: Tensor,
        actions: Tensor,
        rewards: Tensor,
        next_obs: Tensor,
        dones: Tensor,
        noise: Tensor,
        next_noise: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`update` written for ``torch.compile(fullgraph=True)`` (see
        :mod:`rlweights.agents.compiled`): the same steps in the same order, gradients by
        ``torch.func``, Adam on the optimizers' state, the capturable routines and constraints.
        ``noise`` / ``next_noise``: the policy's standard normal draws for ``obs`` and
        ``next_obs`` (gSDE: the step's one matrix, twice). The policy runs forward on ``obs``
        once, inside the actor's gradient: the temperature's step, which needs only those
        log-probabilities and changes no loss of this step, comes after the actor's."""
        batch = {"obs": obs, "actions": actions, "rewards": rewards, "next_obs": next_obs}
        batch["dones"] = dones
        actor, critic = self.actor, self.critic
        actor_params = dict(actor.named_parameters())
        critic_params = dict(critic.named_parameters())
        with torch.no_grad():
            alpha = self.alpha()  # the temperature before its step, for all losses
            target = self.td_target(batch, alpha, next_noise)

        def critic_loss(params: dict[str, Tensor]) -> Tensor:
            return self.critic_loss(batch, target, params)

        detached = {name: p.detach() for name, p in critic_params.items()}
        grads, critic_loss_value = grad_and_value(critic_loss)(detached)
        adam_(self.optimizers["critic"], list(critic_params.values()), grads.values())
        self.constrain_bound("critic")

        def actor_loss(params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            acts, lp = functional_call(actor, params, (obs,), {"noise": noise})
            q_pi = critic(torch.cat([obs, acts], -1), detach_weights=True).min(0)[0]
            return (alpha * lp - q_pi).mean(), lp

        detached = {name: p.detach() for name, p in actor_params.items()}
        grads, (actor_loss_value, lp) = grad_and_value(actor_loss, has_aux=True)(detached)
        adam_(self.optimizers["actor"], list(actor_params.values()), grads.values())
        self.constrain_bound("actor")
        if self.config.ent_coef is None:  # lp: the policy's log-probabilities before its step
            grad = -(lp.detach() + self.target_entropy).mean().reshape(1)
            adam_(self.optimizers["alpha"], [self.log_alpha], [grad])
        self.average_policy()
        self.target_routine.step()
        return critic_loss_value.detach(), actor_loss_value.detach(), alpha, -lp.mean()

    def alpha(self) -> Tensor:
        """The temperature: the fixed ``ent_coef``, or the tuned one."""
        if self.config.ent_coef is not None:
            return torch.full((1,), self.config.ent_coef, device=self.device)
        return self.log_alpha.exp().detach()

    @torch.no_grad()
    def td_target(
        self, batch: dict[str, Tensor], alpha: Tensor, noise: Tensor | None = None
    ) -> Tensor:
        """The soft TD target: reward + gamma * (min of the target critics - alpha * log pi)
        (``noise``: the policy's draw for the next observations, drawn here if not given)."""
        next_actions, next_log_prob = self.actor(batch["next_obs"], noise=noise)
        next_q = self.critic_target(torch.cat([batch["next_obs"], next_actions], -1)).min(0)[0]
        soft = next_q - alpha * next_log_prob
        return batch["rewards"] + self.config.gamma * (1 - batch["dones"]) * soft

    @torch.no_grad()
    def temperature_step(self, log_prob: Tensor) -> None:
        """One Adam step of the temperature. Its loss is -(log_alpha * (log_prob +
        target_entropy)).mean(); its gradient is written directly (a scalar: no autograd pass
        needed)."""
        self.log_alpha.grad = -(log_prob + self.target_entropy).mean().reshape(1)
        self.optimizers["alpha"].step()

    def averaged_tensors(self) -> list[torch.Tensor]:
        return [self.log_alpha]

    def _extra_state(self) -> dict:
        return {"log_alpha": self.log_alpha.detach().clone()}

    def _load_extra_state(self, state: dict) -> None:
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
