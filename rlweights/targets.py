"""Target networks: making one, and the stateful routines that keep it up to date."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from rlweights.capture import check_plan, frozen_plan, plan_device
from rlweights.checks import check_choice, check_fraction, warn_small_tau
from rlweights.flat import flatten_, lives_in_other_layout
from rlweights.ops import BufferPolicy, NonFinite, Plan, copy_, pair_plan, polyak_, write_
from rlweights.periodic import PeriodicRoutine
from rlweights.weights import Weights, entries, is_float

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


def _always(routine: TargetRoutine) -> bool:
    """Due at every step: the write needs no ``torch.where``."""
    return routine.every == 1 and routine.start == 0


class TargetRoutine(PeriodicRoutine):
    """Counts ``step()`` calls and updates the target on every due step: every ``every``-th
    one (as SB3's DQN does: the first update happens at step ``every``), after the first
    ``start`` steps. ``counter`` is the ``Periodic`` that says when.

    A routine made without ``source`` and ``target`` is a template: ``bind`` makes a bound
    copy (``rlweights.sb3.attach`` does this for each target pair of a model).

    ``state_dict()`` is ``{"counter": <Periodic's state>, "updates": n}`` (plus ``"tau"`` for
    ``PolyakUpdate``); a state saved with another ``every`` or ``start`` is refused, as
    ``Periodic`` does.
    """

    def __init__(
        self,
        source: Weights | None,
        target: Weights | None,
        every: int,
        start: int = 0,
        capturable: bool = False,
    ):
        name = type(self).__name__
        if (source is None) != (target is None):
            raise ValueError(f"{name}: pass both source and target, or neither")
        self.plan: Plan | None = None
        device = None
        if source is not None:
            # Pair and validate now, not at the first due step (maybe thousands later).
            if capturable:
                self.plan = frozen_plan(target, source, name)
                device = plan_device(self.plan, name)
            else:
                pair_plan(target, source, name, ints_ok=True)
        super().__init__(every, start=start, capturable=capturable, device=device)
        self.source = source
        self.target = target

    def bind(self, source: Weights, target: Weights) -> TargetRoutine:
        """A copy of this routine's settings, fresh counters, acting on ``source -> target``."""
        bound = copy.copy(self)
        TargetRoutine.__init__(bound, source, target, self.every, self.start, self.capturable)
        bound._bound()
        return bound

    def _bound(self) -> None:
        """What a subclass keeps per bound pair (the capturable form's coefficient tensor)."""

    def check(self) -> None:
        """Capturable routines: raise ``LayoutChangedError`` if the weights
        moved since the routine was built (called on every step: inside torch.compile when
        the step is traced, and the compiled code is traced again after a change, see
        ``rlweights.capture``)."""
        if self.plan is not None:
            check_plan(self.plan)

    def step(self) -> bool | Tensor:
        """Count one step; update the target when due. Returns whether it updated (a 0-dim bool
        tensor on the weights' device for capturable routines)."""
        if self.source is None:
            raise ValueError(
                f"{type(self).__name__} has no source and target: pass them when making it, "
                "use .bind(source, target), or attach it to an SB3 model (rlweights.sb3.attach)."
            )
        if self.plan is not None:
            check_plan(self.plan)  # inside torch.compile: at trace time, then guarded
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
        capturable = ", capturable=True" if self.capturable else ""
        return (
            f"{type(self).__name__}({pair}{self._repr_extra()}, every={self.every}{start}, "
            f"steps={self.steps}, updates={int(self.updates)}{capturable})"
        )


class PolyakUpdate(TargetRoutine):
    """Soft target update every ``every`` steps: ``target <- target + tau * (source - target)``.

    ``tau`` is a float in [0, 1], a 0-dim tensor (for CUDA graphs), or a schedule: a callable
    that receives the number of updates done so far and returns the float for this one
    (validated at every update). It can be changed at any time (``routine.tau = 0.01``).
    ``start=s`` holds the first update back to step ``s + every`` (how SWA starts averaging
    late). ``buffers`` / ``nonfinite`` are those of ``rlweights.polyak_``.

    ``capturable=True``: the form for compiled and captured training steps (see
    ``rlweights.capture``). The pair is resolved and validated here; ``tau`` lives in a
    0-dim float64 tensor on the weights' device, which ``routine.tau = x`` overwrites in place
    (compiled and captured steps see the new value); the counters are device tensors, and
    ``step`` returns the due flag as a tensor. Off the every-step case the write is a
    ``torch.where`` over the due flag. Schedules and ``nonfinite="raise"`` need the host at
    every update and are refused; ``tau=0`` then adds ``0 * (source - target)`` (the weights
    stay equal, but a non-finite source makes NaN).

    ```python
    >>> target = rw.make_target(critic)
    >>> update = rw.PolyakUpdate(critic, target, tau=0.005)
    >>> update.step()  # after each gradient step
    >>> warmup = rw.PolyakUpdate(tau=lambda n: min(1.0, 0.005 + 1.0 / (n + 1)))  # a template

    ```
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
        capturable: bool = False,
    ):
        check_choice(buffers, ("copy", "polyak", "skip"), "buffers", "PolyakUpdate")
        check_choice(nonfinite, ("propagate", "raise", "skip"), "nonfinite", "PolyakUpdate")
        self._tau_t: Tensor | None = None
        self._dtypes: set[torch.dtype] = set()
        self.tau = tau
        if capturable:
            if callable(self._tau) and not isinstance(self._tau, Tensor):
                raise ValueError(
                    "PolyakUpdate(capturable=True): a tau schedule is Python code run at every "
                    "update; set routine.tau = value between steps instead (compiled and "
                    "captured steps see it)."
                )
            _refuse_raise(nonfinite, "PolyakUpdate")
        super().__init__(source, target, every, start, capturable)
        self.buffers = buffers
        self.nonfinite = nonfinite
        self._bound()

    def _bound(self) -> None:
        if self.target is not None:  # the dtypes a small tau cannot move (a warning)
            found = entries(self.target, "target")[0]
            self._dtypes = {
                e.tensor.dtype for e in found if e.kind != "buffer" and is_float(e.tensor)
            }
            warn_small_tau(self._tau, self._dtypes, "PolyakUpdate")
        if self.capturable and self.plan is not None:
            device = self.counter.count.device  # type: ignore[attr-defined]
            self._tau_t = torch.zeros((), dtype=torch.float64, device=device)
            self._tau_t.copy_(torch.as_tensor(self._tau, dtype=torch.float64))

    @property
    def tau(self) -> float | Tensor | Callable[[int], float]:
        return self._tau

    @tau.setter
    def tau(self, value: float | Tensor | Callable[[int], float] | None) -> None:
        if value is None:
            raise ValueError("PolyakUpdate: tau is required (a float in [0, 1], e.g. 0.005)")
        is_schedule = callable(value) and not isinstance(value, Tensor)
        if is_schedule and getattr(self, "capturable", False):
            raise ValueError("PolyakUpdate(capturable=True): tau must be a number, not a schedule")
        self._tau = value if is_schedule else check_fraction(value, "tau", "PolyakUpdate")
        warn_small_tau(self._tau, self._dtypes, "PolyakUpdate")
        if self._tau_t is not None:  # capturable: in place, so compiled steps see it
            self._tau_t.copy_(torch.as_tensor(self._tau, dtype=torch.float64))

    def current_tau(self) -> float | Tensor:
        """The coefficient the next update uses (the schedule's value, if tau is one)."""
        if isinstance(self._tau, (float, Tensor)):
            return self._tau
        return check_fraction(self._tau(self.updates), "tau (from the schedule)", "PolyakUpdate")

    def _run(self) -> None:
        tau = self.current_tau()
        polyak_(self.target, self.source, tau, buffers=self.buffers, nonfinite=self.nonfinite)

    def _run_when(self, due: Tensor) -> None:
        assert self.plan is not None and self._tau_t is not None
        write_(
            self.plan,
            self._tau_t,
            buffers=self.buffers,
            when=None if _always(self) else due,
            skip_nonfinite=self.nonfinite == "skip",
        )

    def _extra_state(self) -> dict[str, Any]:
        # A schedule is code, not state: it is kept by the routine, not saved.
        if self._tau_t is not None:
            return {"tau": float(self._tau_t)}
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
    ``start`` as for ``PolyakUpdate``.

    ```python
    >>> update = rw.HardUpdate(q_net, q_target, every=1000)

    ```

    ``capturable=True``: the form for compiled and captured steps (as for
    ``PolyakUpdate``): every call is one ``torch.where`` per tensor over the due flag of
    the device counter, no host branch.
    """

    def __init__(
        self,
        source: Weights | None = None,
        target: Weights | None = None,
        every: int = 1,
        *,
        start: int = 0,
        nonfinite: NonFinite = "propagate",
        capturable: bool = False,
    ):
        check_choice(nonfinite, ("propagate", "raise", "skip"), "nonfinite", "HardUpdate")
        if capturable:
            _refuse_raise(nonfinite, "HardUpdate")
        self.nonfinite = nonfinite
        super().__init__(source, target, every, start, capturable)

    def _run(self) -> None:
        copy_(self.target, self.source, nonfinite=self.nonfinite)

    def _run_when(self, due: Tensor) -> None:
        assert self.plan is not None
        when = None if _always(self) else due
        write_(self.plan, None, when=when, skip_nonfinite=self.nonfinite == "skip")


def _refuse_raise(nonfinite: str, name: str) -> None:
    if nonfinite == "raise":
        raise ValueError(
            f"{name}(capturable=True): nonfinite='raise' reads the sources on the host at every "
            "update; use 'skip' (no host sync) or 'propagate'."
        )
