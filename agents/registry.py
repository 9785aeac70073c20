"""The algorithms of ``rlweights train``: each name's config and agent class, the config of a
name and environment (the zoo's preset, then overrides), and building the agent."""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from rlweights.agents.agent import OffPolicyAgent
from rlweights.agents.config import AgentConfig
from rlweights.agents.ddpg import DDPG, DDPGConfig
from rlweights.agents.dqn import DQN, DQNConfig
from rlweights.agents.droq import DroQ, DroQConfig
from rlweights.agents.presets import preset
from rlweights.agents.sac import SAC, SACConfig
from rlweights.agents.td3 import TD3, TD3Config
from rlweights.agents.tqc import TQC, TQCConfig

__all__ = ["ALGOS", "build_agent", "make_config"]


ALGOS: dict[str, tuple[type[AgentConfig], type[OffPolicyAgent]]] = {
    "dqn": (DQNConfig, DQN),
    "sac": (SACConfig, SAC),
    "td3": (TD3Config, TD3),
    "ddpg": (DDPGConfig, DDPG),
    "tqc": (TQCConfig, TQC),
    "droq": (DroQConfig, DroQ),
}
"""The algorithms of ``rlweights train --algo``: each name's config class and agent class."""


def make_config(algo: str, env_id: str | None = None, **overrides: Any) -> AgentConfig:
    """The algorithm's config: its defaults, the zoo preset for ``env_id`` if there is one
    (``rlweights.agents.presets``), then ``overrides`` (``None`` values are ignored).
    Raises ``ValueError`` on bad values."""
    if algo not in ALGOS:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {', '.join(ALGOS)}")
    values: dict[str, Any] = {}
    if env_id is not None:
        values["env_id"] = env_id
        values.update(preset(algo, env_id) or {})
    values.update({key: value for key, value in overrides.items() if value is not None})
    return ALGOS[algo][0](**values)


def build_agent(config: AgentConfig, envs: gym.vector.VectorEnv) -> OffPolicyAgent:
    """The agent of ``config.algo`` for the spaces of ``envs`` (checked by the agent)."""
    return ALGOS[config.algo][1](config, envs.single_observation_space, envs.single_action_space)
