"""Target networks: making one, and the stateful routines that keep it up to date."""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn

from rlweights.flat import flatten_
from rlweights.ops import BufferPolicy, NonFinite, _pair_plan, copy_, polyak_
from rlweights.weights import Weights, check_choice, check_fraction

__all__ = ["HardUpdate", "PolyakUpdate", "make_target"]


def make_target(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module`` for use as a target network.

    The copy has ``requires_grad=False`` everywhere and is in eval mode. Both ``module`` (in
    place, Parameter objects kept) and the copy are flattened with the same layout, so every
    target update between them takes the fast path: one kernel per flat buffer.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"make_target takes an nn.Module, got {type(module).__name__}")
    flatten_(module)
    target = copy.deepcopy(module)  # deepcopy keeps no views: flatten the copy again
    flatten_(target)
    target.requires_grad_(False)
    target.eval()
    return target


def _check_every(every: object, cls: str) -> int:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"{cls}: every must be an int >= 1, not {every!r}")
    return every


def _weights_name(weights: Weights) -> str:
    return type(weights).__name__


class _Periodic:
    """Counts ``step()`` calls and updates on every ``every``-th one (as SB3's DQN does:
    the first update happens at step ``every``)."""

    def __init__(self, source: Weights, target: Weights, every: int):
        self.every = _check_every(every, type(self).__name__)
        # Pair and validate now, not at the first due step (maybe thousands of steps later).
        _pair_plan(target, source, type(self).__name__, ints_ok=True)
        self.source = source
        self.target = target
        self.steps = 0
        self.updates = 0

    def _update(self) -> None:
        raise NotImplementedError

    def step(self) -> bool:
        """Count one step; update the target when due. Returns whether it updated."""
        self.steps += 1
        if self.steps % self.every:
            return False
        self._update()
        self.updates += 1
        return True

    def state_dict(self) -> dict[str, Any]:
        """Counters and settings (the networks' weights live in their own state_dicts)."""
        return {"every": self.every, "steps": self.steps, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; validated first, so a bad state changes nothing."""
        name = type(self).__name__
        expected = set(self.state_dict())
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{name}.load_state_dict: expected keys {sorted(expected)}, got {got}")
        for key in ("steps", "updates"):
            if isinstance(state[key], bool) or not isinstance(state[key], int) or state[key] < 0:
                raise ValueError(f"{name}.load_state_dict: {key} must be an int >= 0")
        every = _check_every(state["every"], name)
        self._load_extra(state)
        self.every, self.steps, self.updates = every, state["steps"], state["updates"]

    def _load_extra(self, state: dict[str, Any]) -> None:
        pass

    def _repr_extra(self) -> str:
        return ""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({_weights_name(self.source)} -> "
            f"{_weights_name(self.target)}{self._repr_extra()}, every={self.every}, "
            f"steps={self.steps}, updates={self.updates})"
        )


class PolyakUpdate(_Periodic):
    """Soft target update every ``every`` steps: ``target <- target + tau * (source - target)``.

    ``tau`` can be changed at any time (``routine.tau = 0.01``; validated), and may be a 0-dim
    tensor for CUDA graphs. ``buffers`` / ``nonfinite`` are those of :func:`rlweights.polyak_`.

    >>> target = rw.make_target(critic)
    >>> update = rw.PolyakUpdate(critic, target, tau=0.005)
    >>> update.step()  # after each gradient step
    """

    def __init__(
        self,
        source: Weights,
        target: Weights,
        tau: float | Tensor,
        every: int = 1,
        *,
        buffers: BufferPolicy = "copy",
        nonfinite: NonFinite = "propagate",
    ):
        super().__init__(source, target, every)
        check_choice(buffers, ("copy", "polyak", "skip"), "buffers", "PolyakUpdate")
        check_choice(nonfinite, ("propagate", "raise", "skip"), "nonfinite", "PolyakUpdate")
        self.tau = tau
        self.buffers = buffers
        self.nonfinite = nonfinite

    @property
    def tau(self) -> float | Tensor:
        return self._tau

    @tau.setter
    def tau(self, value: float | Tensor) -> None:
        self._tau = check_fraction(value, "tau", "PolyakUpdate")

    def _update(self) -> None:
        polyak_(self.target, self.source, self._tau, buffers=self.buffers, nonfinite=self.nonfinite)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "tau": self._tau}

    def _load_extra(self, state: dict[str, Any]) -> None:
        self.tau = state["tau"]

    def _repr_extra(self) -> str:
        tau = self._tau if isinstance(self._tau, float) else "<tensor>"
        return f", tau={tau}"


class HardUpdate(_Periodic):
    """Hard target update (exact copy) every ``every`` steps, as DQN's target network.

    >>> update = rw.HardUpdate(q_net, q_target, every=1000)
    """

    def __init__(
        self,
        source: Weights,
        target: Weights,
        every: int = 1,
        *,
        nonfinite: NonFinite = "propagate",
    ):
        super().__init__(source, target, every)
        check_choice(nonfinite, ("propagate", "raise", "skip"), "nonfinite", "HardUpdate")
        self.nonfinite = nonfinite

    def _update(self) -> None:
        copy_(self.target, self.source, nonfinite=self.nonfinite)
