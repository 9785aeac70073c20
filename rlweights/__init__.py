"""rlweights: fast, validated in-place weight operations for deep reinforcement learning.

``import rlweights as rw``. Every op takes *weight sets*: an ``nn.Module`` (matched by
name), a sequence of tensors (matched by position), a ``state_dict`` or the handle of
``flatten_``. Coefficient convention: ``tau`` is the step toward the source,
``target <- target + tau * (source - target)`` (TorchRL's eps / torch's decay = 1 - tau).

Each name loads its module when it is first used: the names below come from the core and
the routines (torch, without its compiler), ``rw.distributed`` from the integration of that
name. ``import rlweights`` itself imports no torch, so that the ``rlweights`` command
prints its help at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

__all__ = [
    "EMA",
    "SWA",
    "FlatLayoutWarning",
    "FlatWeights",
    "HardUpdate",
    "LayoutChangedError",
    "NonFiniteError",
    "PolyakUpdate",
    "PrecisionWarning",
    "ShrinkPerturb",
    "WeightMismatchError",
    "__version__",
    "average_",
    "clamp_",
    "constrain",
    "constraints",
    "copy_",
    "distance",
    "distances",
    "distributed",
    "flatten_",
    "make_target",
    "max_norm_",
    "polyak_",
    "reinit_",
    "reset_optimizer_state_",
    "shrink_perturb_",
]

if TYPE_CHECKING:
    from rlweights import constraints, distributed
    from rlweights.capture import LayoutChangedError
    from rlweights.checks import PrecisionWarning
    from rlweights.constraints import constrain, reset_optimizer_state_
    from rlweights.flat import FlatLayoutWarning, FlatWeights, flatten_
    from rlweights.ops import average_, clamp_, copy_, distance, distances, max_norm_, polyak_
    from rlweights.plasticity import ShrinkPerturb, reinit_, shrink_perturb_
    from rlweights.running_average import EMA, SWA
    from rlweights.targets import HardUpdate, PolyakUpdate, make_target
    from rlweights.weights import NonFiniteError, WeightMismatchError

# The module of each name imported above, for __getattr__ (a test holds the two equal).
_HOME = {
    "constraints": "constraints",
    "distributed": "distributed",
    "EMA": "running_average",
    "SWA": "running_average",
    "LayoutChangedError": "capture",
    "PrecisionWarning": "checks",
    "constrain": "constraints",
    "reset_optimizer_state_": "constraints",
    "FlatLayoutWarning": "flat",
    "FlatWeights": "flat",
    "flatten_": "flat",
    "average_": "ops",
    "clamp_": "ops",
    "copy_": "ops",
    "distance": "ops",
    "distances": "ops",
    "max_norm_": "ops",
    "polyak_": "ops",
    "ShrinkPerturb": "plasticity",
    "reinit_": "plasticity",
    "shrink_perturb_": "plasticity",
    "HardUpdate": "targets",
    "PolyakUpdate": "targets",
    "make_target": "targets",
    "NonFiniteError": "weights",
    "WeightMismatchError": "weights",
}


def __getattr__(name: str) -> Any:
    """A public name, or a submodule (``rw.ops``), imported on first use and kept."""
    home = _HOME.get(name, name)
    if home.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(f"{__name__}.{home}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{home}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = module if home == name else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
