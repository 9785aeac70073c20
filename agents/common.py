"""Pieces every native agent shares: seeding and a replay buffer of torch tensors."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import Tensor

__all__ = ["ReplayBuffer", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (environments are seeded through ``reset(seed=...)``)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class ReplayBuffer:
    """A ring buffer of transitions kept as torch tensors on the training device.

    Transitions arrive in batches (one row per vectorised environment) and are sampled
    uniformly with a torch generator, so sampling needs no host round trip.
    """

    def __init__(
        self,
        capacity: int,
        obs_shape: tuple[int, ...],
        action_shape: tuple[int, ...],
        device: torch.device | str = "cpu",
        action_dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ):
        if capacity < 1:
            raise ValueError(f"ReplayBuffer: capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.device = torch.device(device)
        self.obs = torch.zeros((capacity, *obs_shape), device=self.device)
        self.next_obs = torch.zeros((capacity, *obs_shape), device=self.device)
        self.actions = torch.zeros(
            (capacity, *action_shape), dtype=action_dtype, device=self.device
        )
        self.rewards = torch.zeros(capacity, device=self.device)
        self.dones = torch.zeros(capacity, device=self.device)
        self.position = 0
        self.size = 0
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    def add(self, obs, actions, rewards, next_obs, terminated) -> None:
        """Store a batch of transitions (arrays or tensors with a leading batch dim).

        ``terminated`` marks true terminal states only (not time-limit truncations), so
        that bootstrapping stops exactly where the episode really ended.
        """
        batch = {
            "obs": obs,
            "actions": actions,
            "rewards": rewards,
            "next_obs": next_obs,
            "dones": terminated,
        }
        n = len(rewards)
        idx = (torch.arange(n, device=self.device) + self.position) % self.capacity
        for name, value in batch.items():
            store: Tensor = getattr(self, name)
            store[idx] = torch.as_tensor(np.asarray(value), device=self.device).to(store.dtype)
        self.position = (self.position + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int) -> dict[str, Tensor]:
        """A uniformly sampled batch (with replacement)."""
        if self.size == 0:
            raise ValueError("ReplayBuffer.sample: the buffer is empty")
        idx = torch.randint(self.size, (batch_size,), device=self.device, generator=self.generator)
        return {
            "obs": self.obs[idx],
            "actions": self.actions[idx],
            "rewards": self.rewards[idx],
            "next_obs": self.next_obs[idx],
            "dones": self.dones[idx],
        }
