"""Stable-Baselines3 plug-in: rlweights target updates inside SB3 models, with one call.

>>> from rlweights.sb3 import attach
>>> model = SAC("MlpPolicy", "Pendulum-v1")
>>> attach(model)                   # SB3's own target updates, on rlweights' fast path
>>> attach(model, target_update=rw.HardUpdate(every=1000))   # or a routine of your own

How it works: SB3 imports ``polyak_update`` by name into each algorithm module and calls it
at its own update points with generators of parameters. ``attach`` replaces that name in the
algorithm's module (once, for all models) by a dispatcher that recognises the target tensors
of attached models and routes those calls to rlweights; every other call, from models that
are not attached, goes to SB3's own function unchanged. Nothing is stored on the model, so
``model.save()`` / ``SAC.load()`` work as usual; after a load, attach again:
``attach(model := SAC.load(path))``.

Where the routine runs (SB3's own update points, unchanged):

* SAC, TQC: every gradient step whose index is a multiple of ``target_update_interval``;
* TD3, DDPG: every ``policy_delay``-th gradient step, for the critic pair and the actor pair
  (a features extractor shared by actor and critic is updated twice, as in SB3);
* DQN, QR-DQN: every ``max(target_update_interval // n_envs, 1)`` environment steps
  (``_on_step``), with ``tau=1`` by default.

BatchNorm running statistics are hard-copied to the targets at every update point, as SB3
does, from the lists SB3 caches in ``_setup_model`` (flattening keeps those tensor objects).

Callbacks (``model.learn(..., callback=...)``): :class:`WeightConstraintCallback` (weight
constraints after every gradient step), :class:`DriftCallback` (weight drift to TensorBoard)
and :class:`PolicyAveragingCallback` (an EMA / SWA copy of the policy, evaluated next to the
online one and saved as a normal SB3 model):

>>> averaging = PolicyAveragingCallback("ema", tau=0.005, eval_env="Pendulum-v1")
>>> model.learn(50_000, callback=averaging)
>>> averaging.save_averaged("sac_ema.zip")   # SAC.load("sac_ema.zip") acts with the average
"""

from __future__ import annotations

import importlib
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

import rlweights as rw
from rlweights.drift import DriftMonitor
from rlweights.files import atomic_write
from rlweights.ops import _polyak_scale_add_
from rlweights.targets import _check_every, _Periodic
from rlweights.tensorboard import DriftLogger
from rlweights.weights import check_choice, check_fraction

__all__ = [
    "ACTING_OPTIMIZERS",
    "SUPPORTED",
    "Attachment",
    "DriftCallback",
    "PolicyAveragingCallback",
    "WeightConstraintCallback",
    "attach",
    "detach",
]

MIN_SB3, MAX_SB3 = (2, 3), (3, 0)

# (package, class, module whose polyak_update name is replaced, target pairs, BN stat lists).
# Subclasses match through their base (DDPG is a TD3).
_Names = tuple[tuple[str, str], ...]
SUPPORTED: tuple[tuple[str, str, str, _Names, _Names], ...]
SUPPORTED = (
    (
        "stable_baselines3",
        "SAC",
        "stable_baselines3.sac.sac",
        (("critic", "critic_target"),),
        (("batch_norm_stats", "batch_norm_stats_target"),),
    ),
    (
        "stable_baselines3",
        "TD3",
        "stable_baselines3.td3.td3",
        (("critic", "critic_target"), ("actor", "actor_target")),
        (
            ("critic_batch_norm_stats", "critic_batch_norm_stats_target"),
            ("actor_batch_norm_stats", "actor_batch_norm_stats_target"),
        ),
    ),
    (
        "stable_baselines3",
        "DQN",
        "stable_baselines3.dqn.dqn",
        (("q_net", "q_net_target"),),
        (("batch_norm_stats", "batch_norm_stats_target"),),
    ),
    (
        "sb3_contrib",
        "TQC",
        "sb3_contrib.tqc.tqc",
        (("critic", "critic_target"),),
        (("batch_norm_stats", "batch_norm_stats_target"),),
    ),
    (
        "sb3_contrib",
        "QRDQN",
        "sb3_contrib.qrdqn.qrdqn",
        (("quantile_net", "quantile_net_target"),),
        (("batch_norm_stats", "batch_norm_stats_target"),),
    ),
)

TargetUpdate = _Periodic | Callable[[nn.Module, nn.Module, float], None] | None

# id(object SB3 passes as target_params: the target module behind a parameters() generator,
# or a cached list of BatchNorm statistics) -> weak reference to the attachment that owns it.
_ROUTES: dict[int, weakref.ref[Attachment]] = {}
_PATCHED: dict[str, tuple[ModuleType, Callable, int]] = {}  # module -> (module, original, users)
_ATTACHED: weakref.WeakKeyDictionary[Any, Attachment] = weakref.WeakKeyDictionary()


def _sb3_polyak() -> Callable:
    from stable_baselines3.common import utils

    return utils.polyak_update


def _owner(target_params: object) -> object:
    """The module whose ``parameters()`` generator this is (without consuming it), or the
    object itself (SB3 passes its cached BatchNorm lists as they are)."""
    frame = getattr(target_params, "gi_frame", None)
    if frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module):
            return owner
    return target_params


def _dispatch(params: Iterable[Tensor], target_params: Iterable[Tensor], tau: float) -> None:
    """Stands in for ``polyak_update`` in SB3's algorithm modules."""
    owner = _owner(target_params)
    ref = _ROUTES.get(id(owner))
    if ref is not None:
        attachment = ref()
        if attachment is not None and attachment.handle(owner, tau):
            return
    _sb3_polyak()(params, target_params, tau)


def _check_version() -> None:
    import stable_baselines3

    version = stable_baselines3.__version__
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        major_minor = (0, 0)
    if not MIN_SB3 <= major_minor < MAX_SB3:
        raise RuntimeError(
            f"rlweights.sb3 supports stable-baselines3 {MIN_SB3[0]}.{MIN_SB3[1]} up to (not "
            f"including) {MAX_SB3[0]}.0, found {version}: its target updates may be called "
            "differently. Install a supported version (pip install 'stable-baselines3>=2.3,<3')."
        )


def _algorithm(model: object) -> tuple[str, str, tuple, tuple]:
    """(class name, module path, pairs, BN lists) of the supported algorithm of ``model``."""
    from stable_baselines3.common.base_class import BaseAlgorithm

    if not isinstance(model, BaseAlgorithm):
        raise TypeError(
            f"attach takes a Stable-Baselines3 model (SAC, TD3, DDPG, DQN, TQC, QRDQN), "
            f"got {type(model).__name__}"
        )
    for package, name, module_path, pairs, bn in SUPPORTED:
        try:
            cls = getattr(importlib.import_module(package), name)
        except ImportError:
            continue
        if isinstance(model, cls):
            return name, module_path, pairs, bn
    raise ValueError(
        f"{type(model).__name__} has no target networks, so there is nothing to attach to: "
        "rlweights.sb3.attach works with SAC, TD3, DDPG, DQN and sb3-contrib's TQC and QRDQN."
    )


@dataclass
class _Pair:
    name: str
    source: nn.Module
    target: nn.Module
    routine: TargetUpdate

    def update(self, tau: float) -> None:
        if self.routine is None:
            # What SB3 does, rounded as SB3 rounds (parameters only; BatchNorm statistics come
            # in their own call), on the flat fast path.
            _polyak_scale_add_(self.target, self.source, tau)
        elif isinstance(self.routine, _Periodic):
            self.routine.step()
        else:
            self.routine(self.target, self.source, tau)


@dataclass
class _Stats:
    source: list[Tensor]
    target: list[Tensor]

    def update(self, tau: float) -> None:
        _polyak_scale_add_(self.target, self.source, tau)  # SB3 passes tau=1: a hard copy


@dataclass
class Attachment:
    """What :func:`attach` did to one model; :meth:`detach` undoes it."""

    algorithm: str
    module_path: str
    pairs: list[_Pair]
    flattened: list[str]
    stats: list[_Stats] = field(default_factory=list)
    attached: bool = True
    _routes: dict[int, tuple[object, _Pair | _Stats]] = field(default_factory=dict, repr=False)

    def _route(self, owner: object, what: _Pair | _Stats) -> None:
        self._routes[id(owner)] = (owner, what)
        _ROUTES[id(owner)] = weakref.ref(self)

    def handle(self, owner: object, tau: float) -> bool:
        """Run the update SB3 asked for, if ``owner`` belongs to this attachment."""
        entry = self._routes.get(id(owner))
        if not self.attached or entry is None or entry[0] is not owner:
            return False
        entry[1].update(tau)
        return True

    def detach(self) -> None:
        """Give the model back to SB3's own target updates (idempotent)."""
        if not self.attached:
            return
        for key in self._routes:
            ref = _ROUTES.get(key)
            if ref is not None and ref() is self:
                del _ROUTES[key]
        _unpatch(self.module_path)
        self.attached = False

    @property
    def routines(self) -> dict[str, TargetUpdate]:
        return {p.name: p.routine for p in self.pairs}

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        routines = ", ".join(f"{p.name}: {p.routine!r}" for p in self.pairs)
        return f"Attachment({self.algorithm}, {state}, flat={self.flattened}, {routines})"


def _patch(module_path: str) -> None:
    if module_path in _PATCHED:
        module, original, users = _PATCHED[module_path]
        _PATCHED[module_path] = (module, original, users + 1)
        return
    module = importlib.import_module(module_path)
    original = getattr(module, "polyak_update", None)
    if original is None:
        raise RuntimeError(
            f"{module_path} no longer calls polyak_update by name; this stable-baselines3 "
            "version is not supported by rlweights.sb3."
        )
    module.polyak_update = _dispatch
    _PATCHED[module_path] = (module, original, 1)


def _unpatch(module_path: str) -> None:
    module, original, users = _PATCHED[module_path]
    if users > 1:
        _PATCHED[module_path] = (module, original, users - 1)
        return
    module.polyak_update = original
    del _PATCHED[module_path]


def _flatten_disjoint(modules: dict[str, nn.Module]) -> list[str]:
    """Flatten the modules that share no tensor with another one (a features extractor
    shared by actor and critic would otherwise be pulled into two flat buffers)."""
    ids = {name: {id(t) for t in (*m.parameters(), *m.buffers())} for name, m in modules.items()}
    done = []
    for name, module in modules.items():
        if all(ids[name].isdisjoint(ids[other]) for other in modules if other != name):
            rw.flatten_(module)
            done.append(name)
    return done


def _refresh_batch_norm_stats(model: Any, pair_attrs: _Names, bn_attrs: _Names) -> None:
    """SB3 caches detached aliases of the BatchNorm statistics (from ``state_dict()``) in
    ``_setup_model``; flattening rebinds those buffers, so refresh the lists in place."""
    from stable_baselines3.common.utils import get_parameters_by_name

    for module_attrs, list_attrs in zip(pair_attrs, bn_attrs, strict=True):
        for module_attr, list_attr in zip(module_attrs, list_attrs, strict=True):
            getattr(model, list_attr)[:] = get_parameters_by_name(
                getattr(model, module_attr), ["running_"]
            )


def attach(model: Any, target_update: TargetUpdate = None) -> Attachment:
    """Run ``model``'s target-network updates through rlweights.

    ``target_update=None`` keeps SB3's semantics exactly (``model.tau`` read at every update,
    ``tau=0`` leaves targets bit-identical, BatchNorm statistics hard-copied) on the fast
    path. A routine replaces the algorithm's own update at its update points: a
    ``rw.PolyakUpdate`` / ``rw.HardUpdate`` template (bound to each target pair, and stepped
    at each update point), or a callable ``fn(target, source, tau)``. Attaching again
    replaces the earlier attachment. Returns a handle with ``detach()``.
    """
    _check_version()
    name, module_path, pair_attrs, bn_attrs = _algorithm(model)
    if target_update is not None and not (
        isinstance(target_update, _Periodic) or callable(target_update)
    ):
        raise TypeError(
            "target_update must be None, a rw.PolyakUpdate / rw.HardUpdate, or a callable "
            f"fn(target, source, tau); got {type(target_update).__name__}"
        )
    previous = _ATTACHED.get(model)
    if previous is not None:
        previous.detach()
    modules = {}
    for source_attr, target_attr in pair_attrs:
        modules[source_attr] = getattr(model, source_attr)
        modules[target_attr] = getattr(model, target_attr)
    flattened = _flatten_disjoint(modules)
    _refresh_batch_norm_stats(model, pair_attrs, bn_attrs)
    pairs = []
    for source_attr, target_attr in pair_attrs:
        source, target = modules[source_attr], modules[target_attr]
        routine = target_update
        if isinstance(routine, _Periodic):
            routine = routine.bind(source, target)
        else:
            rw.ops._pair_plan(target, source, "attach")  # validate the pair now
        pairs.append(_Pair(source_attr, source, target, routine))
    attachment = Attachment(name, module_path, pairs, flattened)
    for pair in pairs:
        attachment._route(pair.target, pair)
    for source_attr, target_attr in bn_attrs:
        source_stats, target_stats = getattr(model, source_attr), getattr(model, target_attr)
        if target_stats:
            stats = _Stats(source_stats, target_stats)
            attachment.stats.append(stats)
            attachment._route(target_stats, stats)
    _patch(module_path)
    _ATTACHED[model] = attachment
    return attachment


def detach(model: Any) -> None:
    """Undo :func:`attach` for ``model`` (nothing happens if it is not attached)."""
    attachment = _ATTACHED.pop(model, None)
    if attachment is not None:
        attachment.detach()


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


def _callback_base() -> type:
    from stable_baselines3.common.callbacks import BaseCallback

    return BaseCallback


class WeightConstraintCallback(_callback_base()):  # type: ignore[misc]
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


class DriftCallback(_callback_base()):  # type: ignore[misc]
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
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"DriftCallback: every must be an int >= 1, not {every!r}")
        self.every = every
        self.per_layer = per_layer
        self.histograms = histograms
        self.drift_logger = None
        self.monitor: DriftMonitor | None = None

    def _on_training_start(self) -> None:
        from stable_baselines3.common.logger import TensorBoardOutputFormat

        try:
            _, _, pairs, _ = _algorithm(self.model)
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

    def _on_step(self) -> bool:
        if self.n_calls % self.every == 0:
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


# (package, class, attribute whose .optimizer trains the network that acts). Subclasses match
# through their base (DDPG is a TD3). TRPO is not here: its actor moves by a line search, not
# by an optimizer step; MaskablePPO is not: evaluate_policy would act without its masks.
ACTING_OPTIMIZERS: tuple[tuple[str, str, str], ...] = (
    ("stable_baselines3", "SAC", "actor"),
    ("stable_baselines3", "TD3", "actor"),
    ("stable_baselines3", "DQN", "policy"),
    ("stable_baselines3", "PPO", "policy"),
    ("stable_baselines3", "A2C", "policy"),
    ("sb3_contrib", "TQC", "actor"),
    ("sb3_contrib", "CrossQ", "actor"),
    ("sb3_contrib", "QRDQN", "policy"),
    ("sb3_contrib", "RecurrentPPO", "policy"),
)

Average = Literal["ema", "swa"]


def _acting_optimizer(model: Any) -> Optimizer:
    """The optimizer whose steps move the network that chooses ``model``'s actions."""
    from stable_baselines3.common.base_class import BaseAlgorithm

    names = ", ".join(name for _, name, _ in ACTING_OPTIMIZERS)
    if not isinstance(model, BaseAlgorithm):
        raise TypeError(
            f"PolicyAveragingCallback works with Stable-Baselines3 models ({names}), "
            f"got {type(model).__name__}"
        )
    for package, name, attr in ACTING_OPTIMIZERS:
        try:
            cls = getattr(importlib.import_module(package), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(model, cls):
            return getattr(model, attr).optimizer
    raise TypeError(
        f"PolicyAveragingCallback does not know which optimizer trains the policy of "
        f"{type(model).__name__}; it supports {names} (and their subclasses, e.g. DDPG)."
    )


def _check_count(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"PolicyAveragingCallback: {name} must be an int >= {minimum}, not {value!r}"
        )
    return value


class PolicyAveragingCallback(_callback_base()):  # type: ignore[misc]
    """Keep an averaged copy of an SB3 policy, evaluate it next to the online policy, save it.

    ``average="ema"``: exponential moving average, ``avg <- avg + tau * (online - avg)``
    (:class:`rlweights.EMA`; ``warmup=True`` for its TensorFlow-style warm-up; torch/timm
    ``decay`` is ``1 - tau``). ``average="swa"``: uniform mean of the weights seen after the
    first ``start`` gradient steps (:class:`rlweights.SWA`). Either way ``every=k`` averages
    at every k-th gradient step. The average is made over the whole ``model.policy`` (actor,
    critics and their targets), so it has the policy's ``state_dict`` and saves as a normal
    model; it is frozen (no grad, eval mode, in no optimizer) and lives in flat storage, so an
    update is one fused pass per buffer.

    When it updates: after every optimizer step of the network that acts (a step post-hook
    on ``actor.optimizer`` for SAC, TD3/DDPG, TQC, CrossQ; on ``policy.optimizer`` for DQN,
    QR-DQN, PPO, A2C, RecurrentPPO; see :data:`ACTING_OPTIMIZERS`). That is the averaging
    of the SWA/EMA literature (one snapshot per gradient step of the policy), independent of
    ``train_freq``, ``gradient_steps``, ``learning_starts``, ``policy_delay`` (TD3's actor
    steps every ``policy_delay``-th update) or PPO's epochs and minibatches, which an update
    at ``_on_step`` (one per environment step, including steps with no training) would
    count wrong. The hook is removed when ``learn`` ends and the average carries over to the
    next ``learn`` call.

    Evaluation: every ``eval_freq`` calls of ``_on_step`` (vectorised environment steps, as
    SB3's ``EvalCallback``), if ``eval_env`` (a Gymnasium env, a VecEnv or an env id) is
    given, both policies play ``n_eval_episodes`` episodes with ``evaluate_policy`` on the
    same episodes (``eval_env`` is seeded with ``eval_seed`` before each), through their
    ``policy.predict`` (so DQN's exploration plays no part). Recorded through SB3's logger,
    and so in the model's TensorBoard run (``tensorboard_log=``), at ``num_timesteps``:
    ``eval/online_mean_reward``, ``eval/online_std_reward``, ``eval/averaged_mean_reward``,
    ``eval/averaged_std_reward``; ``evaluations`` keeps ``(timesteps, online mean, averaged
    mean)``. ``rlweights/averaged_updates`` is recorded at each rollout end.

    With :func:`attach` on the same model, the flat layouts ``attach`` made for the target
    pairs are kept (the policy is then not flattened as a whole, and the average is updated
    on the grouped ``torch._foreach_*`` path); attach before ``learn``.

    >>> averaging = PolicyAveragingCallback("ema", tau=0.005, eval_env="Pendulum-v1")
    >>> model.learn(50_000, callback=averaging)
    >>> averaging.save_averaged("sac_ema")  # sac_ema.zip: SAC.load acts with the average
    """

    def __init__(
        self,
        average: Average = "ema",
        tau: float | None = None,
        *,
        warmup: bool = False,
        start: int = 0,
        every: int = 1,
        eval_env: Any = None,
        eval_freq: int = 10_000,
        n_eval_episodes: int = 5,
        deterministic: bool = True,
        eval_seed: int = 0,
        verbose: int = 0,
    ):
        super().__init__(verbose)
        name = "PolicyAveragingCallback"
        check_choice(average, ("ema", "swa"), "average", name)
        if average == "ema":
            tau = 0.005 if tau is None else tau
            value = check_fraction(tau, "tau", name)
            if not isinstance(value, float) or value <= 0.0:
                raise ValueError(
                    f"{name}: tau must be a float in (0, 1], got {tau!r}: it is the EMA's step "
                    "toward the online weights (e.g. 0.005); tau=0 would never move the average."
                )
            tau = value
            _check_count(start, "start", 0)
            if start:
                raise ValueError(f"{name}: start={start} is SWA's; use average='swa' or drop it")
        else:
            if tau is not None:
                raise ValueError(
                    f"{name}: tau={tau!r} is the EMA's step; SWA averages uniformly. Drop tau "
                    "or use average='ema'."
                )
            if warmup:
                raise ValueError(f"{name}: warmup is the EMA's; use average='ema' or drop it")
            _check_count(start, "start", 0)
        self.average = average
        self.tau = tau
        self.warmup = bool(warmup)
        self.start = start
        self.every = _check_every(every, name)
        self.eval_freq = _check_count(eval_freq, "eval_freq", 1)
        self.n_eval_episodes = _check_count(n_eval_episodes, "n_eval_episodes", 1)
        self.eval_seed = _check_count(eval_seed, "eval_seed", 0)
        self.deterministic = deterministic
        self.eval_env = _vec_env(eval_env)
        self.evaluations: list[tuple[int, float, float]] = []
        self.averager: rw.EMA | rw.SWA | None = None
        self._pending: dict[str, Any] | None = None
        self._hook: RemovableHandle | None = None

    # -- the average -------------------------------------------------------------------------

    def _make_averager(self) -> rw.EMA | rw.SWA:
        policy = self.model.policy
        if self.average == "ema":
            averager = rw.EMA(policy, self.tau, warmup=self.warmup, every=self.every)
        else:
            averager = rw.SWA(policy, start=self.start, every=self.every)
        # The deep copy took the policy's optimizers along (bound to the copy's parameters,
        # with copies of their state): the average is never trained, so drop them.
        for module in averager.averaged.modules():
            for attr, value in list(vars(module).items()):
                if isinstance(value, Optimizer):
                    setattr(module, attr, None)
        # make_target may have flattened the online policy: refresh SB3's cached BatchNorm
        # lists.
        try:
            _, _, pair_attrs, bn_attrs = _algorithm(self.model)
        except ValueError:  # no target networks, so no cached lists
            pass
        else:
            _refresh_batch_norm_stats(self.model, pair_attrs, bn_attrs)
        return averager

    def _on_training_start(self) -> None:
        optimizer = _acting_optimizer(self.model)
        if self.averager is None:
            self.averager = self._make_averager()
            if self._pending is not None:
                self.load_state_dict(self._pending)
                self._pending = None
        elif self.averager.module is not self.model.policy:
            raise ValueError(
                "PolicyAveragingCallback: this callback already averages another model's "
                "policy; make one callback per model (carry an average over with "
                "state_dict() / load_state_dict())."
            )
        self._remove_hook()  # a learn() that raised never reached _on_training_end
        self._hook = optimizer.register_step_post_hook(self._update)

    def _update(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.averager.update()

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _on_training_end(self) -> None:
        self._remove_hook()

    def _on_rollout_end(self) -> None:
        self.logger.record("rlweights/averaged_updates", self.averager.updates)

    def _started(self) -> rw.EMA | rw.SWA:
        if self.averager is None:
            raise RuntimeError(
                "PolicyAveragingCallback: nothing is averaged yet; the average is made when "
                "training starts (model.learn(..., callback=this))."
            )
        return self.averager

    @property
    def averaged(self) -> nn.Module:
        """The averaged policy (an SB3 policy: ``averaged.predict(obs)``); frozen, eval mode."""
        return self._started().averaged

    # -- evaluation --------------------------------------------------------------------------

    def _on_step(self) -> bool:
        if self.eval_env is not None and self.n_calls % self.eval_freq == 0:
            self.evaluate()
        return True

    def evaluate(self) -> dict[str, float]:
        """Evaluate the online and the averaged policy now, on the same episodes; record the
        results and dump the logger at ``num_timesteps``. Returns ``{tag: value}``."""
        from stable_baselines3.common.evaluation import evaluate_policy
        from stable_baselines3.common.vec_env import sync_envs_normalization

        if self.eval_env is None:
            raise ValueError("PolicyAveragingCallback: evaluate() needs eval_env=")
        averaged = self.averaged
        if self.model.get_vec_normalize_env() is not None:
            sync_envs_normalization(self.training_env, self.eval_env)
        values = {}
        for name, policy in (("online", self.model.policy), ("averaged", averaged)):
            self.eval_env.seed(self.eval_seed)  # used at evaluate_policy's reset
            mean, std = evaluate_policy(
                policy,
                self.eval_env,
                n_eval_episodes=self.n_eval_episodes,
                deterministic=self.deterministic,
            )
            values[f"eval/{name}_mean_reward"] = float(mean)
            values[f"eval/{name}_std_reward"] = float(std)
        for tag, value in values.items():
            self.logger.record(tag, value)
        self.logger.dump(self.num_timesteps)
        self.evaluations.append(
            (
                self.num_timesteps,
                values["eval/online_mean_reward"],
                values["eval/averaged_mean_reward"],
            )
        )
        return values

    # -- saving ------------------------------------------------------------------------------

    def save_averaged(
        self,
        path: str | Path,
        exclude: Iterable[str] | None = None,
        include: Iterable[str] | None = None,
    ) -> Path:
        """Write the model as SB3's ``model.save`` does, with the averaged policy weights.

        ``SAC.load(path)`` (``DQN.load``, ...) then acts with the average. The rest of the
        file is the training state (optimizers, hyperparameters) as ``model.save`` writes it.
        The averaged weights are copied into ``model.policy`` for the save and the online
        ones copied back (bit-identical) afterwards, even if the save fails; the optimizers
        are not touched. The file is written atomically (a temporary file, then a rename), a
        ``.zip`` suffix is added when ``path`` has none, as SB3 does. Returns the path.
        """
        averaged = self.averaged
        path = Path(path)
        if not path.suffix:
            path = path.with_suffix(".zip")
        policy = self.model.policy
        online = {name: t.clone() for name, t in policy.state_dict().items()}
        try:
            policy.load_state_dict(averaged.state_dict())
            atomic_write(path, lambda f: self.model.save(f, exclude=exclude, include=include))
        finally:
            policy.load_state_dict(online)
        return path

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights, the averager's counters and the evaluations so far."""
        if self.averager is None and self._pending is not None:
            return self._pending
        return {
            "average": self.average,
            "averager": self._started().state_dict(),
            "evaluations": list(self.evaluations),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Before training starts the state is kept and loaded
        into the average when it is made (to resume an average with a loaded model)."""
        name = "PolicyAveragingCallback.load_state_dict"
        expected = {"average", "averager", "evaluations"}
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{name}: expected keys {sorted(expected)}, got {got}")
        if state["average"] != self.average:
            raise ValueError(
                f"{name}: the state is of average={state['average']!r}, this callback makes "
                f"average={self.average!r}; make the callback with the same average."
            )
        if self.averager is None:
            self._pending = state
            return
        self.averager.load_state_dict(state["averager"])
        self.evaluations = [tuple(e) for e in state["evaluations"]]

    def __repr__(self) -> str:
        if self.averager is not None:
            average = repr(self.averager)
        elif self.average == "ema":
            average = f"ema, tau={self.tau}, warmup={self.warmup}, not started"
        else:
            average = f"swa, start={self.start}, not started"
        evaluation = (
            f"eval every {self.eval_freq} calls on {self.n_eval_episodes} episodes, "
            f"{len(self.evaluations)} done"
            if self.eval_env is not None
            else "no eval_env"
        )
        return f"PolicyAveragingCallback({average}, every={self.every}, {evaluation})"


def _vec_env(env: Any) -> Any:
    """``env`` as a VecEnv (None stays None): an env id is made with SB3's ``make_vec_env``
    (Monitor-wrapped), a Gymnasium env is wrapped in a ``DummyVecEnv``."""
    import gymnasium as gym
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

    if env is None or isinstance(env, VecEnv):
        return env
    if isinstance(env, str):
        return make_vec_env(env, n_envs=1)
    if isinstance(env, gym.Env):
        return DummyVecEnv([lambda: env])
    raise TypeError(
        "PolicyAveragingCallback: eval_env must be a Gymnasium env, a VecEnv, an env id or "
        f"None, got {type(env).__name__}"
    )
