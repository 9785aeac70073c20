"""``rlweights train --impl sb3``: the SB3 algorithm of the same name, rlweights attached.

The same config, the same evaluation (:func:`agents.train.evaluate`, same seeds), the same
outputs (TensorBoard events through SB3's logger, ``model.pt``, ``summary.json``) as the
native agents, so that the two can be compared run for run. Target updates go through
:func:`rlweights.sb3.attach`; clipping / max-norm through
:class:`rlweights.sb3.WeightConstraintCallback`; drift through
:class:`rlweights.sb3.DriftCallback`; the policy EMA is an rlweights Polyak routine stepped by
an optimizer post-hook of the policy's optimizer (after every policy step, as natively).

``model.pt`` holds the policy's weights (and the EMA's) for evaluation, plus what a resumed
run needs: SB3's optimizer states, the entropy coefficient, the stored replay transitions,
counters and RNG states; all tensors and plain values (``weights_only=True``), never SB3's
pickled zip.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rlweights.agents.common import AgentConfig, parse_target_update, rng_state, set_rng_state
from rlweights.agents.train import (
    EVAL_SEED_OFFSET,
    _GracefulStop,
    evaluate,
    load_checkpoint,
    save_checkpoint,
)
from torch import nn

import rlweights as rw
from rlweights.files import write_json

__all__ = ["build_sb3_model", "load_sb3_policy", "train_sb3"]


def _kwargs(config: AgentConfig) -> dict[str, Any]:
    """SB3 constructor arguments equivalent to ``config``."""
    kind, value = parse_target_update(config.target_update)
    kwargs: dict[str, Any] = {
        "learning_rate": config.learning_rate,
        "buffer_size": config.buffer_size,
        "learning_starts": config.learning_starts,
        "batch_size": config.batch_size,
        "gamma": config.gamma,
        "train_freq": max(config.train_freq // config.num_envs, 1),
        "gradient_steps": config.gradient_steps,
        "policy_kwargs": {"net_arch": list(config.hidden)},
        "seed": config.seed,
        "device": config.device,
    }
    if config.algo == "dqn":
        kwargs.update(
            exploration_fraction=config.exploration_fraction,
            exploration_initial_eps=config.exploration_initial_eps,
            exploration_final_eps=config.exploration_final_eps,
            max_grad_norm=config.max_grad_norm,
            # SB3's DQN updates every target_update_interval env steps with tau.
            target_update_interval=int(value) if kind == "hard" else 1,
            tau=1.0 if kind == "hard" else float(value),
        )
    else:
        kwargs["tau"] = float(value) if kind == "polyak" else 1.0
    if config.algo == "td3":
        kwargs.update(
            policy_delay=config.policy_delay,
            target_policy_noise=config.target_policy_noise,
            target_noise_clip=config.target_noise_clip,
        )
    return kwargs


def build_sb3_model(config: AgentConfig) -> tuple[Any, Any]:
    """(model, attachment): the SB3 model for ``config`` with rlweights attached."""
    import stable_baselines3 as sb3
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.noise import NormalActionNoise

    from rlweights.sb3 import attach

    vec_env = make_vec_env(config.env_id, n_envs=config.num_envs, seed=config.seed)
    kwargs = _kwargs(config)
    if config.algo == "td3":
        n = int(np.prod(vec_env.action_space.shape))
        kwargs["action_noise"] = NormalActionNoise(
            np.zeros(n), config.exploration_noise * np.ones(n)
        )
    model = getattr(sb3, config.algo.upper())("MlpPolicy", vec_env, **kwargs)
    kind, value = parse_target_update(config.target_update)
    routine = rw.HardUpdate(every=int(value)) if kind == "hard" and config.algo != "dqn" else None
    return model, attach(model, routine)


def _policy_network(model: Any, algo: str) -> nn.Module:
    return model.q_net if algo == "dqn" else model.actor


def _policy_optimizer(model: Any, algo: str) -> torch.optim.Optimizer:
    return model.policy.optimizer if algo == "dqn" else model.actor.optimizer


def _policy_fn(model: Any, algo: str, network: nn.Module) -> Callable:
    """Deterministic actions of ``network`` (SB3's actor / Q-network, or its EMA) in the
    environment's units."""
    if algo == "dqn":
        return lambda obs: network(obs).argmax(-1)
    low = torch.as_tensor(model.action_space.low, device=model.device)
    high = torch.as_tensor(model.action_space.high, device=model.device)

    def act(obs: torch.Tensor) -> torch.Tensor:
        squashed = network(obs, deterministic=True) if algo == "sac" else network(obs)
        return low + (squashed + 1.0) * 0.5 * (high - low)  # SB3's unscale_action

    return act


def _buffer_state(buffer: Any) -> dict[str, Any]:
    n = buffer.buffer_size if buffer.full else buffer.pos
    arrays = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")
    state = {name: torch.from_numpy(np.array(getattr(buffer, name)[:n])) for name in arrays}
    state.update(pos=buffer.pos, full=buffer.full)
    return state


def _load_buffer_state(buffer: Any, state: dict[str, Any]) -> None:
    for name in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
        data = state[name].numpy()
        getattr(buffer, name)[: len(data)] = data
    buffer.pos, buffer.full = state["pos"], state["full"]


def _torch_variables(model: Any) -> dict[str, torch.Tensor]:
    names = model._get_torch_save_params()[1]
    return {name: getattr(model, name).detach().clone() for name in names}


def _loop_callback(
    config: AgentConfig,
    collected: list[float],
    progress: Callable | None,
    stop: _GracefulStop,
    evaluate_and_checkpoint: Callable[[int], None],
) -> Any:
    from stable_baselines3.common.callbacks import BaseCallback

    class _Loop(BaseCallback):
        """Episode returns, evaluation + checkpoint every ``eval_every`` steps, the progress
        bar, and the graceful stop on Ctrl-C."""

        def _on_step(self) -> bool:
            info: dict[str, float] = {}
            for step_info in self.locals.get("infos", ()):
                if "episode" in step_info:  # SB3's Monitor wrapper
                    collected.append(float(step_info["episode"]["r"]))
                    info["return"] = collected[-1]
            steps, previous = self.num_timesteps, self.num_timesteps - config.num_envs
            every = config.eval_every
            if every and steps // every > previous // every and steps < config.total_steps:
                evaluate_and_checkpoint(steps)
            if progress is not None:
                progress(steps, info)
            return not stop.requested

    return _Loop()


def train_sb3(
    config: AgentConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train SB3's algorithm for ``config`` with rlweights attached; returns the summary."""
    from stable_baselines3.common.callbacks import CallbackList
    from stable_baselines3.common.logger import configure

    from rlweights.sb3 import DriftCallback, WeightConstraintCallback

    run_dir = Path(run_dir)
    model, attachment = build_sb3_model(config)
    model.set_logger(configure(str(run_dir), ["tensorboard"]))
    algo = config.algo
    ema = ema_average = None
    if config.policy_ema is not None:
        ema_average = rw.EMA(_policy_network(model, algo), tau=config.policy_ema)
        ema = ema_average.averaged
        hook = _policy_optimizer(model, algo).register_step_post_hook(
            lambda _o, _a, _k: ema_average.update()
        )
    episodes_before: list[float] = []
    wall_before = 0.0
    if resume:
        saved = load_checkpoint(run_dir / "model.pt")
        training = saved["training"]
        model.set_parameters(training["parameters"], exact_match=True, device=model.device)
        with torch.no_grad():
            for name, value in training["variables"].items():
                getattr(model, name).copy_(value)
        if ema_average is not None:
            ema_average.load_state_dict(training["policy_ema"])
        _load_buffer_state(model.replay_buffer, training["buffer"])
        model.num_timesteps = saved["steps"]
        model._n_updates = training["n_updates"]
        set_rng_state(training["rng"])
        episodes_before = list(training["episodes"])
        wall_before = training["wall_seconds"]

    start = time.perf_counter()
    aside = [0.0]
    start_steps = model.num_timesteps

    collected: list[float] = []  # SB3 keeps only the last 100 episodes; the callback all

    def episodes() -> list[float]:
        return episodes_before + collected

    def run_eval(at: int) -> dict[str, np.ndarray]:
        tick = time.perf_counter()
        seed = config.seed + EVAL_SEED_OFFSET
        fns = {"return": _policy_fn(model, algo, _policy_network(model, algo))}
        if ema is not None:
            fns["ema_return"] = _policy_fn(model, algo, ema)
        results = {
            name: evaluate(fn, config.env_id, config.eval_episodes, seed, model.device)
            for name, fn in fns.items()
        }
        for name, returns in results.items():
            model.logger.record(f"eval/{name}", float(returns.mean()))
        model.logger.dump(at)
        aside[0] += time.perf_counter() - tick
        return results

    def checkpoint() -> None:
        tick = time.perf_counter()
        weights = {"policy": model.policy.state_dict()}
        if ema is not None:
            weights["policy_ema"] = ema.state_dict()
        training = {
            "parameters": model.get_parameters(),
            "variables": _torch_variables(model),
            "buffer": _buffer_state(model.replay_buffer),
            "n_updates": model._n_updates,
            "rng": rng_state(),
            "episodes": episodes(),
            "wall_seconds": wall_before + time.perf_counter() - start,
        }
        if ema_average is not None:
            training["policy_ema"] = ema_average.state_dict()
        state = {
            "algo": algo,
            "impl": "sb3",
            "config": config.to_dict(),
            "steps": model.num_timesteps,
            "weights": weights,
            "training": training,
        }
        save_checkpoint(run_dir / "model.pt", state)
        aside[0] += time.perf_counter() - tick

    callbacks = []
    if config.clip is not None or config.max_norm is not None:
        modules = ("q_net",) if algo == "dqn" else ("actor", "critic")
        clamp = (-config.clip, config.clip) if config.clip is not None else None
        callbacks.append(WeightConstraintCallback(modules, clamp=clamp, max_norm=config.max_norm))
    if config.drift_every:
        callbacks.append(DriftCallback(every=max(config.drift_every // config.num_envs, 1)))

    def evaluate_and_checkpoint(at: int) -> None:
        run_eval(at)
        checkpoint()

    with _GracefulStop() as stop:
        loop = _loop_callback(config, collected, progress, stop, evaluate_and_checkpoint)
        model.learn(
            config.total_steps - model.num_timesteps,
            callback=CallbackList([*callbacks, loop]),
            reset_num_timesteps=not resume,
        )
        if stop.requested:
            checkpoint()
            raise KeyboardInterrupt(f"step {model.num_timesteps}")
    train_seconds = time.perf_counter() - start - aside[0]
    results = run_eval(model.num_timesteps)
    checkpoint()
    if ema is not None:
        hook.remove()
    attachment.detach()
    all_episodes = episodes()
    session_steps = model.num_timesteps - start_steps
    summary: dict[str, Any] = {
        "algo": algo,
        "impl": "sb3",
        "env_id": config.env_id,
        "seed": config.seed,
        "steps": model.num_timesteps,
        "final_eval_return": float(results["return"].mean()),
        "final_eval_std": float(results["return"].std()),
        "eval_episodes": config.eval_episodes,
        "steps_per_second": session_steps / train_seconds if session_steps else None,
        "wall_seconds": wall_before + time.perf_counter() - start,
        "episodes": len(all_episodes),
        "mean_last_10_train_returns": float(np.mean(all_episodes[-10:])) if all_episodes else None,
        "gradient_updates": model._n_updates,
    }
    if "ema_return" in results:
        summary["final_ema_eval_return"] = float(results["ema_return"].mean())
    write_json(run_dir / "summary.json", summary)
    model.logger.close()
    model.get_env().close()
    return summary


def load_sb3_policy(config: AgentConfig, saved: dict[str, Any], ema: bool = False) -> Callable:
    """The deterministic policy of an ``--impl sb3`` checkpoint, for evaluation."""
    model, attachment = build_sb3_model(config)
    attachment.detach()
    weights = saved["weights"]
    if ema and "policy_ema" not in weights:
        raise ValueError("--ema: this checkpoint was trained without --policy-ema")
    try:
        model.policy.load_state_dict(weights["policy"])
        network = _policy_network(model, config.algo)
        if ema:
            network = copy.deepcopy(network)
            network.load_state_dict(weights["policy_ema"])
    except (KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"the checkpoint's SB3 weights do not fit ({first})") from None
    model.policy.set_training_mode(False)
    network.eval()
    return _policy_fn(model, config.algo, network)
