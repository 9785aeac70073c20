"""SB3 callbacks for weight constraints and weight drift."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stable_baselines3.common.callbacks import BaseCallback
from torch import nn

import rlweights as rw
from rlweights.drift import DriftMonitor
from rlweights.periodic import Periodic
from rlweights.sb3.patching import algorithm_names
from rlweights.tensorboard import DriftLogger

__all__ = ["DriftCallback", "WeightConstraintCallback"]


def _constraint_targets(model: Any, names: Sequence[str]) -> list[tuple[nn.Module, Any]]:
    out = []
    for name in names:
        module = getattr(model, name, None)
        if not isinstance(module, nn.Module):
            raise ValueError(f"{type(model).__name__} has no module {name!r} to constrain")
        optimizer = getattr(module, "optimizer", None) or getattr(model.policy, "optimizer", None)
        if optimizer is None:
            raise ValueError(f"found no optimizer that trains {name!r}")
        out.append((module, optimizer))
    return out


class WeightConstraintCallback(BaseCallback):
    """Apply a weight constraint after every optimizer step of the given SB3 modules.

    ``clamp=(min, max)`` clips weights (WGAN style), ``max_norm=v`` rescales each output
    unit's incoming weights to norm at most ``v`` (Keras ``MaxNorm``); both may be given.
    The constraint runs as an optimizer step post-hook, so it follows every gradient step
    (not every environment step), and the hooks are removed when training ends. Logs
    ``rlweights/constraint_steps`` through SB3's logger.

    >>> model.learn(10_000, callback=WeightConstraintCallback(("actor",), max_norm=3.0))
    """

    def __init__(
        self,
        modules: Sequence[str] = ("actor",),
        clamp: tuple[float | None, float | None] | None = None,
        max_norm: float | None = None,
        verbose: int = 0,
    ):
        super().__init__(verbose)
        if clamp is None and max_norm is None:
            raise ValueError("WeightConstraintCallback: give clamp=(min, max), max_norm=v or both")
        if clamp is not None:
            if not isinstance(clamp, tuple) or len(clamp) != 2:
                raise ValueError(f"WeightConstraintCallback: clamp must be (min, max), not {clamp}")
            rw.clamp_([], *clamp)  # validates the bounds
        if max_norm is not None:
            rw.max_norm_([], max_norm)  # validates the bound
        self.modules = tuple(modules)
        self.clamp = clamp
        self.max_norm = max_norm
        self.constraint_steps = 0
        self._handles: list = []

    def _constrain(self, module: nn.Module) -> None:
        if self.clamp is not None:
            rw.clamp_(module, *self.clamp)
        if self.max_norm is not None:
            rw.max_norm_(module, self.max_norm)
        self.constraint_steps += 1

    def _on_training_start(self) -> None:
        for module, optimizer in _constraint_targets(self.model, self.modules):
            self._handles.append(rw.constrain(optimizer, module, self._constrain))

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.logger.record("rlweights/constraint_steps", self.constraint_steps)

    def _on_training_end(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class DriftCallback(BaseCallback):
    """Log weight drift (:mod:`rlweights.drift`) of an SB3 model every ``every`` calls.

    Tracks the online networks of the model's target pairs (``critic``, ``actor``, ``q_net``,
    ...) with their targets, or the whole ``policy`` for algorithms without targets. When the
    model logs to TensorBoard (``tensorboard_log=``), the values go into that same run through
    its ``SummaryWriter``, at ``num_timesteps``; otherwise they are recorded through SB3's
    logger (per-tensor values kept out of stdout).

    >>> model = SAC("MlpPolicy", "Pendulum-v1", tensorboard_log="runs")
    >>> model.learn(20_000, callback=DriftCallback(every=1000))
    """

    def __init__(self, every: int = 1000, per_layer: bool = True, histograms: bool = False):
        super().__init__()
        self.counter = Periodic(every, name="DriftCallback")
        self.per_layer = per_layer
        self.histograms = histograms
        self.drift_logger = None
        self.monitor: DriftMonitor | None = None

    def _on_training_start(self) -> None:
        from stable_baselines3.common.logger import TensorBoardOutputFormat

        try:
            _, _, pairs, _ = algorithm_names(self.model)
            modules = {s: getattr(self.model, s) for s, _ in pairs}
            targets = {s: getattr(self.model, t) for s, t in pairs}
        except ValueError:  # no target networks: watch the whole policy
            modules, targets = {"policy": self.model.policy}, {}
        self.monitor = DriftMonitor(modules, targets, per_layer=self.per_layer)
        writers = [
            f.writer for f in self.logger.output_formats if isinstance(f, TensorBoardOutputFormat)
        ]
        if writers:
            self.drift_logger = DriftLogger(writers[0], self.monitor, self.histograms)

    @property
    def every(self) -> int:
        return self.counter.every

    def _on_step(self) -> bool:
        if self.counter.step():
            self.log_drift()
        return True

    def log_drift(self) -> dict[str, float]:
        """Measure now and log at the model's ``num_timesteps``."""
        if self.drift_logger is not None:
            return self.drift_logger.log(self.num_timesteps)
        values = {tag: float(v) for tag, v in self.monitor.measure().items()}
        for tag, value in values.items():
            quiet = ("stdout", "log") if "/layers/" in tag else None
            self.logger.record(tag, value, exclude=quiet)
        return values
