"""Averages of a policy over time: an exponential moving average (EMA) and a uniform one (SWA).

Both keep a frozen averaged copy of the module in flat storage (``rw.make_target``), so an
update is one fused pass per flat buffer, and both are routines like ``rw.PolyakUpdate``:
``update()``, ``state_dict()`` / ``load_state_dict()``, a clear repr.

>>> ema = rw.EMA(policy, tau=0.005, warmup=True)
>>> ema.update()  # after each optimizer step of the policy
>>> action = ema.averaged(obs)

Convention: ``tau`` is the step toward the online weights, as everywhere in rlweights
(torch's / timm's ``decay`` and ema-pytorch's ``beta`` are ``1 - tau``).

Buffers (BatchNorm running statistics): ``buffers="copy"`` (default) copies the online
module's floating buffers into the average at every update, ``"polyak"`` averages them like
the weights, ``"skip"`` leaves them as they were when the average was made (then recompute
them, e.g. with ``torch.optim.swa_utils.update_bn``). Integer buffers are copied.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from rlweights.checks import check_fraction
from rlweights.ops import BufferPolicy
from rlweights.targets import PolyakUpdate, make_target

__all__ = ["EMA", "SWA"]


class _Average:
    """The averaged copy and the Polyak routine that moves it; subclasses give the schedule."""

    def __init__(self, module: nn.Module, buffers: BufferPolicy, every: int):
        if not isinstance(module, nn.Module):
            raise TypeError(f"{type(self).__name__} averages an nn.Module, got {module!r}")
        self.module = module
        self.averaged = make_target(module)
        self._routine = PolyakUpdate(
            module, self.averaged, tau=self._tau, every=every, buffers=buffers
        )

    def _tau(self, updates: int) -> float:
        raise NotImplementedError

    @property
    def updates(self) -> int:
        """Updates of the average done so far."""
        return self._routine.updates

    def update(self) -> bool:
        """Count a step; on every ``every``-th one, move the average. Returns whether it did."""
        return self._routine.step()

    def state_dict(self) -> dict[str, Any]:
        return {"averaged": self.averaged.state_dict(), "routine": self._routine.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state["averaged"])  # in place: flat views stay
        self._routine.load_state_dict(state["routine"])


class EMA(_Average):
    """Exponential moving average: ``avg <- avg + tau_n * (online - avg)`` at update ``n``.

    ``warmup=True`` uses TensorFlow's ``ExponentialMovingAverage(num_updates=n)`` schedule
    (also timm's and many RL codebases'): ``tau_n = max(tau, 1 - (1 + n) / (10 + n))``, so
    early updates follow the online weights closely instead of averaging in the random
    initialisation for thousands of steps. ``every=k`` updates on every k-th call.
    """

    def __init__(
        self,
        module: nn.Module,
        tau: float,
        *,
        warmup: bool = False,
        every: int = 1,
        buffers: BufferPolicy = "copy",
    ):
        if isinstance(tau, bool) or not isinstance(tau, (int, float)):
            raise TypeError(f"EMA: tau must be a float in (0, 1], got {tau!r}")
        self.tau = float(check_fraction(float(tau), "tau", "EMA"))
        self.warmup = bool(warmup)
        super().__init__(module, buffers, every)

    def _tau(self, updates: int) -> float:
        if self.warmup:
            return max(self.tau, 1.0 - (1.0 + updates) / (10.0 + updates))
        return self.tau

    def __repr__(self) -> str:
        return (
            f"EMA({type(self.module).__name__}, tau={self.tau}, warmup={self.warmup}, "
            f"updates={self.updates})"
        )


class SWA(_Average):
    """Uniform average of the weights seen at the updates after the first ``start`` calls
    (stochastic weight averaging): after ``n`` averaged updates the copy holds the mean of
    those ``n`` weight snapshots (``tau_n = 1 / (n + 1)``; the first one copies)."""

    def __init__(
        self, module: nn.Module, *, start: int = 0, every: int = 1, buffers: BufferPolicy = "copy"
    ):
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"SWA: start must be an int >= 0, not {start!r}")
        self.start = start
        self.calls = 0
        super().__init__(module, buffers, every)

    def _tau(self, updates: int) -> float:
        return 1.0 / (updates + 1)

    def update(self) -> bool:
        self.calls += 1
        if self.calls <= self.start:
            return False
        return super().update()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.calls = state["calls"]

    def __repr__(self) -> str:
        return (
            f"SWA({type(self.module).__name__}, start={self.start}, calls={self.calls}, "
            f"updates={self.updates})"
        )
