"""``AgentConfig``: the settings every native agent shares; each algorithm's config extends it."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

from rlweights.agents.seeding import MAX_SEED
from rlweights.agents.target_update import TargetUpdateSpec

__all__ = [
    "EVALUATIONS",
    "AgentConfig",
    "Group",
    "exploration_noise",
    "policy_delay",
    "setting",
    "setting_of",
    "split_patterns",
]

Group = Literal["hyperparameters", "weights", "plasticity", "run", "parallel"]
"""The sections of ``rlweights train --help`` a setting's flag is listed under."""


def setting(
    default: Any,
    help: str | None = None,
    *,
    rule: Callable[[Any], bool] | None = None,
    flag: str | None = None,
    metavar: str | None = None,
    group: Group = "hyperparameters",
    sb3: str | None = None,
) -> Any:
    """A config field, written once with all that is said about it: its ``default``; the
    ``rule`` a value must meet (else the config names it among its impossible values); its
    ``rlweights train`` flag (``flag``, by default ``--field-name``; none without ``help``),
    with ``metavar`` and the ``group`` of the help it is listed in; and ``sb3``, the name of
    the SB3 constructor argument that takes its value as it is (``--impl sb3``). A subclass
    that only changes the default redeclares the field plainly (``total_steps: int = 50_000``);
    the rest is read from the class that declared it (``setting_of``)."""
    meta = {"help": help, "rule": rule, "flag": flag, "metavar": metavar, "group": group}
    return dataclasses.field(default=default, metadata={**meta, "sb3": sb3})


def setting_of(cls: type, name: str) -> Mapping[str, Any]:
    """What ``setting`` said about field ``name`` of config class ``cls`` (empty for a
    field declared without it)."""
    for klass in cls.__mro__:
        field = klass.__dict__.get("__dataclass_fields__", {}).get(name)
        if field is not None and field.metadata:
            return field.metadata
    return {}


def _positive(value: int) -> bool:
    return value >= 1


def _at_least_0(value: int) -> bool:
    return value >= 0


def _none_or_positive(value: float | None) -> bool:
    return value is None or value > 0.0


EVALUATIONS = 10
"""Evaluations per run by default. TensorBoard's Scalars dashboard, with its default "ignore
outliers in chart scaling", draws no line for a series of two points: a run needs more."""


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
    total_steps: int = setting(
        20_000,
        "environment steps in total (summed over --num-envs)",
        flag="--steps",
        rule=_positive,
    )
    seed: int = setting(0, rule=lambda v: 0 <= v <= MAX_SEED, sb3="seed")
    num_envs: int = setting(
        1, "environments stepped side by side (gymnasium.vector)", rule=_positive, group="run"
    )
    buffer_size: int = setting(
        1_000_000,
        "replay capacity in transitions (at most --steps)",
        rule=_positive,
        sb3="buffer_size",
    )
    batch_size: int = setting(256, "replay batch size", rule=_positive, sb3="batch_size")
    learning_starts: int = setting(
        100, "random-action steps before learning", rule=_at_least_0, sb3="learning_starts"
    )
    gamma: float = setting(
        0.99, "discount factor", rule=lambda v: 0.0 <= v <= 1.0, metavar="GAMMA", sb3="gamma"
    )
    learning_rate: float = setting(
        1e-3, "Adam learning rate", rule=lambda v: v > 0.0, metavar="LR", sb3="learning_rate"
    )
    hidden: tuple[int, ...] = setting(
        (256, 256),
        "hidden layer sizes, e.g. 256,256",
        rule=lambda v: len(v) >= 1 and all(h >= 1 for h in v),
        metavar="SIZES",
    )
    train_freq: int = setting(1, "env steps between training phases", rule=_positive)
    gradient_steps: int = setting(
        1, "gradient steps per training phase", rule=_positive, sb3="gradient_steps"
    )
    target_update: str = setting(
        "polyak:0.005",
        "polyak:TAU (TAU in [0, 1]) or hard:EVERY; dqn default hard:10, else polyak:0.005",
        metavar="SPEC",
        group="weights",
    )
    policy_ema: float | None = setting(
        None,
        "keep an exponential moving average of the policy with this TAU (0 < TAU <= 1), updated "
        "after every policy step, and evaluate it next to the policy (eval/ema_return)",
        rule=lambda v: v is None or 0.0 < v <= 1.0,
        metavar="TAU",
        group="weights",
    )
    weight_clip: float | None = setting(
        None,
        "clamp weights to [-VALUE, VALUE] after optimizer steps",
        rule=_none_or_positive,
        metavar="VALUE",
        group="weights",
    )
    max_norm: float | None = setting(
        None,
        "rescale each unit's incoming weights to L2 norm <= VALUE after each optimizer step",
        rule=_none_or_positive,
        metavar="VALUE",
        group="weights",
    )
    device: str = setting("cpu", sb3="device")
    drift_every: int = setting(
        1000, "log weight drift every N env steps (0: never)", rule=_at_least_0, group="run"
    )
    # None: EVALUATIONS evaluations (and checkpoints) per run, so that eval/ is a curve.
    eval_every: int | None = setting(
        None,
        "evaluate + checkpoint every N env steps (default: 10 times per run; 0: at the end)",
        rule=lambda v: v is None or v >= 0,
        group="run",
    )
    eval_episodes: int = setting(
        10, "deterministic episodes per evaluation", rule=_positive, metavar="K", group="run"
    )
    average_every: int = setting(
        0,
        "under torchrun --nproc_per_node=N: the N learners average all their networks every K "
        "env steps (rank 0 evaluates, logs and checkpoints)",
        rule=_at_least_0,
        metavar="K",
        group="parallel",
    )
    peer_timeout: int = setting(
        300,
        "with --average-every: how long a learner waits for the others before it stops (300)",
        rule=_positive,
        metavar="SECONDS",
        group="parallel",
    )
    compile: bool = False  # the whole gradient step as one torch.compile graph (agents.compiled)
    cudagraphs: bool = False  # with compile, on CUDA: the compiled step replayed as a CUDA graph
    # Plasticity (rlweights.plasticity), counted in environment steps; patterns are
    # comma-separated globs over "network.parameter" names ("critic.*").
    reset_every: int = setting(
        0,
        "re-initialise the --reset-layers every N env steps (each layer's reset_parameters; "
        "their optimizer state is forgotten, their targets and the policy EMA take the same "
        "weights; 0: never)",
        rule=_at_least_0,
        group="plasticity",
    )
    reset_layers: str | None = setting(
        None,
        "comma-separated globs over NETWORK.PARAMETER names that --reset-every and "
        "--shrink-perturb touch, e.g. 'critic.*' or 'actor.mean.*,critic.weights.2' "
        "(default: every parameter of the trained networks)",
        metavar="PATTERNS",
        group="plasticity",
    )
    shrink_perturb: tuple[float, float] | None = setting(
        None,
        "every --sp-every env steps, theta <- SHRINK * theta + PERTURB * a fresh initialisation "
        "of the --reset-layers (both in [0, 1]; BBF: 0.5,0.5; Ash & Adams: 0.4-0.6, 0.001-0.01)",
        rule=lambda v: v is None or (len(v) == 2 and all(0 <= x <= 1 for x in v)),
        metavar="SHRINK,PERTURB",
        group="plasticity",
    )
    sp_every: int = setting(
        0, "env steps between shrink-and-perturbs", rule=_at_least_0, group="plasticity"
    )
    unit_sphere: str | None = setting(
        None,
        "after every optimizer step, project the units of the weight matrices named by these "
        "comma-separated globs onto the unit sphere (SimbaV2), e.g. 'critic.*'",
        metavar="PATTERNS",
        group="plasticity",
    )

    def __post_init__(self) -> None:
        self.hidden = tuple(self.hidden)
        if self.shrink_perturb is not None:  # a list when read back from config.json
            self.shrink_perturb = tuple(self.shrink_perturb)
        if self.eval_every is None:
            self.eval_every = max(self.total_steps // EVALUATIONS, 1)
        self.checks()

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
        bad = [] if self.env_id else ["env_id"]
        for f in fields(self):
            rule = setting_of(type(self), f.name).get("rule")
            if rule is not None and not rule(getattr(self, f.name)):
                bad.append(f.name)
        if self.cudagraphs and not (self.compile and self.device.startswith("cuda")):
            bad.append("cudagraphs")
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(f"{type(self).__name__}: impossible values: {values}")

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.shrink_perturb is not None:
            data["shrink_perturb"] = list(self.shrink_perturb)
        return {"algo": self.algo, **data, "hidden": list(self.hidden)}


def exploration_noise() -> Any:
    """The setting of TD3's and DDPG's Gaussian exploration noise (the zoo's 0.1)."""
    return setting(
        0.1,
        "std of the Gaussian exploration noise, relative to the action bounds",
        rule=lambda v: v >= 0.0,
        metavar="STD",
    )


def policy_delay(default: int) -> Any:
    """The setting of TD3's and DroQ's policy delay: the actor steps at every ``default``-th
    gradient step (TD3's targets too; DroQ's move at every step). SB3's and SBX's
    ``policy_delay``."""
    return setting(
        default,
        "gradient steps per actor step (td3: and per target update)",
        rule=lambda v: v >= 1,
        sb3="policy_delay",
    )


def split_patterns(text: str | None) -> list[str] | None:
    """Comma-separated globs (``--reset-layers "critic.*,actor.mean.*"``) as a list."""
    if text is None:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]
