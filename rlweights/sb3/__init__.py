"""Stable-Baselines3 plug-in: rlweights target updates inside SB3 models, with one call.

```python
>>> from rlweights.sb3 import attach
>>> model = SAC("MlpPolicy", "Pendulum-v1")
>>> attach(model)                   # SB3's own target updates, on rlweights' fast path
>>> attach(model, routine=rw.HardUpdate(every=1000))   # or a routine of your own

```

Callbacks (``model.learn(..., callback=...)``): ``WeightConstraintCallback`` (weight
constraints after every gradient step), ``DriftCallback`` (weight drift to TensorBoard) and
``PolicyAveragingCallback`` (an EMA / SWA copy of the policy, evaluated next to the online
one and saved as a normal SB3 model), ``PlasticityCallback`` (resets, shrink-and-perturb,
unit-sphere projection):

```python
>>> averaging = PolicyAveragingCallback("ema", tau=0.005, eval_env="Pendulum-v1")
>>> model.learn(50_000, callback=averaging)
>>> averaging.save_averaged("sac_ema.zip")   # SAC.load("sac_ema.zip") acts with the average

```

Modules: ``algorithms`` (SB3's per-algorithm attribute names, one row per algorithm),
``patching`` (``attach``, and SB3's update points), ``callbacks``, ``running_average``. Needs the
``sb3`` extra: ``pip install 'rlweights[sb3]'``.
"""

from rlweights.extras import require

require("stable_baselines3", "sb3", "rlweights.sb3")

from rlweights.sb3.algorithms import ALGORITHMS, Algorithm  # noqa: E402
from rlweights.sb3.callbacks import (  # noqa: E402
    DriftCallback,
    PlasticityCallback,
    WeightConstraintCallback,
)
from rlweights.sb3.patching import Attachment, attach, detach  # noqa: E402
from rlweights.sb3.running_average import PolicyAveragingCallback  # noqa: E402

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "Attachment",
    "DriftCallback",
    "PlasticityCallback",
    "PolicyAveragingCallback",
    "WeightConstraintCallback",
    "attach",
    "detach",
]
