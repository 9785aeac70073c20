"""Target-update specs, ``polyak:TAU`` or ``hard:EVERY``: the one parser behind
``rlweights train --target-update`` (native and ``--impl sb3``) and ``rlweights demo``, and the
rlweights routine a spec stands for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import rlweights as rw
from rlweights.checks import check_choice, check_fraction, check_int
from rlweights.weights import Weights

__all__ = ["TargetUpdateSpec"]


@dataclass(frozen=True)
class TargetUpdateSpec:
    """How a target network follows its online network, at each of the algorithm's update
    points (SB3's; the table is in ``rlweights.sb3.patching``).

    ``polyak:TAU`` lerps the target toward the online network by ``TAU`` in [0, 1] at every
    update point; ``hard:EVERY`` copies it at every ``EVERY``-th one. ``tau`` and ``every``
    are SB3's ``tau`` and ``target_update_interval``: a hard copy has ``tau=1``, a Polyak
    update ``every=1``.

    ```python
    >>> TargetUpdateSpec.parse("hard:250")
    TargetUpdateSpec(kind='hard', tau=1.0, every=250)

    ```
    """

    kind: Literal["polyak", "hard"]
    tau: float = 1.0
    every: int = 1

    def __post_init__(self) -> None:
        check_choice(self.kind, ("polyak", "hard"), "kind", "TargetUpdateSpec")
        check_fraction(self.tau, "tau", "TargetUpdateSpec")
        check_int(self.every, "every", "TargetUpdateSpec")

    @classmethod
    def parse(cls, text: str) -> TargetUpdateSpec:
        """``"polyak:TAU"`` or ``"hard:EVERY"``; anything else raises ``ValueError``."""
        kind, _, value = text.partition(":")
        try:
            if kind == "polyak":
                return cls("polyak", tau=float(value))
            if kind == "hard":
                return cls("hard", every=int(value))
        except ValueError:
            pass
        raise ValueError(
            f"target_update must be 'polyak:TAU' with TAU in [0, 1] or 'hard:EVERY' with an "
            f"integer EVERY >= 1, got {text!r}"
        )

    def routine(
        self,
        source: Weights | None = None,
        target: Weights | None = None,
        *,
        steps_per_call: int = 1,
        capturable: bool = False,
    ) -> rw.PolyakUpdate | rw.HardUpdate:
        """The rlweights routine moving ``target`` toward ``source`` (without them: a template,
        as ``rlweights.sb3.attach`` takes).

        ``steps_per_call``: how many counted steps one ``step()`` call stands for (DQN steps
        its routine once per step of ``num_envs`` environments, while ``EVERY`` counts
        environment steps); ``EVERY`` is divided by it, to at least 1, as SB3 does.
        ``capturable``: the routine's capturable form (``rlweights train --compile``).
        """
        if self.kind == "polyak":
            return rw.PolyakUpdate(
                source, target, tau=self.tau, every=self.every, capturable=capturable
            )
        every = max(self.every // check_int(steps_per_call, "steps_per_call", "routine"), 1)
        return rw.HardUpdate(source, target, every=every, capturable=capturable)
