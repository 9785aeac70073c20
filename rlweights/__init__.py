"""rlweights: fast, validated in-place weight operations for deep reinforcement learning.

``import rlweights as rw``. Every op takes *weight sets*: an ``nn.Module`` (matched by
name), a sequence of tensors (matched by position), a ``state_dict`` or the handle of
:func:`flatten_`. Coefficient convention: ``tau`` is the step toward the source,
``target <- target + tau * (source - target)`` (TorchRL's eps / torch's decay = 1 - tau).
"""

from rlweights import constraints, distributed
from rlweights.averaging import EMA, SWA
from rlweights.capture import LayoutChangedError
from rlweights.checks import PrecisionWarning
from rlweights.constraints import constrain, reset_optimizer_state_
from rlweights.flat import FlatLayoutWarning, FlatWeights, flatten_
from rlweights.ops import average_, clamp_, copy_, distance, distances, max_norm_, polyak_
from rlweights.plasticity import ShrinkPerturb, reinit_, shrink_perturb_
from rlweights.targets import HardUpdate, PolyakUpdate, make_target
from rlweights.weights import NonFiniteError, WeightMismatchError

__version__ = "0.1.0"

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
