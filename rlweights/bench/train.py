"""Environment steps per second of the native agents against SB3, side by side.

Run as 'rlweights bench-train' or 'python scripts/bench_train.py'. Needs the sb3 and agents
extras. For each algorithm the native agent and SB3's algorithm (plain, without rlweights
attached: what a user has today) train with the same network sizes, batch size, update
ratio and learning start on the same environment, on the CPU, in one process, alternating
which goes first each round. Neither logs nor evaluates while timed. The table reports the
median of per-round speed-ups.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time
from pathlib import Path

import torch

from rlweights.agents.train import make_config, train
from rlweights.files import write_json

__all__ = ["markdown", "run"]

# Algorithm -> settings for the timed runs: the CLI defaults, but learning starts after 100
# steps so that the timing covers training (TD3's zoo setting waits 10k steps).
SETTINGS = {
    "sac": {"learning_starts": 100},
    "td3": {"learning_starts": 100},
    "dqn": {"learning_starts": 100},
}


def _native(config) -> float:
    _, summary = train(config)
    return summary["steps"] / summary["train_seconds"]


def _sb3(config) -> float:
    from rlweights.agents.sb3_train import build_sb3_model

    model, attachment = build_sb3_model(config)
    attachment.detach()  # plain SB3: its own polyak_update
    start = time.perf_counter()
    model.learn(config.total_steps)
    seconds = time.perf_counter() - start
    model.get_env().close()
    return model.num_timesteps / seconds


def run(algos: list[str], rounds: int, steps: dict[str, int]) -> dict:
    results: dict = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "rounds": rounds,
        "algos": {},
    }
    for algo in algos:
        config = make_config(
            algo,
            total_steps=steps[algo],
            eval_every=0,
            eval_episodes=1,
            drift_every=0,
            **SETTINGS[algo],
        )
        speeds: dict[str, list[float]] = {"native": [], "sb3": []}
        for r in range(rounds):
            order = ["native", "sb3"] if r % 2 == 0 else ["sb3", "native"]
            for impl in order:
                cfg = dataclasses.replace(config, seed=r)
                speeds[impl].append(_native(cfg) if impl == "native" else _sb3(cfg))
        ratios = [n / s for n, s in zip(speeds["native"], speeds["sb3"], strict=True)]
        results["algos"][algo] = {
            "env_id": config.env_id,
            "steps": config.total_steps,
            "hidden": list(config.hidden),
            "batch_size": config.batch_size,
            "train_freq": config.train_freq,
            "gradient_steps": config.gradient_steps,
            "steps_per_second": {k: statistics.median(v) for k, v in speeds.items()},
            "all_steps_per_second": speeds,
            "speedup": statistics.median(ratios),
            "speedups": ratios,
        }
    return results


def markdown(result: dict) -> str:
    lines = [
        "| algorithm | env | network | batch | steps | native steps/s | SB3 steps/s | "
        "native / SB3 (median of rounds) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for algo, r in result["algos"].items():
        per_round = ", ".join(f"{x:.2f}" for x in r["speedups"])
        lines.append(
            f"| {algo.upper()} | {r['env_id']} | {'-'.join(map(str, r['hidden']))} | "
            f"{r['batch_size']} | {r['steps']} | {r['steps_per_second']['native']:.0f} | "
            f"{r['steps_per_second']['sb3']:.0f} | **{r['speedup']:.2f}x** ({per_round}) |"
        )
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--algos", nargs="+", choices=sorted(SETTINGS), default=["sac", "td3", "dqn"]
    )
    parser.add_argument("--rounds", type=int, default=3, help="runs of each, alternating (3)")
    parser.add_argument(
        "--steps", type=int, default=1500, help="env steps per SAC/TD3 run (1500; DQN: 10x)"
    )
    parser.add_argument("--json", type=Path, help="also write the raw results as JSON here")


def main_from_args(args: argparse.Namespace) -> int:
    if args.rounds < 1 or args.steps < 200:
        raise SystemExit("rlweights bench-train: --rounds must be >= 1 and --steps >= 200")
    steps = {"sac": args.steps, "td3": args.steps, "dqn": 10 * args.steps}
    result = run(args.algos, args.rounds, steps)
    print(markdown(result), end="")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0
