"""Target networks: making one, and the stateful routines that keep it up to date."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from rlweights.checks import check_choice, check_fraction
from rlweights.flat import flatten_, lives_in_other_layout
from rlweights.ops import BufferPolicy, NonFinite, copy_, pair_plan, polyak_
from rlweights.periodic import PeriodicRoutine
from rlweights.weights import Weights

__all__ = ["HardUpdate", "PolyakUpdate", "TargetRoutine", "make_target"]


def make_target(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module`` for use as a target network.

    The copy has ``requires_grad=False`` everywhere and is in eval mode. Both ``module`` (in
    place, Parameter objects kept) and the copy are flattened with the same layout, so every
    target update between them takes the fast path: one kernel per flat buffer.

    Except when ``module``'s tensors already live in flat buffers made for other modules (a
    submodule flattened on its own, e.g. by ``rlweights.sb3.attach``, or ``module`` being
    part of a larger flattened network, like TD3's actor in one buffer with its critic):
    then ``module`` is left as it is, so those layouts stay intact, only the copy is
    flattened, and updates between the two take the grouped ``torch._foreach_*`` path.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"make_target takes an nn.Module, got {type(module).__name__}")
    if not lives_in_other_layout(module):
        flatten_(module)
    target = copy.deepcopy(module)  # deepcopy keeps no views: flatten the copy again
    flatten_(target)
    target.requires_grad_(False)
    target.eval()
    return target


def _weights_name(weights: Weights) -> str:
    return type(weights).__name__


class TargetRoutine(PeriodicRoutine):
    """Counts ``step()`` calls and updates the target on every due step: every ``every``-th
    one (as SB3's DQN does: the first update happens at step ``every``), after the first
    ``start`` steps. ``counter`` is the :class:`~rlweights.periodic.Periodic` that says when.

    A routine made without ``source`` and ``target`` is a template: :meth:`bind` makes a bound
    copy (``rlweights.sb3.attach`` does this for each target pair of a model).

    ``state_dict()`` is ``{"counter": <Periodic's state>, "updates": n}`` (plus ``"tau"`` for
    :class:`PolyakUpdate`); a state saved with another ``every`` or ``start`` is refused, as
    :class:`~rlweights.periodic.Periodic` does.
    """

    def __init__(self, source: Weights | None, target: Weights | None, every: int, start: int = 0):
        super().__init__(every, start=start)
        if (source is None) != (target is None):
            raise ValueError(f"{type(self).__name__}: pass both source and target, or neither")
        if source is not None:
            # Pair and validate now, not at the first due step (maybe thousands later).
            pair_plan(target, source, type(self).__name__, ints_ok=True)
        self.source = source
        self.target = target

    def bind(self, source: Weights, target: Weights) -> TargetRoutine:
        """A copy of this routine's settings, fresh counters, acting on ``source -> target``."""
        bound = copy.copy(self)
        TargetRoutine.__init__(bound, source, target, self.every, self.start)
        return bound

    def step(self) -> bool:
        """Count one step; update the target when due. Returns whether it updated."""
        if self.source is None:
            raise ValueError(
                f"{type(self).__name__} has no source and target: pass them when making it, "
                "use .bind(source, target), or attach it to an SB3 model (rlweights.sb3.attach)."
            )
        return PeriodicRoutine.step(self)  # not super(): cheaper, and this runs every step

    def _repr_extra(self) -> str:
        return ""

    def __repr__(self) -> str:
        pair = (
            "unbound"
            if self.source is None
            else f"{_weights_name(self.source)} -> {_weights_name(self.target)}"
        )
        start = f", start={self.start}" if self.start else ""
        return (
            f"{type(self).__name__}({pair}{self._repr_extra()}, every={self.every}{start}, "
            f"steps={self.steps}, updates={self.updates})"
        )


class PolyakUpdate(TargetRoutine):
    """Soft target update every ``every`` steps: ``target <- target + tau * (source - target)``.

    ``tau`` is a float in [0, 1], a 0-dim tensor (for CUDA graphs), or a schedule: a callable
    that receives the number of updates done so far and returns the float for this one
    (validated at every update). It can be changed at any time (``routine.tau = 0.01``).
    ``start=s`` holds the first update back to step ``s + every`` (how SWA starts averaging
    late). ``buffers`` / ``nonfinite`` are those of :func:`rlweights.polyak_`.

    >>> target = rw.make_target(critic)
    >>> update = rw.PolyakUpdate(critic, target, tau=0.005)
    >>> update.step()  # after each gradient step
    >>> warmup = rw.PolyakUpdate(tau=lambda n: min(1.0, 0.005 + 1.0 / (n + 1)))  # a template
    """

    def __init__(
        self,
        source: Weights | None = None,
        target: Weights | None = None,
        tau: float | Tensor | Callable[[int], float] | None = None,
        every: int = 1,
        *,
        start: int = 0,
        buffers: BufferPolicy = "copy",
        nonfinite: NonFinite = "propagate",
    ):
        check_choice(buffers, ("copy", "polyak", "skip"), "buffers", "PolyakUpdate")
        check_choice(nonfinite, ("propagate", "raise", "skip"), "nonfinite", "PolyakUpdate")
        self.tau = tau
        super().__init__(source, target, every, start)
        self.buffers = buffers
        self.nonfinite = nonfinite

    @property
    def tau(self) -> float | Tensor | Callable[[int], float]:
        return self._tau

    @tau.setter
    def tau(self, value: float | Tensor | Callable[[int], float] | None) -> None:
        if value is None:
            raise ValueError("PolyakUpdate: tau is required (a float in [0, 1], e.g. 0.005)")
        is_schedule = callable(value) and not isinstance(value, Tensor)
        self._tau = value if is_schedule else check_fraction(value, "tau", "PolyakUpdate")

    def current_tau(self) -> float | Tensor:
        """The coefficient the next update uses (the schedule's value, if tau is one)."""
        if isinstance(self._tau, (float, Tensor)):
            return self._tau
        return check_fraction(self._tau(self.updates), "tau (from the schedule)", "PolyakUpdate")

    def _run(self) -> None:
        tau = self.current_tau()
        polyak_(self.target, self.source, tau, buffers=self.buffers, nonfinite=self.nonfinite)

    def _extra_state(self) -> dict[str, Any]:
        # A schedule is code, not state: it is kept by the routine, not saved.
        return {"tau": self._tau if isinstance(self._tau, (float, Tensor)) else None}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if state["tau"] is not None:
            self.tau = state["tau"]

    def _repr_extra(self) -> str:
        tau = self._tau
        shown = (
            tau
            if isinstance(tau, float)
            else "<tensor>"
            if isinstance(tau, Tensor)
            else "<schedule>"
        )
        return f", tau={shown}"


class HardUpdate(TargetRoutine):
    """Hard target update (exact copy) every ``every`` steps, as DQN's target network;
    ``start`` as for :class:`PolyakUpdate`.

    >>> update = rw.HardUpdate(q_net, q_target, every=1000)
    """

    def __init__(
        self,
        source: Weights | None = None,
        target: Weights | None = None,
        every: int = 1,
        *,
        start: int = 0,
        nonfinite: NonFinite = "propagate",
    ):
        check_choice(nonfinite, ("propagate", "raise", "skip"), "nonfinite", "HardUpdate")
        super().__init__(source, target, every, start)
        self.nonfinite = nonfinite

    def _run(self) -> None:
        copy_(self.target, self.source, nonfinite=self.nonfinite)
