"""Hyperparameters per (algorithm, environment), from rl-baselines3-zoo (hyperparams/dqn.yml,
sac.yml, td3.yml, ddpg.yml, tqc.yml; its MuJoCo v4 settings for the v5 environments) and, for
DroQ, SBX's DroQ configuration of SAC's.

A preset holds what differs from the algorithm's defaults (the defaults are the zoo's settings
for CartPole-v1 (DQN) and Pendulum-v1 (SAC, TD3, DDPG)); flags override it. The zoo's DDPG
settings for these environments are its TD3 ones, so DDPG's presets are TD3's. Where the zoo uses
something the native agents do not have, the preset keeps the rest and says so in ``NOTES``
(the SB3 runs of 'rlweights train --impl sb3' and 'rlweights bench-learning' use the same
preset, so the comparison stays like for like). Zoo's ``gradient_steps: -1`` (one gradient
step per environment step of the rollout) is written as ``train_freq``; zoo's linear
learning-rate schedules (``lin_``) as their initial value.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NOTES", "PRESETS", "PRESET_SOURCES", "preset"]

# SB3's defaults where the algorithm's native defaults are another environment's settings.
_SAC_SB3 = {"learning_rate": 3e-4}
_TD3_SB3 = {"gamma": 0.99, "buffer_size": 1_000_000, "learning_starts": 100, "hidden": (400, 300)}
_SAC_MUJOCO = {**_SAC_SB3, "total_steps": 1_000_000, "learning_starts": 10_000}
_TD3_MUJOCO = {**_TD3_SB3, "total_steps": 1_000_000, "learning_starts": 10_000}
_DQN_LUNAR = {
    "learning_rate": 6.3e-4,
    "batch_size": 128,
    "buffer_size": 50_000,
    "learning_starts": 0,
    "target_update": "hard:250",
    "train_freq": 4,
    "gradient_steps": 4,
    "exploration_fraction": 0.12,
    "exploration_final_eps": 0.1,
}

PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    # DQN
    ("dqn", "CartPole-v1"): {},
    ("dqn", "Acrobot-v1"): {**_DQN_LUNAR, "total_steps": 100_000},
    ("dqn", "MountainCar-v0"): {
        "total_steps": 120_000,
        "learning_rate": 4e-3,
        "batch_size": 128,
        "buffer_size": 10_000,
        "learning_starts": 1000,
        "gamma": 0.98,
        "target_update": "hard:600",
        "train_freq": 16,
        "gradient_steps": 8,
        "exploration_fraction": 0.2,
        "exploration_final_eps": 0.07,
    },
    ("dqn", "LunarLander-v3"): {**_DQN_LUNAR, "total_steps": 100_000},
    # SAC (Pendulum-v1: the defaults, with half the zoo's 20k steps for a short main job)
    ("sac", "Pendulum-v1"): {},
    ("sac", "MountainCarContinuous-v0"): {
        "total_steps": 50_000,
        "learning_rate": 3e-4,
        "buffer_size": 50_000,
        "batch_size": 512,
        "ent_coef": 0.1,
        "train_freq": 32,
        "gradient_steps": 32,
        "gamma": 0.9999,
        "target_update": "polyak:0.01",
        "learning_starts": 0,
        "hidden": (64, 64),
        "use_sde": True,
        "log_std_init": -3.67,
    },
    ("sac", "LunarLanderContinuous-v3"): {
        "total_steps": 500_000,
        "learning_rate": 7.3e-4,
        "target_update": "polyak:0.01",
        "learning_starts": 10_000,
        "hidden": (400, 300),
    },
    ("sac", "BipedalWalker-v3"): {
        "total_steps": 500_000,
        "learning_rate": 7.3e-4,
        "buffer_size": 300_000,
        "gamma": 0.98,
        "target_update": "polyak:0.02",
        "train_freq": 64,
        "gradient_steps": 64,
        "learning_starts": 10_000,
        "hidden": (400, 300),
        "use_sde": True,
    },
    ("sac", "HalfCheetah-v5"): _SAC_MUJOCO,
    ("sac", "Hopper-v5"): _SAC_MUJOCO,
    ("sac", "Walker2d-v5"): _SAC_MUJOCO,
    ("sac", "Ant-v5"): _SAC_MUJOCO,
    ("sac", "Humanoid-v5"): {**_SAC_MUJOCO, "total_steps": 2_000_000},
    # TD3 (Pendulum-v1: the defaults)
    ("td3", "Pendulum-v1"): {},
    ("td3", "MountainCarContinuous-v0"): {
        **_TD3_SB3,
        "total_steps": 300_000,
        "exploration_noise": 0.5,
    },
    ("td3", "LunarLanderContinuous-v3"): {"total_steps": 300_000},
    ("td3", "BipedalWalker-v3"): {"total_steps": 1_000_000},
    ("td3", "HalfCheetah-v5"): _TD3_MUJOCO,
    ("td3", "Hopper-v5"): _TD3_MUJOCO,
    ("td3", "Walker2d-v5"): _TD3_MUJOCO,
    ("td3", "Ant-v5"): _TD3_MUJOCO,
    ("td3", "Humanoid-v5"): {**_TD3_MUJOCO, "total_steps": 2_000_000},
}
"""rl-baselines3-zoo's hyperparameters by (algorithm, environment id), as ``AgentConfig`` field
names."""
PRESETS |= {("ddpg", env_id): values for (algo, env_id), values in PRESETS.items() if algo == "td3"}
# The zoo's TQC settings for these environments are its SAC ones (TQC's defaults are SAC's),
# but on Hopper, where it drops 5 quantiles per critic instead of 2.
PRESETS |= {("tqc", env_id): values for (algo, env_id), values in PRESETS.items() if algo == "sac"}
PRESETS[("tqc", "Hopper-v5")] = {**_SAC_MUJOCO, "top_quantiles_to_drop_per_net": 5}
# DroQ: SAC's settings with DroQ's 20 gradient steps per environment step (SBX's DroQ settings
# are SAC's with these, dropout and layer normalisation: DroQConfig's defaults).
PRESETS |= {
    ("droq", env_id): {**values, "gradient_steps": 20 * values.get("train_freq", 1)}
    for (algo, env_id), values in PRESETS.items()
    if algo == "sac"
}

PRESET_SOURCES = {"droq": "rl-baselines3-zoo's SAC preset with SBX's DroQ settings"}
"""Where an algorithm's presets come from, as a run's first line names it (the zoo's otherwise)."""

NOTES: dict[tuple[str, str], str] = {
    ("sac", "LunarLanderContinuous-v3"): "the zoo decays the learning rate linearly",
    ("tqc", "LunarLanderContinuous-v3"): "the zoo decays the learning rate linearly",
    ("droq", "LunarLanderContinuous-v3"): "the zoo decays SAC's learning rate linearly",
    ("td3", "MountainCarContinuous-v0"): "the zoo's exploration noise is Ornstein-Uhlenbeck",
    ("ddpg", "MountainCarContinuous-v0"): "the zoo's exploration noise is Ornstein-Uhlenbeck",
}
"""What the zoo does that these presets cannot (the native agents lack it)."""


def preset(algo: str, env_id: str) -> dict[str, Any] | None:
    """The preset of ``algo`` on ``env_id``, or None where there is none."""
    found = PRESETS.get((algo, env_id))
    return None if found is None else dict(found)
