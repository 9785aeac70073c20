"""The functional in-place weight ops.

Every op validates everything before it writes anything (a bad call raises and leaves every
tensor bit-identical), writes under ``torch.no_grad()`` through the tensors themselves (never
``.data``) so autograd sees the write, keeps Parameter objects, and never syncs the host with
the device unless asked to (``nonfinite="raise"``).

Paths, fastest first: both sides flattened with the same layout (``rlweights.flatten_``):
one kernel per flat buffer; otherwise ``torch._foreach_*`` per (device, dtype) group;
per-tensor where foreach has no form (tensor coefficients, non-finite guards). Every Polyak
update and copy, eager, traced inside torch.compile or of a capturable routine, is written by
one function, ``write_``, from one validated ``Plan``.

Coefficient convention, everywhere: ``tau`` is the step toward the source,
``target <- target + tau * (source - target)`` as in SB3, CleanRL and Tianshou. TorchRL's
``eps``, torch/timm ``decay`` and ema-pytorch ``beta`` are ``1 - tau``.

Non-finite sources (``nonfinite=``): ``"propagate"`` (default, free) writes NaN/inf through as
the formula says; ``"raise"`` checks every source first (one extra read of the sources and one
host sync per call) and raises ``NonFiniteError`` before writing;
``"skip"`` leaves the target untouched when any source is non-finite without syncing (one
extra read of the sources plus a ``torch.where`` pass over the targets).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Literal, ParamSpec, TypeVar

import torch
from torch import Tensor
from torch.compiler import is_compiling

from rlweights.checks import check_choice, check_fraction, check_number
from rlweights.flat import FlatWeights, bump_versions, layout_of, registered_layout
from rlweights.registration import GENERATION, StructureWatch, overwrites_params
from rlweights.tracing import constant_when_traced
from rlweights.weights import (
    Entry,
    NonFiniteError,
    WeightMismatchError,
    Weights,
    check_no_overlap,
    check_writable,
    entries,
    group_by_device_dtype,
    is_float,
    match,
    select,
)

__all__ = [
    "Plan",
    "average_",
    "clamp_",
    "constrained_tensors",
    "copy_",
    "distance",
    "distances",
    "max_norm_",
    "pair_plan",
    "polyak_",
    "unit_norms_",
    "write_",
]

NonFinite = Literal["propagate", "raise", "skip"]
BufferPolicy = Literal["copy", "polyak", "skip"]
_BUFFER_POLICIES = ("copy", "polyak", "skip")
AverageBuffers = Literal["average", "copy", "skip"]

_Group = tuple[Sequence[Tensor], Sequence[Tensor]]


@dataclass(slots=True, eq=False)
class Plan:
    """Matched, validated (target, source) tensors by role, what ``write_`` writes.

    ``params`` are floating parameters (or the tensors of sequences and state_dicts),
    ``buffers`` floating buffers, each a list of ``(targets, sources)`` groups of one
    (device, dtype); ``others`` are non-floating pairs (copied, never interpolated). A
    constraint's plan pairs each tensor with itself. In a flat plan each group is one flat
    buffer and ``traced_params`` / ``traced_buffers`` hold the same pairs as the buffers'
    views: inside torch.compile the writes go through the views, as each has a storage
    object of its own, so the compiler cannot see that a flat buffer aliases the weights a
    step reads and could order the write before those reads (it fuses the per-view writes
    anyway). Without a flat layout they are ``params`` / ``buffers``.

    ``bump_*`` list the views whose autograd version an eager flat write must bump; ``views``
    / ``ptrs`` are what the integrity checks compare. ``resolve``, ``ids``, ``generation``
    and ``watch`` are set for the capturable routines' checks (``rlweights.capture``).
    """

    op: str
    params: list[_Group]
    buffers: list[_Group]
    others: list[tuple[Tensor, Tensor]]
    traced_params: list[_Group]
    traced_buffers: list[_Group]
    flat: bool = False
    bump_params: list[Tensor] = field(default_factory=list)
    bump_buffers: list[Tensor] = field(default_factory=list)
    bump_all: list[Tensor] = field(default_factory=list)
    layouts: tuple[FlatWeights, ...] = ()
    views: list[Tensor] = field(default_factory=list)
    ptrs: list[int] = field(default_factory=list)
    # Without a flat layout: how to find the weight sets' tensors again, when a registration
    # anywhere may have replaced one (load_state_dict(assign=True), a new Parameter), and
    # the ids of those found when the plan was made.
    resolve: Callable[[], list[Tensor]] | None = None
    ids: list[int] = field(default_factory=list)
    generation: int = 0
    watch: StructureWatch | None = None


def _grouped(pairs: list[tuple[Tensor, Tensor]]) -> list[_Group]:
    """(target, source) pairs as ``(targets, sources)`` groups, one per (device, dtype)."""
    return [
        ([t for t, _ in group], [s for _, s in group])
        for group in group_by_device_dtype(pairs, key=itemgetter(0))
    ]


def _classify(t: Entry, s: Entry, op: str, ints_ok: bool) -> str:
    kind = t.kind if t.kind in ("param", "buffer") else s.kind
    if not is_float(t.tensor):
        if kind == "tensor" and not ints_ok:
            raise WeightMismatchError(
                f"{op}: tensor {t.name!r} is {t.tensor.dtype}, but {op} needs floating-point "
                "tensors; pass only floating tensors (modules copy their integer buffers)."
            )
        return "other"
    return "buffer" if kind == "buffer" else "param"


def _plan_from_pairs(pairs: list[tuple[Entry, Entry]], op: str, ints_ok: bool) -> Plan:
    sorted_pairs: dict[str, list[tuple[Tensor, Tensor]]] = {"param": [], "buffer": [], "other": []}
    for t, s in pairs:
        sorted_pairs[_classify(t, s, op, ints_ok)].append((t.tensor, s.tensor))
    params, buffers = _grouped(sorted_pairs["param"]), _grouped(sorted_pairs["buffer"])
    return Plan(op, params, buffers, sorted_pairs["other"], params, buffers)


# Flat plans of recent (target, source) pairs, keyed by the objects' ids and checked by
# weak reference (an entry goes away with either object).
_PAIR_PLANS: dict[tuple[int, int], tuple[weakref.ref, weakref.ref, Plan]] = {}


def _cached_flat_plan(target: Weights, source: Weights) -> Plan | None:
    """The flat plan of an earlier call on this pair, if both layouts are still intact.

    This is the hot path: one dict lookup, one data-pointer check per view, nothing else.
    """
    entry = _PAIR_PLANS.get((id(target), id(source)))
    if entry is None or entry[0]() is not target or entry[1]() is not source:
        return None
    plan = entry[2]
    tl, sl = plan.layouts
    generation = GENERATION[0]
    stale = tl.generation != generation or sl.generation != generation
    if (stale or overwrites_params()) and not (tl.intact and sl.intact):
        return None
    if list(map(Tensor.data_ptr, plan.views)) != plan.ptrs:
        return None
    return plan


def _view_groups(tl: FlatWeights, sl: FlatWeights, role: str) -> list[_Group]:
    """The (target views, source views) of each flat buffer of ``role`` of a layout pair."""
    return [
        (tg.views, sg.views) for tg, sg in zip(tl.groups, sl.groups, strict=True) if tg.role == role
    ]


def _flat_plan(target: Weights, source: Weights, tl: FlatWeights, sl: FlatWeights, op: str) -> Plan:
    check_writable(list(tl.others), op)  # the flat buffers themselves are contiguous
    # The flat buffers are checked too: if their storage moved (share_memory_), a later
    # allocation could reuse the old addresses and make stale views look intact.
    views = [*tl.param_views, *tl.buffer_views, *sl.param_views, *sl.buffer_views]
    views += [g.flat for g in tl.groups] + [g.flat for g in sl.groups]
    plan = Plan(
        op,
        [([t], [s]) for t, s in zip(tl.param_flats, sl.param_flats, strict=True)],
        [([t], [s]) for t, s in zip(tl.buffer_flats, sl.buffer_flats, strict=True)],
        [(t.tensor, s.tensor) for t, s in zip(tl.others, sl.others, strict=True)],
        _view_groups(tl, sl, "param"),
        _view_groups(tl, sl, "buffer"),
        flat=True,
        bump_params=tl.param_views,
        bump_buffers=tl.buffer_views,
        bump_all=tl.param_views + tl.buffer_views,
        layouts=(tl, sl),
        views=views,
        ptrs=[Tensor.data_ptr(v) for v in views],
    )
    key = (id(target), id(source))

    def forget(_: object) -> None:
        _PAIR_PLANS.pop(key, None)

    _PAIR_PLANS[key] = (weakref.ref(target, forget), weakref.ref(source, forget), plan)
    return plan


def _shared_layouts(*weight_sets: Weights) -> list[FlatWeights] | None:
    """The intact flat layouts of all weight sets if they all have the same one, else None."""
    layouts = []
    for w in weight_sets:
        layout = layout_of(w)
        if layout is None or (layouts and layout.signature != layouts[0].signature):
            return None
        layouts.append(layout)
    return layouts


def pair_plan(
    target: Weights, source: Weights, op: str, ints_ok: bool = False, flat: bool = True
) -> Plan:
    """Pair and validate ``target`` with ``source`` (raising ``WeightMismatchError``
    otherwise) and group the pairs for the ops: the cached flat plan when both share an intact
    flat layout (and ``flat``), else one built now. ``ints_ok`` lets sequences hold integer
    tensors (copied, as by ``copy_``); ``op`` names the caller in messages.
    """
    if flat:
        plan = _cached_flat_plan(target, source)
        if plan is not None:
            return plan
        layouts = _shared_layouts(target, source)
        if layouts is not None:
            return _flat_plan(target, source, *layouts, op)
    t_entries, t_named = entries(target, "target")
    s_entries, s_named = entries(source, "source")
    return _plan_from_pairs(match(t_entries, t_named, s_entries, s_named, op), op, ints_ok)


def _all_finite(sources: list[Tensor]) -> Tensor | None:
    """A 0-dim bool tensor, every floating source finite (no host sync); None if none."""
    floats = [s for s in sources if is_float(s)]
    if not floats:
        return None
    home = floats[0].device
    flags = [torch.isfinite(s).all() for s in floats]
    if any(s.device != home for s in floats):
        flags = [f.to(home) for f in flags]
    return torch.stack(flags).all()


def _finite_guard(
    sources: list[Tensor], nonfinite: NonFinite, op: str, source_sets: Sequence[Weights]
) -> Tensor | None:
    """None to write unconditionally, else a 0-dim bool tensor: all sources finite.

    With ``"raise"`` it syncs once and raises ``NonFiniteError`` naming the tensors.
    """
    if nonfinite == "propagate":
        return None
    ok = _all_finite(sources)
    if ok is not None and nonfinite == "raise" and not bool(ok):
        bad = []
        for i, weights in enumerate(source_sets):
            label = "source" if len(source_sets) == 1 else f"sources[{i}]"
            for e in entries(weights, label)[0]:
                if is_float(e.tensor):
                    n = int((~torch.isfinite(e.tensor)).sum())
                    if n:
                        bad.append(f"{label} {e.name!r} ({n} non-finite)")
        raise NonFiniteError(
            f"{op}: {', '.join(bad)}; nothing was written. Fix the source (a diverged network?) "
            "or pass nonfinite='skip' to leave the target as it is, or 'propagate' to write "
            "the values through."
        )
    return ok


class _no_grad:
    """``torch.no_grad()`` without its Python overhead, which is a large part of the cost of
    a small flat update."""

    __slots__ = ("prev",)

    def __enter__(self) -> None:
        self.prev = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)

    def __exit__(self, *exc: object) -> None:
        torch._C._set_grad_enabled(self.prev)


_NULL = nullcontext()


def _write_group(
    ts: Sequence[Tensor],
    ss: Sequence[Tensor],
    tau: float | Tensor | None,
    when: Tensor | None,
    one_by_one: bool,
) -> None:
    """``ts <- lerp(ts, ss, tau)`` (a copy for ``tau=None``), only where ``when`` if given: one
    kernel for a single tensor (a flat buffer), ``torch._foreach_*`` for several, one by one
    where foreach has no form (a tensor ``tau``, ``when``) or under trace (``one_by_one``)."""
    if isinstance(tau, Tensor) and ts:
        tau = tau.to(ts[0].device)
    if when is not None:
        for t, s in zip(ts, ss, strict=True):
            new = s if tau is None else torch.lerp(t, s, tau)
            if one_by_one:  # traced: out= would hide the write from the compiler
                t.copy_(torch.where(when, new, t))
            else:
                torch.where(when, new, t, out=t)
    elif len(ts) == 1 or one_by_one or isinstance(tau, Tensor):
        for t, s in zip(ts, ss, strict=True):
            if tau is None:
                t.copy_(s)
            else:
                t.lerp_(s, tau)
    elif tau is None:
        torch._foreach_copy_(ts, ss)
    else:
        torch._foreach_lerp_(ts, ss, tau)


def write_(
    plan: Plan,
    tau: float | Tensor | None,
    *,
    params: bool = True,
    buffers: BufferPolicy = "copy",
    when: Tensor | None = None,
    skip_nonfinite: bool = False,
) -> None:
    """Write a validated plan: the one writer of Polyak updates and hard copies.

    Parameters move ``tau`` of the way to their sources, ``target <- target + tau * (source -
    target)`` (copied for ``tau=None``, left for ``params=False``); floating buffers are
    copied (``buffers="copy"``), moved as well (``"polyak"``) or left (``"skip"``);
    non-floating tensors are copied unless ``"skip"``. ``when``, a 0-dim bool tensor (a
    capturable routine's due flag), writes only where it is True, without a host sync;
    ``skip_nonfinite`` also leaves everything when a source it reads is not finite.

    Nothing is checked here (the plan was, when it was made or found in the cache): eager,
    a flat plan costs one kernel per flat buffer and a version bump of its views; inside
    torch.compile the writes go through the views (see ``Plan``) and are traced.
    """
    eager_flat = when is None and plan.flat and not skip_nonfinite
    if eager_flat and (tau is None or type(tau) is float) and not is_compiling():
        # The hot path (a target update every gradient step): one kernel per flat buffer,
        # then the views' versions; flat buffers never require grad, so no grad toggle.
        lerp_buffers = buffers == "polyak" and tau is not None
        if params:
            for (t,), (s,) in plan.params:
                if tau is None:
                    t.copy_(s)
                else:
                    t.lerp_(s, tau)
        if buffers == "skip":
            torch._C._increment_version(plan.bump_params if params else [])
            return
        for (t,), (s,) in plan.buffers:
            if lerp_buffers:
                t.lerp_(s, tau)
            else:
                t.copy_(s)
        for t, s in plan.others:
            t.copy_(s)
        torch._C._increment_version(plan.bump_all if params else plan.bump_buffers)
        return
    traced = is_compiling()
    groups = (plan.traced_params, plan.traced_buffers) if traced else (plan.params, plan.buffers)
    param_groups = groups[0] if params else []
    buffer_groups = groups[1] if buffers != "skip" else []
    if skip_nonfinite:
        ok = _all_finite([s for _, ss in param_groups + buffer_groups for s in ss])
        if ok is not None:
            when = ok if when is None else when & ok
    with torch.no_grad() if traced else _NULL if plan.flat else _no_grad():
        for ts, ss in param_groups:
            _write_group(ts, ss, tau, when, traced)
        buffer_tau = tau if buffers == "polyak" else None
        for ts, ss in buffer_groups:
            _write_group(ts, ss, buffer_tau, when, traced)
        if buffers != "skip":
            for t, s in plan.others:
                t.copy_(s if when is None else torch.where(when, s, t))
    if traced:  # written through the views: their own version counters moved
        return
    if buffers == "skip":
        bump_versions(plan.bump_params if params else [])
    else:
        bump_versions(plan.bump_all if params else plan.bump_buffers)


def _read(plan: Plan, params: bool, buffers: BufferPolicy) -> list[Tensor]:
    """The sources that ``write_`` reads with these settings (for the finite check)."""
    groups = (plan.params if params else []) + (plan.buffers if buffers != "skip" else [])
    return [s for _, ss in groups for s in ss]


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _eager(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Inside torch.compile, run ``fn`` eagerly (a graph break): the ops' checks are Python
    bookkeeping that must not be traced, and their writes are single kernels anyway.

    ``torch.compiler.disable`` is applied lazily, at the first call under compilation:
    applying it at import would import torch._dynamo (slow) in every process, also in those
    that never compile, and its wrapper would add Python work to every eager call.
    """
    disabled: list[Callable[_P, _R]] = []

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if is_compiling():
            if not disabled:
                disabled.append(torch.compiler.disable(fn))
            return disabled[0](*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


@constant_when_traced
def _flat_pair_at_trace(target: Weights, source: Weights) -> bool:
    """Whether ``target`` and ``source`` share an intact flat layout. Inside torch.compile
    this runs once, for real, when the function is traced (the pointer checks cannot be
    traced), and its answer is built into the compiled code; the layouts' watches are
    cleared, as they were just found intact (see ``_flat_pair_traced``)."""
    layouts = _shared_layouts(target, source)
    for layout in layouts or ():
        layout.watch.changed = False
    return layouts is not None


def _flat_pair_traced(target: Weights, source: Weights) -> bool:
    """``_flat_pair_at_trace``, with the compiled code made to depend on the layouts'
    watches (``StructureWatch``): they are False here (just
    cleared), but reading them guards the code, so that a tensor registered on either module
    afterwards (``load_state_dict(assign=True)``, a replaced Parameter) traces the function
    again, and the broken layout then takes the eager path instead of the old views."""
    if not _flat_pair_at_trace(target, source):
        return False
    tl, sl = _traced_layout(target), _traced_layout(source)
    return not (tl.watch.changed or sl.watch.changed)


def _traced_layout(weights: Weights) -> FlatWeights:
    return weights if isinstance(weights, FlatWeights) else registered_layout(weights)  # type: ignore[arg-type,return-value]


def _traced_plan(target: Weights, source: Weights, op: str) -> Plan:
    """The plan of a flat pair inside torch.compile (after ``_flat_pair_traced``): its
    views, as ``write_`` writes them there. Built while tracing, from the layouts alone:
    the cached eager plan is found by pointer checks, which cannot be traced."""
    tl, sl = _traced_layout(target), _traced_layout(source)
    params, buffers = _view_groups(tl, sl, "param"), _view_groups(tl, sl, "buffer")
    others = [(t.tensor, s.tensor) for t, s in zip(tl.others, sl.others, strict=True)]
    return Plan(op, params, buffers, others, params, buffers, flat=True)


def polyak_(
    target: Weights,
    source: Weights,
    tau: float | Tensor,
    *,
    buffers: BufferPolicy = "copy",
    nonfinite: NonFinite = "propagate",
) -> None:
    """Soft (Polyak) target update, in place: ``target <- target + tau * (source - target)``.

    ``tau=1`` copies exactly, ``tau=0`` leaves the target's weights bit-identical (with a
    Python float the weights are not even read). ``tau`` may be a 0-dim tensor on the
    target's device, for CUDA graphs and ``torch.compile``; its value is then not checked
    (that would sync).

    Floating buffers (BatchNorm running statistics) follow ``buffers``: ``"copy"`` (default,
    as SB3 does at every target update), ``"polyak"`` (interpolate like the weights) or
    ``"skip"``. Integer buffers (``num_batches_tracked``) are copied, never interpolated
    (skipped with ``buffers="skip"``). See the module docstring for ``nonfinite``.
    """
    if is_compiling():
        # Flat layouts trace (no graph break); anything else runs eagerly (a break, see _eager).
        if nonfinite == "propagate" and _flat_pair_traced(target, source):
            op = "polyak_"
            check_choice(buffers, _BUFFER_POLICIES, "buffers", op)
            tau = check_fraction(tau, "tau", op)
            plan = _traced_plan(target, source, op)
            return write_(plan, tau, params=not _is_zero(tau), buffers=buffers)
        return _polyak_eager(target, source, tau, buffers=buffers, nonfinite=nonfinite)
    if type(tau) is float and nonfinite == "propagate" and 0.0 < tau <= 1.0:
        # The hot path (a target update every gradient step): nothing but the integrity
        # check of the cached flat plan before the write.
        plan = _cached_flat_plan(target, source) if buffers in _BUFFER_POLICIES else None
        if plan is not None:
            return write_(plan, tau, buffers=buffers)
    op = "polyak_"
    tau = check_fraction(tau, "tau", op)
    check_choice(buffers, _BUFFER_POLICIES, "buffers", op)
    check_choice(nonfinite, ("propagate", "raise", "skip"), "nonfinite", op)
    plan = pair_plan(target, source, op)
    write_params = not _is_zero(tau)
    if nonfinite == "raise":
        _finite_guard(_read(plan, write_params, buffers), nonfinite, op, [source])
    write_(plan, tau, params=write_params, buffers=buffers, skip_nonfinite=nonfinite == "skip")


def _is_zero(tau: float | Tensor) -> bool:
    """A Python ``tau=0``: the weights are left without being read (a tensor's value is not
    read, that would sync)."""
    return type(tau) is float and tau == 0.0


# The checks are Python bookkeeping that must not be traced; polyak_ tests for compilation
# itself instead of wearing the decorator, which would add a call to every eager one.
_polyak_eager = _eager(polyak_)


def copy_(
    target: Weights,
    source: Weights,
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    nonfinite: NonFinite = "propagate",
) -> None:
    """Hard update, in place: every tensor of ``target`` becomes its source's value.

    ``include`` / ``exclude`` are shell-style globs on tensor names (``"encoder.*"``) for
    partial transfer, e.g. copying a pretrained feature extractor into a new network whose
    head differs: only the selected names must match. ``source`` may be a ``state_dict``
    (load it with ``torch.load(path, weights_only=True)``).

    Inside ``torch.compile`` a copy between two weight sets of one flat layout traces (no
    graph break); other calls run eagerly there.
    """
    if is_compiling():
        plain = include is None and exclude is None and nonfinite == "propagate"
        if plain and _flat_pair_traced(target, source):
            return write_(_traced_plan(target, source, "copy_"), None)
        return _copy_eager(target, source, include=include, exclude=exclude, nonfinite=nonfinite)
    op = "copy_"
    check_choice(nonfinite, ("propagate", "raise", "skip"), "nonfinite", op)
    if include is None and exclude is None:
        plan = pair_plan(target, source, op, ints_ok=True)
    else:
        t_entries, t_named = entries(target, "target")
        s_entries, s_named = entries(source, "source")
        if not (t_named and s_named):
            raise ValueError(
                f"{op}: include=/exclude= select tensors by name, so target and source must "
                "both be modules, state_dicts or flatten_ handles."
            )
        t_entries = select(t_entries, include, exclude, "target")
        s_names = {e.name for e in t_entries}
        s_entries = [e for e in s_entries if e.name in s_names]
        pairs = match(t_entries, True, s_entries, True, op)
        plan = _plan_from_pairs(pairs, op, ints_ok=True)
    if nonfinite == "raise":
        _finite_guard(_read(plan, True, "copy"), nonfinite, op, [source])
    write_(plan, None, skip_nonfinite=nonfinite == "skip")


_copy_eager = _eager(copy_)


def _normalised(coefficients: Sequence[float] | None, n: int, op: str) -> list[float]:
    """The validated coefficients of ``n`` sources, scaled to sum to 1 (uniform for None)."""
    if n == 0:
        raise ValueError(f"{op}: sources is empty; pass at least one weight set to average.")
    if coefficients is None:
        return [1.0 / n] * n
    values = list(coefficients)
    if len(values) != n:
        raise ValueError(
            f"{op}: got {len(values)} coefficients for {n} sources; pass one per source."
        )
    relative = "Coefficients are relative (normalised to sum to 1)."
    for i, c in enumerate(values):
        check_number(c, f"coefficients[{i}]", op, minimum=0.0, finite=True, fix=relative)
    largest = max(float(c) for c in values)
    if largest <= 0.0:
        raise ValueError(f"{op}: coefficients are all 0; at least one must be positive.")
    # Scaled by the largest first, so that the sum cannot overflow (1e308 + 1e308 is inf).
    scaled = [float(c) / largest for c in values]
    total = sum(scaled)
    return [c / total for c in scaled]


def _average_into(t: Tensor, sources: list[Tensor], coefficients: list[float]) -> None:
    """t <- sum_i c_i * sources[i], correct when t is one of the sources."""
    c = coefficients
    if t.dtype in (torch.float16, torch.bfloat16):
        acc = torch.zeros_like(t, dtype=torch.float32)
        for s, ci in zip(sources, c, strict=True):
            acc.add_(s, alpha=ci)
        t.copy_(acc)
        return
    # Sources that are the target itself (it may appear several times) are read before the
    # first write: their coefficients are summed into one scaling of the target.
    key = (t.data_ptr(), t.stride())
    itself = [t.numel() > 0 and (s.data_ptr(), s.stride()) == key for s in sources]
    rest = [i for i, same in enumerate(itself) if not same]
    if any(itself):
        t.mul_(sum(ci for ci, same in zip(c, itself, strict=True) if same))
    else:
        first = rest.pop(0)
        torch.mul(sources[first], c[first], out=t)
    for i in rest:
        t.add_(sources[i], alpha=c[i])


@_eager
def average_(
    target: Weights,
    sources: Sequence[Weights],
    coefficients: Sequence[float] | None = None,
    *,
    buffers: AverageBuffers = "average",
    nonfinite: NonFinite = "propagate",
) -> None:
    """Weighted mean of N weight sets, written into ``target`` in place.

    ``target <- sum_i c_i * sources[i]`` with the ``coefficients`` ``c`` normalised to sum to
    1 (uniform when None): the mean of the sources' values from before the call. ``target``
    may be among the sources, even several times (averaging into the online network).
    fp16/bf16 are accumulated in float32. Floating buffers are averaged by default
    (``buffers="copy"`` takes the first source's, ``"skip"`` leaves them); integer buffers are
    copied from the first source.
    """
    op = "average_"
    if isinstance(sources, (torch.Tensor, torch.nn.Module)):
        raise TypeError(f"{op}: sources must be a sequence of weight sets, e.g. [net_a, net_b].")
    sources = list(sources)
    c = _normalised(coefficients, len(sources), op)
    check_choice(buffers, ("average", "copy", "skip"), "buffers", op)
    check_choice(nonfinite, ("propagate", "raise", "skip"), "nonfinite", op)
    # One path for all pairs, so that their groups line up.
    flat = _shared_layouts(target, *sources) is not None
    plans = [pair_plan(target, s, op, flat=flat) for s in sources]
    with _no_grad():
        first = plans[0]
        read = [s for p in plans for _, ss in p.params for s in ss]
        if buffers != "skip":
            read += [s for p in plans for _, ss in p.buffers for s in ss]
        ok = _finite_guard(read, nonfinite, op, sources)
        for role in ("params", "buffers"):
            if role == "buffers" and buffers != "average":
                if buffers == "copy":
                    for ts, ss in first.buffers:
                        _write_group(ts, ss, None, ok, False)
                continue
            for g, (ts, _) in enumerate(getattr(first, role)):
                for j, t in enumerate(ts):
                    srcs = [getattr(p, role)[g][1][j] for p in plans]
                    if ok is None:
                        _average_into(t, srcs, c)
                    else:
                        new = t.clone()
                        _average_into(new, srcs, c)
                        torch.where(ok, new, t, out=t)
        if buffers != "skip":
            for t, s in first.others:
                if ok is None:
                    t.copy_(s)
                else:
                    torch.where(ok, s, t, out=t)
            bump_versions(first.bump_buffers)
        bump_versions(first.bump_params)


def constrained_tensors(weights: Weights, op: str) -> tuple[list[Tensor], list[Tensor]]:
    """The floating tensors a constraint acts on, and the flat views to bump (if flat).

    Modules contribute their floating parameters (not buffers); sequences and mappings every
    tensor, which must be floating.
    """
    layout = layout_of(weights)
    if layout is not None:
        for flat in layout.param_flats:
            if flat.is_complex():
                raise WeightMismatchError(
                    f"{op}: a flat buffer of the module is {flat.dtype}; {op} needs real "
                    "floating-point weights, and nothing was written."
                )
        if layout.others:  # parameters left out of the flat buffers: meta tensors
            check_writable([e for e in layout.others if e.kind == "param"], op)
        return list(layout.param_flats), layout.param_views
    found, _ = entries(weights, "weights")
    out, kept = [], []
    for e in found:
        if e.kind == "buffer":
            continue
        if e.tensor.is_complex():  # refused before anything is written (no order is bitwise)
            raise WeightMismatchError(
                f"{op}: tensor {e.name!r} is {e.tensor.dtype}; {op} needs real floating-point "
                "tensors, and nothing was written."
            )
        if not is_float(e.tensor):
            if e.kind in ("tensor", "state"):
                raise WeightMismatchError(
                    f"{op}: tensor {e.name!r} is {e.tensor.dtype}, but {op} needs "
                    "floating-point tensors."
                )
            continue
        out.append(e.tensor)
        kept.append(e)
    check_writable(kept, op)
    check_no_overlap(kept, op)
    return out, []


@_eager
def clamp_(weights: Weights, min: float | None = None, max: float | None = None) -> None:
    """Clip every weight into ``[min, max]`` in place (WGAN's critic clipping).

    On a module this acts on its floating parameters, not its buffers. Either bound may be
    None for a one-sided clip.
    """
    op = "clamp_"
    lo = check_number(min, "min", op, optional=True)
    hi = check_number(max, "max", op, optional=True)
    if lo is None and hi is None:
        raise ValueError(f"{op}: give min, max or both.")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"{op}: min={lo} is greater than max={hi}; pass min <= max.")
    tensors, bump = constrained_tensors(weights, op)
    with _no_grad():
        if len(tensors) == 1:
            tensors[0].clamp_(lo, hi)
        else:
            for group in group_by_device_dtype(tensors):
                if lo is not None:
                    torch._foreach_clamp_min_(group, lo)
                if hi is not None:
                    torch._foreach_clamp_max_(group, hi)
        bump_versions(bump)


@_eager
def max_norm_(weights: Weights, max_norm: float) -> None:
    """Rescale each output unit's incoming weights to L2 norm at most ``max_norm`` (Keras MaxNorm).

    For every tensor with 2 or more dims, each slice along dim 0 (a row of a Linear weight, an
    output channel of a Conv weight) with norm above ``max_norm`` is scaled down to exactly
    ``max_norm``; slices within the bound are unchanged. 1-D tensors (biases) are untouched.
    """
    op = "max_norm_"
    bound = check_number(max_norm, "max_norm", op, minimum=0.0)
    tensors, _ = constrained_tensors(weights, op)  # validates everything before the first write
    layout = layout_of(weights)
    if layout is not None:  # write through the Parameters themselves: autograd sees it
        tensors = layout.param_views
    with _no_grad():
        unit_norms_(tensors, bound, at_most=True)


def unit_norms_(
    tensors: Sequence[Tensor], norm: float, *, at_most: bool, dim: int | None = 0
) -> None:
    """Scale each unit of every tensor with 2 or more dims to L2 norm ``norm`` (``at_most``:
    only the units above it; else every unit, an all-zero unit staying zero). A unit is a
    slice along ``dim`` (0: an output unit, a row of a Linear weight or an output channel of a
    Conv weight), or the whole tensor for ``dim=None``. Pure tensor code, unvalidated: the body
    of ``max_norm_`` and of the norm constraints (``rlweights.constraints``), traced as
    it is inside torch.compile."""
    for t in tensors:
        if t.dim() < 2 or t.numel() == 0:
            continue
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        over = None if dim is None else [d for d in range(t.dim()) if d != dim % t.dim()]
        norms = torch.linalg.vector_norm(t, dim=over, keepdim=True, dtype=acc)
        if at_most:
            scale = (norm / norms).clamp(max=1.0)
        else:
            scale = torch.where(norms > 0, norm / norms, torch.zeros_like(norms))
        t.mul_(scale.to(t.dtype))


def _norm_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@_eager
def distances(a: Weights, b: Weights) -> dict[str, Tensor]:
    """Per-tensor L2 distance ``||a_i - b_i||`` of every matched floating tensor.

    Values are 0-dim tensors on the tensors' device (no host sync), float32 (float64 for
    float64 tensors). Names are the module's (or positions for sequences).
    """
    op = "distances"
    a_entries, a_named = entries(a, "a")
    b_entries, b_named = entries(b, "b")
    pairs = match(a_entries, a_named, b_entries, b_named, op, "b", writes=False)
    with _no_grad():
        return {
            x.name: torch.linalg.vector_norm(x.tensor - y.tensor, dtype=_norm_dtype(x.tensor))
            for x, y in pairs
            if is_float(x.tensor)
        }


@_eager
def distance(a: Weights, b: Weights) -> Tensor:
    """L2 distance over all matched floating tensors, as a 0-dim tensor (no host sync).

    ``sqrt(sum_i ||a_i - b_i||^2)``; computed on the flat buffers (one pass each) when both
    sides share a flat layout. Floating buffers count too; float32 accumulation (float64 for
    float64 tensors).
    """
    op = "distance"
    layouts = _shared_layouts(a, b)
    if layouts is not None:
        la, lb = layouts
        pairs = [(x.flat, y.flat) for x, y in zip(la.groups, lb.groups, strict=True)]
    else:
        a_entries, a_named = entries(a, "a")
        b_entries, b_named = entries(b, "b")
        matched = match(a_entries, a_named, b_entries, b_named, op, "b", writes=False)
        pairs = [(x.tensor, y.tensor) for x, y in matched if is_float(x.tensor)]
    if not pairs:
        return torch.zeros(())
    home = pairs[0][0].device
    with _no_grad():
        parts = [
            torch.linalg.vector_norm(x - y, dtype=_norm_dtype(x)).to(home, torch.float64)
            for x, y in pairs
        ]
        total = torch.linalg.vector_norm(torch.stack(parts))
    dtype = torch.float64 if all(x.dtype == torch.float64 for x, _ in pairs) else torch.float32
    return total.to(dtype)
