"""A native run and SB3's run of the same algorithm in lockstep: where do their whole runs part?

Run as 'rlweights bench-lockstep' or 'python scripts/bench_lockstep.py'. Needs the sb3 and
agents extras.

The per-step parity tests give both implementations one gradient step on identical weights
and batches. This runs both training loops whole, each its own (SB3's ``learn``, the native
``train``), from identical weights, on identically seeded environments, with every random draw
shared: SB3's run draws them and records them (the random actions before learning starts,
the exploration noise, the replay batches' indices, the seed of each gradient step's noise)
and the native run takes the recorded ones in their place. Anything outside one update that
differs (the order of environment steps and updates, action scaling, where noise is added,
what the buffer stores, when training starts, the policy delay) then shows as a difference
at the step where it happens. Floating-point rounding alone (the two implementations sum in
other orders) gives differences that start near 1e-7 and grow: Adam divides each gradient by
its own magnitude, so a component that is all rounding moves its weight by about the learning
rate either way, and the environment carries any difference in actions forward. So that
rounding's own growth can be told apart, the native run is also made a second time from
initial weights one unit in the last place away (``torch.nextafter``), with the same draws:
the native-against-native column is what rounding alone does.

TD3 and DDPG (deterministic actors, Gaussian exploration noise, SB3's own algorithms).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from rlweights.files import write_json

__all__ = ["ALGOS", "add_arguments", "lockstep", "main_from_args", "markdown"]

ALGOS = ("td3", "ddpg")
_SEED_BASE = 10_000  # the gradient steps' noise: torch seeded base + step, in both runs


def _linears(module: Any) -> list[Any]:
    import torch

    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


def _copy_weights(model: Any, agent: Any) -> None:
    """SB3's actor, critics and targets (of its model or policy) into the native agent (its
    critics batched: weights (networks, inputs, outputs))."""
    import torch

    with torch.no_grad():
        for sb3_net, name in ((model.actor, "actor"), (model.actor_target, "actor_target")):
            pairs = zip(_linears(sb3_net), _linears(agent.networks[name]), strict=True)
            for source, target in pairs:
                target.weight.copy_(source.weight)
                target.bias.copy_(source.bias)
        for sb3_net, name in ((model.critic, "critic"), (model.critic_target, "critic_target")):
            twin = agent.networks[name]
            for k, q in enumerate(sb3_net.q_networks):
                for layer, linear in enumerate(_linears(q)):
                    twin.weights[layer][k].copy_(linear.weight.t())
                    twin.biases[layer][k, 0].copy_(linear.bias)


class _Draws:
    """What SB3's run drew, in order, for the native run to take."""

    def __init__(self) -> None:
        self.random_actions: list[np.ndarray] = []
        self.noise: list[np.ndarray] = []
        self.indices: list[np.ndarray] = []


def _sb3_run(config: Any, steps: int) -> tuple[Any, _Draws, dict[str, Any]]:
    """SB3's run of ``steps`` steps, recording its draws; its initial weights are returned
    (as a state dict) for the native agent to start from."""
    import copy

    import torch
    from stable_baselines3.common.logger import configure

    from rlweights.agents.sb3_train import build_sb3_model

    model, attachment = build_sb3_model(config)
    attachment.detach()  # plain SB3
    model.set_logger(configure(None, []))
    initial = copy.deepcopy(model.policy.state_dict())
    draws = _Draws()
    sample = model.action_space.sample

    def random_action(*args: Any, **kwargs: Any) -> np.ndarray:
        action = sample(*args, **kwargs)
        draws.random_actions.append(np.array(action))
        return action

    model.action_space.sample = random_action
    noise = model.action_noise

    class RecordedNoise:
        def __call__(self) -> np.ndarray:
            value = noise()
            draws.noise.append(np.array(value))
            return value

        def reset(self) -> None:
            noise.reset()

    model.action_noise = RecordedNoise()
    buffer = model.replay_buffer
    get_samples = buffer._get_samples

    def samples(batch_inds: np.ndarray, env: Any = None) -> Any:
        draws.indices.append(np.array(batch_inds))
        torch.manual_seed(_SEED_BASE + len(draws.indices))  # this gradient step's noise
        return get_samples(batch_inds, env)

    buffer._get_samples = samples
    model.learn(steps)
    return model, draws, initial


def _native_run(
    config: Any, model: Any, initial: dict[str, Any], draws: _Draws, nudge: bool = False
) -> Any:
    """The native run of ``config``, from SB3's initial weights (``nudge``: each moved one
    unit in the last place up), taking SB3's draws."""
    import copy

    import torch

    from rlweights.agents import train as native_train

    original = native_train._Run.__init__
    random_actions: Iterator[np.ndarray] = iter(draws.random_actions)
    noise: Iterator[np.ndarray] = iter(draws.noise)
    indices: Iterator[np.ndarray] = iter(draws.indices)
    made: list[Any] = []

    def init(run: Any, *args: Any, **kwargs: Any) -> None:
        original(run, *args, **kwargs)
        made.append(run)
        agent, buffer = run.agent, run.buffer
        policy = copy.deepcopy(model.policy)  # SB3's policy as it started
        policy.load_state_dict(initial)
        _copy_weights(policy, agent)
        if nudge:
            with torch.no_grad():
                for net in agent.networks.values():
                    for p in net.parameters():
                        p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
        run.action_space.sample = lambda: next(random_actions)
        actor = agent.actor

        def perturb(actions: torch.Tensor, noise_std: float) -> torch.Tensor:
            drawn = torch.as_tensor(next(noise), dtype=actions.dtype).reshape(len(actions), -1)
            return actor.clamp(actions + drawn * actor.scale)  # DeterministicActor's, SB3's draw

        actor.perturb = perturb

        def batches(count: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
            for _ in range(count):
                idx = torch.as_tensor(next(indices))
                yield {name: getattr(buffer, name)[idx] for name in buffer.FIELDS}

        buffer.batches = batches
        step_inputs = agent.step_inputs
        done = [0]

        def seeded(batch_size: int) -> Any:
            done[0] += 1
            torch.manual_seed(_SEED_BASE + done[0])
            return step_inputs(batch_size)

        agent.step_inputs = seeded

    native_train._Run.__init__ = init
    try:
        native_train.train(config)
    finally:
        native_train._Run.__init__ = original
    return made[0]


def lockstep(config: Any, steps: int) -> dict[str, Any]:
    """Both runs of ``config`` for ``steps`` environment steps; per step, the largest
    difference between the transitions the two buffers hold (actions, observations, rewards),
    and at the end between the weights."""
    import torch

    if config.algo not in ALGOS:
        raise ValueError(f"lockstep runs {', '.join(ALGOS)}, not {config.algo}")
    config = dataclasses.replace(
        config, total_steps=steps, eval_every=0, drift_every=0, eval_episodes=1, num_envs=1
    )
    model, draws, initial = _sb3_run(config, steps)
    run = _native_run(config, model, initial, draws)
    nudged = _native_run(config, model, initial, draws, nudge=True)
    sb3_buffer, buffer = model.replay_buffer, run.buffer
    low = torch.as_tensor(model.action_space.low)
    high = torch.as_tensor(model.action_space.high)
    rows = min(steps, buffer.size)

    def held(buffer: Any) -> dict[str, torch.Tensor]:  # actions as SB3 stores them, [-1, 1]
        actions = 2 * (buffer.actions[:rows] - low) / (high - low) - 1
        return {"actions": actions, "obs": buffer.obs[:rows], "rewards": buffer.rewards[:rows]}

    sb3 = {
        "actions": torch.as_tensor(sb3_buffer.actions[:rows, 0]),
        "obs": torch.as_tensor(sb3_buffer.observations[:rows, 0]),
        "rewards": torch.as_tensor(sb3_buffer.rewards[:rows, 0]),
    }
    native, control = held(buffer), held(nudged.buffer)

    def largest(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, list]:
        return {
            name: (a[name] - b[name]).abs().reshape(rows, -1).amax(-1).double().tolist()
            for name in a
        }

    actor_pairs = zip(_linears(run.agent.actor), _linears(model.actor), strict=True)
    twin = run.agent.networks["critic_target"]
    weights = {
        "actor": max(float((a.weight - b.weight).detach().abs().max()) for a, b in actor_pairs),
        "critic_target": max(
            float((twin.weights[layer][k] - linear.weight.t()).detach().abs().max())
            for k, q in enumerate(model.critic_target.q_networks)
            for layer, linear in enumerate(_linears(q))
        ),
    }
    return {
        "algo": config.algo,
        "env_id": config.env_id,
        "steps": rows,
        "learning_starts": config.learning_starts,
        "gradient_updates": {"native": run.agent.gradient_updates, "sb3": model._n_updates},
        "max_difference_per_step": largest(native, sb3),
        "rounding_per_step": largest(native, control),
        "final_weight_difference": weights,
    }


def first_step_over(result: dict[str, Any], name: str, tolerance: float) -> int | None:
    """The first step whose ``name`` difference exceeds ``tolerance`` (None: none does)."""
    values = result["max_difference_per_step"][name]
    return next((i for i, v in enumerate(values) if v > tolerance), None)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"{result['algo']} on {result['env_id']}, {result['steps']} steps in lockstep "
        f"(learning from step {result['learning_starts']}; gradient updates native "
        f"{result['gradient_updates']['native']}, SB3 {result['gradient_updates']['sb3']})",
        "",
        "| steps | actions: native - SB3 | native - native (1 ulp) | observations: native - "
        "SB3 | native - native (1 ulp) |",
        "|---|---:|---:|---:|---:|",
    ]
    actions = result["max_difference_per_step"]["actions"]
    obs = result["max_difference_per_step"]["obs"]
    own_actions = result["rounding_per_step"]["actions"]
    own_obs = result["rounding_per_step"]["obs"]
    edges = sorted({0, result["learning_starts"], *(2**k for k in range(4, 30))})
    edges = [e for e in edges if e < len(actions)] + [len(actions)]
    for a, b in itertools.pairwise(edges):
        if b > a:
            lines.append(
                f"| {a}-{b - 1} | {max(actions[a:b]):.2e} | {max(own_actions[a:b]):.2e} | "
                f"{max(obs[a:b]):.2e} | {max(own_obs[a:b]):.2e} |"
            )
    first = first_step_over(result, "actions", 1e-3)
    lines += [
        "",
        f"first step with an action difference above 1e-3: {'none' if first is None else first}",
        "final weights, largest difference: "
        + ", ".join(f"{k} {v:.2e}" for k, v in result["final_weight_difference"].items()),
    ]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--algo", choices=ALGOS, default="td3")
    parser.add_argument("--env", default="HalfCheetah-v5", help="environment (HalfCheetah-v5)")
    parser.add_argument("--steps", type=int, default=13_000, help="environment steps (13000)")
    parser.add_argument(
        "--learning-starts",
        type=int,
        default=None,
        help="random steps before learning (default: the preset's; HalfCheetah's 10000)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the per-step differences here")


def main_from_args(args: argparse.Namespace) -> int:
    from rlweights.agents.registry import make_config

    try:
        config = make_config(
            args.algo, args.env, seed=args.seed, learning_starts=args.learning_starts
        )
        if args.steps <= config.learning_starts:
            raise ValueError(f"--steps must exceed learning_starts {config.learning_starts}")
    except ValueError as exc:
        print(f"rlweights bench-lockstep: error: {exc}", file=sys.stderr)
        return 2
    result = lockstep(config, args.steps)
    print(markdown(result), end="")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0
