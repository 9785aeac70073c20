"""The replay buffer of the native agents: a ring of transitions kept as torch tensors on the
training device."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rlweights.checks import check_int

__all__ = ["ReplayBuffer"]


class ReplayBuffer:
    """A ring buffer of transitions kept as torch tensors on the training device.

    Transitions arrive in batches (one row per vectorised environment) and are sampled
    uniformly with a torch generator, so sampling needs no host round trip.
    """

    FIELDS = ("obs", "actions", "rewards", "next_obs", "terminated")

    def __init__(
        self,
        capacity: int,
        obs_shape: tuple[int, ...],
        action_shape: tuple[int, ...],
        device: torch.device | str = "cpu",
        action_dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ):
        self.capacity = check_int(capacity, "capacity", "ReplayBuffer")
        self.device = torch.device(device)
        self.obs = torch.zeros((capacity, *obs_shape), device=self.device)
        self.next_obs = torch.zeros((capacity, *obs_shape), device=self.device)
        self.actions = torch.zeros(
            (capacity, *action_shape), dtype=action_dtype, device=self.device
        )
        self.rewards = torch.zeros(capacity, device=self.device)
        self.terminated = torch.zeros(capacity, device=self.device)
        self.position = 0
        self.size = 0
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        # On the CPU, numpy views of the same storage: a transition is written and a batch
        # gathered by numpy's indexing, without a tensor made per field and step (the same
        # values, less time per environment step).
        self._host = (
            {name: getattr(self, name).numpy() for name in self.FIELDS}
            if self.device.type == "cpu"
            else None
        )

    def __len__(self) -> int:
        return self.size

    def add(self, obs, actions, rewards, next_obs, terminated) -> None:
        """Store a batch of transitions (arrays or tensors with a leading batch dim).

        ``terminated`` marks true terminal states only (not time-limit truncations), so
        that bootstrapping stops exactly where the episode really ended.
        """
        n = len(rewards)
        start = self.position
        # A slice while the rows fit before the end of the ring (cheaper than indexing).
        rows: Any = slice(start, start + n) if start + n <= self.capacity else None
        if rows is None:
            rows = (np.arange(n) + start) % self.capacity
            if self._host is None:
                rows = torch.as_tensor(rows, device=self.device)
        values = (obs, actions, rewards, next_obs, terminated)
        for name, value in zip(self.FIELDS, values, strict=True):
            if self._host is not None:  # numpy casts to the field's dtype as torch's .to() does
                self._host[name][rows] = np.asarray(value)
            else:
                store: Tensor = getattr(self, name)
                store[rows] = torch.as_tensor(np.asarray(value), device=self.device).to(store.dtype)
        self.position = (self.position + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    # The most bytes one draw of several batches gathers at once (``batches``).
    GATHER_BYTES = 64 * 2**20

    def sample(self, batch_size: int) -> dict[str, Tensor]:
        """A uniformly sampled batch (with replacement)."""
        return next(self.batches(1, batch_size))

    def batches(self, count: int, batch_size: int) -> Iterator[dict[str, Tensor]]:
        """``count`` uniformly sampled batches (with replacement) for as many gradient steps,
        drawn together: one index draw and one gather per field for all of them (in chunks
        of at most ``GATHER_BYTES``), not one per step. On the CPU the batches are
        exactly those of ``count`` calls of ``sample`` (the generator's stream is the
        same); on CUDA they are other uniform draws."""
        if self.size == 0:
            raise ValueError("ReplayBuffer.sample: the buffer is empty")
        row = sum(getattr(self, name)[:1].nbytes for name in self.FIELDS)
        chunk = max(1, min(count, self.GATHER_BYTES // max(1, row * batch_size)))
        for start in range(0, count, chunk):
            steps = min(chunk, count - start)
            idx = torch.randint(
                self.size, (steps, batch_size), device=self.device, generator=self.generator
            )
            if self._host is not None:
                rows = idx.numpy()
                drawn = {name: torch.from_numpy(self._host[name][rows]) for name in self.FIELDS}
            else:
                drawn = {name: getattr(self, name)[idx] for name in self.FIELDS}
            for i in range(steps):
                yield {name: values[i] for name, values in drawn.items()}

    def state_dict(self) -> dict[str, Any]:
        """The stored rows only (not the empty capacity), the ring position and the sampler."""
        state: dict[str, Any] = {name: getattr(self, name)[: self.size] for name in self.FIELDS}
        state.update(position=self.position, size=self.size, generator=self.generator.get_state())
        return state

    def check_state(self, state: Any) -> None:
        """Raise ``ValueError`` unless ``state`` is a ``state_dict`` this buffer can load:
        counters that are integers in range, and ``size`` rows of each field in this buffer's
        shapes and dtypes."""
        op = "ReplayBuffer.load_state_dict"
        expected = {*self.FIELDS, "position", "size", "generator"}
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{op}: expected keys {sorted(expected)}, got {got}")
        size = check_int(state["size"], "size", op, minimum=0)
        if size > self.capacity:
            raise ValueError(
                f"ReplayBuffer: the saved buffer holds {size} transitions, more than this "
                f"buffer's capacity {self.capacity}"
            )
        position = check_int(state["position"], "position", op, minimum=0)
        if position > size:
            raise ValueError(f"{op}: position={position} is past the {size} stored rows")
        for name in self.FIELDS:
            value, store = state[name], getattr(self, name)
            shape = (size, *store.shape[1:])
            if not (
                isinstance(value, Tensor) and value.dtype == store.dtype and value.shape == shape
            ):
                got = (value.dtype, tuple(value.shape)) if isinstance(value, Tensor) else value
                raise ValueError(
                    f"{op}: {name} must be {store.dtype} rows of shape {shape}, got {got!r:.60}"
                )
        generator = state["generator"]
        if not (isinstance(generator, Tensor) and generator.dtype == torch.uint8):
            raise ValueError(f"{op}: generator must be a torch generator state (uint8 tensor)")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``, validated first. Into a buffer of another capacity (a
        run resumed with more steps), the rows are laid oldest first from row 0, so that the
        ring goes on as it would have in a buffer of this capacity: new rows never overwrite
        old ones while there is room, and no empty row is ever sampled."""
        self.check_state(state)
        size, position = state["size"], state["position"]
        values = {name: state[name].to(self.device) for name in self.FIELDS}
        if size < self.capacity and position != size:  # wrapped or full in a smaller ring
            values = {name: value.roll(-position, 0) for name, value in values.items()}
            position = size
        for name, value in values.items():
            getattr(self, name)[:size] = value
        self.position, self.size = position % self.capacity, size
        self.generator.set_state(state["generator"])
