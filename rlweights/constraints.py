"""Weight constraints applied after optimizer steps (what Keras has and PyTorch lacks), and the
reset of optimizer state after a manual write.

>>> handle = rw.constrain(optimizer, actor, rw.constraints.MaxNorm(3.0))
>>> handle.remove()

Each constraint is a callable ``constraint(weights)`` that writes in place under
``torch.no_grad()`` through the tensors themselves (autograd's version counters see it), on
the module's floating parameters (never its buffers).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from rlweights.checks import check_number
from rlweights.flat import FlatWeights, bump_versions, layout_of
from rlweights.ops import clamp_, max_norm_
from rlweights.weights import Weights, entries

__all__ = [
    "Clamp",
    "Constraint",
    "InitClip",
    "MaxNorm",
    "NonNeg",
    "UnitNorm",
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
    """Base class: ``constraint(weights)`` projects the weights in place."""

    def __call__(self, weights: Weights) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class Clamp(Constraint):
    """Clip every weight into ``[min, max]`` (WGAN's critic clipping); either may be None."""

    def __init__(self, min: float | None = None, max: float | None = None):
        clamp_([], min, max)  # validates the bounds
        self.min, self.max = min, max

    def __call__(self, weights: Weights) -> None:
        clamp_(weights, self.min, self.max)


class NonNeg(Clamp):
    """Weights >= 0 (Keras ``NonNeg``)."""

    def __init__(self) -> None:
        super().__init__(min=0.0)

    def __repr__(self) -> str:
        return "NonNeg()"


class MaxNorm(Constraint):
    """Each output unit's incoming weights (a slice along dim 0 of every tensor with 2 or more
    dims) to L2 norm at most ``max_norm`` (Keras ``MaxNorm``); biases untouched."""

    def __init__(self, max_norm: float):
        max_norm_([], max_norm)  # validates the bound
        self.max_norm = max_norm

    def __call__(self, weights: Weights) -> None:
        max_norm_(weights, self.max_norm)


class UnitNorm(Constraint):
    """Each output unit's incoming weights to L2 norm exactly 1 (Keras ``UnitNorm``); an
    all-zero unit stays zero; biases untouched."""

    def __call__(self, weights: Weights) -> None:
        with torch.no_grad():
            for t in _parameters(weights, "UnitNorm"):
                if t.dim() < 2 or t.numel() == 0:
                    continue
                acc = torch.float64 if t.dtype == torch.float64 else torch.float32
                norms = torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1, dtype=acc)
                scale = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
                t.mul_(scale.to(t.dtype).view(-1, *([1] * (t.dim() - 1))))


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

    def __init__(self, kappa: float, bounds: dict[str, float] | None = None):
        self.kappa = check_number(kappa, "kappa", "InitClip", minimum=0.0, strict=True)
        self._bounds = dict(bounds) if bounds is not None else None
        self._limits: tuple[FlatWeights, list[tuple[Tensor, Tensor, Tensor]]] | None = None

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

    def __call__(self, weights: Weights) -> None:
        if not isinstance(weights, nn.Module):
            raise TypeError("InitClip needs the module (its layers give the bounds)")
        if self._bounds is None:
            self._bounds = self.default_bounds(weights)
        params = dict(weights.named_parameters())
        missing = sorted(set(self._bounds) - set(params))
        if missing:
            raise ValueError(f"InitClip: the module has no parameter {', '.join(missing)}")
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


def _check_trained(optimizer: Optimizer, tensors: list[Tensor], op: str) -> None:
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(id(t) in owned for t in tensors):
        raise ValueError(
            f"{op}: the optimizer trains none of these weights; pass the optimizer that steps them"
        )


def constrain(optimizer: Optimizer, weights: Weights, constraint: Any) -> RemovableHandle:
    """Apply ``constraint(weights)`` after every ``optimizer.step()`` (an optimizer step
    post-hook). Returns the handle; ``handle.remove()`` stops it.

    ``weights`` must be trained by ``optimizer`` (at least one of its tensors), so that a
    constraint is never attached to the wrong optimizer by mistake.
    """
    if not callable(constraint):
        raise TypeError(f"constrain: the constraint must be callable, got {constraint!r}")
    _check_trained(optimizer, _parameters(weights, "constrain"), "constrain")
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
    _check_trained(optimizer, tensors, "reset_optimizer_state_")
    reset = 0
    for t in tensors:
        if t in optimizer.state:
            del optimizer.state[t]
            reset += 1
    return reset
