"""SB3 callbacks for weight constraints, weight drift and plasticity (resets, shrink-and-perturb,
unit-sphere projection)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from stable_baselines3.common.callbacks import BaseCallback
from torch import nn

import rlweights as rw
from rlweights.checks import check_fraction, check_int
from rlweights.drift import DriftMonitor
from rlweights.periodic import Periodic, PeriodicRoutine
from rlweights.plasticity import follow_targets_, step_schedules
from rlweights.sb3.patching import algorithm_names
from rlweights.tensorboard import DriftLogger
from rlweights.weights import entries, select

__all__ = ["DriftCallback", "PlasticityCallback", "WeightConstraintCallback"]


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

    ```python
    >>> model.learn(10_000, callback=WeightConstraintCallback(("actor",), max_norm=3.0))

    ```
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
        targets = _constraint_targets(self.model, self.modules)
        _remove(self._handles)  # a learn() that raised never reached _on_training_end
        for module, optimizer in targets:
            self._handles.append(rw.constrain(optimizer, module, self._constrain))

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.logger.record("rlweights/constraint_steps", self.constraint_steps)

    def state_dict(self) -> dict[str, Any]:
        """The count of constrained optimizer steps, to resume a run."""
        return {"constraint_steps": self.constraint_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``, validated first."""
        op = "WeightConstraintCallback.load_state_dict"
        if not isinstance(state, dict) or set(state) != {"constraint_steps"}:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{op}: expected keys ['constraint_steps'], got {got}")
        self.constraint_steps = check_int(state["constraint_steps"], "constraint_steps", op, 0)

    def _on_training_end(self) -> None:
        _remove(self._handles)


class DriftCallback(BaseCallback):
    """Log weight drift (``rlweights.drift``) of an SB3 model every ``every`` calls.

    Tracks the online networks of the model's target pairs (``critic``, ``actor``, ``q_net``,
    ...) with their targets, or the whole ``policy`` for algorithms without targets. When the
    model logs to TensorBoard (``tensorboard_log=``), the values go into that same run through
    its ``SummaryWriter``, at ``num_timesteps``; otherwise they are recorded through SB3's
    logger (per-tensor values kept out of stdout). A due step is measured when SB3 reports
    it, after its environment step and before the rollout's gradient steps; a ``learn`` that
    ends between two due steps is measured once more at its end, on its final weights.

    ```python
    >>> model = SAC("MlpPolicy", "Pendulum-v1", tensorboard_log="runs")
    >>> model.learn(20_000, callback=DriftCallback(every=1000))

    ```
    """

    def __init__(self, every: int = 1000, per_layer: bool = True, histograms: bool = False):
        super().__init__()
        self.counter = Periodic(every, name="DriftCallback")
        self.per_layer = per_layer
        self.histograms = histograms
        self.drift_logger = None
        self.monitor: DriftMonitor | None = None
        self.logged_at: int | None = None  # num_timesteps of the last measurement

    def _on_training_start(self) -> None:
        from stable_baselines3.common.logger import TensorBoardOutputFormat

        try:
            pairs = algorithm_names(self.model).targets
            modules = {s: getattr(self.model, s) for s, _ in pairs}
            targets = {s: getattr(self.model, t) for s, t in pairs}
        except ValueError:  # no target networks: watch the whole policy
            modules, targets = {"policy": self.model.policy}, {}
        self.monitor = DriftMonitor(modules, targets, per_layer=self.per_layer)
        writers = [
            f.writer for f in self.logger.output_formats if isinstance(f, TensorBoardOutputFormat)
        ]
        # this learn()'s run only: never the writer of an earlier model's run
        self.drift_logger = (
            DriftLogger(writers[0], self.monitor, self.histograms) if writers else None
        )

    @property
    def every(self) -> int:
        return self.counter.every

    def _on_step(self) -> bool:
        if self.counter.step():
            self.log_drift()
        return True

    def _on_training_end(self) -> None:
        if self.logged_at != self.num_timesteps:
            self.log_drift()
            if self.drift_logger is None:  # SB3 writes its logger's records at rollout ends
                self.logger.dump(self.num_timesteps)

    def log_drift(self) -> dict[str, float]:
        """Measure now and log at the model's ``num_timesteps``."""
        self.logged_at = self.num_timesteps
        if self.drift_logger is not None:
            return self.drift_logger.log(self.num_timesteps)
        values = {tag: float(v) for tag, v in self.monitor.measure().items()}
        for tag, value in values.items():
            quiet = ("stdout", "log") if "/layers/" in tag else None
            self.logger.record(tag, value, exclude=quiet)
        return values


class PlasticityCallback(BaseCallback):
    """Resets, shrink-and-perturb and unit-sphere projection for an SB3 model: the native
    agents' ``--reset-every``, ``--shrink-perturb`` and ``--unit-sphere``
    (``rlweights.plasticity``, ``rlweights.constraints.UnitSphere``).

    ``reset_every`` / ``sp_every`` count environment steps (``model.num_timesteps``).
    ``reset_layers``: shell globs over the names of ``model.policy``'s parameters
    (``"critic.*"``, ``"actor.mu.*"``); by default every parameter of its trained networks.
    Target networks (``*_target``) are never selected: after a reset or a shrink-and-perturb
    each target takes the same weights as its online network for the touched parameters, and
    every optimizer of the policy forgets the state of what was touched. SB3's
    state-independent ``log_std`` (gSDE's, PPO's, A2C's), which no layer draws, starts again
    from its ``log_std_init`` as SB3 builds it (a shrink-and-perturb takes ``shrink *
    log_std + perturb * log_std_init``). ``unit_sphere``:
    globs naming weights whose output units are projected onto the unit sphere after every
    optimizer step. A reset or shrink-and-perturb due at the last step of ``learn()`` is
    skipped (nothing would train after it). Logs ``rlweights/resets`` and
    ``rlweights/shrink_perturbs``.

    Everything is bound to the model of each ``learn()`` call, so one callback may serve a
    model and then the one ``SAC.load`` gives back: the schedules go on from that model's
    ``num_timesteps``.

    ```python
    >>> resets = PlasticityCallback(reset_every=20_000, reset_layers="critic.*")
    >>> model.learn(100_000, callback=resets)

    ```
    """

    def __init__(
        self,
        reset_every: int = 0,
        reset_layers: str | Sequence[str] | None = None,
        shrink_perturb: tuple[float, float] | None = None,
        sp_every: int = 0,
        unit_sphere: str | Sequence[str] | None = None,
        verbose: int = 0,
    ):
        super().__init__(verbose)
        name = "PlasticityCallback"
        check_int(reset_every, "reset_every", name, minimum=0)
        check_int(sp_every, "sp_every", name, minimum=0)
        if (shrink_perturb is None) != (sp_every == 0):
            raise ValueError(f"{name}: shrink_perturb=(shrink, perturb) goes with sp_every=N > 0")
        if shrink_perturb is not None:
            if not isinstance(shrink_perturb, tuple) or len(shrink_perturb) != 2:
                raise ValueError(
                    f"{name}: shrink_perturb must be (shrink, perturb), got {shrink_perturb!r}"
                )
            for value, what in zip(shrink_perturb, ("shrink", "perturb"), strict=True):
                check_fraction(value, what, name, tensor=False)
        if not (reset_every or sp_every or unit_sphere):
            raise ValueError(
                f"{name}: give reset_every, shrink_perturb with sp_every, or unit_sphere"
            )
        self.reset_every, self.reset_layers = reset_every, reset_layers
        self.shrink_perturb, self.sp_every, self.unit_sphere = shrink_perturb, sp_every, unit_sphere
        self.routines: dict[str, rw.ShrinkPerturb] = {}
        self.events = {"reset": 0, "shrink_perturb": 0}
        self._handles: list = []
        self._counted = 0
        self._log_std_shifts: dict[str, _LogStdShift] = {}
        self._pending: dict[str, Any] | None = None  # a state loaded before training starts

    def _on_training_start(self) -> None:
        policy = self.model.policy
        targets = [n for n, _ in policy.named_children() if n.endswith("_target")]
        exclude = [f"{n}.*" for n in targets]
        optimizers = _optimizers(policy)
        schedules = {"reset": (0.0, 1.0, self.reset_every)}
        if self.shrink_perturb is not None:
            schedules["shrink_perturb"] = (*self.shrink_perturb, self.sp_every)
        layers, log_stds = [], {}
        if self.reset_every or self.sp_every:
            layers, log_stds = _reset_selection(policy, self.reset_layers, exclude)
        # bound to this learn()'s policy (after a load, another one)
        routines, shifts = {}, {}
        for kind, (shrink, perturb, every) in schedules.items():
            if every and layers:
                routines[kind] = rw.ShrinkPerturb(
                    policy,
                    shrink,
                    perturb,
                    every=every,
                    include=self.reset_layers,
                    exclude=[*exclude, *log_stds],
                    optimizer=optimizers,
                )
            if every and log_stds:
                shifts[kind] = _LogStdShift(log_stds, shrink, perturb, every, optimizers)
        # the schedules count the model's environment steps: those done before too
        for routine in (*routines.values(), *shifts.values()):
            routine.counter.step(self.model.num_timesteps)
        _remove(self._handles)  # a learn() that raised never reached _on_training_end
        self.routines, self._log_std_shifts = routines, shifts
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.load_state_dict(state)
        self._counted = self.model.num_timesteps
        if self.unit_sphere is not None:
            found = entries(policy, "PlasticityCallback")[0]
            chosen = select(found, self.unit_sphere, exclude, "the policy")
            matrices = [e.tensor for e in chosen if e.tensor.dim() >= 2]
            if not matrices:
                raise ValueError(
                    f"PlasticityCallback: unit_sphere={self.unit_sphere!r} selects no weight "
                    "matrix of the policy (only biases or other vectors)"
                )
            sphere = rw.constraints.UnitSphere()
            for optimizer in optimizers:
                owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
                mine = [t for t in matrices if id(t) in owned]
                if mine:
                    self._handles.append(rw.constrain(optimizer, mine, sphere))

    def _on_step(self) -> bool:
        steps = self.model.num_timesteps
        n, self._counted = steps - self._counted, steps
        if not n:
            return True
        # the last step of learn(): nothing trains after it, so no reset there
        last = steps >= getattr(self.model, "_total_timesteps", steps + 1)
        fired = step_schedules(self.routines, n, skip=last)
        for kind in {**fired, **step_schedules(self._log_std_shifts, n, skip=last)}:
            self.events[kind] += 1
        touched = [name for names in fired.values() for name in names]
        if touched:
            policy = self.model.policy
            pairs = [
                (name, online, getattr(policy, f"{name}_target"))
                for name, online in policy.named_children()
                if hasattr(policy, f"{name}_target")
            ]
            follow_targets_(pairs, touched)
        return True

    def _on_rollout_end(self) -> None:
        self.logger.record("rlweights/resets", self.events["reset"])
        self.logger.record("rlweights/shrink_perturbs", self.events["shrink_perturb"])

    def state_dict(self) -> dict[str, Any]:
        """The schedules' states (counters, generators; SB3's ``log_std`` schedules apart) and
        the event counts, to resume a run (before training starts: the state given to
        ``load_state_dict``)."""
        if not self.routines and not self._log_std_shifts and self._pending is not None:
            return self._pending
        return {
            "routines": {kind: routine.state_dict() for kind, routine in self.routines.items()},
            "log_std": {kind: shift.state_dict() for kind, shift in self._log_std_shifts.items()},
            "events": dict(self.events),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict`` (each schedule's state validated before it loads). Before
        training starts the state is kept and loaded into the schedules when they are made
        (which of them there are depends on the policy)."""
        op = "PlasticityCallback.load_state_dict"
        keys = {"routines", "log_std", "events"}
        if not isinstance(state, dict) or set(state) != keys:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{op}: expected keys {sorted(keys)}, got {got}")
        events = state["events"]
        if not isinstance(events, dict) or set(events) != set(self.events):
            raise ValueError(f"{op}: events must count {sorted(self.events)}, got {events!r}")
        for kind, count in events.items():
            check_int(count, f"events[{kind!r}]", op, minimum=0)
        kept = {"reset"} if self.reset_every else set()
        kept |= {"shrink_perturb"} if self.sp_every else set()
        built = self.routines or self._log_std_shifts
        for key, mine in (("routines", self.routines), ("log_std", self._log_std_shifts)):
            have = state[key]
            expected = set(mine) if built else kept
            if (
                not isinstance(have, dict)
                or not set(have) <= expected
                or (built and set(have) != expected)
            ):
                got = sorted(have) if isinstance(have, dict) else type(have).__name__
                raise ValueError(
                    f"{op}: the state has {key} schedules {got}, this callback keeps "
                    f"{sorted(expected)}; make the callback with the same settings"
                )
        if not built:
            self._pending = state
            return
        for key, mine in (("routines", self.routines), ("log_std", self._log_std_shifts)):
            for kind, routine in mine.items():
                routine.load_state_dict(state[key][kind])
        self.events = dict(events)

    def _on_training_end(self) -> None:
        _remove(self._handles)


def _reset_selection(
    policy: nn.Module, include: str | Sequence[str] | None, exclude: list[str]
) -> tuple[list[str], dict[str, tuple[nn.Parameter, float]]]:
    """What ``include`` selects for a reset among the policy's parameters: (the names of
    those its layers draw afresh, ``{name: (parameter, log_std_init)}`` of SB3's
    state-independent log standard deviations). SB3 builds each of those as ``log_std_init``
    everywhere, outside any layer, so no ``reset_parameters()`` draws it."""
    found = [e for e in entries(policy, "PlasticityCallback")[0] if e.kind == "param"]
    chosen = [e.name for e in select(found, include, exclude, "the policy")]
    log_stds = {}
    for prefix, module in policy.named_modules():
        param, init = getattr(module, "log_std", None), getattr(module, "log_std_init", None)
        name = f"{prefix}.log_std" if prefix else "log_std"
        if isinstance(param, nn.Parameter) and isinstance(init, int | float) and name in chosen:
            log_stds[name] = (param, float(init))
    return [n for n in chosen if n not in log_stds], log_stds


class _LogStdShift(PeriodicRoutine):
    """``log_std <- shrink * log_std + perturb * log_std_init`` on a schedule (a reset:
    ``log_std_init``, as SB3 builds it); the optimizers forget the state of what it wrote."""

    def __init__(
        self,
        log_stds: dict[str, tuple[nn.Parameter, float]],
        shrink: float,
        perturb: float,
        every: int,
        optimizers: list[Any],
    ):
        self.log_stds, self.shrink, self.perturb = log_stds, shrink, perturb
        params = [param for param, _ in log_stds.values()]
        self.trained = []  # (optimizer, the log_stds it trains)
        for optimizer in optimizers:
            owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
            mine = [p for p in params if id(p) in owned]
            if mine:
                self.trained.append((optimizer, mine))
        self.touched = list(log_stds)
        super().__init__(every)

    def _run(self) -> None:
        with torch.no_grad():
            for param, init in self.log_stds.values():
                if self.shrink == 0.0:
                    param.fill_(self.perturb * init)
                else:
                    param.mul_(self.shrink).add_(self.perturb * init)
        for optimizer, mine in self.trained:
            rw.reset_optimizer_state_(optimizer, mine)


def _remove(handles: list) -> None:
    """Remove the hooks a callback put on optimizers, and forget them."""
    for handle in handles:
        handle.remove()
    handles.clear()


def _optimizers(policy: nn.Module) -> list[Any]:
    """The optimizers of an SB3 policy: the policy's own and those of its networks."""
    found = []
    for module in policy.modules():
        optimizer = getattr(module, "optimizer", None)
        if isinstance(optimizer, torch.optim.Optimizer) and all(optimizer is not o for o in found):
            found.append(optimizer)
    return found
