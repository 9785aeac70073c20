"""The networks the benchmarks share: sizes a practitioner meets, from a SAC critic to a
network large enough that every implementation is memory-bound."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

__all__ = ["MODELS", "mlp_16m", "nature_dqn", "sac_critic"]


def sac_critic() -> nn.Module:
    """SAC's twin Q-network for HalfCheetah (obs 17 + action 6): 144k parameters, 12 tensors."""
    from torch import nn  # here and below: the commands' --help starts without torch

    def q() -> nn.Module:
        return nn.Sequential(
            nn.Linear(23, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1)
        )

    return nn.ModuleList([q(), q()])


def nature_dqn() -> nn.Module:
    """The Nature-DQN CNN on 4x84x84 frames with 18 actions: 1.7M parameters."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(4, 32, 8, stride=4),
        nn.ReLU(),
        nn.Conv2d(32, 64, 4, stride=2),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3136, 512),
        nn.ReLU(),
        nn.Linear(512, 18),
    )


def mlp_16m() -> nn.Module:
    """A wide MLP of 16.8M parameters, where every implementation is memory-bound."""
    from torch import nn

    sizes = [1024, 2048, 2048, 2048, 2048, 1024]
    layers: list[nn.Module] = []
    for n_in, n_out in itertools.pairwise(sizes):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


MODELS: dict[str, Callable[[], nn.Module]] = {
    "sac_critic": sac_critic,
    "nature_dqn": nature_dqn,
    "mlp_16m": mlp_16m,
}
