"""Averages of a policy over time: an exponential moving average (EMA) and a uniform one (SWA).

Both keep a frozen averaged copy of the module in flat storage (``rw.make_target``), so an
update is one fused pass per flat buffer, and both are routines like ``rw.PolyakUpdate``
(``PeriodicRoutine``): ``update()`` (also named ``step()``),
``state_dict()`` / ``load_state_dict()``, a clear repr.

```python
>>> ema = rw.EMA(policy, tau=0.005, warmup=True)
>>> ema.update()  # after each optimizer step of the policy
>>> action = ema.averaged(obs)

```

Convention: ``tau`` is the step toward the online weights, as everywhere in rlweights
(torch's / timm's ``decay`` and ema-pytorch's ``beta`` are ``1 - tau``).

Buffers (BatchNorm running statistics): ``buffers="copy"`` (default) copies the online
module's floating buffers into the average at every update, ``"polyak"`` averages them like
the weights, ``"skip"`` leaves them as they were when the average was made (then recompute
them, e.g. with ``torch.optim.swa_utils.update_bn``). Integer buffers are copied.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from rlweights.capture import check_plan, frozen_plan, plan_device
from rlweights.checks import check_choice, check_fraction, warn_small_tau
from rlweights.ops import BufferPolicy, Plan, polyak_, write_
from rlweights.periodic import PeriodicRoutine
from rlweights.targets import make_target
from rlweights.weights import WeightMismatchError

__all__ = ["EMA", "SWA"]


class _Average(PeriodicRoutine):
    """The averaged copy, moved toward the module on the due steps of the routine's counter;
    subclasses give the schedule of tau. The copy is made by ``make_target``, which also puts
    the online module into flat storage (its Parameter objects stay, so optimizers and hooks
    built on them stay valid). The state is ``{"counter": ..., "updates": ...,
    "averaged": <the averaged module's state_dict>}``."""

    def __init__(
        self,
        module: nn.Module,
        buffers: BufferPolicy,
        every: int,
        start: int = 0,
        capturable: bool = False,
    ):
        name = type(self).__name__
        if not isinstance(module, nn.Module):
            raise TypeError(f"{name} averages an nn.Module, got {module!r}")
        check_choice(buffers, ("copy", "polyak", "skip"), "buffers", name)
        self.module = module
        self.buffers = buffers
        self.averaged = make_target(module)
        self.plan: Plan | None = None
        device = None
        if capturable:
            self.plan = frozen_plan(self.averaged, module, name)
            device = plan_device(self.plan, name)
        super().__init__(every, start=start, capturable=capturable, device=device)

    def _tau(self, updates: int) -> float:
        raise NotImplementedError

    def _tau_tensor(self, updates: Tensor) -> Tensor:
        """The capturable form of ``_tau`` (float64, on the device)."""
        raise NotImplementedError

    def _run(self) -> None:
        polyak_(self.averaged, self.module, self._tau(self.updates), buffers=self.buffers)

    def _run_when(self, due: Tensor) -> None:
        assert self.plan is not None
        tau = self._tau_tensor(self.updates)  # type: ignore[arg-type]
        always = self.every == 1 and self.start == 0
        write_(self.plan, tau, buffers=self.buffers, when=None if always else due)

    def check(self) -> None:
        """Capturable averages: raise ``LayoutChangedError`` if the weights
        moved since the average was built."""
        if self.plan is not None:
            check_plan(self.plan)

    def update(self) -> bool | Tensor:
        """Count a step; move the average when due. Returns whether it moved (a 0-dim bool
        tensor for capturable averages)."""
        if self.plan is not None:
            check_plan(self.plan)  # inside torch.compile: at trace time, then guarded
        return PeriodicRoutine.step(self)

    step = update

    def _extra_state(self) -> dict[str, Any]:
        return {"averaged": self.averaged.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Check that the saved weights have this average's names and shapes, then load them
        (torch's load_state_dict would copy the matching tensors before it raises)."""
        op = f"{type(self).__name__}.load_state_dict"
        saved, mine = state["averaged"], self.averaged.state_dict()
        if not isinstance(saved, Mapping):
            raise ValueError(f"{op}: 'averaged' must be a state_dict, got {type(saved).__name__}")
        wrong = sorted(
            name
            for name in mine.keys() | saved.keys()
            if name not in mine
            or name not in saved
            or getattr(saved[name], "shape", None) != mine[name].shape
        )
        if wrong:
            raise WeightMismatchError(
                f"{op}: the saved average does not fit this module ({', '.join(wrong[:6])}); "
                "load the state of an average of the same architecture"
            )
        self.averaged.load_state_dict(saved)  # in place: flat views stay


class EMA(_Average):
    """Exponential moving average: ``avg <- avg + tau_n * (online - avg)`` at update ``n``.

    ``warmup=True`` uses TensorFlow's ``ExponentialMovingAverage(num_updates=n)`` schedule
    (also timm's and many RL codebases'): ``tau_n = max(tau, 1 - (1 + n) / (10 + n))``, so
    early updates follow the online weights closely instead of averaging in the random
    initialisation for thousands of steps. ``every=k`` updates on every k-th call.

    ``capturable=True``: the form for compiled and captured steps (as for
    ``PolyakUpdate``): ``tau`` in a device tensor (``ema.tau = x`` writes it
    in place), the warm-up schedule computed there from the update count.
    """

    def __init__(
        self,
        module: nn.Module,
        tau: float,
        *,
        warmup: bool = False,
        every: int = 1,
        buffers: BufferPolicy = "copy",
        capturable: bool = False,
    ):
        self._tau_t: Tensor | None = None
        self._dtypes: set[torch.dtype] = set()
        self.tau = tau
        self.warmup = bool(warmup)
        super().__init__(module, buffers, every, capturable=capturable)
        self._dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
        warn_small_tau(self.tau, self._dtypes, "EMA")
        if self.capturable:
            self._tau_t = torch.tensor(self.tau, dtype=torch.float64, device=self.updates.device)

    @property
    def tau(self) -> float:
        return self._tau_value

    @tau.setter
    def tau(self, value: float) -> None:
        self._tau_value = float(check_fraction(value, "tau", "EMA", tensor=False))
        warn_small_tau(self._tau_value, self._dtypes, "EMA")
        if self._tau_t is not None:
            self._tau_t.fill_(self._tau_value)

    def _tau(self, updates: int) -> float:
        if self.warmup:
            return max(self.tau, 1.0 - (1.0 + updates) / (10.0 + updates))
        return self.tau

    def _tau_tensor(self, updates: Tensor) -> Tensor:
        assert self._tau_t is not None
        if not self.warmup:
            return self._tau_t
        n = updates.to(torch.float64)
        return torch.maximum(self._tau_t, 1.0 - (1.0 + n) / (10.0 + n))

    def __repr__(self) -> str:
        return (
            f"EMA({type(self.module).__name__}, tau={self.tau}, warmup={self.warmup}, "
            f"updates={int(self.updates)})"
        )


class SWA(_Average):
    """Uniform average of the weights seen at the updates after the first ``start`` calls
    (stochastic weight averaging): after ``n`` averaged updates the copy holds the mean of
    those ``n`` weight snapshots (``tau_n = 1 / (n + 1)``; the first one copies). With
    ``every=k`` it averages at calls ``start + k``, ``start + 2k``, ...
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        start: int = 0,
        every: int = 1,
        buffers: BufferPolicy = "copy",
        capturable: bool = False,
    ):
        super().__init__(module, buffers, every, start, capturable)

    def _tau(self, updates: int) -> float:
        return 1.0 / (updates + 1)

    def _tau_tensor(self, updates: Tensor) -> Tensor:
        return 1.0 / (updates.to(torch.float64) + 1.0)

    @property
    def calls(self) -> int:
        """Calls of ``update`` counted so far (those before ``start`` included)."""
        return self.steps

    def __repr__(self) -> str:
        return (
            f"SWA({type(self.module).__name__}, start={self.start}, calls={self.calls}, "
            f"updates={int(self.updates)})"
        )
