"""The one "every N steps" counter behind every periodic thing in rlweights.

Target updates (``HardUpdate(every=...)``), EMA/SWA, averaging across processes, the SB3
callbacks and the training loop's evaluation and checkpoint intervals all count with
:class:`Periodic`, so they agree on when "every N" fires and save their counters in one
format.
"""

from __future__ import annotations

from typing import Any

from rlweights.checks import check_int

__all__ = ["Periodic"]


class Periodic:
    """Counts steps; a step is *due* when the count crosses a multiple of ``every`` past
    ``start``.

    With the default ``start=0`` the due steps are ``every, 2 * every, ...`` (as SB3's DQN
    copies its target: the first copy happens at step ``every``). ``start=s`` makes the first
    due step ``s + every``. :meth:`step` may count several steps at once (``n``, e.g. one
    step of ``n`` vectorised environments); it is due when any multiple was crossed.
    """

    __slots__ = ("every", "name", "start", "steps")

    def __init__(self, every: int, *, start: int = 0, name: str = "Periodic"):
        self.name = name
        self.every = check_int(every, "every", name)
        self.start = check_int(start, "start", name, minimum=0)
        self.steps = 0

    def _done(self, steps: int) -> int:
        return max(steps - self.start, 0) // self.every

    @property
    def fired(self) -> int:
        """How many due steps have been counted so far."""
        return self._done(self.steps)

    def step(self, n: int = 1) -> bool:
        """Count ``n`` steps; return whether a due step was among them."""
        before = self._done(self.steps)
        self.steps += n
        return self._done(self.steps) > before

    def state_dict(self) -> dict[str, int]:
        return {"every": self.every, "start": self.start, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. The interval is part of the meaning of the counter, so
        a state saved with another ``every`` or ``start`` is refused (nothing changes)."""
        expected = {"every", "start", "steps"}
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"{self.name}.load_state_dict: expected keys {sorted(expected)}, got {got}"
            )
        for key in ("every", "start"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"{self.name}.load_state_dict: the saved state has {key}={state[key]!r}, this "
                    f"one {key}={getattr(self, key)!r}; build it with {key}={state[key]!r}."
                )
        self.steps = check_int(state["steps"], "steps", f"{self.name}.load_state_dict", minimum=0)

    def __repr__(self) -> str:
        start = f", start={self.start}" if self.start else ""
        return f"Periodic(every={self.every}{start}, steps={self.steps})"
