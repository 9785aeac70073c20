"""The training loop shared by the native agents, evaluation, checkpoints and resuming.

A run directory holds ``config.json``, TensorBoard events, ``model.pt`` (written atomically at
every evaluation, at the end and on Ctrl-C; loads with ``torch.load(weights_only=True)``) and,
when the run finishes, ``summary.json``. ``model.pt`` carries the weights of every network
and what a resumed run needs: optimizers, rlweights routines, the stored replay transitions,
counters and RNG states.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import signal
import threading
import time
import types
import typing
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch

import rlweights.envs as _rlweights_envs  # noqa: F401  (registers the rlweights/ environments)
from rlweights.agents.common import (
    AgentConfig,
    OffPolicyAgent,
    ReplayBuffer,
    rng_state,
    seed_everything,
    set_rng_state,
)
from rlweights.agents.ddpg import DDPG, DDPGConfig
from rlweights.agents.dqn import DQN, DQNConfig
from rlweights.agents.presets import preset
from rlweights.agents.sac import SAC, SACConfig
from rlweights.agents.td3 import TD3, TD3Config
from rlweights.checks import check_int
from rlweights.files import atomic_write, checksum_matches, sealed, write_json
from rlweights.periodic import Periodic

if TYPE_CHECKING:
    from rlweights.agents.parallel import Learners

__all__ = [
    "ALGOS",
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "GracefulStop",
    "Stopped",
    "UnverifiedCheckpointWarning",
    "available_memory",
    "build_agent",
    "checkpoint_steps",
    "evaluate",
    "load_checkpoint",
    "make_config",
    "make_envs",
    "memory_needed",
    "restoring",
    "run_summary",
    "spaces_of",
    "train",
]

ALGOS: dict[str, tuple[type[AgentConfig], type[OffPolicyAgent]]] = {
    "dqn": (DQNConfig, DQN),
    "sac": (SACConfig, SAC),
    "td3": (TD3Config, TD3),
    "ddpg": (DDPGConfig, DDPG),
}

CHECKPOINT_FORMAT = "rlweights-agent"
# Version 2: the routines' states in the one counter format of rlweights.periodic. Version 3:
# the config's weight clamp is ``weight_clip`` (was ``clip``) and the replay buffer's terminal
# flags ``terminated`` (were ``dones``); a version 2 checkpoint is read with those names
# changed and resumes. Version 1 checkpoints load for evaluation only.
CHECKPOINT_VERSION = 3
RESUMABLE_VERSIONS = (2, 3)
# Names a version 2 file gives what version 3 names otherwise (config field, buffer field).
_RENAMED_IN_3 = {"config": {"clip": "weight_clip"}, "buffer": {"dones": "terminated"}}
EVAL_SEED_OFFSET = 1_000_000  # evaluation episodes never reuse a training seed


class CheckpointError(ValueError):
    """A file that is not a readable rlweights checkpoint (corrupt, foreign, wrong version)."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint of a format written before checksums: a change to it cannot be told."""


def make_config(algo: str, env_id: str | None = None, **overrides: Any) -> AgentConfig:
    """The algorithm's config: its defaults, the zoo preset for ``env_id`` if there is one
    (:mod:`rlweights.agents.presets`), then ``overrides`` (``None`` values are ignored).
    Raises ``ValueError`` on bad values."""
    if algo not in ALGOS:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {', '.join(ALGOS)}")
    values: dict[str, Any] = {}
    if env_id is not None:
        values["env_id"] = env_id
        values.update(preset(algo, env_id) or {})
    values.update({key: value for key, value in overrides.items() if value is not None})
    return ALGOS[algo][0](**values)


def _mujoco_warning(message: str) -> None:
    if "deprecated" in message:  # Gymnasium's models under MuJoCo 4 ('settotalmass')
        logging.getLogger("mujoco").debug(message)
    else:
        warnings.warn(f"MuJoCo: {message}", RuntimeWarning, stacklevel=2)


def route_mujoco_warnings(env_id: str) -> None:
    """MuJoCo appends its warnings to ``MUJOCO_LOG.TXT`` in the working directory (one per
    model compiled: every environment made). For a MuJoCo environment, send them to Python
    instead: deprecations to the ``mujoco`` logger (debug), others as RuntimeWarnings."""
    try:
        spec = gym.spec(env_id)
    except (gym.error.Error, ImportError):  # gym.make says what is wrong with the id
        return
    if "mujoco" in str(spec.entry_point):
        import mujoco

        mujoco.set_mju_user_warning(_mujoco_warning)


def make_envs(
    env_id: str, num_envs: int, interrupted: Callable[[], bool] | None = None
) -> gym.vector.SyncVectorEnv:
    """``num_envs`` copies with episode statistics and same-step autoreset (the final
    observation of an episode comes in ``infos["final_obs"]``, so every transition is real).
    When ``interrupted()`` becomes true before the next copy is made, ``KeyboardInterrupt``
    is raised (making many environments can take long)."""
    route_mujoco_warnings(env_id)

    made: list[gym.Env] = []

    def make() -> gym.Env:
        if interrupted is not None and interrupted():
            for env in made:
                env.close()
            raise KeyboardInterrupt("making environments")
        made.append(gym.wrappers.RecordEpisodeStatistics(gym.make(env_id)))
        return made[-1]

    return gym.vector.SyncVectorEnv(
        [make] * num_envs, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )


def _mlp_parameters(sizes: list[int]) -> int:
    return sum((a + 1) * b for a, b in itertools.pairwise(sizes))


# Bytes of one environment with its wrappers in a vector environment: about 8-16 KiB for
# classic control, over 1 MiB for a MuJoCo model and its data.
ENV_BYTES = 64 * 2**10
MUJOCO_ENV_BYTES = 2 * 2**20


def _env_bytes(env_id: str) -> int:
    try:
        mujoco = "mujoco" in str(gym.spec(env_id).entry_point)
    except (gym.error.Error, ImportError):
        mujoco = False
    return MUJOCO_ENV_BYTES if mujoco else ENV_BYTES


def memory_needed(
    config: AgentConfig,
    observation_space: gym.Space,
    action_space: gym.Space,
    impl: str = "native",
    evaluation: bool = False,
) -> dict[str, int]:
    """Bytes the run will allocate, from the sizes alone (an upper estimate): the replay
    buffer (the native agents' holds at most ``total_steps`` transitions, SB3's always
    ``buffer_size``), the networks with their targets, gradients and Adam's moments, a
    gradient step's batch (its transitions, and the layer outputs that the forward passes
    keep for the backward pass, with their gradients), and the ``eval_episodes`` evaluation
    environments, made together. ``evaluation``: only a saved agent's evaluation runs (the
    native agents then make no replay buffer; SB3's model makes its own; nothing trains)."""
    obs = int(np.prod(observation_space.shape))
    discrete = isinstance(action_space, gym.spaces.Discrete)
    act = int(action_space.n) if discrete else int(np.prod(action_space.shape))
    hidden = list(config.hidden)
    if config.algo == "dqn":
        networks = 5 * _mlp_parameters([obs, *hidden, act])  # online, target, grad, Adam x2
        passes = 2  # online and target Q-network
    else:
        actor = _mlp_parameters([obs, *hidden, 2 * act])
        critic = 2 * _mlp_parameters([obs + act, *hidden, 1])
        networks = 5 * (actor + critic) + (actor if config.policy_ema else 0)
        passes = 8  # actor twice, twin critic three times (target, online, actor loss)
    capacity = config.buffer_size
    if impl == "native":
        capacity = 0 if evaluation else min(capacity, config.total_steps)
    row = 4 * (2 * obs + 2) + (8 if discrete else 4 * act)  # obs, next obs, reward, done, action
    # per pass and sample: each layer's output and activation, and their gradients
    activations = 4 * 4 * passes * (obs + act + sum(hidden))
    return {
        "replay buffer": capacity * row,
        "networks and optimizers": 4 * networks,
        "a gradient step's batch": 0 if evaluation else config.batch_size * (row + activations),
        "evaluation environments": config.eval_episodes * (_env_bytes(config.env_id) + 8 * obs),
    }


def available_memory(device: str) -> int | None:
    """Bytes that can still be allocated on ``device`` (None where it cannot be told)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def build_agent(config: AgentConfig, envs: gym.vector.VectorEnv) -> OffPolicyAgent:
    return ALGOS[config.algo][1](config, envs.single_observation_space, envs.single_action_space)


def evaluate(
    policy: Callable[[torch.Tensor], torch.Tensor],
    env_id: str,
    episodes: int,
    seed: int,
    device: torch.device | str = "cpu",
    interrupted: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Returns of ``episodes`` episodes with the deterministic ``policy``, run side by side
    (one environment per episode, seeded ``seed``, ``seed + 1``, ...). When
    ``interrupted()`` becomes true (while the environments are made, or during the
    episodes) the evaluation stops with ``KeyboardInterrupt``."""
    envs = make_envs(env_id, episodes, interrupted)
    try:
        obs, _ = envs.reset(seed=seed)
        returns = np.zeros(episodes)
        done = np.zeros(episodes, dtype=bool)
        while not done.all():
            if interrupted is not None and interrupted():
                raise KeyboardInterrupt("evaluation")
            with torch.no_grad():
                actions = policy(torch.as_tensor(obs, dtype=torch.float32, device=device))
            obs, rewards, terminated, truncated, _ = envs.step(actions.cpu().numpy())
            returns += np.where(done, 0.0, rewards)
            done |= terminated | truncated
    finally:
        envs.close()
    return returns


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically, with the format, the version and the checksum of its
    content (checked when it is loaded)."""
    payload = sealed({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state})
    atomic_write(path, lambda f: torch.save(payload, f))


def checkpoint_steps(path: Path) -> int | None:
    """The step of the checkpoint at ``path`` (memory-mapped, nothing checked), or None."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["steps"])
    except Exception:  # no file, or not a checkpoint
        return None


def _sb3_algorithm(path: Path) -> str | None:
    """If ``path`` is a zip written by Stable-Baselines3's ``save``: its algorithm's class
    as imported ("stable_baselines3.DQN", from the policy's module named in the zip's JSON
    ``data``), else None."""
    try:
        with zipfile.ZipFile(path) as archive:
            if not {"data", "policy.pth"} <= set(archive.namelist()):
                return None
            data = json.loads(archive.read("data"))
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    policy = data.get("policy_class") if isinstance(data, dict) else None
    module = str(policy.get("__module__", "") if isinstance(policy, dict) else "").split(".")
    if len(module) < 3:  # not "package.algorithm.policies"
        return "stable_baselines3.ALGORITHM"
    return f"{module[0]}.{module[-2].upper()}"


def load_checkpoint(path: str | Path, *, resume: bool = False) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no code from the file ever runs) and
    check that it is an rlweights checkpoint, of the current version if it is to ``resume``
    a run. Raises :class:`CheckpointError`."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    algorithm = _sb3_algorithm(path)
    if algorithm is not None:
        raise CheckpointError(
            f"{path} is a Stable-Baselines3 model (its save()), not an rlweights checkpoint: "
            f"load it with {algorithm}.load and run stable_baselines3.common.evaluation."
            "evaluate_policy; rlweights reads the model.pt of 'rlweights train' runs "
            "(--impl sb3 for SB3's algorithms)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, truncated file, pickled code refused, ...
        # The first sentence of torch's message ("Weights only load failed", "failed finding
        # central directory", ...) names the problem; the rest is advice for other cases.
        reason = str(exc).strip().split("\n")[0].split(". ")[0] or type(exc).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an rlweights training checkpoint")
    version = state.get("version")
    if "checksum" not in state and version != 1:  # version 1 was written before checksums
        raise CheckpointError(
            f"{path} has no checksum, which every checkpoint of version {version} is written "
            "with (a changed file); use an intact copy"
        )
    if not checksum_matches(state, required=version != 1):
        raise CheckpointError(
            f"{path} is damaged: its content does not match the checksum written with it "
            "(a changed or corrupted file); use an intact copy"
        )
    if version not in range(1, CHECKPOINT_VERSION + 1):
        raise CheckpointError(
            f"{path} has checkpoint version {version}, this rlweights reads versions 1 to "
            f"{CHECKPOINT_VERSION}"
        )
    if resume and version not in RESUMABLE_VERSIONS:
        raise CheckpointError(
            f"{path} was written by an earlier rlweights (checkpoint version {version}): it "
            f"evaluates, but only versions {RESUMABLE_VERSIONS[0]} to {CHECKPOINT_VERSION} "
            "resume; start a new run"
        )
    if resume and "training" not in state:
        made = "an average of checkpoints" if "averaged_from" in state else "a checkpoint"
        raise CheckpointError(
            f"{path} is {made} without training state (optimizers, replay buffer): it "
            "evaluates, but does not resume; start a new run"
        )
    if version < 3:
        _rename(state.get("config"), _RENAMED_IN_3["config"])
        training = state.get("training")
        _rename(
            training.get("buffer") if isinstance(training, dict) else None, _RENAMED_IN_3["buffer"]
        )
    _check_fields(state, path)
    if version == 1:
        warnings.warn(
            f"{path} (checkpoint version 1) has no checksum: a changed or corrupted file "
            "cannot be told from an intact one",
            UnverifiedCheckpointWarning,
            stacklevel=2,
        )
    return state


def _rename(fields: Any, names: dict[str, str]) -> None:
    """Give the entries of a dict read from an earlier version their current names."""
    if isinstance(fields, dict):
        for old, new in names.items():
            if old in fields and new not in fields:
                fields[new] = fields.pop(old)


@contextlib.contextmanager
def restoring(path: Path) -> Iterator[None]:
    """What a restore raises on a checkpoint's content (a state that does not fit this
    run) becomes a :class:`CheckpointError` naming ``path``, in one line."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path} does not fit this run: {first}") from None


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_fields(state: dict[str, Any], path: Path) -> None:
    """The values a run restores, checked for type and range as the command line checks its
    own (the checksum finds damage, not intent: anyone can write a checkpoint and seal it).
    The config itself is checked by :func:`config_from_checkpoint`."""

    def impossible(what: str, value: Any, rule: str) -> CheckpointError:
        shown = repr(value)
        shown = shown if len(shown) <= 40 else f"{shown[:40]}..."
        return CheckpointError(f"{path}: {what}={shown} is impossible ({rule})")

    if state.get("algo") not in ALGOS:
        raise impossible("algo", state.get("algo"), f"one of {', '.join(ALGOS)}")
    if state.get("impl") not in ("native", "sb3"):
        raise impossible("impl", state.get("impl"), "native or sb3")
    for key in ("config", "weights"):
        if not isinstance(state.get(key), dict):
            raise impossible(key, type(state.get(key)).__name__, "a mapping")
    spaces = state.get("spaces", {"observation": "", "action": ""})  # none: not compared
    if not (
        isinstance(spaces, dict)
        and set(spaces) == {"observation", "action"}
        and all(isinstance(text, str) for text in spaces.values())
    ):
        raise impossible("spaces", spaces, "the observation and action spaces, as text")
    steps, config = state.get("steps"), state["config"]
    total, envs = config.get("total_steps"), config.get("num_envs", 1)
    if not _whole(steps) or steps < 0:
        raise impossible("steps", steps, "a whole number >= 0")
    if _whole(total) and _whole(envs) and steps > total + envs - 1:
        raise impossible("steps", steps, f"past the run's total_steps {total}")
    training = state.get("training")
    if training is None:  # evaluates only
        return
    if not isinstance(training, dict):
        raise impossible("training", type(training).__name__, "a mapping")
    episodes, wall = training.get("episodes"), training.get("wall_seconds")
    if not (isinstance(episodes, list) and all(_real(r) for r in episodes)):
        raise impossible("episodes", episodes, "a list of returns")
    if len(episodes) > steps:
        raise impossible("episodes", f"{len(episodes)} returns", f"more than {steps} steps")
    if not (_real(wall) and math.isfinite(wall) and wall >= 0):
        raise impossible("wall_seconds", wall, "a finite number >= 0")
    counters = {}
    if state["impl"] == "native":
        agent = training.get("agent")
        counters["gradient_updates"] = (
            agent.get("gradient_updates") if isinstance(agent, dict) else None
        )
        buffer = training.get("buffer")
        buffer = buffer if isinstance(buffer, dict) else {}
        size, position = buffer.get("size"), buffer.get("position")
        if not _whole(size) or not 0 <= size <= steps:
            raise impossible("size", size, f"the replay buffer holds 0 to {steps} transitions")
        if not _whole(position) or not 0 <= position <= size:
            raise impossible("position", position, f"a row of the {size} stored")
    else:
        counters.update(n_updates=training.get("n_updates"), n_calls=training.get("n_calls"))
        if not isinstance(training.get("routines"), dict):
            raise CheckpointError(
                f"{path} was written before --impl sb3 checkpoints kept their routines' "
                "counters: it evaluates, but does not resume; start a new run"
            )
    for name, value in counters.items():
        if not _whole(value) or value < 0:
            raise impossible(name, value, "a whole number >= 0")


def spaces_of(envs: Any) -> dict[str, str]:
    """The observation and action space of one environment, as text (kept in checkpoints:
    a run resumes only where its environment has the same spaces). ``envs``: a Gymnasium
    environment, a Gymnasium vector environment or an SB3 VecEnv."""
    single = getattr(envs, "single_observation_space", None) is not None
    return {
        "observation": str(envs.single_observation_space if single else envs.observation_space),
        "action": str(envs.single_action_space if single else envs.action_space),
    }


def _check_env_from_file(env_id: Any, env: str | None, where: str) -> None:
    """Raise :class:`CheckpointError` if the environment id ``env_id`` read from a file
    (``where``) names a module ("module:Env-v0", which Gymnasium imports, running any code it
    holds) that the user did not name with the same id (``env``, from ``--env``), or if
    ``env`` is another id than the file's."""
    if not isinstance(env_id, str):
        raise CheckpointError(f"{where}: its environment id {env_id!r} is not a string")
    if env is not None and env != env_id:
        raise CheckpointError(
            f"--env {env}: {where} was trained on {env_id!r}; give its own id or none"
        )
    module = env_id.partition(":")[0] if ":" in env_id else None
    if module is not None and env is None:
        raise CheckpointError(
            f"{where} names environment {env_id!r}, which would import module {module!r} "
            f"(running any code in it): if you trust it, pass --env {env_id}"
        )


def config_from_checkpoint(
    state: dict[str, Any], env: str | None = None, where: str = "the checkpoint", **overrides: Any
) -> AgentConfig:
    """The config a checkpoint (or a ``config.json``, as ``{"config": ...}``) was written
    with, ``overrides`` applied and every value checked as the command line's are. Its
    environment id imports no module unless the user names it (``env``, see
    :func:`_check_env_from_file`)."""
    saved = dict(state["config"])
    _rename(saved, _RENAMED_IN_3["config"])  # a config.json written before version 3
    algo = saved.pop("algo")
    _check_env_from_file(saved.get("env_id"), env, where)
    if algo in ALGOS:
        _check_types(ALGOS[algo][0], saved, where)
    saved.update({key: value for key, value in overrides.items() if value is not None})
    return make_config(algo, **saved)


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value``, read from JSON or a checkpoint, has the type ``hint`` of a config
    field (a whole number for ``int``, a list for a tuple)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _whole(value)
    if hint is float:
        return _real(value)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(item, args[0]) for item in value)
        return len(value) == len(args) and all(map(_fits, value, args))
    return True


def _check_types(cls: type[AgentConfig], saved: dict[str, Any], where: str) -> None:
    """Raise :class:`CheckpointError` naming a saved config value whose type is not its
    field's (the command line parses each flag to its type; a file may hold anything)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in saved and not _fits(saved[field.name], hints[field.name]):
            raise CheckpointError(
                f"{where}: its config has {field.name}={saved[field.name]!r:.40}, not of the "
                f"field's type ({hints[field.name]})"
            )


# What a user, a scheduler (SLURM, Kubernetes, docker stop, timeout) or a closed terminal sends.
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


class Stopped(KeyboardInterrupt):
    """A run stopped on a signal after writing its checkpoint: ``steps`` is the checkpoint's
    step, ``during`` what was running ("training" or "the final evaluation")."""

    def __init__(self, steps: int, signum: int | None, during: str = "training"):
        super().__init__(f"step {steps}")
        self.steps, self.signum, self.during = steps, signum, during


class GracefulStop:
    """The first SIGINT (Ctrl-C), SIGTERM or SIGHUP asks the run to stop at the next step (it
    then checkpoints); a second one of the same signal acts at once, as without rlweights
    (Ctrl-C raises ``KeyboardInterrupt``, the others end the process). A signal that the
    process ignores (``nohup``) stays ignored. Re-entrant; only installed in the main thread.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None  # the first signal received
        self._previous: dict[int, Any] = {}
        self._depth = 0

    def __enter__(self) -> GracefulStop:
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                signum = getattr(signal, name, None)  # Windows has no SIGHUP
                if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.signum = self.signum or signum
        signal.signal(signum, self._previous[signum])

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if not self._depth:
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)
            self._previous = {}


Monitor = Callable[[int, OffPolicyAgent], dict[str, float]]


def train(
    config: AgentConfig,
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    monitor: Monitor | None = None,
    monitor_every: int = 1000,
    stop: GracefulStop | None = None,
) -> tuple[OffPolicyAgent, dict[str, Any]]:
    """Train a native agent; returns it and the run's summary.

    With ``run_dir``: TensorBoard events (``charts/``, ``losses/``, ``eval/``, ``drift/``),
    ``model.pt`` at every evaluation and at the end, ``summary.json`` at the end. With
    ``resume=True`` the run continues from ``run_dir/model.pt`` (weights, optimizers,
    routines, replay buffer, counters, RNG); the environments restart their episodes.
    ``progress(steps, info)`` is called after every environment step. Ctrl-C, SIGTERM or
    SIGHUP stops at the next step, writes the checkpoint and raises :class:`Stopped`; an
    evaluation stops at once (the final one after the final checkpoint, another one without
    its results); while the environments are made, before the next one (``KeyboardInterrupt``,
    no checkpoint). ``stop``: a :class:`GracefulStop` already installed by the caller (from
    before the run is built).
    ``monitor(steps, agent)`` is called every ``monitor_every`` environment steps (and at the
    end) and returns ``{tag: value}`` measurements, written to TensorBoard with the run's
    other scalars (e.g. the error of a Q-function against known optimal values).

    With ``config.average_every > 0`` (under torchrun, see :mod:`rlweights.agents.parallel`)
    this process is one of several learners that average their weights every
    ``average_every`` environment steps; only rank 0 evaluates and writes to ``run_dir``, and
    only rank 0's summary has the evaluation results.
    """
    check_int(monitor_every, "monitor_every", "train")
    stop = stop or GracefulStop()
    if not config.average_every:
        run = _Run(config, run_dir, resume, progress, monitor, monitor_every, stop=stop)
        return run.train(stop)
    if resume:
        raise ValueError(
            "resuming a run of parallel learners is not supported: its checkpoint holds rank "
            "0's learner only; evaluate or average it, or start a new run"
        )
    from rlweights.agents.parallel import Learners

    learners = Learners(config)
    try:
        run_dir = run_dir if learners.rank == 0 else None
        run = _Run(config, run_dir, False, progress, monitor, monitor_every, learners, stop)
        return run.train(stop)
    finally:
        learners.close()


def run_summary(
    config: AgentConfig,
    impl: str,
    steps: int,
    results: dict[str, np.ndarray],
    session_steps: int,
    train_seconds: float,
    wall_seconds: float,
    episodes: list[float],
    weights: Iterable[torch.Tensor] = (),
) -> dict[str, Any]:
    """What ``summary.json`` holds for every run, native or SB3: the final evaluation
    (``results``: returns per policy), the speed of this session, the training episodes.
    The run ``diverged`` if a return or one of the trained ``weights`` is NaN or infinite
    (a Q-network of NaN weights still acts, by argmax, and can return a finite sum)."""
    summary: dict[str, Any] = {
        "algo": config.algo,
        "impl": impl,
        "env_id": config.env_id,
        "seed": config.seed,
        "steps": steps,
        "final_eval_return": float(results["return"].mean()),
        "final_eval_std": float(results["return"].std()),
        "eval_episodes": config.eval_episodes,
        "steps_per_second": session_steps / train_seconds if session_steps else None,
        "wall_seconds": wall_seconds,
        "episodes": len(episodes),
        "mean_last_10_train_returns": float(np.mean(episodes[-10:])) if episodes else None,
    }
    if "ema_return" in results:
        summary["final_ema_eval_return"] = float(results["ema_return"].mean())
    # NaN or infinite returns (the weights diverged) are written as null in summary.json.
    summary["diverged"] = not all(np.isfinite(r).all() for r in results.values()) or not all(
        bool(torch.isfinite(w).all()) for w in weights if w.is_floating_point()
    )
    return summary


class _Run:
    """One training run: the environments, the agent, its replay buffer, the counters and the
    outputs. :meth:`train` is the loop; each of its steps is one method."""

    def __init__(
        self,
        config: AgentConfig,
        run_dir: str | Path | None,
        resume: bool,
        progress: Callable[[int, dict[str, float]], None] | None,
        monitor: Monitor | None,
        monitor_every: int,
        learners: Learners | None = None,
        stop: GracefulStop | None = None,
    ):
        cfg = self.config = config
        # A stop signal while the environments are made stops the run before the next one.
        self.stopping = stop or GracefulStop()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress, self.monitor, self.learners = progress, monitor, learners
        self.rank0 = learners is None or learners.rank == 0
        self.seed = cfg.seed if learners is None else learners.seed(cfg)
        seed_everything(self.seed)
        self.envs = make_envs(cfg.env_id, cfg.num_envs, lambda: self.stopping.requested)
        self.agent = build_agent(cfg, self.envs)
        if learners is not None:
            learners.start(self.agent)
        self.buffer = ReplayBuffer(
            min(cfg.buffer_size, cfg.total_steps),
            self.envs.single_observation_space.shape,
            self.envs.single_action_space.shape,
            self.agent.device,
            action_dtype=torch.int64 if cfg.algo == "dqn" else torch.float32,
            seed=self.seed,
        )
        self.action_space = self.envs.single_action_space
        self.action_space.seed(self.seed)
        self.steps, self.episodes, self.wall_before = 0, [], 0.0
        if resume:
            self.restore()
        self.writer = self.drift = None
        if self.run_dir is not None:
            self.open_outputs(resume)
        # What happens every N environment steps, counted from the run's current step.
        intervals = {
            "train": cfg.train_freq,
            "log_losses": max(cfg.train_freq, 100),
            "sync": cfg.average_every if learners is not None else 0,
            "monitor": monitor_every if monitor is not None else 0,
            "drift": cfg.drift_every if self.drift is not None else 0,
            "evaluate": cfg.eval_every if self.rank0 else 0,
        }
        self.every = {name: Periodic(n, name=name) for name, n in intervals.items() if n}
        for counter in self.every.values():
            counter.step(self.steps)  # the steps done before (by the run that is resumed)
        self.due: set[str] = set()  # what is due at this step
        self.monitored_at: int | None = None
        self.info: dict[str, float] = {}  # for progress(): last return, last evaluation, rate
        self.session_start = time.perf_counter()
        self.session_steps = 0
        self.aside = 0.0  # seconds spent evaluating and checkpointing (not training)
        self.drift_seconds = 0.0
        # Episodes restart on resume; a fresh, deterministic seed per resume point.
        self.obs, _ = self.envs.reset(seed=self.seed + self.steps)

    def restore(self) -> None:
        """Continue from ``run_dir/model.pt``."""
        if self.run_dir is None:
            raise ValueError("resume=True needs the run directory")
        path = self.run_dir / "model.pt"
        saved = load_checkpoint(path, resume=True)
        training = saved["training"]
        with restoring(path):
            self.agent.load_weights(saved["weights"])
            self.agent.load_training_state(training["agent"])
            self.buffer.load_state_dict(training["buffer"])
            set_rng_state(training["rng"])
            self.action_space.np_random.bit_generator.state = training["action_space_rng"]
        self.steps, self.episodes = saved["steps"], list(training["episodes"])
        self.wall_before = training["wall_seconds"]

    def open_outputs(self, resume: bool) -> None:
        """The TensorBoard writer (events past the resumed step are dropped) and the drift
        logger."""
        from torch.utils.tensorboard import SummaryWriter

        # Events of the checkpoint's own step were written before it (the evaluation at that
        # step too): only later ones, which the resumed run writes again, are dropped.
        purge = self.steps + 1 if resume else None
        self.writer = SummaryWriter(str(self.run_dir), purge_step=purge)
        if self.config.drift_every:
            from rlweights.drift import DriftMonitor
            from rlweights.tensorboard import DriftLogger

            drift_monitor = DriftMonitor(*self.agent.drift_pairs)
            self.drift = DriftLogger(self.writer, drift_monitor, config=self.config.to_dict())

    def train(self, stop: GracefulStop) -> tuple[OffPolicyAgent, dict[str, Any]]:
        """The loop: one step of the environments, then each step of the algorithm that is
        due; at the end, the final checkpoint, evaluation and summary."""
        self.stopping = stop
        with stop:
            while self.steps < self.config.total_steps:
                if stop.requested:
                    self.stop()
                self.collect()
                self.run_gradient_steps()
                self.sync_learners()
                self.log()
                self.evaluate_and_checkpoint()
                self.report()
            return self.finish()

    def collect(self) -> None:
        """One step of the vectorised environments: random actions until learning starts,
        then the agent's; the transitions go to the replay buffer, and every counter counts
        the step (``due``: the names of the counters that fired)."""
        cfg = self.config
        if self.steps < cfg.learning_starts:
            actions = np.stack([self.action_space.sample() for _ in range(cfg.num_envs)])
        else:
            obs = torch.as_tensor(self.obs, dtype=torch.float32, device=self.agent.device)
            actions = self.agent.act(obs, self.steps).cpu().numpy()
        next_obs, rewards, terminated, truncated, infos = self.envs.step(actions)
        real_next = next_obs
        done = terminated | truncated
        if done.any():
            real_next = self.end_episodes(next_obs, done, infos)
        self.buffer.add(self.obs, actions, rewards, real_next, terminated)
        self.obs = next_obs
        self.steps += cfg.num_envs
        self.session_steps += cfg.num_envs
        self.due = {name for name, counter in self.every.items() if counter.step(cfg.num_envs)}

    def end_episodes(self, next_obs: np.ndarray, done: np.ndarray, infos: dict) -> np.ndarray:
        """Record the returns of the episodes that ended; the next observations with each
        ended episode's final observation (the vector env has already reset those)."""
        real_next = next_obs.copy()
        for i in np.flatnonzero(done):
            real_next[i] = infos["final_obs"][i]
        final = infos["final_info"]
        for i in np.flatnonzero(final["_episode"]):
            self.episodes.append(float(final["episode"]["r"][i]))
            self.info["return"] = self.episodes[-1]
            if self.writer is not None:
                at = self.steps + self.config.num_envs
                self.writer.add_scalar("charts/episodic_return", self.episodes[-1], at)
                self.writer.add_scalar("charts/episodic_length", final["episode"]["l"][i], at)
        return real_next

    def run_gradient_steps(self) -> None:
        """The agent's per-environment-step routine (DQN's target update), then, once learning
        has started, ``gradient_steps`` gradient steps every ``train_freq`` environment steps."""
        cfg = self.config
        self.agent.on_env_step()
        last = self.steps >= cfg.total_steps  # nothing trains after it: no reset there
        self.plasticity(self.agent.plasticity_step(cfg.num_envs, skip=last))
        if "train" not in self.due or self.steps <= cfg.learning_starts:
            return
        for batch in self.buffer.batches(cfg.gradient_steps, cfg.batch_size):
            losses = self.agent.train_step(batch)
        if self.writer is not None and "log_losses" in self.due:
            for name, value in losses.items():
                self.writer.add_scalar(f"losses/{name}", value.item(), self.steps)

    def plasticity(self, fired: dict[str, list[str]]) -> None:
        """After a reset or shrink-and-perturb: ``plasticity/reset`` (or ``shrink_perturb``)
        is the number of parameter tensors touched, a point on the chart at each event; after
        a reset, the drift charts measure ``init_distance`` from the new initialisation."""
        for kind, names in fired.items():
            if self.writer is not None:
                self.writer.add_scalar(f"plasticity/{kind}", len(names), self.steps)
            if kind == "reset" and self.drift is not None:
                watched = self.drift.monitor.modules
                by_network: dict[str, list[str]] = {}
                for name in names:
                    network, _, tensor = name.partition(".")
                    if network in watched:
                        by_network.setdefault(network, []).append(tensor)
                self.drift.monitor.reset(by_network)

    def sync_learners(self) -> None:
        """Parallel learners: average the weights across them."""
        if "sync" in self.due:
            moved = self.learners.sync_weights()
            if self.writer is not None and moved is not None:
                self.writer.add_scalar("distributed/distance_to_average", moved.item(), self.steps)

    def log(self) -> None:
        """The monitor's measurements and the weight drift, when due."""
        if "monitor" in self.due:
            self.observe()
        if "drift" in self.due:
            tick = time.perf_counter()
            self.drift.log(self.steps)
            self.drift_seconds += time.perf_counter() - tick

    def observe(self) -> None:
        for tag, value in self.monitor(self.steps, self.agent).items():
            if self.writer is not None:
                self.writer.add_scalar(tag, value, self.steps)
        self.monitored_at = self.steps

    def evaluate_and_checkpoint(self) -> None:
        """Every ``eval_every`` environment steps before the end (the end has its own)."""
        if "evaluate" not in self.due or self.steps >= self.config.total_steps:
            return
        tick = time.perf_counter()
        try:
            results = self.evaluate(interruptible=True)
        except KeyboardInterrupt:  # a stop signal: this step's checkpoint, no evaluation
            self.stop()
        self.info["eval"] = float(results["return"].mean())
        self.checkpoint()
        self.aside += time.perf_counter() - tick

    def evaluate(self, interruptible: bool = False) -> dict[str, np.ndarray]:
        """Deterministic episodes of the policy (and of its EMA), with the evaluation seeds;
        ``interruptible``: a stop signal ends it."""
        cfg = self.config
        seed = cfg.seed + EVAL_SEED_OFFSET
        interrupted = (lambda: self.stopping.requested) if interruptible else None
        results = {
            name: evaluate(
                policy, cfg.env_id, cfg.eval_episodes, seed, self.agent.device, interrupted
            )
            for name, policy in self.agent.evaluated_policies().items()
        }
        if self.writer is not None:
            for name, returns in results.items():
                self.writer.add_scalar(f"eval/{name}", float(returns.mean()), self.steps)
        return results

    def checkpoint(self) -> None:
        """``run_dir/model.pt``: the weights and all that a resumed run needs."""
        if self.run_dir is None:
            return
        training = {
            "agent": self.agent.training_state(),
            "buffer": self.buffer.state_dict(),
            "rng": rng_state(),
            "action_space_rng": self.action_space.np_random.bit_generator.state,
            "episodes": self.episodes,
            "wall_seconds": self.wall_before + time.perf_counter() - self.session_start,
        }
        save_checkpoint(
            self.run_dir / "model.pt",
            {
                "algo": self.config.algo,
                "impl": "native",
                "config": self.config.to_dict(),
                "spaces": spaces_of(self.envs),
                "steps": self.steps,
                "weights": self.agent.weights_state(),
                "training": training,
            },
        )

    def report(self) -> None:
        # After a stop signal nothing is drawn: SIGHUP may have closed the terminal.
        if self.progress is not None and not self.stopping.requested:
            elapsed = time.perf_counter() - self.session_start - self.aside
            self.info["steps_per_second"] = self.session_steps / max(elapsed, 1e-9)
            self.progress(self.steps, self.info)

    def stop(self) -> None:
        """A stop signal: checkpoint, close, and raise :class:`Stopped` naming the step."""
        self.checkpoint()
        self.close()
        raise Stopped(self.steps, self.stopping.signum)

    def close(self) -> None:
        self.envs.close()
        if self.writer is not None:
            self.writer.close()

    def finish(self) -> tuple[OffPolicyAgent, dict[str, Any]]:
        """The last monitor call, the final checkpoint (first: a stop signal during the
        evaluation loses nothing), the final evaluation and the summary."""
        train_seconds = time.perf_counter() - self.session_start - self.aside
        if self.monitor is not None and self.monitored_at != self.steps:
            self.observe()
        if not self.rank0:
            self.envs.close()
            summary = {"rank": self.learners.rank, "steps": self.steps}
            return self.agent, summary | {"averages": self.learners.averages}
        self.checkpoint()
        try:
            results = self.evaluate(interruptible=True)
        except KeyboardInterrupt:
            self.close()
            raise Stopped(self.steps, self.stopping.signum, "the final evaluation") from None
        self.envs.close()
        summary = self.summary(results, train_seconds)
        if self.run_dir is not None:
            write_json(self.run_dir / "summary.json", summary)
            self.writer.close()
        return self.agent, summary

    def summary(self, results: dict[str, np.ndarray], train_seconds: float) -> dict[str, Any]:
        summary = run_summary(
            self.config,
            "native",
            self.steps,
            results,
            self.session_steps,
            train_seconds,
            self.wall_before + time.perf_counter() - self.session_start,
            self.episodes,
            [w for net in self.agent.networks.values() for w in net.state_dict().values()],
        )
        summary |= {
            "train_seconds": train_seconds,
            "drift_seconds": self.drift_seconds,
            "gradient_updates": self.agent.gradient_updates,
            "target_updates": int(self.agent.target_routine.updates),
        }
        if self.learners is not None:
            summary.update(processes=self.learners.world, averages=self.learners.averages)
        return summary
