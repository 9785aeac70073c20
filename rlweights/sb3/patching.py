"""``attach``: rlweights target updates inside SB3 models, at SB3's own update points.

SB3 imports ``polyak_update`` by name into each algorithm module and calls it at its own
update points with generators of parameters. ``attach`` replaces that name in the
algorithm's module (once, for all models) by this module's ``polyak_update``, which
recognises the target tensors of attached models and routes those calls to rlweights; every
other call, from models that are not attached, goes to SB3's own function unchanged.
Nothing is stored on the model, so ``model.save()`` / ``SAC.load()`` work as usual; after a
load, attach again.

Where the routine runs (SB3's update points, unchanged; the one table of them in rlweights,
which the native agents and ``--impl sb3`` refer to):

* SAC, TQC: every gradient step whose index is a multiple of ``target_update_interval``;
* TD3, DDPG: every ``policy_delay``-th gradient step, for the critic pair and the actor pair
  (a features extractor shared by actor and critic is updated twice, as in SB3);
* DQN, QR-DQN: every ``max(target_update_interval // n_envs, 1)`` environment steps
  (``_on_step``), with ``tau=1`` by default.

BatchNorm running statistics are hard-copied to the targets at every update point, as SB3
does, from the lists SB3 caches in ``_setup_model`` (flattening keeps those tensor objects).
Each algorithm's target pairs, lists and module are its row of
:data:`rlweights.sb3.algorithms.ALGORITHMS`.
"""

from __future__ import annotations

import importlib
import weakref
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

import rlweights as rw
from rlweights.checks import check_fraction
from rlweights.flat import bump_versions
from rlweights.ops import pair_plan
from rlweights.sb3.algorithms import Algorithm, algorithm_of
from rlweights.targets import TargetRoutine
from rlweights.weights import Weights

__all__ = [
    "Attachment",
    "algorithm_names",
    "attach",
    "detach",
    "polyak_update",
    "refresh_batch_norm_stats",
]

MIN_SB3, MAX_SB3 = (2, 3), (3, 0)

Routine = TargetRoutine | Callable[[nn.Module, nn.Module, float], None] | None

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


def polyak_update(params: Iterable[Tensor], target_params: Iterable[Tensor], tau: float) -> None:
    """What SB3's algorithm modules call under the name ``polyak_update`` while a model of
    theirs is attached: the targets of attached models go to their attachment, every other
    call to SB3's own function."""
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


def algorithm_names(model: object) -> Algorithm:
    """The row of :data:`rlweights.sb3.algorithms.ALGORITHMS` of ``model``, an algorithm
    with target networks."""
    from stable_baselines3.common.base_class import BaseAlgorithm

    if not isinstance(model, BaseAlgorithm):
        raise TypeError(
            f"attach takes a Stable-Baselines3 model (SAC, TD3, DDPG, DQN, TQC, QRDQN), "
            f"got {type(model).__name__}"
        )
    row = algorithm_of(model)
    if row is not None and row.targets:
        return row
    raise ValueError(
        f"{type(model).__name__} has no target networks, so there is nothing to attach to: "
        "rlweights.sb3.attach works with SAC, TD3, DDPG, DQN and sb3-contrib's TQC and QRDQN."
    )


_NO_TOGGLE = nullcontext()


def _polyak_as_sb3_(target: Weights, source: Weights, tau: float) -> None:
    """SB3's own formula, ``target <- target * (1 - tau) + tau * source`` (two passes, rounded
    as SB3's ``polyak_update`` rounds), on the parameters only, on the validated plans of
    ``rlweights.polyak_`` (one kernel pair per flat buffer).

    An attached model uses it where it is given no routine, so that it trains bit-identically
    to a plain one. ``tau=0`` writes nothing.
    """
    if type(tau) is not float or not 0.0 < tau <= 1.0:
        tau = float(check_fraction(tau, "tau", "attach"))  # SB3's tau is a Python number
        if tau == 0.0:
            return
    plan = pair_plan(target, source, "attach")
    # Flat buffers never require grad, so writing them records nothing: skip the toggle.
    with _NO_TOGGLE if plan.flat else torch.no_grad():
        for ts, ss in plan.params:
            if len(ts) == 1:
                ts[0].mul_(1 - tau).add_(ss[0], alpha=tau)
            else:
                torch._foreach_mul_(ts, 1 - tau)
                torch._foreach_add_(ts, ss, alpha=tau)
    bump_versions(plan.bump_params)


@dataclass
class _Pair:
    name: str
    source: nn.Module
    target: nn.Module
    routine: Routine

    def update(self, tau: float) -> None:
        if self.routine is None:
            # What SB3 does, rounded as SB3 rounds (parameters only; BatchNorm statistics come
            # in their own call), on the flat fast path.
            _polyak_as_sb3_(self.target, self.source, tau)
        elif isinstance(self.routine, TargetRoutine):
            self.routine.step()
        else:
            self.routine(self.target, self.source, tau)


@dataclass
class _Stats:
    source: list[Tensor]
    target: list[Tensor]

    def update(self, tau: float) -> None:
        _polyak_as_sb3_(self.target, self.source, tau)  # SB3 passes tau=1: a hard copy


@dataclass
class Attachment:
    """What ``attach`` did to one model; ``detach`` undoes it."""

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
    def routines(self) -> dict[str, Routine]:
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
    module.polyak_update = polyak_update
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


def refresh_batch_norm_stats(model: Any, row: Algorithm) -> None:
    """SB3 caches detached aliases of the BatchNorm statistics (from ``state_dict()``) in
    ``_setup_model``; flattening rebinds those buffers, so refresh the lists in place."""
    from stable_baselines3.common.utils import get_parameters_by_name

    for module_attrs, list_attrs in zip(row.targets, row.batch_norm_stats, strict=True):
        for module_attr, list_attr in zip(module_attrs, list_attrs, strict=True):
            getattr(model, list_attr)[:] = get_parameters_by_name(
                getattr(model, module_attr), ["running_"]
            )


def attach(model: Any, routine: Routine = None) -> Attachment:
    """Run ``model``'s target-network updates through rlweights.

    ``routine=None`` keeps SB3's semantics exactly (``model.tau`` read at every update,
    ``tau=0`` leaves targets bit-identical, BatchNorm statistics hard-copied) on the fast
    path. A routine replaces the algorithm's own update at its update points: a
    ``rw.PolyakUpdate`` / ``rw.HardUpdate`` template (bound to each target pair, and stepped
    at each update point), or a callable ``fn(target, source, tau)``. Attaching again
    replaces the earlier attachment. Returns a handle with ``detach()``.
    """
    _check_version()
    row = algorithm_names(model)
    if routine is not None and not (isinstance(routine, TargetRoutine) or callable(routine)):
        raise TypeError(
            "attach: routine must be None, a rw.PolyakUpdate / rw.HardUpdate, or a callable "
            f"fn(target, source, tau); got {type(routine).__name__}"
        )
    previous = _ATTACHED.get(model)
    if previous is not None:
        previous.detach()
    modules = {}
    for source_attr, target_attr in row.targets:
        modules[source_attr] = getattr(model, source_attr)
        modules[target_attr] = getattr(model, target_attr)
    flattened = _flatten_disjoint(modules)
    refresh_batch_norm_stats(model, row)
    pairs = []
    for source_attr, target_attr in row.targets:
        source, target = modules[source_attr], modules[target_attr]
        bound = routine.bind(source, target) if isinstance(routine, TargetRoutine) else routine
        if bound is routine:
            pair_plan(target, source, "attach")  # validate the pair now
        pairs.append(_Pair(source_attr, source, target, bound))
    attachment = Attachment(row.name, row.module, pairs, flattened)
    for pair in pairs:
        attachment._route(pair.target, pair)
    for source_attr, target_attr in row.batch_norm_stats:
        source_stats, target_stats = getattr(model, source_attr), getattr(model, target_attr)
        if target_stats:
            stats = _Stats(source_stats, target_stats)
            attachment.stats.append(stats)
            attachment._route(target_stats, stats)
    _patch(row.module)
    _ATTACHED[model] = attachment
    return attachment


def detach(model: Any) -> None:
    """Undo ``attach`` for ``model`` (nothing happens if it is not attached)."""
    attachment = _ATTACHED.pop(model, None)
    if attachment is not None:
        attachment.detach()
