"""DroQ (Hiraoka et al. 2022, "Dropout Q-Functions for Doubly Efficient Reinforcement Learning";
SBX's DroQ configuration of SAC) built on rlweights.

SAC with small critics made robust enough for many updates per sample: dropout and layer
normalisation after every hidden layer of both critics (and their targets), 20 gradient steps
and so 20 target updates per environment step, the actor and the temperature stepped once
every ``policy_delay`` (20) of them. The 20 batches of one environment step are drawn together
(one index draw and one gather, as SBX draws them); under ``--compile`` the critic-only step
and the step with the actor are each one compiled graph.

The units that dropout drops are drawn before each step, with its other random draws, as the
positions of the dropped units (``dropped_units``: about one
random number per dropped unit, a hundredth of what a mask drawn unit by unit takes at DroQ's
rate): an eager and a compiled step drop the same units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym

from rlweights.agents.config import policy_delay, setting
from rlweights.agents.networks import TwinQ
from rlweights.agents.sac import SAC, SACConfig
from rlweights.periodic import Periodic

__all__ = ["DroQ", "DroQConfig"]


@dataclass
class DroQConfig(SACConfig):
    """Defaults: SAC's (rl-baselines3-zoo's Pendulum-v1 settings) with SBX's DroQ settings: 20
    gradient steps per environment step, the actor and temperature stepped at every 20th,
    dropout 0.01 and layer normalisation in the critics (SBX's README, "Note about DroQ")."""

    algo: ClassVar[str] = "droq"
    gradient_steps: int = 20
    policy_delay: int = policy_delay(20)
    dropout: float = setting(
        0.01,
        "dropout rate after each hidden layer of the critics",
        rule=lambda v: 0.0 <= v < 1.0,
        metavar="RATE",
        sb3="policy_kwargs.dropout_rate",
    )
    layer_norm: bool = setting(
        True,
        "layer normalisation after each hidden layer of the critics",
        sb3="policy_kwargs.layer_norm",
    )


class DroQ(SAC):
    """SAC's networks and temperature, its critics with dropout and layer normalisation, the
    actor stepped every ``policy_delay``-th gradient step."""

    name = "DroQ"

    def __init__(self, config: DroQConfig, observation_space: gym.Space, action_space: gym.Space):
        super().__init__(config, observation_space, action_space)
        # Counts gradient steps: the actor steps at every policy_delay-th one (SBX: the last
        # of each environment step's 20).
        self.actor_delay = Periodic(config.policy_delay, name="DroQ policy_delay")

    def make_critic(self) -> TwinQ:
        cfg = self.config
        return TwinQ(
            self.obs_dim + self.act_dim, cfg.hidden, dropout=cfg.dropout, layer_norm=cfg.layer_norm
        )

    def step_inputs(self, batch_size: int) -> tuple[Any, ...]:
        """SAC's draws; whether the actor steps in this gradient step (compiled, one graph for
        each); the units that dropout drops in the step's evaluations of the critics, drawn at
        once: the target's, the critic's and (when the actor steps) the actor loss's
        (``TwinQ.draw_dropped``, drawn here so that an eager and a compiled step drop the
        same units)."""
        noise, next_noise = super().step_inputs(batch_size)
        update_actor = self.actor_delay.step()
        dropped = None
        if self.config.dropout > 0.0:
            dropped = self.critic.draw_dropped(batch_size, 3 if update_actor else 2)
        return noise, next_noise, update_actor, dropped

    def _extra_state(self) -> dict:
        return super()._extra_state() | {"actor_delay": self.actor_delay.state_dict()}

    def _load_extra_state(self, state: dict) -> None:
        super()._load_extra_state(state)
        self.actor_delay.load_state_dict(state["actor_delay"])
