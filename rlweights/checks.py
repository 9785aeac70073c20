"""Argument checks shared by every op and routine: one helper per kind of argument.

Each raises ``ValueError`` with the value, the allowed range and, where it helps, the fix;
``op`` names the function or class in the message.
"""

from __future__ import annotations

import math

from torch import Tensor

__all__ = ["check_bound", "check_choice", "check_fraction", "check_int"]


def check_int(value: object, name: str, op: str, minimum: int = 1) -> int:
    """Validate an integer ``>= minimum`` (bools are refused: ``True`` is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{op}: {name} must be an int >= {minimum}, got {value!r}.")
    return value


def check_fraction(value: object, name: str, op: str) -> float | Tensor:
    """Validate a coefficient in [0, 1]: a Python number, or a 0-dim floating tensor.

    Tensor values are not inspected (that would sync the host with the device); their range
    is the caller's responsibility.
    """
    if isinstance(value, Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise ValueError(
                f"{op}: {name} must be a float in [0, 1] or a 0-dim floating tensor, got a "
                f"{value.dtype} tensor of shape {tuple(value.shape)}."
            )
        return value.detach() if value.requires_grad else value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{op}: {name} must be a float in [0, 1], got {value!r}.")
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise ValueError(
            f"{op}: {name}={value} is outside [0, 1]. {name} is the step toward the source "
            "(target <- target + tau * (source - target)); TorchRL's eps, torch/timm decay and "
            "ema-pytorch beta are 1 - tau."
        )
    return value


def check_choice(value: object, allowed: tuple[str, ...], name: str, op: str) -> None:
    """Validate a mode string against its allowed values."""
    if value not in allowed:
        raise ValueError(f"{op}: {name}={value!r} is not one of {', '.join(map(repr, allowed))}.")


def check_bound(value: object, name: str, op: str) -> float | None:
    """Validate an optional finite real bound."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{op}: {name} must be a real number or None, got {value!r}.")
    return float(value)
