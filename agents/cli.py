"""``rlweights train`` and ``rlweights evaluate``: argument parsing, input checks, output."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import sys
import time
import types
import typing
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from rlweights.agents.checkpoint import (
    CheckpointError,
    UnverifiedCheckpointWarning,
    checkpoint_steps,
    config_from_checkpoint,
    load_checkpoint,
)
from rlweights.agents.compiled import compile_pays
from rlweights.agents.config import setting_of
from rlweights.agents.environments import route_mujoco_warnings, spaces_of
from rlweights.agents.evaluation import evaluate
from rlweights.agents.memory import available_memory, memory_needed
from rlweights.agents.parallel import launched_ranks
from rlweights.agents.presets import NOTES, PRESET_SOURCES, preset
from rlweights.agents.registry import ALGOS, make_config
from rlweights.agents.run_folder import (
    MARKER,
    clean_temporaries,
    create,
    discard,
    holding,
    is_marked,
    mark,
    never_checkpointed,
    reset_for_rerun,
)
from rlweights.agents.seeding import MAX_SEED
from rlweights.agents.signals import GracefulStop, Stopped
from rlweights.distributed import PeerError
from rlweights.extras import require
from rlweights.files import WriteError, write_json

TRAIN_DESCRIPTION = """\
Train a native DQN, SAC, TD3, DDPG, TQC or DroQ agent on a Gymnasium environment (with --impl
sb3: SB3's or sb3-contrib's algorithm of the same name, rlweights attached; with --impl sbx:
SBX's, the bench extra). Without arguments: SAC on Pendulum-v1.
Hyperparameters come from rl-baselines3-zoo's preset for the algorithm and environment (DroQ:
the zoo's SAC preset with SBX's DroQ settings)
(classic control, Box2D with gymnasium[box2d], MuJoCo v5 with the mujoco extra; the table:
python -m pydoc rlweights.agents.presets); an environment without one gets the algorithm's
defaults (the zoo's for CartPole-v1 or Pendulum-v1), and the run says so.

A run writes LOGDIR/RUN-NAME/: config.json, TensorBoard events (charts/, losses/, eval/,
drift/), model.pt (at every evaluation, at the end and on Ctrl-C; continue it with --resume)
and summary.json.

--target-update polyak:TAU lerps the target toward the online network, hard:EVERY copies it
at every EVERY-th update point; the update points are SB3's, for the native agents too (the
table: python -m pydoc rlweights.sb3.patching).

Parallel learners: torchrun --nproc_per_node=N -m rlweights train ... --average-every K.
"""
"""The description of ``rlweights train --help``."""

MAX_RUN_NAME = 200  # bytes; file systems allow 255 per name

# Gymnasium's ids: [module:][namespace/]name[-vN], the module imported first (gymnasium.make)
ENV_ID = re.compile(r"(?:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:)?(?:[\w.-]+/)?[\w.-]+")

EVALUATE_DESCRIPTION = "Run deterministic episodes with a saved agent and print the mean return."
"""The description of ``rlweights evaluate --help``."""

__all__ = [
    "EVALUATE_DESCRIPTION",
    "TRAIN_DESCRIPTION",
    "UsageError",
    "add_evaluate_arguments",
    "add_train_arguments",
    "evaluate_main",
    "train_main",
]


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit code 2."""


# One thread per training process: 2-thread runs side by side on a 2-core machine slow each
# other down many times over (OpenMP threads waiting on each other), while 1-thread runs side
# by side keep their speed (measurements in docs/benchmarks.md).
DEFAULT_THREADS = 1


def _count(text: str) -> int:
    """An integer flag: 1000000, 1_000_000 or 1e6."""
    try:
        return int(text)
    except ValueError:
        pass  # 1e6
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value.is_integer() and abs(value) < 2**63):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(value)


def _pair(text: str) -> tuple[float, float]:
    """Two numbers: 0.5,0.5."""
    parts = text.split(",")
    try:
        pair = tuple(float(part) for part in parts)
    except ValueError:
        pair = ()
    if len(pair) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.5,0.5, got {text!r}")
    return pair


def _hidden(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 256,256, got {text!r}") from None
    return sizes


# How a flag reads the type of its config field, and its metavar unless the field names one.
_PARSERS: dict[Any, tuple[Any, str]] = {
    int: (_count, "N"),
    float: (float, "VALUE"),
    str: (str, "TEXT"),
    tuple[int, ...]: (_hidden, "SIZES"),
    tuple[float, float]: (_pair, "A,B"),
}


@dataclasses.dataclass(frozen=True)
class Flag:
    """A flag of ``rlweights train``, made from a config field
    (``setting``): its name, the field it sets, the field's type
    and what was said about it, and the algorithms whose configs have the field."""

    flag: str
    field: str
    hint: Any
    setting: Any
    algos: tuple[str, ...]

    def add_to(self, group: Any) -> None:
        text = self.setting["help"]
        if len(self.algos) < len(ALGOS):
            text += f" ({', '.join(self.algos)})"
        if self.hint is bool:
            group.add_argument(
                self.flag, dest=self.field, action=argparse.BooleanOptionalAction, help=text
            )
            return
        parse, metavar = _PARSERS[self.hint]
        metavar = self.setting["metavar"] or metavar
        group.add_argument(self.flag, dest=self.field, type=parse, metavar=metavar, help=text)

    def as_argument(self, value: Any) -> str:
        """The flag with ``value``, as one argument (a value that begins with '-' stays the
        flag's value)."""
        if self.hint is bool:
            return self.flag if value else f"--no-{self.flag[2:]}"
        return f"{self.flag}={','.join(map(str, value)) if isinstance(value, tuple) else value}"


def _flags() -> list[Flag]:
    """The flags of every algorithm's config fields that have a help text, the shared ones
    first, in the order the configs declare them."""
    found: dict[str, Flag] = {}
    for algo, (cls, _) in ALGOS.items():
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            meta = setting_of(cls, field.name)
            if not meta.get("help"):
                continue
            if field.name in found:
                flag = found[field.name]
                found[field.name] = dataclasses.replace(flag, algos=(*flag.algos, algo))
                continue
            hint = hints[field.name]
            if typing.get_origin(hint) in (types.UnionType, typing.Union):  # X | None
                hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
            name = meta["flag"] or "--" + field.name.replace("_", "-")
            found[field.name] = Flag(name, field.name, hint, meta, (algo,))
    return list(found.values())


FLAGS = _flags()


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``rlweights train`` to ``parser``, in the sections of its help: one flag
    per config field (with its default, rule and help), and the run's own flags."""
    run = parser.add_argument_group("run and output")
    groups = {
        "run": run,
        "hyperparameters": parser.add_argument_group(
            "algorithm and hyperparameters (default: the zoo's preset for the environment)"
        ),
        "weights": parser.add_argument_group("weight operations"),
        "plasticity": parser.add_argument_group("plasticity"),
        "parallel": parser.add_argument_group("several seeds and parallel learners"),
    }
    speed = parser.add_argument_group("speed")
    groups["hyperparameters"].add_argument("--algo", choices=sorted(ALGOS), help="default: sac")
    run.add_argument(
        "--env", metavar="ID", help="Gymnasium id (default: CartPole-v1 for dqn, else Pendulum-v1)"
    )
    run.add_argument("--seed", type=int, metavar="S", help="seeds python, numpy, torch, envs (0)")
    run.add_argument(
        "--logdir", default="runs", metavar="DIR", help="parent of the run directory (runs)"
    )
    run.add_argument("--run-name", metavar="NAME", help="default: ALGO-ENV-sSEED-DATE-TIME")
    run.add_argument(
        "--device", choices=("cpu", "cuda", "auto"), default="cpu", help="auto: cuda if present"
    )
    groups["hyperparameters"].add_argument(
        "--impl",
        choices=("native", "sb3", "sbx"),
        help="native agents (default); sb3: SB3's (or sb3-contrib's) algorithm of the same name, "
        "rlweights attached; sbx: SBX's (JAX), as it is",
    )
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted run from RUN_DIR/model.pt (only --steps, --device, "
        "--no-progress and --env with the run's own environment id may be given with it)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    for flag in FLAGS:
        flag.add_to(groups[flag.setting["group"]])
    speed.add_argument(
        "--threads",
        type=_count,
        default=DEFAULT_THREADS,
        metavar="N",
        help=f"torch threads of the training process (default {DEFAULT_THREADS}: runs side by "
        "side, or next to other busy processes, do not slow each other down; "
        "docs/benchmarks.md has the numbers)",
    )
    groups["parallel"].add_argument(
        "--seeds",
        type=int,
        nargs="+",
        metavar="S",
        help="train one run per seed, each in its own run folder, --workers at a time "
        "(instead of --seed)",
    )
    groups["parallel"].add_argument(
        "--workers",
        type=_count,
        metavar="N",
        help="with --seeds: runs side by side (default: the CPU cores divided by --threads)",
    )
    speed.add_argument(
        "--compile",
        nargs="?",
        const="on",
        choices=("auto", "on", "off"),
        help="compile the whole gradient step (losses, gradients, Adam, temperature, "
        "constraints, policy EMA, target update) as one torch.compile graph: on (--compile "
        "alone), off, or auto (the default: on the CPU, SAC, TD3, DDPG, TQC and DroQ runs "
        "long enough for compiling to pay; the run says which)",
    )
    speed.add_argument(
        "--cudagraphs",
        action="store_const",
        const=True,
        help="with --compile on CUDA: replay the compiled step as a CUDA graph (no kernel "
        "launches from Python, no host sync per step)",
    )


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``rlweights evaluate`` to ``parser``."""
    parser.add_argument("checkpoint", help="a model.pt written by 'rlweights train', or its run")
    parser.add_argument("--episodes", type=_count, default=10, help="evaluation episodes (10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first episode (0)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    parser.add_argument(
        "--env",
        metavar="ID",
        help="the checkpoint's own environment id, given again to allow an id that imports a "
        "module (module:Env-v0); an id read from a file never imports one by itself",
    )
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


def _check_plasticity(config: Any, env: gym.Env, impl: str) -> None:
    """--reset-layers and --unit-sphere name parameters of the networks: build them once (on
    the CPU, not compiled) so that a pattern that names nothing fails before any file is
    written."""
    if not (config.reset_every or config.shrink_perturb is not None or config.unit_sphere):
        return
    quick = dataclasses.replace(config, compile=False, cudagraphs=False, device="cpu")
    if impl == "sb3":
        from rlweights.agents.sb3_train import check_plasticity

        check_plasticity(quick)
    else:
        ALGOS[config.algo][1](quick, env.observation_space, env.action_space)


def _check_env(
    config: Any,
    spaces: dict[str, str] | None = None,
    impl: str = "native",
    evaluation: bool = False,
) -> None:
    """Make the environment once, before any file is written: unknown ids, modules that do
    not import, wrong action spaces, spaces other than the resumed run's (``spaces``), and
    runs too large for this machine's memory fail here. ``evaluation``: only the
    evaluation of a saved agent (``config.eval_episodes`` episodes) will run."""
    env_id = config.env_id
    if not ENV_ID.fullmatch(env_id):
        raise UsageError(
            f"--env {env_id!r}: not an environment id; expected [module:]Name-vN, e.g. "
            "Pendulum-v1, rlweights/Chain-v0 or mypackage.envs:MyEnv-v0"
        )
    try:
        route_mujoco_warnings(env_id)
        env = gym.make(env_id)
    except (gym.error.Error, ImportError) as exc:
        first = str(exc).strip().split("\n")[0]
        if isinstance(exc, gym.error.DependencyNotInstalled):  # name rlweights' extra
            extra = next((e for e in ("box2d", "mujoco") if e in first.lower()), None)
            if extra is not None:
                first = f"it needs the '{extra}' extra: pip install 'rlweights[{extra}]'"
        raise UsageError(f"environment {env_id!r}: {first}") from None
    try:
        ALGOS[config.algo][1].check_spaces(env_id, env.observation_space, env.action_space)
        here = spaces_of(env)
        if spaces is not None and spaces != here:
            raise UsageError(
                f"environment {env_id!r} here has observation space {here['observation']} and "
                f"action space {here['action']}, but the run was trained with "
                f"{spaces['observation']} and {spaces['action']}: resume it where its "
                "environment is the same"
            )
        _check_memory(config, env.observation_space, env.action_space, impl, evaluation)
        if not evaluation:
            _check_plasticity(config, env, impl)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    finally:
        env.close()


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    raise AssertionError


# The flag of train that makes each part of memory_needed smaller.
_MEMORY_FLAGS = {
    "replay buffer": "--buffer-size",
    "networks and optimizers": "--hidden",
    "a gradient step's batch": "--batch-size",
    "evaluation environments": "--eval-episodes (one environment per episode)",
}


def _check_memory(
    config: Any, observation_space: Any, action_space: Any, impl: str, evaluation: bool = False
) -> None:
    """Refuse, from the sizes alone, a replay buffer, networks, a gradient step's batch and
    evaluation environments that cannot be allocated (a restored config's too); the fix
    named is the flag of the largest part (``--episodes`` for an evaluation)."""
    need = memory_needed(config, observation_space, action_space, impl, evaluation)
    total = sum(need.values())
    free = available_memory(config.device)
    if free is not None and total > free:
        where = "GPU memory" if config.device.startswith("cuda") else "memory"
        parts = ", ".join(f"{name} {_size(n)}" for name, n in need.items() if n)
        flags = "--episodes" if evaluation else _MEMORY_FLAGS[max(need, key=need.__getitem__)]
        raise UsageError(
            f"this run needs about {_size(total)} of {where} ({parts}), more than the "
            f"{_size(free)} available: lower {flags}"
        )


def _check_utf8(flag: str, value: str) -> None:
    """The paths of a run reach TensorBoard and its JSON files, which need UTF-8: a name
    that is not (a byte that the file system holds, Python as a surrogate) is refused."""
    whole = str(Path(value).absolute())
    try:
        whole.encode()
    except UnicodeEncodeError:
        raise UsageError(
            f"{flag} {os.fsencode(value)!r}: the path {os.fsencode(whole)!r} is not valid UTF-8 "
            "(TensorBoard and the run's files need UTF-8 names): use another name"
        ) from None


def _check_run_name(name: str) -> None:
    """A run name is one folder inside --logdir: no path, not hidden, not too long, UTF-8."""
    _check_utf8("--run-name", name)
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


def _dangling(path: Path) -> str | None:
    """Where ``path`` points, if it is a symbolic link to nothing."""
    if path.is_symlink() and not path.exists():
        return os.readlink(path)
    return None


def _prepare_run_dir(logdir: str, name: str, settings: dict[str, Any], stack: ExitStack) -> Path:
    """Create the run folder with its marker and ``settings`` as ``config.json`` (or take over
    the folder of the same name that a stopped run left without a checkpoint) and lock it for
    this process (released by ``stack``). A folder that rlweights did not create is refused;
    a new folder whose set-up cannot be written is removed again."""
    _check_utf8("--logdir", logdir)
    _check_run_name(name)
    parent = Path(logdir)
    if (target := _dangling(parent)) is not None:
        raise UsageError(f"--logdir {logdir} is a symbolic link to {target}, which does not exist")
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"--logdir {logdir}: exists and is not a directory")
    run_dir = parent / name
    if run_dir.is_dir() and never_checkpointed(run_dir):
        stack.enter_context(holding(run_dir))
        mark(run_dir)  # it can be written
        reset_for_rerun(run_dir)
        write_json(run_dir / "config.json", settings)
        return run_dir
    if (target := _dangling(run_dir)) is not None:
        raise UsageError(
            f"{run_dir} is a symbolic link to {target}, which does not exist: remove it or "
            "choose another --run-name"
        )
    if run_dir.exists() and not (is_marked(run_dir) or (run_dir / "model.pt").is_file()):
        raise UsageError(
            f"{run_dir} exists and is not a run folder that rlweights created (it has no "
            f"{MARKER} file): choose another --run-name"
        )
    if run_dir.exists():
        raise UsageError(
            f"run directory {run_dir} already exists: continue it with --resume {run_dir} "
            "or choose another --run-name"
        )
    try:
        create(run_dir)
    except FileExistsError:
        raise UsageError(f"run directory {run_dir} was created by another process") from None
    except OSError as exc:
        raise UsageError(f"--logdir {logdir}: not writable ({exc.strerror})") from None
    stack.enter_context(holding(run_dir))
    try:
        mark(run_dir)
        write_json(run_dir / "config.json", settings)
    except BaseException:
        discard(run_dir)
        raise
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
    overrides = {flag.field: getattr(args, flag.field) for flag in FLAGS}
    compile_mode = {"on": True, "off": False}.get(args.compile)  # auto: decided with the config
    return overrides | {"compile": compile_mode, "cudagraphs": args.cudagraphs}


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _check_parallel(config: Any, impl: str) -> None:
    processes = launched_ranks()
    if config.average_every and impl != "native":
        raise UsageError(f"--average-every is for the native agents, not --impl {impl}")
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


def _check_impl(impl: str, config: Any) -> None:
    """--impl sb3 or sbx without its extra, or for an algorithm it does not have (or, SBX,
    with rlweights' weight routines), fails before anything is written."""
    if impl == "sb3":
        require("stable_baselines3", "sb3", "rlweights train --impl sb3")
        from rlweights.agents.sb3_train import sb3_class

        try:
            sb3_class(config.algo)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if impl == "sbx":
        require("sbx", "bench", "rlweights train --impl sbx")
        from rlweights.agents.sbx_train import check_sbx_config

        try:
            check_sbx_config(config)
        except ValueError as exc:
            raise UsageError(str(exc)) from None


def _resume_dir(given: str) -> Path:
    _check_utf8("--resume", given)
    run_dir = Path(given)
    if run_dir.name == "model.pt" and run_dir.is_file():  # the checkpoint itself is fine too
        run_dir = run_dir.parent
    if not run_dir.is_dir():
        raise UsageError(f"--resume {given}: no run folder there")
    return run_dir


def _prepare_resume(
    args: argparse.Namespace, device: str, stack: ExitStack
) -> tuple[Any, Path, str, int]:
    """--resume: lock the run, read and check its checkpoint (or its config.json, for a run
    stopped before its first checkpoint), then clean what a kill left. Only a folder that
    rlweights created, or one with an rlweights checkpoint, is a run: in any other nothing is
    removed or written."""
    if launched_ranks() > 1:
        raise UsageError(
            "--resume of parallel learners is not supported (the checkpoint holds rank 0's "
            "learner only); evaluate or average it, or start a new run"
        )
    given = [k for k, v in _overrides(args).items() if v is not None and k != "total_steps"]
    others = (args.algo, args.run_name, args.seed, args.impl)
    if given or any(value is not None for value in others):
        raise UsageError(
            "--resume continues a run with its own settings: only --steps, --device and "
            "--no-progress may be given with it (and --env with the run's own environment id)"
        )
    run_dir = _resume_dir(args.resume)
    stack.enter_context(holding(run_dir))
    if never_checkpointed(run_dir):  # stopped before its first checkpoint: start it again
        where = f"{run_dir}/config.json"
        try:
            saved = json.loads((run_dir / "config.json").read_text())
            impl = saved.pop("impl", "native")
            config = config_from_checkpoint(
                {"config": saved}, args.env, where, total_steps=args.total_steps, device=device
            )
        except CheckpointError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise CheckpointError(f"{where} is unreadable ({exc})") from None
        _check_impl(impl, config)
        _check_env(config, impl=impl)
        mark(run_dir)  # it can be written
        reset_for_rerun(run_dir)
        return config, run_dir, impl, 0
    saved = load_checkpoint(run_dir / "model.pt", resume=True)
    where = f"{run_dir}/model.pt"
    try:
        config = config_from_checkpoint(
            saved, args.env, where, total_steps=args.total_steps, device=device
        )
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{where}: its config is unreadable ({exc})") from None
    impl, initial = saved["impl"], saved["steps"]
    _check_impl(impl, config)
    _check_env(config, saved.get("spaces"), impl)
    finished = (run_dir / "summary.json").is_file()
    if config.total_steps < initial or (config.total_steps == initial and finished):
        raise UsageError(
            f"{run_dir} is at step {initial} of {config.total_steps}: pass --steps N with "
            f"N > {initial} to train further"
        )
    mark(run_dir)  # it can be written (and a run of an earlier rlweights gets its marker)
    clean_temporaries(run_dir)
    return config, run_dir, impl, initial


def _checked_config(args: argparse.Namespace, seed: int, device: str) -> tuple[Any, str]:
    """(config, impl) of a new run with ``seed``, every input checked."""
    if args.cudagraphs and not (args.compile == "on" and device.startswith("cuda")):
        raise UsageError("--cudagraphs needs --compile and a CUDA device (--device cuda)")
    algo = args.algo or "sac"
    for flag in FLAGS:
        if getattr(args, flag.field) is not None and algo not in flag.algos:
            raise UsageError(
                f"{flag.flag} is a setting of {' and '.join(flag.algos)}, not of {algo}"
            )
    config = make_config(algo, args.env, seed=seed, device=device, **_overrides(args))
    impl = args.impl or "native"
    if config.compile and impl != "native":
        raise UsageError(f"--compile compiles the native agents' step, not --impl {impl}")
    _check_impl(impl, config)
    if args.compile in (None, "auto") and impl == "native":
        config = dataclasses.replace(config, compile=compile_pays(config)[0])
    _check_env(config, impl=impl)
    return config, impl


def _default_run_name(config: Any, impl: str, stamp: str) -> str:
    suffix = "" if impl == "native" else f"-{impl}"
    env = re.sub(r"[^A-Za-z0-9._-]+", "-", config.env_id)  # rlweights/Chain-v0, mod:Env-v0
    return f"{config.algo}-{env}-s{config.seed}{suffix}-{stamp}"


def _prepare_train(args: argparse.Namespace, stack: ExitStack) -> tuple[Any, Path, str, int]:
    """Check every input, create (or take over) the run folder and lock it: (config,
    run_dir, impl, start step). Under torchrun only rank 0 creates it."""
    device = _device(args.device)
    if args.resume:
        return _prepare_resume(args, device, stack)
    config, impl = _checked_config(args, args.seed or 0, device)
    _check_parallel(config, impl)
    name = args.run_name or _default_run_name(config, impl, time.strftime("%Y%m%d-%H%M%S"))
    if _rank() != 0:  # the other learners write nothing
        return config, Path(args.logdir) / name, impl, 0
    settings = {"impl": impl, **config.to_dict()}
    return config, _prepare_run_dir(args.logdir, name, settings, stack), impl, 0


def _stopped_message(run_dir: Path, stop: GracefulStop, exc: BaseException, config: Any) -> str:
    """What the user reads after a stop signal: true to the files that are there, with the
    command that continues the run (``--env`` for an id that imports a module)."""
    name = signal.Signals(stop.signum).name if stop.signum else "SIGINT"
    how = "Ctrl-C" if name == "SIGINT" else name
    steps = exc.steps if isinstance(exc, Stopped) else checkpoint_steps(run_dir / "model.pt")
    command = f"rlweights train --resume {run_dir}"
    if ":" in config.env_id:
        command += f" --env {config.env_id}"
    if steps is None:
        return (
            f"rlweights train: stopped by {how} before the first checkpoint; start the run "
            f"again with: {command}"
        )
    during = exc.during if isinstance(exc, Stopped) else "training"
    then = "Finish it (final evaluation, summary)" if steps >= config.total_steps else "Continue"
    return (
        f"rlweights train: stopped by {how} during {during}; the checkpoint of step {steps} "
        f"is in {run_dir}/model.pt. {then} with: {command}"
    )


def _unwritten_message(run_dir: Path, exc: WriteError) -> str:
    """What the user reads when a file of the run could not be written (a full disk): what
    failed, the checkpoint that is left (``model.pt`` is written atomically) and what next."""
    steps = checkpoint_steps(run_dir / "model.pt")
    if steps is None:
        left, then = "no checkpoint was written yet", "start it again"
    else:
        left = f"the checkpoint of step {steps} in {run_dir}/model.pt is as it was"
        then = "continue it"
    return (
        f"{exc}; {left}. When the folder can be written, {then} with: rlweights train "
        f"--resume {run_dir}"
    )


def train_main(args: argparse.Namespace) -> int:
    """``rlweights train``: one run, several seeds side by side, or a resumed run, from parsed
    arguments; the exit code (2 on bad input, in one line, before anything is written; 128 +
    the signal's number when stopped)."""
    if args.threads < 1:
        print("rlweights train: error: --threads must be >= 1", file=sys.stderr)
        return 2
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args.seeds is not None or args.workers is not None:
            return _train_seeds(args)
        return _train_one(args)
    finally:
        torch.set_num_threads(before)  # for callers of main() in this process


def _train_one(args: argparse.Namespace) -> int:
    # Signals are caught from before the run folder exists: a stop during the set-up
    # becomes a checkpoint at the first step.
    with GracefulStop() as stop, ExitStack() as stack:
        prepared = _guarded("train", lambda a: _prepare_train(a, stack), args)
        if isinstance(prepared, int):
            return prepared
        return _train(args, stop, *prepared)


def _child_arguments(args: argparse.Namespace) -> list[str]:
    """The flags given to ``rlweights train`` (but the seeds' own), for its runs of one
    seed each."""
    out = []  # --flag=value: a value that begins with '-' stays the flag's value
    for flag in ("algo", "env", "logdir", "device", "impl", "threads"):
        value = getattr(args, flag)
        if value is not None:
            out.append(f"--{flag}={value}")
    for flag in FLAGS:
        value = getattr(args, flag.field)
        if value is not None:
            out.append(flag.as_argument(value))
    if args.compile is not None:
        out.append(f"--compile={args.compile}")
    if args.cudagraphs:
        out.append("--cudagraphs")
    return out


def _prepare_seeds(args: argparse.Namespace) -> tuple[list[int], list[Path], list[list[str]]]:
    """Check the input of ``--seeds`` once, before anything runs: (seeds, run folders, the
    command of each)."""
    if args.seeds is None:
        raise UsageError("--workers goes with --seeds")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.seed is not None or args.resume:
        raise UsageError("--seeds trains new runs: give it without --seed and --resume")
    seeds = list(args.seeds)
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {' '.join(map(str, seeds))}: each seed once")
    _check_utf8("--logdir", args.logdir)
    device = _device(args.device)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folders, commands = [], []
    for seed in seeds:
        config, impl = _checked_config(args, seed, device)  # seeds out of range fail here
        if config.average_every:
            raise UsageError("--seeds runs independent learners: not with --average-every")
        name = (
            f"{args.run_name}-s{seed}" if args.run_name else _default_run_name(config, impl, stamp)
        )
        _check_run_name(name)
        if os.path.lexists(Path(args.logdir) / name):
            raise UsageError(f"{Path(args.logdir) / name} exists: pick another --run-name")
        folders.append(Path(args.logdir) / name)
        commands.append(
            [
                *(sys.executable, "-m", "rlweights", "train", *_child_arguments(args)),
                *(f"--seed={seed}", f"--run-name={name}", "--no-progress"),
            ]
        )
    return seeds, folders, commands


def _train_seeds(args: argparse.Namespace) -> int:
    """``--seeds``: one ``rlweights train`` process per seed, ``--workers`` at a time, each
    with ``--threads`` threads and its own run folder; then the seeds' final returns and the
    steps per second of them all."""
    from rlweights.agents.side_by_side import SideBySide

    prepared = _guarded("train", _prepare_seeds, args)
    if isinstance(prepared, int):
        return prepared
    seeds, folders, commands = prepared
    workers = args.workers or max((os.cpu_count() or 1) // args.threads, 1)
    print(
        f"rlweights train: {len(seeds)} seeds, {min(workers, len(seeds))} at a time with "
        f"{args.threads} thread(s) each -> {Path(args.logdir)}",
        flush=True,
    )

    def done(finished: Any) -> None:
        lines = (finished.stdout.strip().splitlines() or ["(no output)"])[-1:]
        if finished.returncode != 0:
            lines = (finished.stderr.strip().splitlines() or lines)[-1:]
        print(f"  seed {seeds[finished.index]}: {lines[0]}", flush=True)

    runner = SideBySide(workers, args.threads)
    start = time.perf_counter()
    results = runner.run(commands, on_done=done)
    wall = time.perf_counter() - start
    summaries = {}
    for seed, folder in zip(seeds, folders, strict=True):
        if (folder / "summary.json").is_file():
            summaries[seed] = json.loads((folder / "summary.json").read_text())
    if summaries:
        returns = [s["final_eval_return"] for s in summaries.values()]
        finite = [r for r in returns if r is not None]
        mean = f"{np.mean(finite):.1f}" if finite else "n/a"
        steps = sum(s["steps"] for s in summaries.values())
        print(
            f"rlweights train: {len(summaries)} of {len(seeds)} seeds finished: final eval "
            f"return mean {mean} (per seed: "
            + ", ".join(
                f"{k}: {'n/a' if r is None else f'{r:.1f}'}"
                for k, r in zip(summaries, returns, strict=True)
            )
            + f"); {steps} steps in {wall:.0f} s, {steps / wall:.0f} steps/s in total",
            flush=True,
        )
    if runner.stopped is not None:
        unfinished = [  # started, stopped, and left a folder that --resume continues
            str(f)
            for f, r in zip(folders, results, strict=True)
            if r.returncode not in (0, None)
            and ((f / "model.pt").is_file() or never_checkpointed(f))
        ]
        print(
            "rlweights train: stopped; resume each stopped run with: rlweights train --resume "
            f"RUN ({', '.join(unfinished)})"
            if unfinished
            else "rlweights train: stopped before any run had a folder to resume",
            file=sys.stderr,
        )
        return 128 + runner.stopped
    return 0 if all(r.returncode == 0 for r in results) else 1


def _train(
    args: argparse.Namespace,
    stop: GracefulStop,
    config: Any,
    run_dir: Path,
    impl: str,
    initial: int,
) -> int:
    lead = _rank() == 0
    if lead:
        learners = f" ({launched_ranks()} learners)" if config.average_every else ""
        print(
            f"rlweights train: {impl} {config.algo} on {config.env_id}{learners} -> {run_dir}",
            flush=True,
        )
        if not args.resume:
            print(_preset_line(config), flush=True)
            if args.compile in (None, "auto") and impl == "native":
                print(f"rlweights train: --compile auto: {compile_pays(config)[1]}", flush=True)
    progress = _Progress(config.total_steps, initial, enabled=lead and not args.no_progress)
    resume = initial > 0
    try:
        if impl == "sb3":
            from rlweights.agents.sb3_train import train_sb3

            summary = train_sb3(config, run_dir, resume=resume, progress=progress, stop=stop)
        elif impl == "sbx":
            from rlweights.agents.sbx_train import train_sbx

            summary = train_sbx(config, run_dir, resume=resume, progress=progress, stop=stop)
        else:
            from rlweights.agents.train import train

            summary = train(config, run_dir, resume=resume, progress=progress, stop=stop)[1]
    except KeyboardInterrupt as exc:
        progress.close()
        if lead:
            print(_stopped_message(run_dir, stop, exc, config), file=sys.stderr)
        return 128 + (stop.signum or signal.SIGINT)
    except CheckpointError as exc:  # a restored state that does not fit: before any write
        progress.close()
        print(f"rlweights train: error: {exc}", file=sys.stderr)
        return 2
    except PeerError as exc:
        progress.close()
        print(f"rlweights train: error: {exc}", file=sys.stderr)
        return 1
    except WriteError as exc:
        progress.close()
        print(f"rlweights train: error: {_unwritten_message(run_dir, exc)}", file=sys.stderr)
        return 2
    progress.close()
    if not lead:
        return 0
    ema = summary.get("final_ema_eval_return")
    rate = summary["steps_per_second"]
    print(
        f"final eval return {_number(summary['final_eval_return'])} +- "
        f"{_number(summary['final_eval_std'])} over {summary['eval_episodes']} episodes"
        + (f" (policy EMA: {_number(ema)})" if ema is not None else "")
        + f"; {summary['steps']} steps"
        + (f" at {rate:.0f} steps/s" if rate else " (none in this session)")
        + (
            f" per learner, {summary['processes']} learners averaged {summary['averages']} times"
            if "processes" in summary
            else ""
        )
        + "; "
        f"TensorBoard: tensorboard --logdir {run_dir.parent}"
    )
    shown = (summary["final_eval_return"], ema)
    if summary["diverged"] and all(np.isfinite(v) for v in shown if v is not None):
        print("rlweights train: the run diverged: its weights hold NaN or infinite values")
    return 0


def _preset_line(config: Any) -> str:
    """Which hyperparameters the run starts from (flags override them)."""
    key = (config.algo, config.env_id)
    if preset(*key) is None:
        home = ALGOS[config.algo][0].env_id
        return (
            f"rlweights train: no preset for {config.algo} on {config.env_id}: "
            f"{config.algo}'s defaults (rl-baselines3-zoo's for {home}) are used"
        )
    note = f"; {NOTES[key]}, which the native agents do not have" if key in NOTES else ""
    source = PRESET_SOURCES.get(config.algo, "rl-baselines3-zoo's preset")
    return f"rlweights train: {source} for {config.algo} on {config.env_id}{note}"


def _number(value: float) -> str:
    return f"{value:.1f}" if np.isfinite(value) else f"{value} (the run diverged)"


def _prepare_evaluate(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """Check the inputs and load the policy: (config, policy, checkpoint)."""
    if args.episodes < 1:
        raise UsageError(f"--episodes must be >= 1, got {args.episodes}")
    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must be in [0, {MAX_SEED}], got {args.seed}")
    device = _device(args.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnverifiedCheckpointWarning)
        saved = load_checkpoint(args.checkpoint)
    for warning in caught:
        print(f"rlweights evaluate: warning: {warning.message}", file=sys.stderr)
    try:
        config = config_from_checkpoint(saved, args.env, args.checkpoint, device=device)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{args.checkpoint}: its config is unreadable ({exc})") from None
    config = dataclasses.replace(config, eval_episodes=args.episodes)
    _check_env(config, saved.get("spaces"), saved["impl"], evaluation=True)
    if saved["impl"] == "sb3":
        from rlweights.agents.sb3_train import load_sb3_policy

        return config, load_sb3_policy(config, saved, ema=args.ema), saved
    if saved["impl"] == "sbx":
        from rlweights.agents.sbx_train import load_sbx_policy

        if args.ema:
            raise UsageError("--ema: an --impl sbx run keeps no policy EMA")
        require("sbx", "bench", "rlweights evaluate of an --impl sbx run")
        try:
            return config, load_sbx_policy(config, saved), saved
        except ValueError as exc:
            raise CheckpointError(f"{args.checkpoint}: {exc}") from None
    from rlweights.agents.environments import make_envs
    from rlweights.agents.registry import build_agent

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
    """``rlweights evaluate``: evaluate a checkpoint and print its mean return; the exit code (2 on
    bad input, in one line)."""
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
    """Bad input, or a file of the run that cannot be written -> one line on stderr and exit
    code 2 (returned as an int), no traceback."""
    try:
        return prepare(args)
    except (UsageError, CheckpointError, ValueError, WriteError) as exc:
        print(f"rlweights {command}: error: {exc}", file=sys.stderr)
        return 2
