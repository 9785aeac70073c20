"""Weight constraints applied after optimizer steps (what Keras has and PyTorch lacks), and the
reset of optimizer state after a manual write.

```python
>>> handle = rw.constrain(optimizer, actor, rw.constraints.MaxNorm(3.0))
>>> handle.remove()

```

Each constraint is a callable ``constraint(weights)`` that writes in place under
``torch.no_grad()`` through the tensors themselves (autograd's version counters see it), on
the module's floating parameters (never its buffers).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.compiler import is_compiling
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from rlweights.capture import check_plan, single_plan
from rlweights.checks import check_number, check_trained
from rlweights.flat import FlatWeights, bump_versions, layout_of
from rlweights.ops import Plan, clamp_, max_norm_, unit_norms_
from rlweights.weights import Weights, entries

__all__ = [
    "BoundConstraint",
    "Clamp",
    "Constraint",
    "InitClip",
    "MaxNorm",
    "NonNeg",
    "UnitNorm",
    "UnitSphere",
    "constrain",
    "reset_optimizer_state_",
]


def _parameters(weights: Weights, op: str) -> list[Tensor]:
    """The floating parameters of a weight set (a module's parameters, or the tensors given)."""
    if isinstance(weights, nn.Module):
        return [p for p in weights.parameters() if p.is_floating_point()]
    found, _ = entries(weights, op)
    return [e.tensor for e in found if e.tensor.is_floating_point()]


class Constraint:
    """Base class: ``constraint(weights)`` projects the weights in place.

    ``capturable=True`` (for compiled and captured training steps, see
    ``rlweights.capture``): ``bind`` resolves and validates the weights once and gives
    a ``BoundConstraint`` whose call is pure tensor code (no host sync, no graph break
    inside ``torch.compile``); ``constrain`` binds a capturable constraint when it
    attaches it, and calling the constraint on weights binds them on first use.
    """

    capturable = False

    def __call__(self, weights: Weights) -> None:
        if self.capturable:
            bound = getattr(self, "_bound", None)
            if bound is None or bound.weights is not weights:
                bound = self._bound = self.bind(weights)
            bound()
            return
        self._apply(weights)

    def _apply(self, weights: Weights) -> None:
        """The eager, validated form."""
        raise NotImplementedError

    def _apply_tensors(self, tensors: list[Tensor]) -> None:
        """The capturable form on resolved tensors (the weights themselves, or the flat
        buffers holding them where the constraint is elementwise): pure tensor code."""
        raise NotImplementedError

    def _apply_bound(self, bound: BoundConstraint) -> None:
        """An eager call of a bound constraint (after its layout check)."""
        with torch.no_grad():
            self._apply_tensors(bound.flats)
        bump_versions(bound.plan.bump_params)

    def bind(self, weights: Weights) -> BoundConstraint:
        """This constraint fixed to ``weights``: resolved and validated now."""
        return BoundConstraint(self, weights)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class BoundConstraint:
    """A constraint fixed to one weight set (``Constraint.bind``). Calling it applies the
    constraint: on the flat buffers when eager (one kernel per buffer where the constraint
    allows it), through the weights themselves inside torch.compile (so that the compiler
    sees what aliases what). Every call first checks that the weights are where they were
    (``LayoutChangedError`` if not; inside torch.compile when the function is
    traced, see ``rlweights.capture``); ``check`` does it on demand."""

    def __init__(self, constraint: Constraint, weights: Weights):
        name = type(constraint).__name__
        self.constraint = constraint
        self.weights = weights
        self.plan: Plan = single_plan(weights, name)  # validated, as the eager ops
        tensors, views = self.plan.params[0][0], self.plan.traced_params[0][0]
        sliced = [t for t in tensors if t._base is not None]
        if sliced:
            raise ValueError(
                f"{name}.bind: {len(sliced)} of the tensors are views of other tensors (e.g. "
                "rows or slices of a weight); inside a compiled step such views alias the "
                "weights without the compiler knowing. Bind the module or the parameters "
                "themselves, or make the views inside the compiled function."
            )
        self.flats = list(tensors)
        self.views = list(views)

    def check(self) -> None:
        check_plan(self.plan)

    def __call__(self) -> None:
        check_plan(self.plan)  # inside torch.compile: at trace time, then guarded
        if is_compiling():
            with torch.no_grad():
                self.constraint._apply_tensors(self.views)
            return
        self.constraint._apply_bound(self)

    def __repr__(self) -> str:
        return f"{self.constraint!r} bound to {type(self.weights).__name__}"


class Clamp(Constraint):
    """Clip every weight into ``[min, max]`` (WGAN's critic clipping); either may be None."""

    def __init__(
        self, min: float | None = None, max: float | None = None, *, capturable: bool = False
    ):
        clamp_([], min, max)  # validates the bounds
        self.min, self.max = min, max
        self.capturable = bool(capturable)

    def _apply(self, weights: Weights) -> None:
        clamp_(weights, self.min, self.max)

    def _apply_tensors(self, tensors: list[Tensor]) -> None:
        for t in tensors:
            t.clamp_(self.min, self.max)


class NonNeg(Clamp):
    """Weights >= 0 (Keras ``NonNeg``)."""

    def __init__(self, *, capturable: bool = False) -> None:
        super().__init__(min=0.0, capturable=capturable)

    def __repr__(self) -> str:
        return "NonNeg(capturable=True)" if self.capturable else "NonNeg()"


class _UnitConstraint(Constraint):
    """A constraint on each output unit's norm: it needs the weights' own shapes."""

    def bind(self, weights: Weights) -> BoundConstraint:
        bound = super().bind(weights)
        bound.flats = bound.views  # per unit: always the weights themselves
        bound.plan.bump_params = []
        return bound


class MaxNorm(_UnitConstraint):
    """Each output unit's incoming weights (a slice along dim 0 of every tensor with 2 or more
    dims) to L2 norm at most ``max_norm`` (Keras ``MaxNorm``); biases untouched."""

    def __init__(self, max_norm: float, *, capturable: bool = False):
        max_norm_([], max_norm)  # validates the bound
        self.max_norm = max_norm
        self.capturable = bool(capturable)

    def _apply(self, weights: Weights) -> None:
        max_norm_(weights, self.max_norm)

    def _apply_tensors(self, tensors: list[Tensor]) -> None:
        unit_norms_(tensors, float(self.max_norm), at_most=True)


class UnitSphere(_UnitConstraint):
    """Projection onto the unit hypersphere (SimbaV2 projects its weights after every step):
    each unit's weights to L2 norm exactly 1, an all-zero unit staying zero. ``dim=0`` (the
    default): a unit is an output unit, the incoming weights of one neuron (a row of a Linear
    weight, an output channel of a Conv weight: the slices ``max_norm_`` takes); another
    ``dim``: the slices along that dimension; ``dim=None``: each whole tensor. Tensors with
    fewer than 2 dims (biases, gains) are left alone in every mode.

    ```python
    >>> rw.constrain(optimizer, critic, rw.constraints.UnitSphere())

    ```
    """

    def __init__(self, dim: int | None = 0, *, capturable: bool = False):
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
            raise ValueError(
                f"{type(self).__name__}: dim must be an int (the dimension whose slices are "
                f"projected; 0: each output unit) or None (whole tensors), got {dim!r}"
            )
        self.dim = dim
        self.capturable = bool(capturable)

    def _check_dims(self, tensors: list[Tensor]) -> None:
        if self.dim is None:
            return
        short = [
            tuple(t.shape) for t in tensors if t.dim() >= 2 and not -t.dim() <= self.dim < t.dim()
        ]
        if short:
            raise ValueError(
                f"{type(self).__name__}: dim={self.dim} does not exist in weights of shape "
                f"{short[0]}; use a dim every weight with 2 or more dims has, or dim=None"
            )

    def bind(self, weights: Weights) -> BoundConstraint:
        bound = super().bind(weights)
        self._check_dims(bound.views)
        return bound

    def _apply(self, weights: Weights) -> None:
        tensors = _parameters(weights, type(self).__name__)
        self._check_dims(tensors)
        with torch.no_grad():
            unit_norms_(tensors, 1.0, at_most=False, dim=self.dim)

    def _apply_tensors(self, tensors: list[Tensor]) -> None:
        unit_norms_(tensors, 1.0, at_most=False, dim=self.dim)


class UnitNorm(UnitSphere):
    """Each output unit's incoming weights to L2 norm exactly 1 (Keras ``UnitNorm``): the
    default ``UnitSphere``."""

    def __init__(self, *, capturable: bool = False):
        super().__init__(0, capturable=capturable)

    def __repr__(self) -> str:
        return f"UnitNorm(capturable={self.capturable})"


class InitClip(Constraint):
    """The weight clipping of Elsayed et al. (2024), "Weight Clipping for Deep Continual and
    Reinforcement Learning": every weight stays within ``kappa`` times the bound of its
    layer's initialisation distribution.

    On a flattened module (``rw.flatten_``) the clip is one ``clamp_`` per flat buffer
    against per-element limits built on first use (two extra buffers of the weights' size);
    otherwise one ``clamp_`` per bounded parameter.

    The bound is that of PyTorch's default initialisation of ``nn.Linear`` / ``nn.ConvNd``
    (uniform in ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``, for the weight and its bias), computed
    per tensor from the shapes when the constraint is first applied to a module. Other 1-D
    parameters (normalisation layers' scales and shifts, initialised to constants) are left
    alone. Pass ``bounds={name: bound}`` for networks initialised otherwise.
    """

    def __init__(
        self, kappa: float, bounds: dict[str, float] | None = None, *, capturable: bool = False
    ):
        self.kappa = check_number(kappa, "kappa", "InitClip", minimum=0.0, strict=True)
        self._bounds = dict(bounds) if bounds is not None else None
        self._limits: tuple[FlatWeights, list[tuple[Tensor, Tensor, Tensor]]] | None = None
        self.capturable = bool(capturable)

    @staticmethod
    def default_bounds(module: nn.Module) -> dict[str, float]:
        """{parameter name: bound of PyTorch's default initialisation} for every layer with a
        weight of 2 or more dims (and its bias)."""
        found: dict[str, float] = {}
        for prefix, layer in module.named_modules():
            weight = getattr(layer, "weight", None)
            if not isinstance(weight, Tensor) or weight.dim() < 2:
                continue
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            dot = f"{prefix}." if prefix else ""
            found[f"{dot}weight"] = bound
            if isinstance(getattr(layer, "bias", None), Tensor):
                found[f"{dot}bias"] = bound
        return found

    def _bounded(self, weights: Weights) -> dict[str, Tensor]:
        """The module's parameters by name, once the bounds are known and all present."""
        if not isinstance(weights, nn.Module):
            raise TypeError("InitClip needs the module (its layers give the bounds)")
        if self._bounds is None:
            self._bounds = self.default_bounds(weights)
        params = dict(weights.named_parameters())
        missing = sorted(set(self._bounds) - set(params))
        if missing:
            raise ValueError(f"InitClip: the module has no parameter {', '.join(missing)}")
        return params

    def bind(self, weights: Weights) -> BoundConstraint:
        params = self._bounded(weights)
        bound = BoundConstraint(self, weights)
        # traced: one clamp per bounded parameter, through the parameter itself
        bound.views = [params[name] for name in self._bounds]
        return bound

    def _apply_bound(self, bound: BoundConstraint) -> None:
        self._apply(bound.weights)  # the flat path (limits built once), or per parameter

    def _apply_tensors(self, tensors: list[Tensor]) -> None:
        assert self._bounds is not None
        for t, bound in zip(tensors, self._bounds.values(), strict=True):
            limit = self.kappa * bound
            t.clamp_(-limit, limit)

    def _apply(self, weights: Weights) -> None:
        params = self._bounded(weights)
        layout = layout_of(weights)
        if layout is not None and set(self._bounds) <= set(_flat_names(layout)):
            self._clip_flat(layout)
            return
        with torch.no_grad():
            for name, bound in self._bounds.items():
                limit = self.kappa * bound
                params[name].clamp_(-limit, limit)

    def _clip_flat(self, layout: FlatWeights) -> None:
        """One ``clamp_`` per flat buffer, against per-element limits built once per layout
        (two buffers of the weights' size; unbounded parameters get infinite limits)."""
        if self._limits is None or self._limits[0] is not layout:
            limits = []
            for group in layout.groups:
                if group.role != "param":
                    continue
                hi = torch.full_like(group.flat, math.inf)
                offset = 0
                for name, view in zip(group.names, group.views, strict=True):
                    if name in self._bounds:
                        hi[offset : offset + view.numel()] = self.kappa * self._bounds[name]
                    offset += view.numel()
                limits.append((group.flat, -hi, hi))
            self._limits = (layout, limits)
        with torch.no_grad():
            for flat, lo, hi in self._limits[1]:
                flat.clamp_(lo, hi)
        bump_versions(layout.param_views)


def _flat_names(layout: FlatWeights) -> list[str]:
    return [name for g in layout.groups if g.role == "param" for name in g.names]


def constrain(optimizer: Optimizer, weights: Weights, constraint: Any) -> RemovableHandle:
    """Apply ``constraint(weights)`` after every ``optimizer.step()`` (an optimizer step
    post-hook). Returns the handle; ``handle.remove()`` stops it. A capturable constraint is
    bound to ``weights`` here (``Constraint.bind``).

    ``weights`` must be trained by ``optimizer`` (at least one of its tensors), so that a
    constraint is never attached to the wrong optimizer by mistake.
    """
    if not callable(constraint):
        raise TypeError(f"constrain: the constraint must be callable, got {constraint!r}")
    check_trained(optimizer, _parameters(weights, "constrain"), "constrain")
    if getattr(constraint, "capturable", False):  # resolved and validated now, once
        bound = constraint.bind(weights)
        return optimizer.register_step_post_hook(lambda _opt, _args, _kwargs: bound())
    return optimizer.register_step_post_hook(lambda _opt, _args, _kwargs: constraint(weights))


def reset_optimizer_state_(optimizer: Optimizer, weights: Weights) -> int:
    """Forget the optimizer's per-parameter state (Adam's moments and step count, momentum
    buffers, ...) for exactly these weights, as if they had never been stepped.

    Use it after writing into weights that an optimizer trains by hand (loading pretrained
    weights into part of a network, averaging into the online network, a hard reset of a
    layer): their old moments describe weights that no longer exist and would push the new
    ones in stale directions. Other parameters keep their state. Returns how many
    parameters had state.
    """
    tensors = _parameters(weights, "reset_optimizer_state_")
    check_trained(optimizer, tensors, "reset_optimizer_state_")
    reset = 0
    for t in tensors:
        if t in optimizer.state:
            del optimizer.state[t]
            reset += 1
    return reset
