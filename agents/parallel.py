"""Parallel learners that average their weights: ``rlweights train --average-every K`` under
``torchrun --nproc_per_node=N``.

Each of the N processes is a full learner (its own environments, seeds, replay buffer and
optimizer state); they start from rank 0's networks and, every K environment steps, replace
every network (policy, critics, their targets, the policy EMA, SAC's temperature) by the
mean over the learners with ``rlweights.distributed.all_average_``: one ``all_reduce``
per flat buffer. Optimizer state stays with each learner (post-local SGD). Rank 0 evaluates,
logs and checkpoints; the other ranks write nothing.

The process group is gloo on CPU and NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``), with
the config's ``peer_timeout``: a learner that dies or stops answering makes the others stop
with ``rlweights.distributed.PeerError`` instead of waiting forever.
"""

from __future__ import annotations

import importlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

import rlweights as rw
from rlweights.agents.agent import OffPolicyAgent
from rlweights.agents.config import AgentConfig

__all__ = ["Learners", "launched_ranks"]

SEED_STRIDE = 100_000  # rank r seeds everything with seed + r * SEED_STRIDE


def launched_ranks() -> int:
    """The number of processes torchrun started (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class Learners:
    """The process group of one parallel run, and the averaging of one agent's weights."""

    def __init__(self, config: AgentConfig):
        self.every = config.average_every
        self.owns_group = False
        if not dist.is_initialized():
            if launched_ranks() < 2:
                raise ValueError(
                    f"average_every={self.every} needs several learners: launch with "
                    "torchrun --nproc_per_node=N -m rlweights train ... --average-every K"
                )
            # Imported after init_process_group, torch._dynamo (which the agents import)
            # brings torch.distributed._shard, whose import keeps a reference to the default
            # group: its gloo threads then outlive destroy_process_group() and abort the
            # process at exit (SIGABRT, "terminate called without an active exception").
            importlib.import_module("torch._dynamo")
            cuda = torch.device(config.device).type == "cuda"
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(
                "nccl" if cuda else "gloo", timeout=timedelta(seconds=config.peer_timeout)
            )
            self.owns_group = True
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.averages = 0
        self._units: list[nn.Module] = []

    def seed(self, config: AgentConfig) -> int:
        return config.seed + self.rank * SEED_STRIDE

    def start(self, agent: OffPolicyAgent) -> None:
        """Every learner takes rank 0's networks."""
        extras = nn.Module()
        for i, tensor in enumerate(agent.averaged_tensors()):
            extras.register_buffer(f"tensor{i}", tensor)  # the same tensor object, no copy
        self._units = [*agent.flat_units, extras]
        for unit in self._units:
            rw.distributed.broadcast_(unit, src=0)

    def sync_weights(self) -> Tensor | None:
        """Average every network across the learners. On rank 0, returns the L2 distance its
        weights (all networks) moved (how far the learners had drifted apart), else None."""
        before = None
        if self.rank == 0:
            before = [p.detach().clone() for unit in self._units for p in unit.parameters()]
        for unit in self._units:
            rw.distributed.all_average_(unit)
        self.averages += 1
        if before is None:
            return None
        after = [p.detach() for unit in self._units for p in unit.parameters()]
        return rw.distance(before, after)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
