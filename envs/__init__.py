"""Gymnasium environments of rlweights, registered as ``rlweights/<Name>-v0`` on import.

```python
>>> import gymnasium as gym
>>> import rlweights.envs
>>> env = gym.make("rlweights/Chain-v0", length=8, slip=0.2)

```

``gym.make("rlweights.envs:rlweights/Chain-v0")`` imports this package itself. The
``rlweights`` command imports it, so ``rlweights train --env rlweights/Chain-v0`` works too.

* ``rlweights/BairdCounterexample-v0`` (``rlweights.envs.baird.BairdCounterexample``):
  Baird's counterexample, where off-policy semi-gradient TD with linear features diverges;
* ``rlweights/Chain-v0`` (``rlweights.envs.chain.Chain``): a corridor with slip whose
  optimal action values are known exactly (``rlweights.envs.chain.Chain.optimal_q``).
"""

from __future__ import annotations

from rlweights.extras import require

require("gymnasium", "agents", "rlweights.envs")

from gymnasium.envs.registration import register, registry  # noqa: E402

__all__ = ["IDS"]

IDS = ("rlweights/BairdCounterexample-v0", "rlweights/Chain-v0")
"""The ids of the environments this package registers."""

_ENTRY_POINTS = {
    "rlweights/BairdCounterexample-v0": ("rlweights.envs.baird:BairdCounterexample", 1000),
    "rlweights/Chain-v0": ("rlweights.envs.chain:Chain", 100),
}

for _id, (_entry_point, _steps) in _ENTRY_POINTS.items():
    if _id not in registry:  # importing twice (or reloading) registers once
        register(id=_id, entry_point=_entry_point, max_episode_steps=_steps)
