"""Benchmark of drift monitoring: one measurement against one Polyak update, and the
overhead of drift logging on SB3's SAC (DriftCallback) and on the native SAC agent
(Pendulum-v1), with and without, in alternating runs.

Run as 'rlweights bench-drift' or 'python scripts/bench_drift.py'. Needs the sb3 and
agents extras.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import rlweights as rw
from rlweights.bench.models import mlp_16m, sac_critic
from rlweights.files import write_json

__all__ = ["add_arguments", "main_from_args", "run"]


def _measure_vs_update(rounds: int) -> dict:
    # here and below, not at import: the command's --help starts without torch
    from rlweights.drift import DriftMonitor

    out = {}
    for name, build in (("sac_critic", sac_critic), ("mlp_16m", mlp_16m)):
        online = build()
        target = rw.make_target(online)
        monitor = DriftMonitor({"critic": online}, {"critic": target})
        calls = {
            "rw.polyak_": lambda o=online, t=target: rw.polyak_(t, o, 0.005),
            "DriftMonitor.measure": monitor.measure,
        }
        inner = 50 if name == "sac_critic" else 2
        times: dict[str, list[float]] = {k: [] for k in calls}
        for call in calls.values():
            call()
        for r in range(rounds):
            order = list(calls.items())[r % 2 :] + list(calls.items())[: r % 2]
            for key, call in order:
                start = time.perf_counter()
                for _ in range(inner):
                    call()
                times[key].append((time.perf_counter() - start) / inner)
        ratios = [
            m / p for m, p in zip(times["DriftMonitor.measure"], times["rw.polyak_"], strict=True)
        ]
        out[name] = {
            "params": sum(p.numel() for p in online.parameters()),
            "polyak_us": statistics.median(times["rw.polyak_"]) * 1e6,
            "measure_us": statistics.median(times["DriftMonitor.measure"]) * 1e6,
            "measure_vs_polyak": statistics.median(ratios),
        }
    return out


def _sac_run(drift: bool, steps: int, every: int, seed: int) -> tuple[float, float]:
    """SB3's SAC: (wall seconds, seconds spent measuring and logging drift)."""
    from stable_baselines3 import SAC

    from rlweights.sb3 import DriftCallback

    model = SAC("MlpPolicy", "Pendulum-v1", seed=seed, device="cpu", learning_starts=100)
    callback, spent = None, [0.0]
    if drift:
        callback = DriftCallback(every=every)
        log = callback.log_drift

        def timed() -> dict:
            start = time.perf_counter()
            try:
                return log()
            finally:
                spent[0] += time.perf_counter() - start

        callback.log_drift = timed
    start = time.perf_counter()
    model.learn(steps, callback=callback)
    return time.perf_counter() - start, spent[0]


def _native_run(drift: bool, steps: int, every: int, seed: int) -> tuple[float, float]:
    """The native SAC agent with TensorBoard logging: (training seconds, seconds in drift)."""
    import tempfile

    from rlweights.agents.registry import make_config
    from rlweights.agents.train import train

    with tempfile.TemporaryDirectory() as logdir:
        config = make_config(
            "sac",
            total_steps=steps,
            seed=seed,
            drift_every=every if drift else 0,
            eval_every=0,
            eval_episodes=1,
        )
        _, summary = train(config, logdir)
    return summary["train_seconds"], summary["drift_seconds"]


def _overhead(run_one, rounds: int, steps: int, every: int) -> dict:
    """Runs with and without drift logging, alternating which goes first."""
    walls: dict[str, list[float]] = {"without": [], "with drift": []}
    shares = []
    for r in range(rounds):
        for drift in [False, True] if r % 2 == 0 else [True, False]:
            wall, spent = run_one(drift, steps, every, seed=r)
            walls["with drift" if drift else "without"].append(wall)
            if drift:
                shares.append(spent / wall)
    overheads = [w / wo - 1 for w, wo in zip(walls["with drift"], walls["without"], strict=True)]
    return {
        "steps": steps,
        "every": every,
        "wall_s": {k: statistics.median(v) for k, v in walls.items()},
        "overhead": statistics.median(overheads),
        "measure_share": statistics.median(shares),
    }


def run(rounds: int = 15, sac_rounds: int = 2, sac_steps: int = 3000, every: int = 1000) -> dict:
    import torch

    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "measure_vs_update": _measure_vs_update(rounds),
        "sac": _overhead(_sac_run, sac_rounds, sac_steps, every) if sac_rounds else None,
        "native_sac": _overhead(_native_run, sac_rounds, sac_steps, every) if sac_rounds else None,
    }


def markdown(result: dict) -> str:
    lines = [
        f"torch {result['torch']}, {result['threads']} threads.",
        "",
        "| network | parameters | rw.polyak_ | DriftMonitor.measure (with target) | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in result["measure_vs_update"].items():
        lines.append(
            f"| {name} | {row['params']:,} | {row['polyak_us']:.0f} us | "
            f"{row['measure_us']:.0f} us | {row['measure_vs_polyak']:.1f}x |"
        )
    sac = result["sac"]
    if sac:
        lines += [
            "",
            f"SAC on Pendulum-v1, {sac['steps']} steps, `DriftCallback(every={sac['every']})`: "
            f"{sac['wall_s']['without']:.1f} s without, "
            f"{sac['wall_s']['with drift']:.1f} s with (end to end "
            f"{100 * sac['overhead']:+.2f} %, separate runs, so run-to-run noise included); "
            "time inside the drift measurements and their logging: "
            f"{100 * sac['measure_share']:.3f} % of the run.",
        ]
    native = result.get("native_sac")
    if native:
        lines += [
            "",
            f"Native SAC (`agents.sac`), {native['steps']} steps, drift every {native['every']}: "
            f"{native['wall_s']['without']:.1f} s without, {native['wall_s']['with drift']:.1f} s "
            f"with (end to end {100 * native['overhead']:+.2f} %, separate runs); time inside "
            f"the drift measurements and their logging: {100 * native['measure_share']:.3f} % "
            "of the run.",
        ]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=15, help="measure/update rounds (15)")
    parser.add_argument(
        "--sac-rounds", type=int, default=2, help="SAC run pairs (default 2; 0 skips)"
    )
    parser.add_argument("--sac-steps", type=int, default=3000, help="steps per SAC run (3000)")
    parser.add_argument("--every", type=int, default=1000, help="DriftCallback interval (1000)")
    parser.add_argument("--json", type=Path, help="also write the raw results as JSON here")


def main_from_args(args: argparse.Namespace) -> int:
    if args.rounds < 1 or args.sac_rounds < 0 or args.sac_steps < 101 or args.every < 1:
        raise SystemExit(
            "rlweights bench-drift: --rounds >= 1, --sac-rounds >= 0, --sac-steps > 100 and "
            "--every >= 1"
        )
    result = run(args.rounds, args.sac_rounds, args.sac_steps, args.every)
    print(markdown(result), end="")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0
