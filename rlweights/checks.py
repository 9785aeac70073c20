"""Argument checks shared by every op and routine: one helper per kind of argument.

Each raises ``ValueError`` with the value, the allowed range and, where it helps, the fix;
``op`` names the function or class in the message.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "PrecisionWarning",
    "check_choice",
    "check_fraction",
    "check_int",
    "check_number",
    "check_trained",
    "smallest_tau",
    "warn_small_tau",
]


class PrecisionWarning(UserWarning):
    """A coefficient too small for the dtype of the weights it moves: rounded to the nearest
    representable value, most weights would not change at all."""


def check_int(
    value: object, name: str, op: str, minimum: int = 1, maximum: int | None = None
) -> int:
    """Validate an integer in ``[minimum, maximum]`` (bools are refused: ``True`` is not a
    count)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{op}: {name} must be an int {allowed}, got {value!r}.")
    return value


def check_fraction(
    value: object, name: str, op: str, *, zero: bool = True, tensor: bool = True
) -> float | Tensor:
    """Validate a coefficient in [0, 1] (in (0, 1] with ``zero=False``): a Python number, or
    (with ``tensor=True``) a 0-dim floating tensor.

    Tensor values are not inspected (that would sync the host with the device); their range
    is the caller's responsibility.
    """
    interval = "[0, 1]" if zero else "(0, 1]"
    if isinstance(value, Tensor) and tensor:
        if value.dim() != 0 or not value.is_floating_point():
            raise ValueError(
                f"{op}: {name} must be a float in {interval} or a 0-dim floating tensor, got a "
                f"{value.dtype} tensor of shape {tuple(value.shape)}."
            )
        return value.detach() if value.requires_grad else value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{op}: {name} must be a float in {interval}, got {value!r}.")
    value = float(value)
    if not 0.0 <= value <= 1.0 or (value == 0.0 and not zero):  # also refuses NaN
        meaning = _MEANINGS.get(name.split()[0], "")
        raise ValueError(f"{op}: {name}={value} is outside {interval}.{meaning}")
    return value


# What each coefficient means, said when its value is refused.
_MEANINGS = {
    "tau": " tau is the step toward the source (target <- target + tau * (source - target)); "
    "TorchRL's eps, torch/timm decay and ema-pytorch beta are 1 - tau.",
    "shrink": " shrink is the factor the weights are multiplied by "
    "(theta <- shrink * theta + perturb * fresh); 1 keeps them, 0 drops them.",
    "perturb": " perturb is the weight of the fresh initialisation "
    "(theta <- shrink * theta + perturb * fresh); 0 adds none of it.",
}


def check_choice(value: object, allowed: tuple[str, ...], name: str, op: str) -> None:
    """Validate a mode string against its allowed values."""
    if value not in allowed:
        raise ValueError(f"{op}: {name}={value!r} is not one of {', '.join(map(repr, allowed))}.")


def check_number(
    value: object,
    name: str,
    op: str,
    *,
    minimum: float | None = None,
    strict: bool = False,
    finite: bool = False,
    optional: bool = False,
    fix: str = "",
) -> float | None:
    """Validate a real number: never NaN, not infinite with ``finite=True``, at least
    ``minimum`` (above it with ``strict=True``); None passes with ``optional=True``.
    ``fix`` is appended to the message."""
    if value is None and optional:
        return None
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and not math.isnan(value)
        and (math.isfinite(value) or not finite)
        and (minimum is None or value > minimum or (value == minimum and not strict))
    )
    if not ok:
        kind = "a finite number" if finite else "a number"
        if minimum is not None:
            kind += f" {'>' if strict else '>='} {minimum:g}"
        if optional:
            kind += " or None"
        raise ValueError(f"{op}: {name} must be {kind}, got {value!r}.{' ' + fix if fix else ''}")
    return float(value)


def check_trained(optimizer: Any, tensors: list[Tensor], op: str) -> None:
    """Validate that ``optimizer`` trains at least one of ``tensors``, so that optimizer state
    is never reset, or a constraint attached, through the wrong optimizer by mistake."""
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(id(t) in owned for t in tensors):
        raise ValueError(
            f"{op}: the optimizer trains none of these weights; pass the optimizer that steps them"
        )


def smallest_tau(dtype: torch.dtype) -> float:
    """Half the machine epsilon of ``dtype`` (bfloat16: 0.0039, float16: 0.00049): a step
    ``tau`` below it moves a weight by less than half a unit in its last place unless the
    source is farther from the weight than the weight's own size, so round-to-nearest leaves
    most weights where they are."""
    return torch.finfo(dtype).eps / 2


def warn_small_tau(tau: object, dtypes: Iterable[torch.dtype], op: str) -> None:
    """Warn (``PrecisionWarning``) when ``tau``, a Python number, is positive but below
    ``smallest_tau`` of the least precise floating dtype among ``dtypes``. Only the value
    and the dtypes are looked at (no tensor is read, nothing syncs), so routines call it when
    ``tau`` is set; the warnings machinery shows each message once."""
    floats = [d for d in dtypes if d.is_floating_point]
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or tau <= 0 or not floats:
        return
    coarse = max(floats, key=lambda d: torch.finfo(d).eps)
    bound = smallest_tau(coarse)
    if tau < bound:
        name = str(coarse).removeprefix("torch.")
        warnings.warn(
            f"{op}: tau={tau:g} is below {bound:.2g}, half the {name} epsilon: at each update "
            f"most {name} weights move by less than half a unit in their last place and are "
            f"rounded back to where they were, so the copy barely follows. Use tau >= "
            f"{bound:.2g} (with every=k to update k times less often), or keep the weights "
            "it writes in float32.",
            PrecisionWarning,
            stacklevel=4,
        )
