"""Truncated Quantile Critics (TQC; Kuznetsov et al. 2020; sb3-contrib's TQC) built on rlweights.

SAC's actor and temperature with a distributional critic: ``n_critics`` networks, each
predicting ``n_quantiles`` quantiles of the return, evaluated together as one batched
ensemble whose target lives in one flat buffer (one Polyak pass moves every target critic).
The TD target pools the target critics' quantiles of the next state, sorts them and drops the
``top_quantiles_to_drop_per_net * n_critics`` largest (TQC's control of overestimation); each
critic regresses its quantiles onto what is left with the quantile Huber loss; the actor
maximises the mean of all quantiles of all critics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from rlweights.agents.config import setting
from rlweights.agents.networks import TwinQ
from rlweights.agents.sac import SAC, SACConfig

__all__ = ["TQC", "TQCConfig", "quantile_huber_loss"]


@dataclass
class TQCConfig(SACConfig):
    """Defaults: rl-baselines3-zoo's TQC hyperparameters for Pendulum-v1 (sb3-contrib's
    defaults with a learning rate of 1e-3): 2 critics of 25 quantiles, the 2 largest of each
    dropped from the target."""

    algo: ClassVar[str] = "tqc"
    total_steps: int = 20_000
    n_critics: int = setting(
        2, "critics in the ensemble", rule=lambda v: v >= 1, sb3="policy_kwargs.n_critics"
    )
    n_quantiles: int = setting(
        25, "quantiles each critic predicts", rule=lambda v: v >= 1, sb3="policy_kwargs.n_quantiles"
    )
    top_quantiles_to_drop_per_net: int = setting(
        2,
        "largest quantiles per critic left out of the TD target (fewer than --n-quantiles)",
        rule=lambda v: v >= 0,
        sb3="top_quantiles_to_drop_per_net",
    )

    def checks(self) -> None:
        super().checks()
        if self.top_quantiles_to_drop_per_net >= self.n_quantiles:
            raise ValueError(
                f"{type(self).__name__}: impossible values: top_quantiles_to_drop_per_net="
                f"{self.top_quantiles_to_drop_per_net!r} leaves no quantile of n_quantiles="
                f"{self.n_quantiles!r} in the TD target"
            )


def quantile_huber_loss(quantiles: Tensor, targets: Tensor) -> Tensor:
    """The quantile regression loss with a Huber kernel (QR-DQN, TQC), averaged over every
    pair: ``quantiles`` (critics, batch, n) at the midpoints ``tau_i = (i + 0.5) / n``,
    ``targets`` (batch, m); each pair's error ``d = target - quantile`` is weighted by
    ``|tau_i - [d < 0]|`` times ``huber(d)`` (``d^2 / 2`` within 1, ``|d| - 1/2`` beyond)."""
    n = quantiles.shape[-1]
    tau = (torch.arange(n, device=quantiles.device, dtype=quantiles.dtype) + 0.5) / n
    delta = targets[None, :, None, :] - quantiles[..., None]  # (critics, batch, n, m)
    size = delta.abs()
    huber = torch.where(size > 1, size - 0.5, 0.5 * delta.square())
    return ((tau[:, None] - (delta.detach() < 0).to(delta.dtype)).abs() * huber).mean()


class TQC(SAC):
    """SAC's networks and temperature, with a critic of ``n_critics`` quantile networks."""

    name = "TQC"

    def make_critic(self) -> TwinQ:
        cfg = self.config
        return TwinQ(self.obs_dim + self.act_dim, cfg.hidden, cfg.n_critics, cfg.n_quantiles)

    def gradient_step(self, obs, actions, rewards, next_obs, terminated, noise, next_noise):
        """One gradient step in sb3-contrib's order: the truncated distributional TD target,
        the critic's step, the actor's step (through the updated critic), the temperature's
        step, the policy EMA, the target update. All use the temperature before its step (as
        in ``SAC.gradient_step``)."""
        cfg = self.config
        alpha = self.alpha()
        kept = cfg.n_critics * (cfg.n_quantiles - cfg.top_quantiles_to_drop_per_net)
        with torch.no_grad():
            next_actions, next_log_prob = self.actor(next_obs, noise=next_noise)
            next_z = self.critic_target(torch.cat([next_obs, next_actions], -1))
            pooled = next_z.transpose(0, 1).reshape(len(obs), -1).sort(-1)[0][:, :kept]
            soft = pooled - alpha * next_log_prob[:, None]
            target = rewards[:, None] + cfg.gamma * (1 - terminated[:, None]) * soft

        def critic_loss(critic: nn.Module) -> Tensor:
            return quantile_huber_loss(critic(torch.cat([obs, actions], -1)), target)

        def actor_loss(actor: nn.Module) -> tuple[Tensor, Tensor]:
            acts, log_prob = actor(obs, noise=noise)
            z = self.critic(torch.cat([obs, acts], -1), detach_weights=True)
            return (alpha * log_prob - z.mean((0, 2))).mean(), log_prob

        return self.step_networks(critic_loss, actor_loss, alpha)
