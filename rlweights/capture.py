"""The capturable form of the weight ops (``capturable=True`` on a routine or a constraint).

A capturable routine resolves, pairs and validates its tensors once, when it is built, into a
:class:`FrozenPlan`; its per-step work is then pure tensor code: the coefficient and the
counters live in tensors on the weights' device, "every N" is arithmetic on the counter, and
nothing reads a value back to the host or branches on one. So it traces with
``torch.compile(fullgraph=True)`` and records into a CUDA graph.

What the plan fixed (the tensors and their memory) can be invalidated afterwards by
re-flattening a module, ``.to()``, ``load_state_dict(assign=True)`` and the like. A compiled or
captured step would then keep writing the old tensors without anyone noticing, so the plan is
checked (:meth:`FrozenPlan.check`, a few pointer comparisons) on every eager call, and a
changed layout raises :class:`LayoutChangedError` naming the fix, never silently. Inside a
``torch.compile``'d function the check runs for real each time the function is traced, and
the compiled code is guarded so that it is traced again (and checked) after any change that
could make its tensors stale: new tensors registered on the weights' modules (a
:class:`~rlweights.registration.StructureWatch` flag), or a tensor's dtype, device or shape
changed (torch's own guards). So a compiled function that holds a routine raises at its first
call after such a change instead of writing the old tensors. A CUDA graph recorded by hand
(``torch.cuda.graph``) replays without any Python: call ``check()`` before replaying it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.compiler import is_compiling

from rlweights.flat import FlatWeights, layout_of
from rlweights.ops import constrained_tensors, pair_plan
from rlweights.registration import GENERATION, StructureWatch, overwrites_params
from rlweights.tracing import constant_when_traced
from rlweights.weights import ModuleHandle, Weights, is_float

__all__ = ["FrozenPlan", "LayoutChangedError", "frozen_plan", "single_plan"]


class LayoutChangedError(RuntimeError):
    """The tensors a capturable routine or constraint was built on have moved (re-flattened,
    ``.to()``, ``load_state_dict(assign=True)``, replaced): build it again, and recompile or
    recapture the step that uses it."""


@dataclass(slots=True)
class FrozenPlan:
    """The (target, source) tensor pairs of a capturable routine, by role: floating
    parameters (flat buffers when both sides share a flat layout), floating buffers, and
    non-floating tensors (copied, never interpolated). ``bump_params`` / ``bump_buffers``
    list the views whose autograd version a write must bump (flat layouts only; other tensors
    are written directly, which bumps their own). ``watched`` / ``ptrs`` are what :meth:`check`
    compares.

    Inside torch.compile the writes go through the tensors themselves, ``view_params`` and
    ``view_buffers`` (the flat buffers' views; the same pairs as ``params`` / ``buffers``
    where there is no flat layout): each view has a storage object of its own, so the
    compiler cannot tell that a flat buffer aliases the weights a step reads, and writing it
    could be ordered before those reads. The compiler fuses the per-tensor writes anyway."""

    op: str
    params: list[tuple[Tensor, Tensor]]
    buffers: list[tuple[Tensor, Tensor]]
    others: list[tuple[Tensor, Tensor]]
    view_params: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    view_buffers: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    bump_params: list[Tensor] = field(default_factory=list)
    bump_buffers: list[Tensor] = field(default_factory=list)
    layouts: tuple[FlatWeights, ...] = ()
    watched: list[Tensor] = field(default_factory=list)
    ptrs: list[int] = field(default_factory=list)
    # Without a flat layout: how to find the weight sets' tensors again, when a registration
    # anywhere may have replaced one (load_state_dict(assign=True), a new Parameter), and
    # the ids of those found when the plan was made.
    resolve: Callable[[], list[Tensor]] | None = None
    ids: list[int] = field(default_factory=list)
    generation: int = 0
    watch: StructureWatch | None = None

    @property
    def devices(self) -> list[torch.device]:
        """The devices of the written tensors, in order of first appearance."""
        found: list[torch.device] = []
        for t, _ in self.params + self.buffers + self.others:
            if t.device not in found:
                found.append(t.device)
        return found

    def check(self) -> None:
        """Raise :class:`LayoutChangedError` unless every tensor is where the plan found it.

        Inside ``torch.compile`` it is checked when the function is traced, and the compiled
        code is traced again after a registration on the weights' modules (see the module
        docstring): nothing is checked at run time. ``torch.compile(fullgraph=True)`` reports
        the refusal as its own error, whose message carries this one."""
        if is_compiling():
            if not _intact_at_trace(self) or (self.watch is not None and self.watch.changed):
                raise LayoutChangedError(self._message())
            return
        self._check()

    def _check(self) -> None:
        intact = all(layout.intact for layout in self.layouts)
        intact = intact and list(map(Tensor.data_ptr, self.watched)) == self.ptrs
        moved = self.generation != GENERATION[0] or overwrites_params()
        if intact and self.resolve is not None and moved:
            intact = sorted(map(id, self.resolve())) == self.ids
            if intact:
                self.generation = GENERATION[0]
        if intact:
            return
        raise LayoutChangedError(self._message())

    def _message(self) -> str:
        return (
            f"{self.op}: the weights it was built on have moved since (re-flattened, .to(), "
            "load_state_dict(assign=True), replaced tensors); build it again after the change, "
            "and recompile or recapture the step that uses it."
        )


@constant_when_traced
def _intact_at_trace(plan: FrozenPlan) -> bool:
    """Whether ``plan`` is intact, checked for real while torch.compile traces a function
    (pointers cannot be traced); the answer is built into the compiled code. A watch that
    saw a registration is reset when the plan is still intact (the same tensors
    registered again), so the code traced now guards on it afresh."""
    try:
        plan._check()
    except LayoutChangedError:
        return False
    if plan.watch is not None:
        plan.watch.changed = False
    return True


def _modules(*weight_sets: Weights) -> list[torch.nn.Module]:
    """Every module (submodules included) that holds tensors of the weight sets."""
    found: dict[int, torch.nn.Module] = {}
    for weights in weight_sets:
        if isinstance(weights, ModuleHandle):
            weights = weights.module
        if isinstance(weights, torch.nn.Module):
            found.update((id(m), m) for m in weights.modules())
    return list(found.values())


def _pairs(groups: list[tuple[list[Tensor], list[Tensor]]]) -> list[tuple[Tensor, Tensor]]:
    return [(t, s) for ts, ss in groups for t, s in zip(ts, ss, strict=True)]


def frozen_plan(target: Weights, source: Weights, op: str) -> FrozenPlan:
    """Pair and validate ``target`` with ``source`` (as the eager ops do, raising
    :class:`~rlweights.WeightMismatchError`) and fix the tensors for capturable use."""
    plan = pair_plan(target, source, op, ints_ok=True)
    params, buffers = _pairs(plan.params), _pairs(plan.buffers)
    if plan.flat:
        watched = list(plan.views)
        tl, sl = plan.layouts
        view_params = list(zip(tl.param_views, sl.param_views, strict=True))
        view_buffers = list(zip(tl.buffer_views, sl.buffer_views, strict=True))
    else:
        watched = [x for pair in params + buffers + plan.others for x in pair]
        view_params, view_buffers = params, buffers
    resolve = None if plan.flat else functools.partial(_pair_tensors, target, source, op)
    return FrozenPlan(
        op,
        params,
        buffers,
        list(plan.others),
        view_params=view_params,
        view_buffers=view_buffers,
        bump_params=list(plan.bump_params),
        bump_buffers=list(plan.bump_buffers),
        layouts=plan.layouts,
        watched=watched,
        ptrs=list(map(Tensor.data_ptr, watched)),
        resolve=resolve,
        ids=sorted(map(id, resolve())) if resolve is not None else [],
        generation=GENERATION[0],
        watch=StructureWatch(_modules(target, source)),
    )


def _pair_tensors(target: Weights, source: Weights, op: str) -> list[Tensor]:
    again = pair_plan(target, source, op, ints_ok=True, flat=False)
    found = [x for ts, ss in again.params + again.buffers for x in (*ts, *ss)]
    return found + [x for pair in again.others for x in pair]


def single_plan(weights: Weights, op: str) -> FrozenPlan:
    """A plan over one weight set (a constraint's): its floating parameters are written in
    place (pairs ``(t, t)``): the flat buffers when it is flattened (their views to bump
    after a write), else the tensors themselves. Validated as the eager constraints are."""
    tensors, bump = constrained_tensors(weights, op)
    layout = layout_of(weights) if bump else None
    watched = [*tensors, *bump]
    resolve = None if layout is not None else functools.partial(_single_tensors, weights, op)
    return FrozenPlan(
        op,
        [(t, t) for t in tensors if is_float(t)],
        [],
        [],
        view_params=[(v, v) for v in bump] if bump else [(t, t) for t in tensors if is_float(t)],
        bump_params=list(bump),
        layouts=(layout,) if layout is not None else (),
        watched=watched,
        ptrs=list(map(Tensor.data_ptr, watched)),
        resolve=resolve,
        ids=sorted(map(id, resolve())) if resolve is not None else [],
        generation=GENERATION[0],
        watch=StructureWatch(_modules(weights)),
    )


def _single_tensors(weights: Weights, op: str) -> list[Tensor]:
    return constrained_tensors(weights, op)[0]


def bump(tensors: list[Tensor]) -> None:
    """Bump autograd's version counters of flat views after a write (traceable)."""
    if tensors:
        torch.autograd.graph.increment_version(tensors)


def plan_device(plan: FrozenPlan, name: str) -> torch.device | None:
    """The one device of a plan's tensors (None for an empty plan); several are refused: a
    capturable routine keeps its counters on one device."""
    devices = plan.devices
    if len(devices) > 1:
        raise ValueError(
            f"{name}(capturable=True): the weights are on {', '.join(map(str, devices))}; a "
            "capturable routine keeps its counter on one device, so put them on one."
        )
    return devices[0] if devices else None


def _finite_due(due: Tensor, sources: list[Tensor]) -> Tensor:
    """``due`` and every source finite (no host sync)."""
    if not sources:
        return due
    return due & torch.stack([torch.isfinite(s).all() for s in sources]).all()


def lerp_when(
    plan: FrozenPlan,
    due: Tensor,
    tau: Tensor,
    *,
    buffers: str = "copy",
    always: bool = False,
    skip_nonfinite: bool = False,
) -> None:
    """Where ``due``: parameters move ``tau`` of the way to their sources; floating buffers
    are copied (``buffers="copy"``), moved as well (``"polyak"``) or left (``"skip"``);
    non-floating tensors are copied unless ``"skip"``. ``always`` (due at every call, never
    skipped) writes without ``torch.where``; ``skip_nonfinite`` leaves everything when a read
    source is not finite."""
    with_buffers = buffers != "skip"
    traced = is_compiling()
    params = plan.view_params if traced else plan.params
    buffer_pairs = plan.view_buffers if traced else plan.buffers
    with torch.no_grad():
        if skip_nonfinite:
            read = [s for _, s in params + (buffer_pairs if with_buffers else [])]
            due = _finite_due(due, read)
            always = False
        for t, s in params:
            if always:
                t.lerp_(s, tau)
            else:
                t.copy_(torch.where(due, torch.lerp(t, s, tau), t))
        if with_buffers:
            for t, s in buffer_pairs:
                new = torch.lerp(t, s, tau) if buffers == "polyak" else s
                t.copy_(new if always else torch.where(due, new, t))
            for t, s in plan.others:
                t.copy_(s if always else torch.where(due, s, t))
    if not traced:  # written through the views when traced: their own counters moved
        bump(plan.bump_params + (plan.bump_buffers if with_buffers else []))


def copy_when(
    plan: FrozenPlan, due: Tensor, *, always: bool = False, skip_nonfinite: bool = False
) -> None:
    """Where ``due``: every tensor becomes its source's value (see :func:`lerp_when`)."""
    traced = is_compiling()
    pairs = plan.view_params + plan.view_buffers if traced else plan.params + plan.buffers
    with torch.no_grad():
        if skip_nonfinite:
            due = _finite_due(due, [s for _, s in pairs])
            always = False
        for t, s in pairs + plan.others:
            t.copy_(s if always else torch.where(due, s, t))
    if not traced:
        bump(plan.bump_params + plan.bump_buffers)
