"""``rlweights train --impl sbx``: SBX's algorithm (JAX; the ``bench`` extra) with the same
settings, trained, evaluated and checkpointed as the native runs, so that the two can be
compared run for run (``rlweights bench-learning --impls native sbx``).

SBX runs as it is: its weights are JAX arrays, so rlweights' weight routines (policy EMA,
weight constraints, plasticity, drift, ``hard:`` targets, parallel learners) are not attached;
asking for one is refused before the run starts. ``--algo droq`` runs SBX's SAC in its DroQ
configuration (dropout and layer normalisation in the critics, the policy delay).

``model.pt`` holds the actor's parameters (for ``rlweights evaluate``) and, for a resumed run,
every train state of SBX's model (parameters, target parameters, optimizer states, step
counts) as the flat list of its arrays, the stored replay transitions, SBX's random key and
the counters: tensors and plain values only (``weights_only=True``), never a pickle. A
resumed run rebuilds the model from its config and puts the arrays back into its train
states, each checked against the shape and dtype of the one it replaces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from rlweights.agents.config import AgentConfig
from rlweights.agents.environments import route_mujoco_warnings
from rlweights.agents.sb3_train import SB3Run, buffer_state, load_buffer_state, sb3_kwargs
from rlweights.agents.signals import GracefulStop
from rlweights.agents.target_update import TargetUpdateSpec
from rlweights.extras import require

__all__ = [
    "SBX_ALGOS",
    "SBX_RUNS",
    "build_sbx_model",
    "check_sbx_config",
    "load_sbx_policy",
    "train_sbx",
]

SBX_ALGOS = {"sac": "SAC", "droq": "SAC", "tqc": "TQC", "td3": "TD3", "ddpg": "DDPG", "dqn": "DQN"}
"""The native algorithms SBX has, by the name of its class (DroQ is SBX's SAC, configured)."""
SBX_RUNS = ("sac", "droq", "tqc", "td3", "ddpg")
"""The algorithms an --impl sbx run trains: the continuous ones, whose actor its checkpoint keeps
(rlweights bench-train times SBX's DQN too)."""

# SB3 arguments SBX's constructors do not take.
_NOT_SBX = ("device", "max_grad_norm")


def check_sbx_config(config: AgentConfig) -> None:
    """Raise ``ValueError`` if ``config`` asks SBX for what it does not do: an algorithm it
    lacks, or one of rlweights' weight routines (its weights are JAX arrays)."""
    if config.algo not in SBX_RUNS:
        raise ValueError(f"--impl sbx runs {', '.join(SBX_RUNS)}, not {config.algo}")
    asked = {
        "--policy-ema": config.policy_ema is not None,
        "--weight-clip": config.weight_clip is not None,
        "--max-norm": config.max_norm is not None,
        "--reset-every": bool(config.reset_every),
        "--shrink-perturb": config.shrink_perturb is not None,
        "--unit-sphere": config.unit_sphere is not None,
        "--average-every": bool(config.average_every),
        "--target-update hard:EVERY": TargetUpdateSpec.parse(config.target_update).kind == "hard",
    }
    refused = [flag for flag, given in asked.items() if given]
    if refused:
        raise ValueError(
            "--impl sbx runs SBX as it is (its weights are JAX arrays, which rlweights' weight "
            f"routines do not touch): drop {', '.join(refused)}, or use the native agent or "
            "--impl sb3"
        )


def build_sbx_model(config: AgentConfig) -> Any:
    """SBX's model for ``config`` (SB3's arguments as for ``--impl sb3``)."""
    require("sbx", "bench", "rlweights train --impl sbx")
    import sbx
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.noise import NormalActionNoise

    if config.algo not in SBX_ALGOS:
        raise ValueError(f"SBX has no {config.algo}")
    route_mujoco_warnings(config.env_id)
    vec_env = make_vec_env(config.env_id, n_envs=config.num_envs, seed=config.seed)
    kwargs = {k: v for k, v in sb3_kwargs(config).items() if k not in _NOT_SBX}
    if config.algo in ("td3", "ddpg"):  # a deterministic actor explores by action noise
        n = int(np.prod(vec_env.action_space.shape))
        kwargs["action_noise"] = NormalActionNoise(
            np.zeros(n), config.exploration_noise * np.ones(n)
        )
    return getattr(sbx, SBX_ALGOS[config.algo])("MlpPolicy", vec_env, **kwargs)


class _Unattached:
    """What an SBX run has in place of an SB3 run's attachment: nothing to detach."""

    pairs: tuple = ()

    def detach(self) -> None:
        pass


def _train_states(model: Any) -> dict[str, Any]:
    """SBX's train states (flax ``TrainState``: parameters, target parameters, optimizer
    state, step count), by name: the policy's (``policy.actor_state``, ``policy.qf_state``)
    and the model's (``ent_coef_state``)."""
    from flax.training.train_state import TrainState

    found = {}
    for prefix, owner in (("policy.", model.policy), ("", model)):
        for name, value in sorted(vars(owner).items()):
            if isinstance(value, TrainState):
                found[prefix + name] = value
    return found


def _set_train_state(model: Any, name: str, state: Any) -> None:
    owner = model.policy if name.startswith("policy.") else model
    setattr(owner, name.removeprefix("policy."), state)


def _as_tensors(tree: Any) -> list[torch.Tensor]:
    import jax

    return [torch.from_numpy(np.array(leaf)) for leaf in jax.tree_util.tree_leaves(tree)]


def _from_tensors(tree: Any, tensors: Any, what: str) -> Any:
    """``tree`` with its arrays replaced by ``tensors`` (a list, in the tree's leaf order),
    each checked for the shape and dtype of the array it replaces (a step count of a fresh
    model is a Python int, of a trained one an int32 array: integers of any width fit)."""
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if not isinstance(tensors, list) or len(tensors) != len(leaves):
        got = len(tensors) if isinstance(tensors, list) else type(tensors).__name__
        raise ValueError(f"{what}: {got} arrays, this model's has {len(leaves)}")
    new = []
    for i, (leaf, tensor) in enumerate(zip(leaves, tensors, strict=True)):
        want = np.asarray(leaf)
        if not (
            isinstance(tensor, torch.Tensor)
            and tuple(tensor.shape) == want.shape
            and (
                tensor.numpy().dtype == want.dtype
                or tensor.numpy().dtype.kind == want.dtype.kind == "i"
            )
        ):
            raise ValueError(f"{what}: array {i} must be {want.dtype} of shape {want.shape}")
        new.append(jnp.asarray(tensor.numpy()))
    return jax.tree_util.tree_unflatten(treedef, new)


def _actor_params(model: Any) -> dict[str, torch.Tensor]:
    """The actor's parameters by their path in SBX's parameter tree."""
    import jax

    flat = jax.tree_util.tree_flatten_with_path(model.policy.actor_state.params)[0]
    return {jax.tree_util.keystr(path): torch.from_numpy(np.array(leaf)) for path, leaf in flat}


def _load_actor_params(model: Any, weights: Any) -> None:
    state = model.policy.actor_state
    names = list(_actor_params(model))
    if not isinstance(weights, dict) or list(weights) != names:
        raise ValueError("the checkpoint's SBX actor does not fit this model's")
    params = _from_tensors(state.params, [weights[n] for n in names], "the actor's parameters")
    model.policy.actor_state = state.replace(params=params)


def _policy_fn(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """SBX's deterministic actions, in the environment's units."""

    def act(obs: torch.Tensor) -> torch.Tensor:
        actions, _ = model.predict(obs.cpu().numpy(), deterministic=True)
        return torch.as_tensor(actions)

    return act


def train_sbx(
    config: AgentConfig,
    run_dir: Any,
    *,
    resume: bool = False,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    stop: GracefulStop | None = None,
) -> dict[str, Any]:
    """Train SBX's algorithm for ``config``; returns the summary (as
    ``train_sb3`` does for SB3)."""
    from pathlib import Path

    stop = stop or GracefulStop()
    with stop:
        return _SBXRun(config, Path(run_dir), resume, progress).train(stop)


class _SBXRun(SB3Run):
    """One ``--impl sbx`` run: SB3's loop (SBX's models are SB3 algorithms), SBX's update."""

    impl = "sbx"

    def build(self) -> tuple[Any, Any]:
        check_sbx_config(self.config)
        return build_sbx_model(self.config), _Unattached()

    def weight_callbacks(self) -> list[Any]:
        self.constraints = None
        return []

    def load_training_state(self, saved: dict[str, Any]) -> None:
        model, training = self.model, saved["training"]
        states = training["states"]
        found = _train_states(model)
        if not isinstance(states, dict) or sorted(states) != sorted(found):
            raise ValueError(f"the checkpoint's SBX train states are not {sorted(found)}")
        restored = {name: _from_tensors(state, states[name], name) for name, state in found.items()}
        key = _from_tensors(model.key, [training["key"]], "the random key")
        load_buffer_state(model.replay_buffer, training["buffer"])
        for name, state in restored.items():
            _set_train_state(model, name, state)
        model.key = key
        model.num_timesteps = saved["steps"]
        model._n_updates = training["n_updates"]

    def policies(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        return {"return": _policy_fn(self.model)}

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"actor": _actor_params(self.model)}

    def trained_tensors(self) -> Iterable[torch.Tensor]:
        return [t for state in _train_states(self.model).values() for t in _as_tensors(state)]

    def training_state(self) -> dict[str, Any]:
        model = self.model
        return {
            "states": {name: _as_tensors(s) for name, s in _train_states(model).items()},
            "key": _as_tensors(model.key)[0],
            "buffer": buffer_state(model.replay_buffer),
            "n_updates": model._n_updates,
            "n_calls": 0,
            "routines": {},
        }


def load_sbx_policy(config: AgentConfig, saved: dict[str, Any]) -> Callable:
    """The deterministic policy of an ``--impl sbx`` checkpoint, for evaluation."""
    model = build_sbx_model(config)
    model.get_env().close()
    _load_actor_params(model, saved["weights"].get("actor"))
    return _policy_fn(model)
