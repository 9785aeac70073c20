"""Optional dependencies. The core needs torch and numpy only; the rest comes with extras:

* ``sb3``: Stable-Baselines3 and Gymnasium (``rlweights.sb3``, ``rlweights train --impl sb3``);
* ``tensorboard``: TensorBoard (``rlweights.tensorboard``, drift in TensorBoard);
* ``agents``: what the native agents and the ``rlweights train`` command need (Gymnasium,
  TensorBoard, tqdm);
* ``mujoco``: Gymnasium's MuJoCo environments;
* ``box2d``: Gymnasium's Box2D environments (LunarLander, BipedalWalker);
* ``all``: everything above; ``dev``: everything and the test tools.

A feature whose extra is missing raises ``MissingExtraError`` naming the extra to
install, in one line; the ``rlweights`` command prints it and exits with status 2.
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRA_OF", "MissingExtraError", "missing_extra", "require"]


class MissingExtraError(ImportError):
    """A feature needs a package that comes with one of rlweights' extras."""


def require(module: str, extra: str, feature: str) -> None:
    """Raise ``MissingExtraError`` unless ``module`` can be imported."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a stub in sys.modules
        found = False
    if not found:
        raise MissingExtraError(
            f"{feature} needs {module.split('.')[0]}, which comes with the '{extra}' extra: "
            f"pip install 'rlweights[{extra}]'",
            name=module,
        )


# The top-level package behind each extra, for naming the extra when an import fails.
EXTRA_OF = {
    "stable_baselines3": "sb3",
    "sb3_contrib": "contrib",
    "gymnasium": "agents",
    "tqdm": "agents",
    "tensorboard": "tensorboard",
    "mujoco": "mujoco",
    "Box2D": "box2d",
    "pygame": "box2d",
    "sbx": "bench",
    "jax": "bench",
}


def missing_extra(exc: ImportError) -> str | None:
    """One line naming the extra to install, if ``exc`` is a missing optional package."""
    if isinstance(exc, MissingExtraError):
        return str(exc)
    package = (exc.name or "").split(".")[0]
    extra = EXTRA_OF.get(package)
    if extra is None or not isinstance(exc, ModuleNotFoundError):
        return None
    return (
        f"this needs {package}, which comes with the '{extra}' extra: "
        f"pip install 'rlweights[{extra}]'"
    )
