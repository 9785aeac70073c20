"""rlweights.sb3.algorithms: every row names attributes that a real model of its algorithm
has, and each name holds what the row says (checked on tiny SB3 / sb3-contrib models)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from torch import nn

from rlweights.sb3.algorithms import ALGORITHMS, algorithm_of

_CONTINUOUS = {"SAC", "TD3", "DDPG", "TQC", "CrossQ"}
_ON_POLICY = {"PPO", "A2C", "RecurrentPPO"}


def _tiny(package: str, name: str):
    cls = getattr(pytest.importorskip(package), name)
    env = "Pendulum-v1" if name in _CONTINUOUS else "CartPole-v1"
    kwargs = {"seed": 0, "device": "cpu", "policy_kwargs": {"net_arch": [8]}}
    if name in _ON_POLICY:
        kwargs |= {"n_steps": 8} | ({} if name == "A2C" else {"batch_size": 8})
    else:
        kwargs |= {"buffer_size": 100}
    if name == "RecurrentPPO":
        kwargs["policy_kwargs"]["lstm_hidden_size"] = 8
    policy = "MlpLstmPolicy" if name == "RecurrentPPO" else "MlpPolicy"
    return cls(policy, env, **kwargs)


def _optimized(model) -> set[int]:
    """ids of the parameters some optimizer of ``model`` steps."""
    ids = set()
    for module in model.policy.modules():
        optimizer = getattr(module, "optimizer", None)
        if isinstance(optimizer, torch.optim.Optimizer):
            ids |= {id(p) for group in optimizer.param_groups for p in group["params"]}
    return ids


def _ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


ROWS = [(row.package, row.name, row) for row in ALGORITHMS] + [
    ("stable_baselines3", "DDPG", ALGORITHMS[[r.name for r in ALGORITHMS].index("TD3")])
]


@pytest.mark.parametrize(("package", "name", "row"), ROWS, ids=[r[1] for r in ROWS])
def test_row_names_attributes_of_a_real_model(package, name, row):
    model = _tiny(package, name)
    assert algorithm_of(model) is row
    assert algorithm_of(type(model)) is row
    optimized = _optimized(model)

    # targets: (online, target) networks with the same weights' names, targets not trained
    assert (row.module is None) == (not row.targets)
    if row.module is not None:
        assert hasattr(importlib.import_module(row.module), "polyak_update")
        assert row.module == row.cls().__module__
    for online_attr, target_attr in row.targets:
        online, target = getattr(model, online_attr), getattr(model, target_attr)
        assert isinstance(online, nn.Module) and isinstance(target, nn.Module)
        assert online is not target
        assert online.state_dict().keys() == target.state_dict().keys()
        assert _ids(online) <= optimized and not _ids(target) & optimized
    assert len(row.batch_norm_stats) == len(row.targets)
    for online_attr, target_attr in row.batch_norm_stats:
        assert isinstance(getattr(model, online_attr), list)
        assert isinstance(getattr(model, target_attr), list)

    # the acting network, trained by the row's optimizer
    policy = getattr(model, row.policy)
    assert isinstance(policy, nn.Module)
    assert _ids(policy) <= {
        id(p) for g in getattr(model, row.optimizer).optimizer.param_groups for p in g["params"]
    }
    for attr in row.trained:
        assert _ids(getattr(model, attr)) <= optimized
    assert set().union(*(_ids(getattr(model, a)) for a in row.trained)) == optimized

    # acts: the network called as the row says gives SB3's own deterministic action
    obs = torch.as_tensor(np.stack([model.observation_space.sample() for _ in range(4)]))
    with torch.no_grad():
        expected = model.policy._predict(obs, deterministic=True) if row.acts != "predict" else 0
        if row.acts == "argmax":
            torch.testing.assert_close(policy(obs).argmax(-1), expected)
        elif row.acts == "actor":
            torch.testing.assert_close(policy(obs), expected)
        elif row.acts == "actor(deterministic=True)":
            torch.testing.assert_close(policy(obs, deterministic=True), expected)

    # env_step_targets: the algorithm updates its targets in _on_step (environment steps)
    on_step = getattr(type(model), "_on_step", None) not in (None, OffPolicyAlgorithm._on_step)
    assert row.env_step_targets == (on_step and bool(row.targets))
