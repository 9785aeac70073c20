"""Benchmark of the SB3 plug-in: SB3's own call site, and SAC training end to end.

Run as 'rlweights bench-sb3' or 'python scripts/bench_sb3.py'. Needs the sb3 extra.

1. The call SAC.train makes, polyak_update(critic.parameters(), critic_target.parameters(),
   tau), timed side by side (interleaved rounds) on a plain SAC (SB3's own function) and on
   an attached one (rlweights' flat path).
2. SAC (and sb3-contrib's TQC, ``--models sac tqc``) on Pendulum-v1, plain, attached, and
   attached with a rw.PolyakUpdate routine, in rotating runs: the share of wall time spent in
   target updates (all of SB3's calls per update point, timed at the call site) and
   environment steps per second; ``--gradient-steps 20`` makes 20 gradient steps (and target
   updates) per environment step, DroQ's update ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from rlweights.files import write_json

__all__ = ["add_arguments", "main_from_args", "run"]


# The models of the training runs: (module whose polyak_update the algorithm calls, class).
MODELS = {
    "sac": ("stable_baselines3.sac.sac", "stable_baselines3:SAC"),
    "tqc": ("sb3_contrib.tqc.tqc", "sb3_contrib:TQC"),
}


def _model(algo: str, seed: int, gradient_steps: int = 1):
    import importlib

    package, name = MODELS[algo][1].split(":")
    cls = getattr(importlib.import_module(package), name)
    return cls(
        "MlpPolicy",
        "Pendulum-v1",
        seed=seed,
        device="cpu",
        learning_starts=100,
        gradient_steps=gradient_steps,
    )


def _sac(seed: int):
    return _model("sac", seed)


def _call_site(rounds: int, inner: int) -> dict:
    from stable_baselines3.common import utils
    from stable_baselines3.sac import sac

    from rlweights.sb3 import attach

    plain, attached = _sac(0), _sac(0)
    handle = attach(attached)
    try:

        def sb3() -> None:  # what SB3 runs for a model that is not attached
            utils.polyak_update(plain.critic.parameters(), plain.critic_target.parameters(), 0.005)

        def via_dispatch() -> None:  # a model that is not attached, while another one is
            sac.polyak_update(plain.critic.parameters(), plain.critic_target.parameters(), 0.005)

        def rw() -> None:
            sac.polyak_update(
                attached.critic.parameters(), attached.critic_target.parameters(), 0.005
            )

        calls = {"SB3 (plain model)": sb3, "plain model, dispatcher installed": via_dispatch}
        calls["attached model"] = rw
        times: dict[str, list[float]] = {name: [] for name in calls}
        for call in calls.values():  # warm-up
            for _ in range(inner):
                call()
        for r in range(rounds):
            order = list(calls.items())
            order = order[r % len(order) :] + order[: r % len(order)]
            for name, call in order:
                start = time.perf_counter()
                for _ in range(inner):
                    call()
                times[name].append((time.perf_counter() - start) / inner)
    finally:
        handle.detach()
    base = times["SB3 (plain model)"]
    return {
        name: {
            "median_us": statistics.median(t) * 1e6,
            "speedup_vs_sb3": statistics.median(b / a for a, b in zip(t, base, strict=True)),
        }
        for name, t in times.items()
    }


def _timed(fn: Callable, box: list[float]) -> Callable:
    def wrapper(*args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            box[0] += time.perf_counter() - start

    return wrapper


VARIANTS = {
    "plain SB3": None,
    "attached (SB3's formula, bit-identical)": "exact",
    "attached, rw.PolyakUpdate routine (one lerp_)": "lerp",
}


def _training_run(
    variant: str | None, steps: int, seed: int, algo: str = "sac", gradient_steps: int = 1
) -> dict:
    import importlib

    import rlweights as rw
    from rlweights.sb3 import attach

    module = importlib.import_module(MODELS[algo][0])
    model = _model(algo, seed, gradient_steps)
    handle = None
    if variant == "exact":
        handle = attach(model)
    elif variant == "lerp":
        handle = attach(model, routine=rw.PolyakUpdate(tau=model.tau))
    box = [0.0]
    original = module.polyak_update
    module.polyak_update = _timed(original, box)
    try:
        start = time.perf_counter()
        model.learn(steps)
        wall = time.perf_counter() - start
    finally:
        module.polyak_update = original
        if handle is not None:
            handle.detach()
    return {"wall_s": wall, "update_s": box[0], "steps_per_s": steps / wall}


def _training(rounds: int, steps: int, algo: str = "sac", gradient_steps: int = 1) -> dict:
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            runs[name].append(_training_run(VARIANTS[name], steps, r, algo, gradient_steps))
    out: dict = {}
    plain = runs["plain SB3"]
    for name, rs in runs.items():
        out[name] = {
            "steps_per_s": statistics.median(x["steps_per_s"] for x in rs),
            "update_share": statistics.median(x["update_s"] / x["wall_s"] for x in rs),
            "update_us_per_step": statistics.median(x["update_s"] for x in rs) * 1e6 / steps,
            "speed_vs_plain": statistics.median(
                x["steps_per_s"] / p["steps_per_s"] for x, p in zip(rs, plain, strict=True)
            ),
        }
    return out


def run(
    rounds: int = 21,
    inner: int = 200,
    train_rounds: int = 2,
    train_steps: int = 3000,
    models: tuple[str, ...] = ("sac",),
    gradient_steps: int = 1,
) -> dict:
    import torch  # here, not at import: the command's --help starts without torch

    training = {algo: _training(train_rounds, train_steps, algo, gradient_steps) for algo in models}
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "call_site": _call_site(rounds, inner),
        "training": training if train_rounds else None,
        "train_steps": train_steps,
        "gradient_steps": gradient_steps,
    }


def markdown(result: dict) -> str:
    lines = [
        f"torch {result['torch']}, {result['threads']} threads; SAC MlpPolicy (256x256) on "
        "Pendulum-v1.",
        "",
        "| SB3's call site `sac.polyak_update(critic, critic_target)` | time | speedup vs SB3 |",
        "|---|---:|---:|",
    ]
    for name, row in result["call_site"].items():
        lines.append(f"| {name} | {row['median_us']:.1f} us | {row['speedup_vs_sb3']:.2f}x |")
    ratio = result.get("gradient_steps", 1)
    each = f", {ratio} gradient steps per step" if ratio > 1 else ""
    for algo, training in (result["training"] or {}).items():
        lines += [
            "",
            f"| {algo.upper()}, {result['train_steps']} steps{each} | env steps/s | "
            "speed vs plain | wall time in target updates |",
            "|---|---:|---:|---:|",
        ]
        for name, row in training.items():
            lines.append(
                f"| {name} | {row['steps_per_s']:.1f} | {row['speed_vs_plain']:.3f}x | "
                f"{100 * row['update_share']:.2f} % |"
            )
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=21, help="call-site rounds (default 21)")
    parser.add_argument(
        "--train-rounds",
        type=int,
        default=2,
        help="training runs of each variant, in rotating order (default 2; 0 skips training)",
    )
    parser.add_argument(
        "--train-steps", type=int, default=3000, help="environment steps per run (default 3000)"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(MODELS),
        default=["sac"],
        help="the training runs' algorithms: SB3's SAC, sb3-contrib's TQC (default sac)",
    )
    parser.add_argument(
        "--gradient-steps",
        type=int,
        default=1,
        help="gradient steps (and target updates) per environment step (default 1; DroQ: 20)",
    )
    parser.add_argument("--json", type=Path, help="also write the raw results as JSON here")


def main_from_args(args: argparse.Namespace) -> int:
    if args.rounds < 1 or args.train_rounds < 0 or args.train_steps < 101:
        raise SystemExit(
            "rlweights bench-sb3: --rounds must be >= 1, --train-rounds >= 0 and "
            "--train-steps > 100 (SAC starts learning after 100 steps)"
        )
    if args.gradient_steps < 1:
        raise SystemExit("rlweights bench-sb3: --gradient-steps must be >= 1")
    result = run(
        args.rounds,
        200,
        args.train_rounds,
        args.train_steps,
        tuple(args.models),
        args.gradient_steps,
    )
    print(markdown(result), end="")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0
