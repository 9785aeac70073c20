"""The memory estimate of a run, checked before anything is written: replay buffer, networks with
their targets, gradients and Adam's moments, a gradient step's batch, the environments."""

from __future__ import annotations

import itertools
import os

import gymnasium as gym
import numpy as np
import torch

from rlweights.agents.config import AgentConfig

__all__ = ["ENV_BYTES", "MUJOCO_ENV_BYTES", "available_memory", "memory_needed"]


def _mlp_parameters(sizes: list[int]) -> int:
    return sum((a + 1) * b for a, b in itertools.pairwise(sizes))


ENV_BYTES = 64 * 2**10
"""Bytes of one environment with its wrappers in a vector environment: about 8-16 KiB for classic
control, over 1 MiB for a MuJoCo model and its data."""


MUJOCO_ENV_BYTES = 2 * 2**20
"""Bytes of one MuJoCo environment (its model and data) in a vector environment."""


def _env_bytes(env_id: str) -> int:
    try:
        mujoco = "mujoco" in str(gym.spec(env_id).entry_point)
    except (gym.error.Error, ImportError):
        mujoco = False
    return MUJOCO_ENV_BYTES if mujoco else ENV_BYTES


def memory_needed(
    config: AgentConfig,
    observation_space: gym.Space,
    action_space: gym.Space,
    impl: str = "native",
    evaluation: bool = False,
) -> dict[str, int]:
    """Bytes the run will allocate, from the sizes alone (an upper estimate): the replay
    buffer (the native agents' holds at most ``total_steps`` transitions, SB3's always
    ``buffer_size``), the networks with their targets, gradients and Adam's moments, a
    gradient step's batch (its transitions, and the layer outputs that the forward passes
    keep for the backward pass, with their gradients), and the ``eval_episodes`` evaluation
    environments, made together. ``evaluation``: only a saved agent's evaluation runs (the
    native agents then make no replay buffer; SB3's model makes its own; nothing trains)."""
    obs = int(np.prod(observation_space.shape))
    discrete = isinstance(action_space, gym.spaces.Discrete)
    act = int(action_space.n) if discrete else int(np.prod(action_space.shape))
    hidden = list(config.hidden)
    if config.algo == "dqn":
        networks = 5 * _mlp_parameters([obs, *hidden, act])  # online, target, grad, Adam x2
        passes = 2  # online and target Q-network
    else:
        actor = _mlp_parameters([obs, *hidden, 2 * act])
        critics = 1 if config.algo == "ddpg" else getattr(config, "n_critics", 2)
        critic = critics * _mlp_parameters([obs + act, *hidden, getattr(config, "n_quantiles", 1)])
        networks = 5 * (actor + critic) + (actor if config.policy_ema else 0)
        passes = 8  # actor twice, twin critic three times (target, online, actor loss)
    capacity = config.buffer_size
    if impl == "native":
        capacity = 0 if evaluation else min(capacity, config.total_steps)
    row = 4 * (2 * obs + 2) + (8 if discrete else 4 * act)  # obs, next obs, reward, done, action
    # per pass and sample: each layer's output and activation, and their gradients
    activations = 4 * 4 * passes * (obs + act + sum(hidden))
    if getattr(config, "dropout", 0.0) or getattr(config, "layer_norm", False):
        activations *= 2  # DroQ's critics keep a dropout mask and a normalised output too
    return {
        "replay buffer": capacity * row,
        "networks and optimizers": 4 * networks,
        "a gradient step's batch": 0 if evaluation else config.batch_size * (row + activations),
        "evaluation environments": config.eval_episodes * (_env_bytes(config.env_id) + 8 * obs),
    }


def available_memory(device: str) -> int | None:
    """Bytes that can still be allocated on ``device`` (None where it cannot be told)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
