"""The checkpoint format of ``rlweights train``: ``model.pt`` written atomically with a checksum,
read with ``weights_only=True`` (no code in a file ever runs), every restored value checked
before anything is written, and the config a checkpoint was written with."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import types
import typing
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rlweights.agents.config import AgentConfig
from rlweights.agents.registry import ALGOS, make_config
from rlweights.files import atomic_write, checksum_matches, sealed

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "RESUMABLE_VERSIONS",
    "CheckpointError",
    "UnverifiedCheckpointWarning",
    "checkpoint_steps",
    "config_from_checkpoint",
    "load_checkpoint",
    "restoring",
    "save_checkpoint",
]


CHECKPOINT_FORMAT = "rlweights-agent"
"""The ``format`` entry of every checkpoint ``rlweights train`` writes: a file without it is not
one of its checkpoints."""


CHECKPOINT_VERSION = 3
"""The version of the checkpoints written now. Version 2: the routines' states in the one counter
format of rlweights.periodic. Version 3: the config's weight clamp is ``weight_clip`` (was
``clip``) and the replay buffer's terminal flags ``terminated`` (were ``dones``); a version 2
checkpoint is read with those names changed and resumes. Version 1 checkpoints load for
evaluation only."""


RESUMABLE_VERSIONS = (2, 3)
"""The checkpoint versions ``--resume`` continues from (older ones evaluate only)."""


# Names a version 2 file gives what version 3 names otherwise (config field, buffer field).
_RENAMED_IN_3 = {"config": {"clip": "weight_clip"}, "buffer": {"dones": "terminated"}}


class CheckpointError(ValueError):
    """A file that is not a readable rlweights checkpoint (corrupt, foreign, wrong version)."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint of a format written before checksums: a change to it cannot be told."""


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
    a run. Raises ``CheckpointError``."""
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
    run) becomes a ``CheckpointError`` naming ``path``, in one line."""
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
    The config itself is checked by ``config_from_checkpoint``."""

    def impossible(what: str, value: Any, rule: str) -> CheckpointError:
        shown = repr(value)
        shown = shown if len(shown) <= 40 else f"{shown[:40]}..."
        return CheckpointError(f"{path}: {what}={shown} is impossible ({rule})")

    if state.get("algo") not in ALGOS:
        raise impossible("algo", state.get("algo"), f"one of {', '.join(ALGOS)}")
    if state.get("impl") not in ("native", "sb3", "sbx"):
        raise impossible("impl", state.get("impl"), "native, sb3 or sbx")
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


def _check_env_from_file(env_id: Any, env: str | None, where: str) -> None:
    """Raise ``CheckpointError`` if the environment id ``env_id`` read from a file
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
    ``_check_env_from_file``)."""
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
    """Raise ``CheckpointError`` naming a saved config value whose type is not its
    field's (the command line parses each flag to its type; a file may hold anything)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in saved and not _fits(saved[field.name], hints[field.name]):
            raise CheckpointError(
                f"{where}: its config has {field.name}={saved[field.name]!r:.40}, not of the "
                f"field's type ({hints[field.name]})"
            )
