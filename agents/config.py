"""``AgentConfig``: the settings every native agent shares; each algorithm's config extends it."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from rlweights.agents.seeding import MAX_SEED
from rlweights.agents.target_update import TargetUpdateSpec

__all__ = ["EVALUATIONS", "AgentConfig", "split_patterns"]


# Evaluations per run by default. TensorBoard's Scalars dashboard, with its default "ignore
# outliers in chart scaling", draws no line for a series of two points: a run needs more.
EVALUATIONS = 10


@dataclass
class AgentConfig:
    """Settings shared by every native agent. Each algorithm's subclass sets its defaults
    (rl-baselines3-zoo's hyperparameters for its default environment) and adds its own.

    Units: ``total_steps``, ``learning_starts``, ``train_freq``, ``eval_every`` and
    ``drift_every`` count environment steps summed over the vectorised environments;
    ``gradient_steps`` gradient steps are done every ``train_freq`` environment steps.
    """

    algo: ClassVar[str] = ""
    env_id: str = ""
    total_steps: int = 20_000
    seed: int = 0
    num_envs: int = 1
    buffer_size: int = 1_000_000
    batch_size: int = 256
    learning_starts: int = 100
    gamma: float = 0.99
    learning_rate: float = 1e-3
    hidden: tuple[int, ...] = (256, 256)
    train_freq: int = 1
    gradient_steps: int = 1
    target_update: str = "polyak:0.005"  # the spec: "polyak:TAU" or "hard:EVERY"
    policy_ema: float | None = None  # tau of an EMA of the policy, evaluated next to it
    weight_clip: float | None = (
        None  # clamp weights to [-weight_clip, weight_clip] after each optimizer step
    )
    max_norm: float | None = None  # per-unit max-norm after each optimizer step
    device: str = "cpu"
    drift_every: int = 1000  # 0 disables drift logging
    # None: EVALUATIONS evaluations (and checkpoints) per run, so that eval/ is a curve; 0:
    # evaluate only at the end.
    eval_every: int | None = None
    eval_episodes: int = 10
    average_every: int = 0  # >0: torchrun learners average their weights every N env steps
    peer_timeout: int = 300  # seconds a learner waits for the others before it gives up
    compile: bool = False  # the whole gradient step as one torch.compile graph (agents.compiled)
    cudagraphs: bool = False  # with compile, on CUDA: the compiled step replayed as a CUDA graph
    # Plasticity (rlweights.plasticity), counted in environment steps: re-initialise the
    # reset layers every reset_every steps; shrink-and-perturb them every sp_every steps;
    # project the unit_sphere weights onto the unit sphere after every optimizer step.
    # Patterns: comma-separated globs over "network.parameter" names ("critic.*").
    reset_every: int = 0
    reset_layers: str | None = None  # None: every parameter of the trained networks
    shrink_perturb: tuple[float, float] | None = None  # (shrink, perturb), with sp_every
    sp_every: int = 0
    unit_sphere: str | None = None

    def __post_init__(self) -> None:
        self.hidden = tuple(self.hidden)
        if self.shrink_perturb is not None:  # a list when read back from config.json
            self.shrink_perturb = tuple(self.shrink_perturb)
        if self.eval_every is None:
            self.eval_every = max(self.total_steps // EVALUATIONS, 1)
        self.checks()

    def _rules(self) -> dict[str, bool]:
        return {
            "env_id": bool(self.env_id),
            "total_steps": self.total_steps >= 1,
            "seed": 0 <= self.seed <= MAX_SEED,
            "num_envs": self.num_envs >= 1,
            "buffer_size": self.buffer_size >= 1,
            "batch_size": self.batch_size >= 1,
            "learning_starts": self.learning_starts >= 0,
            "gamma": 0.0 <= self.gamma <= 1.0,
            "learning_rate": self.learning_rate > 0.0,
            "hidden": len(self.hidden) >= 1 and all(h >= 1 for h in self.hidden),
            "train_freq": self.train_freq >= 1,
            "gradient_steps": self.gradient_steps >= 1,
            "policy_ema": self.policy_ema is None or 0.0 < self.policy_ema <= 1.0,
            "weight_clip": self.weight_clip is None or self.weight_clip > 0.0,
            "max_norm": self.max_norm is None or self.max_norm > 0.0,
            "drift_every": self.drift_every >= 0,
            "eval_every": self.eval_every >= 0,
            "eval_episodes": self.eval_episodes >= 1,
            "average_every": self.average_every >= 0,
            "peer_timeout": self.peer_timeout >= 1,
            "cudagraphs": not self.cudagraphs or (self.compile and self.device.startswith("cuda")),
            "reset_every": self.reset_every >= 0,
            "sp_every": self.sp_every >= 0,
            "shrink_perturb": self.shrink_perturb is None
            or (len(self.shrink_perturb) == 2 and all(0 <= x <= 1 for x in self.shrink_perturb)),
        }

    def checks(self) -> None:
        TargetUpdateSpec.parse(self.target_update)
        infinite = [
            f"{f.name}={value!r}"
            for f in fields(self)
            if isinstance(value := getattr(self, f.name), float) and not math.isfinite(value)
        ]
        if infinite:
            raise ValueError(
                f"{type(self).__name__}: {', '.join(infinite)}: hyperparameters must be finite "
                "numbers"
            )
        if (self.shrink_perturb is None) != (self.sp_every == 0):
            raise ValueError(
                f"{type(self).__name__}: shrink_perturb={self.shrink_perturb!r} and "
                f"sp_every={self.sp_every!r}: shrink-and-perturb needs both "
                "(--shrink-perturb SHRINK,PERTURB --sp-every N)"
            )
        if self.reset_layers is not None and not (self.reset_every or self.sp_every):
            raise ValueError(
                f"{type(self).__name__}: --reset-layers {self.reset_layers!r} chooses what "
                "--reset-every and --shrink-perturb touch: give one of them with it"
            )
        for flag, text in (
            ("--reset-layers", self.reset_layers),
            ("--unit-sphere", self.unit_sphere),
        ):
            if text is not None and not split_patterns(text):
                raise ValueError(
                    f"{type(self).__name__}: {flag} {text!r} names no pattern: give "
                    "comma-separated globs such as 'critic.*' or 'actor.mean.*'"
                )
        bad = [name for name, ok in self._rules().items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(f"{type(self).__name__}: impossible values: {values}")

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.shrink_perturb is not None:
            data["shrink_perturb"] = list(self.shrink_perturb)
        return {"algo": self.algo, **data, "hidden": list(self.hidden)}


def split_patterns(text: str | None) -> list[str] | None:
    """Comma-separated globs (``--reset-layers "critic.*,actor.mean.*"``) as a list."""
    if text is None:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]
