"""``rlweights train`` and ``rlweights evaluate``: argument parsing, input checks, output."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from rlweights.agents.parallel import launched_ranks
from rlweights.agents.train import (
    ALGOS,
    CheckpointError,
    config_from_checkpoint,
    evaluate,
    load_checkpoint,
    make_config,
)
from rlweights.distributed import PeerError
from rlweights.extras import require
from rlweights.files import write_json

TRAIN_DESCRIPTION = """\
Train a native DQN, SAC or TD3 agent on a Gymnasium environment (with --impl sb3: SB3's
algorithm of the same name, rlweights attached). Without arguments: SAC on Pendulum-v1.
Hyperparameters default to rl-baselines3-zoo's for the algorithm and environment (dqn on
CartPole-v1, sac and td3 on Pendulum-v1; the LunarLander presets need gymnasium[box2d]).

A run writes LOGDIR/RUN-NAME/: config.json, TensorBoard events (charts/, losses/, eval/,
drift/), model.pt (at every evaluation, at the end and on Ctrl-C; continue it with --resume)
and summary.json.

--target-update polyak:TAU lerps the target toward the online network, hard:EVERY copies it
at every EVERY-th update point; the update points are SB3's, for the native agents too (the
table: python -m pydoc rlweights.sb3.patching).

Parallel learners: torchrun --nproc_per_node=N -m rlweights train ... --average-every K.
"""

MAX_RUN_NAME = 200  # bytes; file systems allow 255 per name

EVALUATE_DESCRIPTION = "Run deterministic episodes with a saved agent and print the mean return."

__all__ = [
    "EVALUATE_DESCRIPTION",
    "TRAIN_DESCRIPTION",
    "UsageError",
    "add_evaluate_arguments",
    "add_train_arguments",
    "evaluate_main",
    "train_main",
]

# Flags that set a hyperparameter: (flag, config field, type, metavar, help).
HYPERPARAMETERS: list[tuple[str, str, Any, str, str]] = [
    ("--steps", "total_steps", int, "N", "environment steps in total (summed over --num-envs)"),
    ("--num-envs", "num_envs", int, "N", "environments stepped side by side (gymnasium.vector)"),
    (
        "--target-update",
        "target_update",
        str,
        "SPEC",
        "polyak:TAU (TAU in [0, 1]) or hard:EVERY; sac/td3 default polyak:0.005, dqn hard:10",
    ),
    (
        "--policy-ema",
        "policy_ema",
        float,
        "TAU",
        "keep an exponential moving average of the policy with this TAU (0 < TAU <= 1), "
        "updated after every policy step, and evaluate it next to the policy (eval/ema_return)",
    ),
    ("--clip", "clip", float, "VALUE", "clamp weights to [-VALUE, VALUE] after optimizer steps"),
    (
        "--max-norm",
        "max_norm",
        float,
        "VALUE",
        "rescale each unit's incoming weights to L2 norm <= VALUE after each optimizer step",
    ),
    ("--drift-every", "drift_every", int, "N", "log weight drift every N env steps (0: never)"),
    ("--eval-every", "eval_every", int, "N", "evaluate + checkpoint every N env steps (0: at end)"),
    ("--eval-episodes", "eval_episodes", int, "K", "deterministic episodes per evaluation"),
    ("--learning-rate", "learning_rate", float, "LR", "Adam learning rate"),
    ("--batch-size", "batch_size", int, "N", "replay batch size"),
    ("--buffer-size", "buffer_size", int, "N", "replay buffer capacity (transitions)"),
    ("--learning-starts", "learning_starts", int, "N", "random-action steps before learning"),
    ("--gamma", "gamma", float, "GAMMA", "discount factor"),
    ("--train-freq", "train_freq", int, "N", "env steps between training phases"),
    ("--gradient-steps", "gradient_steps", int, "N", "gradient steps per training phase"),
    (
        "--average-every",
        "average_every",
        int,
        "K",
        "under torchrun --nproc_per_node=N: the N learners average all their networks every K "
        "env steps (rank 0 evaluates, logs and checkpoints)",
    ),
    (
        "--peer-timeout",
        "peer_timeout",
        int,
        "SECONDS",
        "with --average-every: how long a learner waits for the others before it stops (300)",
    ),
]


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit code 2."""


def _hidden(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 256,256, got {text!r}") from None
    return sizes


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--algo", choices=sorted(ALGOS), help="default: sac")
    parser.add_argument(
        "--env", metavar="ID", help="Gymnasium id (default: CartPole-v1 for dqn, else Pendulum-v1)"
    )
    parser.add_argument(
        "--seed", type=int, metavar="S", help="seeds python, numpy, torch, envs (0)"
    )
    parser.add_argument(
        "--logdir", default="runs", metavar="DIR", help="parent of the run directory (runs)"
    )
    parser.add_argument("--run-name", metavar="NAME", help="default: ALGO-ENV-sSEED-DATE-TIME")
    parser.add_argument(
        "--device", choices=("cpu", "cuda", "auto"), default="cpu", help="auto: cuda if present"
    )
    parser.add_argument(
        "--impl",
        choices=("native", "sb3"),
        help="native agents (default) or the SB3 algorithm of the same name, rlweights attached",
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted run from RUN_DIR/model.pt (only --steps, --device "
        "and --no-progress may be given with it)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    for flag, field, kind, metavar, text in HYPERPARAMETERS:
        parser.add_argument(flag, dest=field, type=kind, metavar=metavar, help=text)
    parser.add_argument(
        "--hidden", type=_hidden, metavar="SIZES", help="hidden layer sizes, e.g. 256,256"
    )


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a model.pt written by 'rlweights train', or its run")
    parser.add_argument("--episodes", type=int, default=10, help="evaluation episodes (10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first episode (0)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    parser.add_argument(
        "--ema", action="store_true", help="evaluate the averaged policy (--policy-ema runs)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu)")
    return name


def _check_env(algo: str, env_id: str) -> None:
    """Make the environment once: unknown ids and wrong action spaces fail before any file
    is written."""
    try:
        env = gym.make(env_id)
    except gym.error.Error as exc:
        raise UsageError(f"environment {env_id!r}: {exc}") from None
    try:
        ALGOS[algo][1].check_spaces(env_id, env.observation_space, env.action_space)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    finally:
        env.close()


def _check_run_name(name: str) -> None:
    """A run name is one folder inside --logdir: no path, not hidden, not too long."""
    if (
        not name
        or name.startswith(".")
        or "/" in name
        or os.sep in name
        or len(name.encode()) > MAX_RUN_NAME
    ):
        raise UsageError(
            f"--run-name {name[:60]!r}{'...' if len(name) > 60 else ''}: must be one folder "
            f"name inside --logdir (no '/', not starting with '.', at most {MAX_RUN_NAME} bytes)"
        )


def _prepare_run_dir(logdir: str, name: str) -> Path:
    _check_run_name(name)
    parent = Path(logdir)
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"--logdir {logdir}: exists and is not a directory")
    run_dir = parent / name
    if run_dir.exists():
        raise UsageError(
            f"run directory {run_dir} already exists: continue it with --resume {run_dir} "
            "or choose another --run-name"
        )
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".rlweights-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--logdir {logdir}: not writable ({exc.strerror})") from None
    return run_dir


class _Progress:
    """A tqdm bar: steps, steps/s (tqdm's rate), last episode return, last evaluation."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.shown = initial
        self.postfix: dict[str, str] = {}

    def __call__(self, steps: int, info: dict[str, float]) -> None:
        if self.bar is None:
            return
        postfix = {key: f"{info[key]:.1f}" for key in ("return", "eval") if key in info}
        if postfix != self.postfix:  # only after a new episode or evaluation
            self.postfix = postfix
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(steps - self.shown)
        self.shown = steps

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    fields = [field for _, field, _, _, _ in HYPERPARAMETERS] + ["hidden"]
    return {field: getattr(args, field) for field in fields}


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _check_parallel(config: Any, impl: str) -> None:
    processes = launched_ranks()
    if config.average_every and impl == "sb3":
        raise UsageError("--average-every is for the native agents, not --impl sb3")
    if config.average_every and processes < 2:
        raise UsageError(
            "--average-every needs several learners: launch with torchrun --nproc_per_node=N "
            "-m rlweights train ... --average-every K"
        )
    if processes > 1 and not config.average_every:
        raise UsageError(
            f"launched as {processes} processes: pass --average-every K so that the learners "
            "average their weights (otherwise each would train alone)"
        )


def _check_impl(impl: str) -> None:
    """--impl sb3 without its extra fails before anything is written."""
    if impl == "sb3":
        require("stable_baselines3", "sb3", "rlweights train --impl sb3")


def _prepare_train(args: argparse.Namespace) -> tuple[Any, Path, str, int]:
    """Check every input and create the run directory: (config, run_dir, impl, start step).
    Under torchrun only rank 0 creates it."""
    device = _device(args.device)
    if args.resume and launched_ranks() > 1:
        raise UsageError(
            "--resume of parallel learners is not supported (the checkpoint holds rank 0's "
            "learner only); evaluate or average it, or start a new run"
        )
    if args.resume:
        given = [k for k, v in _overrides(args).items() if v is not None and k != "total_steps"]
        others = (args.algo, args.env, args.run_name, args.seed, args.impl)
        if given or any(value is not None for value in others):
            raise UsageError(
                "--resume continues a run with its own settings: only --steps, --device and "
                "--no-progress may be given with it"
            )
        run_dir = Path(args.resume)
        if run_dir.name == "model.pt" and run_dir.is_file():  # the checkpoint itself is fine too
            run_dir = run_dir.parent
        saved = load_checkpoint(run_dir / "model.pt", resume=True)
        try:
            config = config_from_checkpoint(saved, total_steps=args.total_steps, device=device)
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{run_dir}/model.pt: its config is unreadable ({exc})") from None
        impl, initial = saved["impl"], saved["steps"]
        _check_impl(impl)
        if config.total_steps <= initial:
            raise UsageError(
                f"{run_dir} is at step {initial} of {config.total_steps}: pass --steps N with "
                f"N > {initial} to train further"
            )
        return config, run_dir, impl, initial
    config = make_config(
        args.algo or "sac", args.env, seed=args.seed or 0, device=device, **_overrides(args)
    )
    _check_env(config.algo, config.env_id)
    impl = args.impl or "native"
    _check_impl(impl)
    _check_parallel(config, impl)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    suffix = "-sb3" if impl == "sb3" else ""
    env = re.sub(r"[^A-Za-z0-9._-]+", "-", config.env_id)  # rlweights/Chain-v0, mod:Env-v0
    name = args.run_name or f"{config.algo}-{env}-s{config.seed}{suffix}-{stamp}"
    if _rank() != 0:  # the other learners write nothing
        return config, Path(args.logdir) / name, impl, 0
    run_dir = _prepare_run_dir(args.logdir, name)
    run_dir.mkdir()
    write_json(run_dir / "config.json", {"impl": impl, **config.to_dict()})
    return config, run_dir, impl, 0


def train_main(args: argparse.Namespace) -> int:
    prepared = _guarded("train", _prepare_train, args)
    if isinstance(prepared, int):
        return prepared
    config, run_dir, impl, initial = prepared
    lead = _rank() == 0
    if lead:
        learners = f" ({launched_ranks()} learners)" if config.average_every else ""
        print(
            f"rlweights train: {impl} {config.algo} on {config.env_id}{learners} -> {run_dir}",
            flush=True,
        )
    progress = _Progress(config.total_steps, initial, enabled=lead and not args.no_progress)
    try:
        if impl == "sb3":
            from rlweights.agents.sb3_train import train_sb3

            summary = train_sb3(config, run_dir, resume=initial > 0, progress=progress)
        else:
            from rlweights.agents.train import train

            summary = train(config, run_dir, resume=initial > 0, progress=progress)[1]
    except KeyboardInterrupt as stop:
        progress.close()
        if not lead:
            return 130
        # The loop's own stop says where it checkpointed; a second Ctrl-C stops at once.
        saved = f"checkpoint of {stop.args[0]}" if stop.args else "the last checkpoint"
        print(
            f"rlweights train: interrupted; {saved} is in {run_dir}/model.pt. "
            f"Continue with: rlweights train --resume {run_dir}",
            file=sys.stderr,
        )
        return 130
    except PeerError as exc:
        progress.close()
        print(f"rlweights train: error: {exc}", file=sys.stderr)
        return 1
    progress.close()
    if not lead:
        return 0
    ema = summary.get("final_ema_eval_return")
    print(
        f"final eval return {summary['final_eval_return']:.1f} +- {summary['final_eval_std']:.1f}"
        f" over {summary['eval_episodes']} episodes"
        + (f" (policy EMA: {ema:.1f})" if ema is not None else "")
        + f"; {summary['steps']} steps at {summary['steps_per_second']:.0f} steps/s"
        + (
            f" per learner, {summary['processes']} learners averaged {summary['averages']} times"
            if "processes" in summary
            else ""
        )
        + "; "
        f"TensorBoard: tensorboard --logdir {run_dir.parent}"
    )
    return 0


def _prepare_evaluate(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """Check the inputs and load the policy: (config, policy, checkpoint)."""
    if args.episodes < 1:
        raise UsageError(f"--episodes must be >= 1, got {args.episodes}")
    device = _device(args.device)
    saved = load_checkpoint(args.checkpoint)
    try:
        config = config_from_checkpoint(saved, device=device)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{args.checkpoint}: its config is unreadable ({exc})") from None
    _check_env(config.algo, config.env_id)
    if saved["impl"] == "sb3":
        from rlweights.agents.sb3_train import load_sb3_policy

        return config, load_sb3_policy(config, saved, ema=args.ema), saved
    from rlweights.agents.train import build_agent, make_envs

    envs = make_envs(config.env_id, 1)
    agent = build_agent(config, envs)
    envs.close()
    try:
        agent.load_weights(saved["weights"])
    except (KeyError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{args.checkpoint}: weights do not fit ({first})") from None
    network = None
    if args.ema:
        if agent.ema_routine is None:
            raise UsageError(f"--ema: {args.checkpoint} was trained without --policy-ema")
        network = agent.ema_routine.averaged
    return config, lambda obs: agent.policy(obs, network), saved


def evaluate_main(args: argparse.Namespace) -> int:
    prepared = _guarded("evaluate", _prepare_evaluate, args)
    if isinstance(prepared, int):
        return prepared
    config, policy, saved = prepared
    returns = evaluate(policy, config.env_id, args.episodes, args.seed, config.device)
    result = {
        "checkpoint": str(args.checkpoint),
        "algo": config.algo,
        "env_id": config.env_id,
        "steps": saved["steps"],
        "episodes": args.episodes,
        "mean_return": float(np.mean(returns)),
        "std_return": float(np.std(returns)),
        "returns": [float(r) for r in returns],
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{config.algo} on {config.env_id} after {saved['steps']} steps: mean return "
            f"{result['mean_return']:.1f} +- {result['std_return']:.1f} over {args.episodes} "
            "episodes"
        )
    return 0


def _guarded(command: str, prepare: Any, args: argparse.Namespace) -> Any:
    """Bad input -> one line on stderr and exit code 2 (returned as an int), no traceback."""
    try:
        return prepare(args)
    except (UsageError, CheckpointError, ValueError) as exc:
        print(f"rlweights {command}: error: {exc}", file=sys.stderr)
        return 2
