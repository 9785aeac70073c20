"""Weight operations against the loss of plasticity: resets of layers (Nikishin et al. 2022,
"The Primacy Bias in Deep RL"; BRO's resets at fixed steps) and shrink-and-perturb (Ash &
Adams 2020; BBF shrinks its encoder by 0.5 toward a fresh initialisation every 20k steps).

```python
>>> rw.shrink_perturb_(critic, shrink=0.8, perturb=0.2, optimizer=critic_optimizer)
>>> rw.reinit_(actor, include="net.4.*", optimizer=actor_optimizer)  # the last layer afresh
>>> resets = rw.ShrinkPerturb(critic, 0.0, 1.0, at=[50_000, 100_000])  # BRO-style
>>> resets.step()  # after every gradient step

```

Every selected floating parameter ``theta`` becomes ``shrink * theta + perturb * fresh``,
where ``fresh`` is a new initialisation of the same layer by that layer's own
``reset_parameters()`` (for a parameter in a ``ParameterList``, or held by a module without
one: the nearest module above it that has one), run on a scratch copy (so the module's
Parameters, flat layout, optimizer and hooks stay what they were), layer by layer in
``module.modules()`` order,
drawing from the global RNG (or from ``generator``). So ``torch.manual_seed(s)`` then
``rw.reinit_(m)`` gives exactly the weights that ``torch.manual_seed(s)`` then
``reset_parameters()`` of each selected layer would give. ``shrink=1, perturb=0`` leaves
the weights bit-identical (the fresh draw still happens, so the RNG stream does not depend
on the coefficients); ``shrink=0, perturb=1`` is a full re-initialisation.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from rlweights.checks import check_fraction, check_trained
from rlweights.constraints import reset_optimizer_state_
from rlweights.flat import FlatGroup, bump_versions, registered_layout
from rlweights.ops import copy_
from rlweights.periodic import PeriodicRoutine
from rlweights.weights import check_writable, module_entries, select

__all__ = ["ShrinkPerturb", "reinit_", "shrink_perturb_"]

Patterns = str | Sequence[str] | None


class _Plan:
    """What a reset touches, resolved and validated before anything is drawn or written."""

    def __init__(self, module: Any, include: Patterns, exclude: Patterns, op: str):
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"{op}: needs an nn.Module (its layers' reset_parameters() draw the fresh "
                f"weights), got {type(module).__name__}"
            )
        found = [e for e in module_entries(module) if e.kind == "param"]
        found = [e for e in found if e.tensor.is_floating_point()]
        chosen = select(found, include, exclude, "the module")
        if not chosen:
            raise ValueError(
                f"{op}: include={include!r} / exclude={exclude!r} leave no floating parameter "
                "of the module to reset; loosen the patterns."
            )
        check_writable(chosen, op)
        names = {id(e.tensor): e.name for e in chosen}
        self.params = [e.tensor for e in chosen]
        self.names = [e.name for e in chosen]
        # The layer that draws each selected parameter afresh: the module that holds it, or
        # the nearest module above that one with a reset_parameters() (a ParameterList's
        # owner); each such layer once, in module order.
        modules = dict(module.named_modules())
        # layer prefix -> [(the parameter's name inside that layer, the parameter)]
        drawn_by: dict[str, list[tuple[str, Tensor]]] = {}
        missing: list[str] = []
        for prefix, holder in modules.items():
            own = [(n, p) for n, p in holder.named_parameters(recurse=False) if id(p) in names]
            if not own:
                continue
            path = prefix.split(".") if prefix else []
            while not callable(getattr(modules[".".join(path)], "reset_parameters", None)):
                if not path:
                    missing.append(
                        f"{', '.join(names[id(p)] for _, p in own)} ({type(holder).__name__} "
                        f"{repr(prefix) if prefix else 'the module itself'})"
                    )
                    break
                path.pop()
            else:
                inner = prefix.split(".")[len(path) :] if prefix else []
                drawn_by.setdefault(".".join(path), []).extend(
                    (".".join([*inner, n]), p) for n, p in own
                )
        if missing:
            raise ValueError(
                f"{op}: no fresh initialisation for {'; '.join(missing)}: neither the module "
                "that holds them nor one above it has a reset_parameters(). Give it one, or "
                "leave these names out (exclude=...)."
            )
        # In module order: what each resetting layer draws for the selection.
        self.layers = [
            (modules[prefix], drawn_by[prefix]) for prefix in modules if prefix in drawn_by
        ]
        self.devices = {p.device for p in self.params}
        # Flat buffers whose every view is selected: one fresh buffer, one write each.
        self.groups: list[FlatGroup] = []
        whole: set[int] = set()
        for sub in module.modules():
            layout = registered_layout(sub)
            if layout is None or not layout.intact:
                continue
            for group in layout.groups:
                ours = group.role == "param" and all(id(v) in names for v in group.views)
                if ours and not any(id(v) in whole for v in group.views):
                    self.groups.append(group)
                    whole.update(id(v) for v in group.views)
        self.whole = whole
        self.fresh_flats: list[tuple[FlatGroup, Tensor]] = []  # filled by _fresh


def _scratch(module: nn.Module, fresh: dict[int, Tensor]) -> nn.Module:
    """A copy of ``module`` that shares no tensor with it: parameters are the tensors of
    ``fresh`` where given (views of a fresh flat buffer), else new empty ones; buffers are
    clones; children are scratch copies too. ``reset_parameters()`` on it draws what it would
    draw on ``module`` and writes only into the copy."""
    copied = copy.copy(module)  # a new __dict__, but the same dictionaries inside it
    copied._parameters = {
        name: None
        if p is None
        else nn.Parameter(fresh.get(id(p), torch.empty_like(p)), requires_grad=p.requires_grad)
        for name, p in module._parameters.items()
    }
    copied._buffers = {
        name: None if b is None else b.clone() for name, b in module._buffers.items()
    }
    copied._modules = {
        name: None if child is None else _scratch(child, fresh)
        for name, child in module._modules.items()
    }
    return copied


@contextlib.contextmanager
def _drawing_from(generator: torch.Generator | None) -> Iterator[None]:
    """Let the global RNG of ``generator``'s device draw from ``generator`` (and advance it)."""
    if generator is None:
        yield
        return
    device = generator.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    default = (
        torch.default_generator
        if device.type == "cpu"
        else torch.cuda.default_generators[device.index]
    )
    saved = default.get_state()
    default.set_state(generator.get_state())
    try:
        yield
    finally:
        generator.set_state(default.get_state())
        default.set_state(saved)


def _check_generator(generator: Any, devices: set[torch.device], op: str) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator, got {generator!r}")
    kind = generator.device.type
    if kind not in ("cpu", "cuda") or any(d.type != kind for d in devices):
        raise ValueError(
            f"{op}: the generator is on {generator.device}, the selected weights on "
            f"{sorted(map(str, devices))}; use a generator of the weights' device (their "
            "layers draw their fresh weights there), or None for the global RNG."
        )


def _fresh(plan: _Plan) -> dict[int, Tensor]:
    """Fresh values of the selected parameters (by id), from the layers' reset_parameters."""
    fresh: dict[int, Tensor] = {}
    flats: list[tuple[FlatGroup, Tensor]] = []
    for group in plan.groups:  # scratch parameters as views of one fresh buffer per group
        buffer = torch.zeros_like(group.flat)
        flats.append((group, buffer))
        start = group.flat.data_ptr()
        for view in group.views:
            offset = (view.data_ptr() - start) // view.element_size()
            fresh[id(view)] = buffer[offset : offset + view.numel()].view(view.shape)
    out: dict[int, Tensor] = {}
    with torch.no_grad():
        for layer, params in plan.layers:
            scratch = _scratch(layer, fresh)
            scratch.reset_parameters()
            for name, p in params:
                drawn = scratch.get_parameter(name).detach()
                kept = fresh.get(id(p))
                if kept is None:
                    out[id(p)] = drawn
                    continue
                if drawn.data_ptr() != kept.data_ptr():  # reset_parameters assigned a tensor
                    kept.copy_(drawn)
                out[id(p)] = kept
    plan.fresh_flats = flats
    return out


def shrink_perturb_(
    module: nn.Module,
    shrink: float,
    perturb: float,
    include: Patterns = None,
    exclude: Patterns = None,
    generator: torch.Generator | None = None,
    optimizer: Optimizer | Sequence[Optimizer] | None = None,
) -> list[str]:
    """Shrink-and-perturb, in place: ``theta <- shrink * theta + perturb * fresh`` for every
    selected floating parameter, ``fresh`` a new initialisation of its layer (see the module
    docstring for how it is drawn). ``shrink`` and ``perturb`` are in [0, 1]: Ash & Adams
    shrink by about 0.4-0.6 and perturb by 0.001-0.01, BBF uses 0.5 and 0.5; ``shrink=0,
    perturb=1`` is ``reinit_``.

    ``include`` / ``exclude``: shell-style globs on parameter names, as in ``copy_``
    (``include="encoder.*"``). ``generator``: draw the fresh weights from it instead of the
    global RNG (on the weights' device). ``optimizer`` (or a sequence of them: an agent's
    actor and critic optimizers): also forget their state (Adam's moments and step count) for
    exactly the touched parameters (``reset_optimizer_state_``).

    Everything is checked before anything is drawn or written (a bad pattern, coefficient,
    generator or optimizer leaves every weight and optimizer state as it was). Writes go
    through the Parameters themselves (optimizers, hooks and flat layouts stay valid;
    autograd's version counters see them), one pass per flat buffer whose tensors are all
    selected. Returns the names of the touched parameters.
    """
    op = "shrink_perturb_"
    shrink = check_fraction(shrink, "shrink", op, tensor=False)
    perturb = check_fraction(perturb, "perturb", op, tensor=False)
    return _reset(module, shrink, perturb, include, exclude, generator, optimizer, op)


def reinit_(
    module: nn.Module,
    include: Patterns = None,
    exclude: Patterns = None,
    generator: torch.Generator | None = None,
    optimizer: Optimizer | Sequence[Optimizer] | None = None,
) -> list[str]:
    """Re-initialise the selected parameters by their layers' ``reset_parameters()``:
    ``shrink_perturb_`` with ``shrink=0, perturb=1`` (Nikishin et al.'s resets).
    Returns the names of the touched parameters."""
    return _reset(module, 0.0, 1.0, include, exclude, generator, optimizer, "reinit_")


def _reset(
    module: nn.Module,
    shrink: float,
    perturb: float,
    include: Patterns,
    exclude: Patterns,
    generator: torch.Generator | None,
    optimizer: Optimizer | Sequence[Optimizer] | None,
    op: str,
) -> list[str]:
    plan = _Plan(module, include, exclude, op)
    _check_generator(generator, plan.devices, op)
    optimizers = _optimizers(optimizer, plan.params, op)
    with _drawing_from(generator):
        fresh = _fresh(plan)
    with torch.no_grad():
        for group, buffer in plan.fresh_flats:
            _combine(group.flat, buffer, shrink, perturb)
            bump_versions(list(group.views))
        for p in plan.params:
            if id(p) not in plan.whole:
                _combine(p, fresh[id(p)], shrink, perturb)
    for opt in optimizers:
        reset_optimizer_state_(opt, [p for p in plan.params if _trains(opt, p)])
    return plan.names


def _trains(optimizer: Optimizer, param: Tensor) -> bool:
    return any(param is p for group in optimizer.param_groups for p in group["params"])


def _optimizers(optimizer: Any, params: list[Tensor], op: str) -> list[Optimizer]:
    """The optimizers (one, or a sequence: an agent's actor and critic optimizers) whose
    state a reset forgets; those that train none of the touched parameters are left out,
    but at least one must train some."""
    if optimizer is None:
        return []
    found = [optimizer] if isinstance(optimizer, Optimizer) else list(optimizer)
    wrong = [o for o in found if not isinstance(o, Optimizer)]
    if wrong or not found:
        raise TypeError(
            f"{op}: optimizer must be a torch.optim.Optimizer or a sequence of them, got "
            f"{optimizer!r}"
        )
    training = [o for o in found if any(_trains(o, p) for p in params)]
    if not training:
        check_trained(found[0], params, op)  # raises, naming the fix
    return training


def _combine(theta: Tensor, fresh: Tensor, shrink: float, perturb: float) -> None:
    """``theta <- shrink * theta + perturb * fresh``, exact at the two ends."""
    if perturb == 0.0:
        if shrink != 1.0:
            theta.mul_(shrink)
    elif shrink == 0.0:
        theta.copy_(fresh if perturb == 1.0 else fresh * perturb)
    else:
        theta.mul_(shrink).add_(fresh, alpha=perturb)


class ShrinkPerturb(PeriodicRoutine):
    """``shrink_perturb_`` on a schedule: every ``every`` steps, or at the listed steps
    ``at`` (BRO's resets at fixed steps); ``shrink=0, perturb=1`` resets. ``step`` after
    every gradient step (or ``step(n)`` after ``n`` environment steps: the caller's unit);
    ``touched`` names what the last run touched; ``state_dict()`` saves the counter.

    ```python
    >>> resets = rw.ShrinkPerturb(critic, 0.0, 1.0, every=100_000, optimizer=critic_opt)

    ```
    """

    def __init__(
        self,
        module: nn.Module,
        shrink: float,
        perturb: float,
        *,
        every: int | None = None,
        at: Sequence[int] | None = None,
        include: Patterns = None,
        exclude: Patterns = None,
        generator: torch.Generator | None = None,
        optimizer: Optimizer | Sequence[Optimizer] | None = None,
    ):
        name = "ShrinkPerturb"
        self.shrink = check_fraction(shrink, "shrink", name, tensor=False)
        self.perturb = check_fraction(perturb, "perturb", name, tensor=False)
        plan = _Plan(module, include, exclude, name)  # fails now, not at the first reset
        _check_generator(generator, plan.devices, name)
        _optimizers(optimizer, plan.params, name)
        self.module, self.include, self.exclude = module, include, exclude
        self.generator, self.optimizer = generator, optimizer
        self.touched: list[str] = []  # the names the last run touched
        super().__init__(every, at=at)

    def _run(self) -> None:
        self.touched = _reset(
            self.module,
            self.shrink,
            self.perturb,
            self.include,
            self.exclude,
            self.generator,
            self.optimizer,
            "ShrinkPerturb",
        )

    def __repr__(self) -> str:
        return (
            f"ShrinkPerturb(shrink={self.shrink}, perturb={self.perturb}, {self.counter!r}, "
            f"resets={self.updates})"
        )


def step_schedules(
    routines: Mapping[str, ShrinkPerturb], n: int = 1, skip: bool = False
) -> dict[str, list[str]]:
    """Count ``n`` steps on each routine's schedule and run those that are due; returns
    ``{key: names the routine touched}`` for each that ran. ``skip``: count without running
    (a run's last step, after which nothing trains: a reset there would leave the final
    weights untrained)."""
    if skip:
        for routine in routines.values():
            routine.counter.step(n)
        return {}
    return {key: r.touched for key, r in routines.items() if r.step(n)}


def follow_targets_(
    pairs: Iterable[tuple[str, nn.Module, nn.Module]], touched: Iterable[str]
) -> None:
    """After a reset or a shrink-and-perturb: each ``(name, online, target)`` pair's target
    takes its online network's weights for the parameters named ``name.<parameter>`` in
    ``touched`` (so a reset network and its target start again together); the other
    parameters of the targets are left as they are."""
    touched = list(touched)
    for name, online, target in pairs:
        local = [t[len(name) + 1 :] for t in touched if t.startswith(f"{name}.")]
        if local:
            copy_(target, online, include=local)
