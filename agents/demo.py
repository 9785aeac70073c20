"""rlweights demo: what target networks do, on the environments of rlweights.envs.

rlweights demo baird: off-policy semi-gradient TD(0) with the book's linear features on
Baird's counterexample (Sutton & Barto, 2nd ed., section 11.2: step size 0.01, gamma 0.99,
weights starting at (1, 1, 1, 1, 1, 1, 10, 1), the behaviour policy's transitions weighted by
the importance ratio of the always-solid target policy). The TD target reads the online
weights (none: no target network), a copy refreshed every K steps (hard:K) or a
Polyak-averaged copy (polyak:TAU), kept by rlweights routines. Every true value is 0, so the
value error is the root mean square of the predicted values over the seven states.

rlweights demo chain: the native DQN on rlweights/Chain-v0 with several target updates, and
the error of its Q-function against the exact optimal values.

Both write TensorBoard runs (one per target update and seed, under --logdir; by default
runs/demo-DEMO-DATE-TIME), print a table, and with --png plot the curves (matplotlib, in the
dev extra).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

import rlweights as rw
from rlweights.agents.target_update import TargetUpdateSpec
from rlweights.drift import DriftMonitor
from rlweights.files import atomic_write, write_json
from rlweights.periodic import Periodic
from rlweights.tensorboard import DriftLogger

__all__ = [
    "BAIRD_ROUTINES",
    "CHAIN_ROUTINES",
    "DIVERGED_NORM",
    "add_arguments",
    "baird_td",
    "chain_dqn",
    "chain_q_error",
    "main_from_args",
]

BAIRD_ROUTINES = (
    "none",
    "hard:10",
    "hard:100",
    "hard:1000",
    "polyak:0.1",
    "polyak:0.01",
    "polyak:0.001",
)
"""The TD targets ``rlweights demo baird`` compares: none (the online weights), hard copies and
Polyak averages."""
CHAIN_ROUTINES = ("none", "hard:100", "hard:1000", "polyak:0.01", "polyak:0.001")
"""The target updates ``rlweights demo chain`` compares."""
DIVERGED_NORM = 1e3
"""A run "diverges" when the weight norm passes this: about 100 times the initial norm,
sqrt(107)."""
_GIVE_UP_NORM = 1e12  # stop simulating a run that has clearly diverged


def _target(target_update: str, online: nn.Module) -> tuple[nn.Module, Any]:
    """(the module the TD target reads, the routine that moves it, or None) for a target
    update spec or ``"none"``."""
    if target_update == "none":
        return online, None
    target = rw.make_target(online)
    return target, TargetUpdateSpec.parse(target_update).routine(online, target)


def baird_td(
    target_update: str,
    steps: int = 10_000,
    seed: int = 0,
    alpha: float = 0.01,
    log_every: int = 100,
    writer: Any = None,
) -> dict[str, Any]:
    """One run of off-policy semi-gradient TD(0) on ``rlweights/BairdCounterexample-v0``:

    ``w <- w + alpha * rho * (r + gamma * x(s') . w_target - x(s) . w) * x(s)``, with ``rho``
    = 7 after solid and 0 after dashed, ``w_target`` = ``w`` itself (``target_update="none"``)
    or a copy kept by the rlweights routine of the spec (stepped after every update).
    Returns the curves (``steps``, ``weight_norm``, ``value_error``, ``target_distance``)
    sampled every ``log_every`` steps, and ``diverged_at`` (the first step whose weight norm
    exceeded :data:`DIVERGED_NORM`, or None). A run whose norm passes 1e12 stops there.
    With ``writer``: rlweights' drift metrics of the weights (``drift/value/weight_norm``,
    ``target_distance``, ``init_distance``, ``update_ratio``) and ``baird/value_error``.
    """
    from rlweights.envs.baird import BairdCounterexample as Baird

    env = gym.make("rlweights/BairdCounterexample-v0", max_episode_steps=None)
    features = torch.as_tensor(Baird.FEATURES, dtype=torch.float64)
    ratios = Baird.TARGET_PROBS / Baird.BEHAVIOUR_PROBS
    online = nn.Linear(8, 1, bias=False).double().requires_grad_(False)
    with torch.no_grad():
        online.weight.copy_(torch.as_tensor(Baird.INITIAL_WEIGHTS).view(1, 8))
    target, target_routine = _target(target_update, online)
    w, w_target = online.weight.view(8), target.weight.view(8)
    # Weight norm and distance to the target: rlweights' drift metrics (drift/value/...).
    monitor = DriftMonitor(
        {"value": online}, {"value": target} if target is not online else None, per_layer=False
    )
    drift = DriftLogger(writer, monitor) if writer is not None else None
    rng = np.random.default_rng(seed)
    _, info = env.reset(seed=seed)
    state = info["state"]
    curves: dict[str, list[float]] = {
        "steps": [],
        "weight_norm": [],
        "value_error": [],
        "target_distance": [],
    }
    diverged_at = None
    curve_point = Periodic(log_every, name="baird_td log_every")
    for step in range(1, steps + 1):
        action = int(rng.random() < Baird.BEHAVIOUR_PROBS[1])
        _, reward, _, _, info = env.step(action)
        following = info["state"]
        with torch.no_grad():
            bootstrap = Baird.GAMMA * features[following] @ w_target
            delta = reward + bootstrap - features[state] @ w
            w.add_(features[state], alpha=float(alpha * ratios[action] * delta))
        if target_routine is not None:
            target_routine.step()
        state = following
        norm = float(torch.linalg.vector_norm(w))
        if diverged_at is None and not norm <= DIVERGED_NORM:
            diverged_at = step
        stop = not norm <= _GIVE_UP_NORM
        if curve_point.step() or step == steps or stop:
            if drift is not None:
                measured = drift.log(step)
            else:
                measured = {tag: float(value) for tag, value in monitor.measure().items()}
            value_error = float((features @ w).pow(2).mean().sqrt())
            if writer is not None:
                writer.add_scalar("baird/value_error", value_error, step)
            curves["steps"].append(step)
            curves["weight_norm"].append(measured["drift/value/weight_norm"])
            curves["value_error"].append(value_error)
            curves["target_distance"].append(measured.get("drift/value/target_distance", 0.0))
        if stop:
            break
    env.close()
    return {
        "routine": target_update,
        "seed": seed,
        "total_steps": steps,
        "diverged_at": diverged_at,
        **curves,
    }


def chain_q_error(agent: Any, optimal: np.ndarray) -> dict[str, float]:
    """Mean and largest ``|Q(s, a) - Q*(s, a)|`` of a DQN agent's online network over every
    non-terminal cell and action (the observation of cell ``s`` is one-hot)."""
    cells = optimal.shape[0] - 1  # the last cell is terminal: never acted in
    obs = torch.eye(optimal.shape[0], device=agent.device)[:cells]
    with torch.no_grad():
        q = agent.networks["q"](obs).double().cpu().numpy()
    error = np.abs(q - optimal[:cells])
    return {"chain/q_error_mean": float(error.mean()), "chain/q_error_max": float(error.max())}


def chain_dqn(
    target_update: str,
    steps: int = 20_000,
    seed: int = 0,
    log_every: int = 500,
    run_dir: Path | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """One run of the native DQN on ``rlweights/Chain-v0`` (10 cells, slip 0.1) with
    the ``target_update`` spec (``"none"``: the TD target reads the online network, i.e.
    ``polyak:1`` at every environment step, before every gradient step), returning the
    Q-error curves against ``rlweights.envs.chain.Chain.optimal_q``. ``overrides``
    change the DQN settings below."""
    from rlweights.agents.registry import make_config
    from rlweights.agents.train import train

    env_id = "rlweights/Chain-v0"
    settings: dict[str, Any] = {
        "total_steps": steps,
        "seed": seed,
        "learning_starts": 500,
        "buffer_size": steps,
        "batch_size": 64,
        "learning_rate": 1e-3,
        "hidden": (64, 64),
        "train_freq": 1,
        "gradient_steps": 1,
        "exploration_fraction": 0.5,
        "exploration_final_eps": 0.1,
        "target_update": "polyak:1.0" if target_update == "none" else target_update,
        "drift_every": 0,
        "eval_every": 0,
        "eval_episodes": 5,
    }
    config = make_config("dqn", env_id, **(settings | overrides))
    chain = gym.make(env_id)
    optimal = chain.unwrapped.optimal_q(config.gamma)
    chain.close()
    curves: dict[str, list[float]] = {"steps": [], "q_error_mean": [], "q_error_max": []}

    def watch(at: int, agent: Any) -> dict[str, float]:
        found = chain_q_error(agent, optimal)
        curves["steps"].append(at)
        curves["q_error_mean"].append(found["chain/q_error_mean"])
        curves["q_error_max"].append(found["chain/q_error_max"])
        return found

    _, summary = train(config, run_dir, monitor=watch, monitor_every=log_every)
    return {
        "routine": target_update,
        "seed": seed,
        "total_steps": steps,
        "final_eval_return": summary["final_eval_return"],
        **curves,
    }


def _plot(path: Path, panels: Sequence[tuple[str, str, bool]], runs: list[dict], title: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            "rlweights demo: --png needs matplotlib (pip install matplotlib, or the dev extra)"
        ) from None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.6))
    routines = list(dict.fromkeys(run["routine"] for run in runs))
    colours = plt.get_cmap("tab10")
    for ax, (key, label, log) in zip(np.atleast_1d(axes), panels, strict=True):
        labelled = set()
        for run in runs:  # one colour per routine, one line per seed
            routine = run["routine"]
            ax.plot(
                run["steps"],
                run[key],
                color=colours(routines.index(routine) % 10),
                label=None if routine in labelled else _label(routine),
                linewidth=1.3,
                alpha=0.85,
            )
            labelled.add(routine)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    seeds = sorted({run["seed"] for run in runs})
    np.atleast_1d(axes)[0].legend(fontsize=8, title=f"seeds {', '.join(map(str, seeds))}")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def _writer(logdir: Path, name: str) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(logdir / name))


def _label(target_update: str) -> str:
    return "no target network" if target_update == "none" else target_update


def run_baird(args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for target_update in args.routines:
        for seed in args.seeds:
            writer = _writer(args.logdir, f"{target_update.replace(':', '-')}-s{seed}")
            run = baird_td(target_update, args.steps, seed, args.alpha, args.log_every, writer)
            writer.close()
            runs.append(run)
    return {"demo": "baird", "alpha": args.alpha, "runs": runs}


def baird_table(result: dict[str, Any]) -> str:
    lines = [
        "| target | seed | steps | weight norm at the end | largest | value error at the end "
        "| outcome |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for run in result["runs"]:
        at, last = run["diverged_at"], run["steps"][-1]
        outcome = f"diverges (norm > 1e3 at step {at}" if at else "stays bounded"
        if at:
            outcome += f"; > 1e12 at step {last}, stopped)" if last < run["total_steps"] else ")"
        lines.append(
            f"| {_label(run['routine'])} | {run['seed']} | {run['total_steps']} | "
            f"{run['weight_norm'][-1]:.3g} | {max(run['weight_norm']):.3g} | "
            f"{run['value_error'][-1]:.3g} | {outcome} |"
        )
    return "\n".join(lines) + "\n"


def run_chain(args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for target_update in args.routines:
        for seed in args.seeds:
            run_dir = args.logdir / f"{target_update.replace(':', '-')}-s{seed}"
            tick = time.perf_counter()
            run = chain_dqn(target_update, args.steps, seed, args.log_every, run_dir)
            run["seconds"] = time.perf_counter() - tick
            runs.append(run)
    return {"demo": "chain", "length": 10, "slip": 0.1, "runs": runs}


def chain_table(result: dict[str, Any]) -> str:
    lines = [
        "| target update | seed | steps | mean abs Q error at the end | largest | "
        "mean over the last half | eval return |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        half = run["q_error_mean"][len(run["q_error_mean"]) // 2 :]
        lines.append(
            f"| {_label(run['routine'])} | {run['seed']} | {run['total_steps']} | "
            f"{run['q_error_mean'][-1]:.4f} | {run['q_error_max'][-1]:.4f} | "
            f"{float(np.mean(half)):.4f} | {run['final_eval_return']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _target_update(text: str) -> str:
    """argparse type of --routines: a target-update spec or none."""
    if text != "none":
        try:
            TargetUpdateSpec.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _step_size(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the subcommands of ``rlweights demo`` (``baird``, ``chain``) and their flags to
    ``parser``."""
    demos = parser.add_subparsers(dest="demo", metavar="DEMO", required=True)
    common: list[tuple[tuple[str, ...], dict[str, Any]]] = [
        (("--seeds",), {"type": int, "nargs": "+", "default": [0], "help": "seeds (0)"}),
        (
            ("--logdir",),
            {
                "type": Path,
                "help": "TensorBoard runs here, one per routine and seed "
                "(default: runs/demo-DEMO-DATE-TIME)",
            },
        ),
        (("--png",), {"type": Path, "help": "plot the curves into this PNG (matplotlib)"}),
        (("--json",), {"type": Path, "help": "also write the raw curves as JSON here"}),
    ]
    baird = demos.add_parser(
        "baird",
        help="TD(0) with linear features on Baird's counterexample, with and without targets",
        description=__doc__.split("\n\n")[1],
    )
    baird.add_argument("--steps", type=_positive, default=10_000, help="TD updates (10000)")
    baird.add_argument(
        "--alpha", type=_step_size, default=0.01, help="step size (0.01, the book's)"
    )
    baird.add_argument("--log-every", type=_positive, default=100, help="curve points (100)")
    chain = demos.add_parser(
        "chain",
        help="DQN's Q-error against the exact Q* on rlweights/Chain-v0, per target update",
        description=__doc__.split("\n\n")[2],
    )
    chain.add_argument("--steps", type=_positive, default=20_000, help="env steps (20000)")
    chain.add_argument("--log-every", type=_positive, default=500, help="curve points (500)")
    for sub, routines in ((baird, BAIRD_ROUTINES), (chain, CHAIN_ROUTINES)):
        sub.add_argument(
            "--routines",
            nargs="+",
            type=_target_update,
            default=list(routines),
            metavar="SPEC",
            help="none, hard:K or polyak:TAU (default: " + " ".join(routines) + ")",
        )
        for flags, options in common:
            sub.add_argument(*flags, **options)


def main_from_args(args: argparse.Namespace) -> int:
    """``rlweights demo``: run the chosen demo over its seeds, print its table, write its
    TensorBoard runs (and the figure with ``--png``); the exit code."""
    if args.logdir is None:
        args.logdir = Path("runs") / f"demo-{args.demo}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.demo == "baird":
        result = run_baird(args)
        print(baird_table(result), end="")
        panels = [
            ("weight_norm", "||w||", True),
            ("value_error", "RMS value error (true values: 0)", True),
        ]
        title = "Baird's counterexample: off-policy semi-gradient TD(0), alpha = " + str(args.alpha)
    else:
        result = run_chain(args)
        print(chain_table(result), end="")
        panels = [("q_error_mean", "mean |Q - Q*|", True)]
        title = "DQN on rlweights/Chain-v0 (10 cells, slip 0.1)"
    if args.png:
        _plot(args.png, panels, result["runs"], title)
        print(f"wrote {args.png}")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    print(f"TensorBoard: tensorboard --logdir {args.logdir}")
    return 0
