"""SB3's per-algorithm names, in one table: which attributes of a model hold its networks,
its target pairs, its cached BatchNorm lists and the optimizer that trains the acting
network, and which module calls ``polyak_update``.

``attach``, ``PolicyAveragingCallback``, ``DriftCallback`` and ``rlweights train --impl sb3``
read these rows; adding an SB3 or sb3-contrib algorithm means adding one row. A model matches
the first row whose class it is an instance of, so subclasses match through their base
(DDPG is a TD3).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

__all__ = ["ALGORITHMS", "Algorithm", "algorithm_of"]

_Pairs = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Algorithm:
    """One SB3 / sb3-contrib algorithm's attribute names.

    ``module``: the module whose ``polyak_update`` name ``attach`` replaces (None: no target
    networks). ``targets``: (online, target) network pairs, in SB3's update order;
    ``batch_norm_stats``: the matching (online, target) BatchNorm statistics lists SB3 caches
    in ``_setup_model``. ``policy``: the network that chooses actions; ``acts``: how it is
    called for a deterministic action (``"argmax"`` of its Q-values, ``"actor"`` its output,
    ``"actor(deterministic=True)"`` a sampling actor's mean, ``"predict"`` only through
    ``policy.predict``). ``optimizer``: the attribute whose ``.optimizer`` trains ``policy``.
    ``trained``: the networks the optimizers train (what weight constraints hold).
    ``env_step_targets``: targets are updated every ``target_update_interval`` environment
    steps (``_on_step``) with SB3's own ``tau``, so a hard update every N steps is that
    interval rather than a routine of its own.
    """

    package: str
    name: str
    module: str | None
    targets: _Pairs
    batch_norm_stats: _Pairs
    policy: str
    acts: Literal["argmax", "actor", "actor(deterministic=True)", "predict"]
    optimizer: str
    trained: tuple[str, ...]
    env_step_targets: bool = False

    def cls(self) -> type | None:
        """The algorithm's class, or None if its package is not installed."""
        try:
            return getattr(importlib.import_module(self.package), self.name)
        except (ImportError, AttributeError):
            return None


_BN = (("batch_norm_stats", "batch_norm_stats_target"),)

ALGORITHMS: tuple[Algorithm, ...] = (
    Algorithm(
        "stable_baselines3",
        "SAC",
        "stable_baselines3.sac.sac",
        targets=(("critic", "critic_target"),),
        batch_norm_stats=_BN,
        policy="actor",
        acts="actor(deterministic=True)",
        optimizer="actor",
        trained=("actor", "critic"),
    ),
    Algorithm(
        "stable_baselines3",
        "TD3",
        "stable_baselines3.td3.td3",
        targets=(("critic", "critic_target"), ("actor", "actor_target")),
        batch_norm_stats=(
            ("critic_batch_norm_stats", "critic_batch_norm_stats_target"),
            ("actor_batch_norm_stats", "actor_batch_norm_stats_target"),
        ),
        policy="actor",
        acts="actor",
        optimizer="actor",
        trained=("actor", "critic"),
    ),
    Algorithm(
        "stable_baselines3",
        "DQN",
        "stable_baselines3.dqn.dqn",
        targets=(("q_net", "q_net_target"),),
        batch_norm_stats=_BN,
        policy="q_net",
        acts="argmax",
        optimizer="policy",
        trained=("q_net",),
        env_step_targets=True,
    ),
    Algorithm(
        "stable_baselines3",
        "PPO",
        None,
        targets=(),
        batch_norm_stats=(),
        policy="policy",
        acts="predict",
        optimizer="policy",
        trained=("policy",),
    ),
    Algorithm(
        "stable_baselines3",
        "A2C",
        None,
        targets=(),
        batch_norm_stats=(),
        policy="policy",
        acts="predict",
        optimizer="policy",
        trained=("policy",),
    ),
    Algorithm(
        "sb3_contrib",
        "TQC",
        "sb3_contrib.tqc.tqc",
        targets=(("critic", "critic_target"),),
        batch_norm_stats=_BN,
        policy="actor",
        acts="actor(deterministic=True)",
        optimizer="actor",
        trained=("actor", "critic"),
    ),
    Algorithm(
        "sb3_contrib",
        "CrossQ",
        None,
        targets=(),
        batch_norm_stats=(),
        policy="actor",
        acts="actor(deterministic=True)",
        optimizer="actor",
        trained=("actor", "critic"),
    ),
    Algorithm(
        "sb3_contrib",
        "QRDQN",
        "sb3_contrib.qrdqn.qrdqn",
        targets=(("quantile_net", "quantile_net_target"),),
        batch_norm_stats=_BN,
        policy="quantile_net",
        acts="predict",
        optimizer="policy",
        trained=("quantile_net",),
        env_step_targets=True,
    ),
    Algorithm(
        "sb3_contrib",
        "RecurrentPPO",
        None,
        targets=(),
        batch_norm_stats=(),
        policy="policy",
        acts="predict",
        optimizer="policy",
        trained=("policy",),
    ),
)
"""SB3's and sb3-contrib's algorithms that rlweights knows, one row each. TRPO is not here: its
actor moves by a line search, not by an optimizer step; MaskablePPO is not: evaluating it
without its action masks would act wrongly."""


def algorithm_of(model_or_class: object) -> Algorithm | None:
    """The row of ``model_or_class`` (an SB3 model or algorithm class): the first row whose
    class it is an instance or subclass of; rows of packages not installed are skipped."""
    for row in ALGORITHMS:
        cls = row.cls()
        if cls is None:
            continue
        if isinstance(model_or_class, type):
            if issubclass(model_or_class, cls):
                return row
        elif isinstance(model_or_class, cls):
            return row
    return None
