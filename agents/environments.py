"""Making the vectorised Gymnasium environments of a run, the checks on their spaces, and the
routing of MuJoCo's warnings."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import gymnasium as gym

import rlweights.envs as _rlweights_envs  # noqa: F401  (registers the rlweights/ environments)

__all__ = ["check_flat_observations", "make_envs", "route_mujoco_warnings", "spaces_of"]


def check_flat_observations(env_id: str, observation_space: gym.Space) -> None:
    """The native agents use MLPs: observations must be a Box vector."""
    if not isinstance(observation_space, gym.spaces.Box) or len(observation_space.shape) != 1:
        raise ValueError(
            f"the native agents take vector observations (a 1-D Box), but {env_id} has "
            f"{observation_space}; flatten them with a gymnasium wrapper first"
        )


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


def spaces_of(envs: Any) -> dict[str, str]:
    """The observation and action space of one environment, as text (kept in checkpoints:
    a run resumes only where its environment has the same spaces). ``envs``: a Gymnasium
    environment, a Gymnasium vector environment or an SB3 VecEnv."""
    single = getattr(envs, "single_observation_space", None) is not None
    return {
        "observation": str(envs.single_observation_space if single else envs.observation_space),
        "action": str(envs.single_action_space if single else envs.action_space),
    }
