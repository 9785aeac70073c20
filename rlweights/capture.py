"""The capturable form of the weight ops (``capturable=True`` on a routine or a constraint).

A capturable routine resolves, pairs and validates its tensors once, when it is built, into a
``Plan`` (the eager ops' plan, here with what the layout checks compare),
which ``write_`` writes, as it writes the eager ops'. Its per-step work is
then pure tensor code: the coefficient and the counters live in tensors on the weights'
device, "every N" is arithmetic on the counter, and nothing reads a value back to the host or
branches on one. So it traces with
``torch.compile(fullgraph=True)`` and records into a CUDA graph.

What the plan fixed (the tensors and their memory) can be invalidated afterwards by
re-flattening a module, ``.to()``, ``load_state_dict(assign=True)`` and the like. A compiled or
captured step would then keep writing the old tensors without anyone noticing, so the plan is
checked (``check_plan``, a few pointer comparisons) on every eager call, and a
changed layout raises ``LayoutChangedError`` naming the fix, never silently. Inside a
``torch.compile``'d function the check runs for real each time the function is traced, and
the compiled code is guarded so that it is traced again (and checked) after any change that
could make its tensors stale: new tensors registered on the weights' modules (a
``StructureWatch`` flag), or a tensor's dtype, device or shape
changed (torch's own guards). So a compiled function that holds a routine raises at its first
call after such a change instead of writing the old tensors. A CUDA graph recorded by hand
(``torch.cuda.graph``) replays without any Python: call ``check()`` before replaying it.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor
from torch.compiler import is_compiling

from rlweights.flat import layout_of
from rlweights.ops import Plan, constrained_tensors, pair_plan
from rlweights.registration import GENERATION, StructureWatch, overwrites_params
from rlweights.tracing import constant_when_traced
from rlweights.weights import ModuleHandle, Weights, is_float

__all__ = ["LayoutChangedError", "check_plan", "frozen_plan", "plan_device", "single_plan"]


class LayoutChangedError(RuntimeError):
    """The tensors a capturable routine or constraint was built on have moved (re-flattened,
    ``.to()``, ``load_state_dict(assign=True)``, replaced): build it again, and recompile or
    recapture the step that uses it."""


def check_plan(plan: Plan) -> None:
    """Raise ``LayoutChangedError`` unless every tensor of a capturable ``plan`` (from
    ``frozen_plan`` or ``single_plan``) is where the plan found it.

    Inside ``torch.compile`` it is checked when the function is traced, and the compiled code
    is traced again after a registration on the weights' modules (see the module docstring):
    nothing is checked at run time. ``torch.compile(fullgraph=True)`` reports the refusal as
    its own error, whose message carries this one."""
    if is_compiling():
        if not _intact_at_trace(plan) or (plan.watch is not None and plan.watch.changed):
            raise LayoutChangedError(_message(plan))
        return
    _check(plan)


def _check(plan: Plan) -> None:
    intact = all(layout.intact for layout in plan.layouts)
    intact = intact and list(map(Tensor.data_ptr, plan.views)) == plan.ptrs
    moved = plan.generation != GENERATION[0] or overwrites_params()
    if intact and plan.resolve is not None and moved:
        intact = sorted(map(id, plan.resolve())) == plan.ids
        if intact:
            plan.generation = GENERATION[0]
    if intact:
        return
    raise LayoutChangedError(_message(plan))


def _message(plan: Plan) -> str:
    return (
        f"{plan.op}: the weights it was built on have moved since (re-flattened, .to(), "
        "load_state_dict(assign=True), replaced tensors); build it again after the change, "
        "and recompile or recapture the step that uses it."
    )


@constant_when_traced
def _intact_at_trace(plan: Plan) -> bool:
    """Whether ``plan`` is intact, checked for real while torch.compile traces a function
    (pointers cannot be traced); the answer is built into the compiled code. A watch that
    saw a registration is reset when the plan is still intact (the same tensors
    registered again), so the code traced now guards on it afresh."""
    try:
        _check(plan)
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


def frozen_plan(target: Weights, source: Weights, op: str) -> Plan:
    """Pair and validate ``target`` with ``source`` (as the eager ops do, raising
    ``WeightMismatchError``) and fix the tensors for capturable use: the plan
    ``write_`` writes, with what ``check_plan`` compares."""
    plan = pair_plan(target, source, op, ints_ok=True)
    if plan.flat:
        # A copy: the eager ops share the cached plan; this one names the routine in its
        # refusal and carries a watch.
        plan = dataclasses.replace(plan, op=op, views=list(plan.views), ptrs=list(plan.ptrs))
    else:
        plan.views = [x for ts, ss in plan.params + plan.buffers for x in (*ts, *ss)]
        plan.views += [x for pair in plan.others for x in pair]
        plan.ptrs = list(map(Tensor.data_ptr, plan.views))
        plan.resolve = functools.partial(_pair_tensors, target, source, op)
        plan.ids = sorted(map(id, plan.resolve()))
    plan.generation = GENERATION[0]
    plan.watch = StructureWatch(_modules(target, source))
    return plan


def _pair_tensors(target: Weights, source: Weights, op: str) -> list[Tensor]:
    again = pair_plan(target, source, op, ints_ok=True, flat=False)
    found = [x for ts, ss in again.params + again.buffers for x in (*ts, *ss)]
    return found + [x for pair in again.others for x in pair]


def single_plan(weights: Weights, op: str) -> Plan:
    """A plan over one weight set (a constraint's): its floating parameters are written in
    place (each paired with itself), in one group: the flat buffers when it is flattened
    (their views to bump after a write, and to write inside torch.compile), else the tensors
    themselves. Validated as the eager constraints are."""
    tensors, bump = constrained_tensors(weights, op)
    tensors = [t for t in tensors if is_float(t)]
    layout = layout_of(weights) if bump else None
    views = [*tensors, *bump]
    resolve = None if layout is not None else functools.partial(_single_tensors, weights, op)
    params = [(tensors, tensors)]
    return Plan(
        op,
        params,
        [],
        [],
        [(bump, bump)] if bump else params,
        [],
        flat=layout is not None,
        bump_params=list(bump),
        layouts=(layout,) if layout is not None else (),
        views=views,
        ptrs=list(map(Tensor.data_ptr, views)),
        resolve=resolve,
        ids=sorted(map(id, resolve())) if resolve is not None else [],
        generation=GENERATION[0],
        watch=StructureWatch(_modules(weights)),
    )


def _single_tensors(weights: Weights, op: str) -> list[Tensor]:
    return constrained_tensors(weights, op)[0]


def plan_device(plan: Plan, name: str) -> torch.device | None:
    """The one device of a plan's tensors (None for an empty plan); several are refused: a
    capturable routine keeps its counters on one device."""
    written = [t for ts, _ in plan.params + plan.buffers for t in ts]
    devices = list(dict.fromkeys(t.device for t in written + [t for t, _ in plan.others]))
    if len(devices) > 1:
        raise ValueError(
            f"{name}(capturable=True): the weights are on {', '.join(map(str, devices))}; a "
            "capturable routine keeps its counter on one device, so put them on one."
        )
    return devices[0] if devices else None
