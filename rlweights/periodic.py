"""The one "every N steps" counter behind every periodic thing in rlweights.

Target updates (``PolyakUpdate`` / ``HardUpdate``), EMA and SWA, averaging across processes
(``distributed.PeriodicAverager``) and the SB3 callbacks (drift logging, evaluation of an
averaged policy) all count with ``Periodic``, so they agree on when "every N" fires and
save their counters in one format. The routines among them share ``PeriodicRoutine``:
count, act when due, save ``{"counter": ..., "updates": ...}``.

``DevicePeriodic`` is the same counter with its count in a device tensor, for the
capturable routines (``capturable=True``): counting and "is it due" are tensor arithmetic,
so they trace with ``torch.compile(fullgraph=True)`` and record into CUDA graphs.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from rlweights.checks import check_int

__all__ = ["DevicePeriodic", "Periodic", "PeriodicRoutine"]


class Periodic:
    """Counts steps; a step is *due* when the count crosses a multiple of ``every`` past
    ``start``, or (``at=[...]`` instead of ``every``) one of the listed steps.

    With the default ``start=0`` the due steps are ``every, 2 * every, ...`` (as SB3's DQN
    copies its target: the first copy happens at step ``every``). ``start=s`` makes the first
    due step ``s + every`` (SWA's late start). ``at=[50_000, 100_000]``: due at exactly those
    counts (BRO's resets at fixed steps). ``step`` may count several steps at once
    (``n``, e.g. one step of ``n`` vectorised environments); it is due when any due count was
    crossed.

    ``state_dict()`` is ``{"every": ..., "start": ..., "steps": ...}`` (``{"at": [...],
    "steps": ...}`` for listed steps): every routine of rlweights saves its counter in this
    format. ``every``, ``start`` and ``at`` are settings, so ``load_state_dict`` refuses
    a state saved with other ones instead of adopting them (the code or the config that built
    the counter says when it fires).
    """

    __slots__ = ("_at", "_due", "_every", "_start", "_steps", "name")

    def __init__(
        self,
        every: int | None = None,
        *,
        start: int = 0,
        at: Sequence[int] | None = None,
        name: str = "Periodic",
    ):
        self.name = name
        if (every is None) == (at is None):
            raise ValueError(
                f"{name}: give every=N (due every N steps) or at=[steps] (due at those "
                f"counts), one of them; got every={every!r}, at={at!r}"
            )
        self._at: tuple[int, ...] | None = None
        if at is not None:
            self._at = _check_at(at, name)
            if start:
                raise ValueError(f"{name}: start= goes with every=; at= lists the due steps")
            every = 1  # unused with at=; keeps the type of every
        self._every = check_int(every, "every", name)
        self._start = check_int(start, "start", name, minimum=0)
        self._set_steps(0)

    @property
    def every(self) -> int | None:
        """Steps between due steps (None with ``at=``)."""
        return None if self._at is not None else self._every

    @property
    def at(self) -> tuple[int, ...] | None:
        """The listed due steps (None with ``every=``)."""
        return self._at

    @property
    def start(self) -> int:
        return self._start

    @property
    def steps(self) -> int:
        """Steps counted so far."""
        return self._steps

    @property
    def fired(self) -> int:
        """How many due steps have been counted so far."""
        if self._at is not None:
            return bisect.bisect_right(self._at, self._steps)
        return max(self._steps - self._start, 0) // self._every

    def _set_steps(self, steps: int) -> None:
        self._steps = steps
        if self._at is not None:  # the next listed step (-1: none left)
            fired = self.fired
            self._due = self._at[fired] if fired < len(self._at) else -1
        else:
            self._due = self._start + self._every * (self.fired + 1)  # the next due count

    def step(self, n: int = 1) -> bool:
        """Count ``n`` steps; return whether a due step was among them."""
        if n == 1:  # the common case, kept cheap: it runs after every gradient step
            self._steps += 1
            if self._steps != self._due:
                return False
            if self._at is None:
                self._due += self._every
            else:
                self._set_steps(self._steps)
            return True
        check_int(n, "n", f"{self.name}.step", minimum=0)
        before = self.fired
        self._set_steps(self._steps + n)
        return self.fired > before

    def state_dict(self) -> dict[str, Any]:
        if self._at is not None:
            return {"at": list(self._at), "steps": self.steps}
        return {"every": self._every, "start": self._start, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``; validated first, so a bad state changes nothing. A
        state saved with another ``every``, ``start`` or ``at`` is refused, naming the fix."""
        self._set_steps(self.check_state(state))

    def check_state(self, state: dict[str, Any]) -> int:
        """Validate a ``state_dict`` for this counter without loading it; return its
        ``steps``. Routines call it before they change anything."""
        op = f"{self.name}.load_state_dict"
        expected = set(self.state_dict())
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{op}: expected keys {sorted(expected)}, got {got}")
        if self._at is not None:
            saved_at = _check_at(state["at"], op)
            if saved_at != self._at:
                raise ValueError(
                    f"{op}: the saved state has at={list(saved_at)}, this one "
                    f"at={list(self._at)}; build it with at={list(saved_at)}."
                )
        else:
            for key, minimum in (("every", 1), ("start", 0)):
                saved = check_int(state[key], key, op, minimum=minimum)
                if saved != getattr(self, key):
                    raise ValueError(
                        f"{op}: the saved state has {key}={saved}, this one {key}="
                        f"{getattr(self, key)}; build it with {key}={saved}."
                    )
        return check_int(state["steps"], "steps", op, minimum=0)

    def __repr__(self) -> str:
        if self._at is not None:
            return f"Periodic(at={list(self._at)}, steps={self._steps})"
        start = f", start={self._start}" if self._start else ""
        return f"Periodic(every={self._every}{start}, steps={self._steps})"


def _check_at(at: object, name: str) -> tuple[int, ...]:
    """Listed due steps: a non-empty sequence of distinct counts >= 1, in increasing order."""
    steps = list(at) if isinstance(at, (list, tuple)) else None
    if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
        raise ValueError(f"{name}: at= must be a non-empty list of step counts >= 1, got {at!r}")
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError(f"{name}: at= must list distinct steps in increasing order, got {at!r}")
    return tuple(steps)


class DevicePeriodic(Periodic):
    """``Periodic`` with its count in a 0-dim int64 tensor on ``device``: ``step``
    adds to it and returns a 0-dim bool tensor (due or not) without reading anything back to
    the host, so it can run inside a compiled or captured step. Reading ``steps`` or
    ``fired`` syncs; the state is ``Periodic``'s."""

    __slots__ = ("count",)

    def __init__(
        self,
        every: int,
        *,
        start: int = 0,
        name: str = "Periodic",
        device: torch.device | str | None = None,
    ):
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        super().__init__(every, start=start, name=name)

    @property
    def steps(self) -> int:
        return int(self.count)

    @property
    def fired(self) -> int:
        return max(self.steps - self._start, 0) // self._every

    def _set_steps(self, steps: int) -> None:
        self.count.fill_(steps)

    def _fired(self) -> Tensor:
        return (self.count - self._start).clamp(min=0) // self._every

    def step(self, n: int = 1) -> Tensor:  # type: ignore[override]
        """Count ``n`` steps (a Python int); a 0-dim bool tensor: whether a due step was among
        them."""
        if n == 1:
            self.count.add_(1)
            return (self.count > self._start) & ((self.count - self._start) % self._every == 0)
        check_int(n, "n", f"{self.name}.step", minimum=0)
        before = self._fired()
        self.count.add_(n)
        return self._fired() > before

    def __repr__(self) -> str:
        start = f", start={self._start}" if self._start else ""
        return f"DevicePeriodic(every={self._every}{start}, device={self.count.device})"


class PeriodicRoutine:
    """Base of the routines that act on the due steps of a ``Periodic`` counter (target
    updates, averages, averaging across processes).

    ``step`` counts one step and, when it is due, runs ``_run``; ``updates`` counts
    the runs that completed; ``counter`` is the ``Periodic``. The state is
    ``{"counter": <Periodic's state>, "updates": n}`` plus what a subclass adds
    (``_extra_state``), and ``load_state_dict`` validates all of it before it changes
    anything.

    ``capturable=True``: the counter is a ``DevicePeriodic`` on ``device``, ``updates``
    a 0-dim int64 tensor there, and ``step`` runs ``_run_when`` (the subclass's
    tensor-only form, given the due flag) on every call and returns the flag as a tensor.
    """

    def __init__(
        self,
        every: int | None,
        *,
        start: int = 0,
        at: Sequence[int] | None = None,
        capturable: bool = False,
        device: torch.device | str | None = None,
    ):
        name = type(self).__name__
        self.capturable = bool(capturable)
        if self.capturable:
            if at is not None:
                raise ValueError(f"{name}: at= is not capturable; use every=N")
            self.counter: Periodic = DevicePeriodic(every, start=start, name=name, device=device)
            self.updates: int | Tensor = torch.zeros((), dtype=torch.int64, device=device)
        else:
            self.counter = Periodic(every, start=start, at=at, name=name)
            self.updates = 0

    @property
    def every(self) -> int:
        return self.counter.every

    @property
    def start(self) -> int:
        return self.counter.start

    @property
    def steps(self) -> int:
        """Steps counted so far."""
        return self.counter.steps

    def _run(self) -> None:
        raise NotImplementedError

    def _run_when(self, due: Tensor) -> None:
        """The capturable form of ``_run``: act where ``due`` (a 0-dim bool tensor) is
        true, without reading it on the host."""
        raise NotImplementedError

    def step(self, n: int = 1) -> bool | Tensor:
        """Count ``n`` steps (one by default); when a due step is among them, run (once).
        Returns whether it ran (capturable: as a 0-dim bool tensor, which stays on the
        device)."""
        if self.capturable:
            due = self.counter.step(n)
            self._run_when(due)
            self.updates.add_(due.to(torch.int64))  # type: ignore[union-attr]
            return due
        if not self.counter.step(n):
            return False
        self._run()
        self.updates += 1
        return True

    def state_dict(self) -> dict[str, Any]:
        """The counter, the number of runs and the subclass's settings."""
        return {
            "counter": self.counter.state_dict(),
            "updates": int(self.updates),
            **self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``; validated first, so a bad state changes nothing."""
        op = f"{self.counter.name}.load_state_dict"
        expected = set(self.state_dict())
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{op}: expected keys {sorted(expected)}, got {got}")
        updates = check_int(state["updates"], "updates", op, minimum=0)
        self.counter.check_state(state["counter"])
        self._load_extra_state(state)
        self.counter.load_state_dict(state["counter"])  # checked above: cannot raise now
        if isinstance(self.updates, Tensor):
            self.updates.fill_(updates)
        else:
            self.updates = updates

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Validate and take the subclass's part of ``state`` (the last thing that may raise)."""
