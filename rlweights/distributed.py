"""Weight averaging across processes with ``torch.distributed`` (gloo on CPU, NCCL on GPU).

N learners that train copies of a network and average them every K steps (local SGD,
"model averaging", policy averaging across actors) need one thing from the core: make every
process's weights the mean of all processes' weights, fast. On flat storage
(``rw.flatten_``) that is one ``all_reduce`` per flat buffer, straight into the buffer:

>>> torch.distributed.init_process_group("gloo")      # under torchrun
>>> rw.flatten_(policy)
>>> rw.distributed.broadcast_(policy, src=0)          # start from the same weights
>>> averager = rw.distributed.PeriodicAverager(policy, every=1000)
>>> averager.step()                                   # after each optimizer step

PyTorch's own ``torch.distributed.algorithms.model_averaging.utils.average_parameters``
concatenates all parameters into a new buffer, reduces it and copies the result back at
every call; here the flat buffer is reduced in place (no concatenation, no copy back).
Modules that are not flattened take that route too (one reduction per (device, dtype)
group), so every weight set works.

What is averaged: the floating parameters, and the floating buffers (BatchNorm running
statistics) unless ``buffers="skip"``; integer buffers (``num_batches_tracked``) are left to
each process. Optimizer state is not averaged (each learner keeps its Adam moments, as in
post-local SGD); after a large jump, ``rw.reset_optimizer_state_`` forgets them.

Every process must call with the same weight set (same names, shapes, dtypes) in the same
order. The first call for a module checks that across processes (one small gather;
sequences and mappings of tensors are checked at every call) and raises
:class:`~rlweights.WeightMismatchError` on every process naming what differs, instead of
hanging or reducing mismatched buffers. A peer that dies or stops answering makes the
collective fail after the process group's timeout (``init_process_group(timeout=...)``);
that surfaces as :class:`PeerError`, and the weights of the failed call may then be
partially averaged.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rlweights.checks import check_choice, check_int
from rlweights.flat import FlatWeights, bump_versions, layout_of
from rlweights.periodic import PeriodicRoutine
from rlweights.weights import (
    WeightMismatchError,
    Weights,
    entries,
    group_by_device_dtype,
    is_float,
)

__all__ = ["PeerError", "PeriodicAverager", "all_average_", "broadcast_"]

BufferMode = Literal["average", "skip"]
_Signature = tuple[tuple[str, str, tuple[int, ...]], ...]


class PeerError(RuntimeError):
    """A collective failed: a peer process died, or did not answer within the timeout."""


# The signature last checked across processes, per module or handle and process group.
_CHECKED: weakref.WeakKeyDictionary[object, dict[int | None, _Signature]] = (
    weakref.WeakKeyDictionary()
)
_LAYOUT_SIGNATURES: weakref.WeakKeyDictionary[FlatWeights, tuple[str, _Signature]] = (
    weakref.WeakKeyDictionary()
)


def _require_group(op: str, group: Any) -> int:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{op}: torch.distributed is not initialised; launch with torchrun and call "
            "torch.distributed.init_process_group() first"
        )
    return dist.get_world_size(group)


def _members(
    weights: Weights, buffers: BufferMode, op: str
) -> tuple[list[Tensor], list[Tensor], _Signature]:
    """(the tensors to reduce, the flat views whose autograd versions to bump afterwards,
    the signature every process must agree on).

    Flat layouts give their buffers; otherwise the floating tensors, one by one. The
    signature lists (name, dtype, shape) of every tensor averaged in reduction order, and
    whether they are reduced as flat buffers or as tensors; cached per layout."""
    check_choice(buffers, ("average", "skip"), "buffers", op)
    layout = layout_of(weights)
    if layout is not None:
        roles = ("param", "buffer") if buffers == "average" else ("param",)
        groups = [g for role in roles for g in layout.groups if g.role == role]
        views = [v for g in groups for v in g.views]
        cached = _LAYOUT_SIGNATURES.get(layout)
        if cached is None or cached[0] != buffers:
            names = [name for g in groups for name in g.names]
            cached = (buffers, _signed(zip(names, views, strict=True), "flat"))
            _LAYOUT_SIGNATURES[layout] = cached
        return [g.flat for g in groups], views, cached[1]
    found, _ = entries(weights, op)
    members = [
        (e.name, e.tensor)
        for e in found
        if is_float(e.tensor) and (e.kind != "buffer" or buffers == "average")
    ]
    return [t for _, t in members], [], _signed(members, "tensors")


def _signed(members: Iterable[tuple[str, Tensor]], kind: str) -> _Signature:
    return tuple(
        (f"{name} ({kind})", str(t.dtype).removeprefix("torch."), tuple(t.shape))
        for name, t in members
    )


def _describe(mine: _Signature, theirs: _Signature) -> str:
    if len(mine) != len(theirs):
        return f"{len(theirs)} entries instead of {len(mine)}"
    for a, b in zip(mine, theirs, strict=True):
        if a != b:
            return f"{b[0]} {b[1]} {list(b[2])} where this process has {a[0]} {a[1]} {list(a[2])}"
    return "a different layout"


def _check_peers(weights: Weights, sig: _Signature, group: Any, op: str) -> None:
    """Gather every process's signature and compare; once per module (or handle) and group
    while its signature stays the same, at every call for sequences and mappings."""
    owner = weights if isinstance(weights, (nn.Module, FlatWeights)) else None
    key = id(group) if group is not None else None
    if owner is not None and _CHECKED.get(owner, {}).get(key) == sig:
        return
    gathered: list[Any] = [None] * dist.get_world_size(group)
    _collective(op, lambda: dist.all_gather_object(gathered, sig, group=group))
    rank = dist.get_rank(group)
    wrong = [r for r, other in enumerate(gathered) if other != gathered[0]]
    if wrong:
        other = wrong[0]
        raise WeightMismatchError(
            f"{op}: the processes hold different weight sets (rank {rank} of "
            f"{len(gathered)}): rank {other} has {_describe(gathered[0], gathered[other])} "
            f"compared with rank 0; every process must average the same architecture"
        )
    if owner is not None:
        _CHECKED.setdefault(owner, {})[key] = sig


def _collective(op: str, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except RuntimeError as exc:  # DistBackendError and the backends' other errors
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        rank = dist.get_rank() if dist.is_initialized() else "?"
        raise PeerError(
            f"{op}: the collective failed on rank {rank}: a peer process died or did not "
            f"answer within the process group's timeout ({reason})"
        ) from exc


def _reduce_in_place(buffer: Tensor, group: Any, world: int, op: str) -> None:
    if dist.get_backend(group) == dist.Backend.NCCL:
        _collective(op, lambda: dist.all_reduce(buffer, op=dist.ReduceOp.AVG, group=group))
    else:  # gloo has no AVG
        _collective(op, lambda: dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group))
        buffer.div_(world)


def all_average_(weights: Weights, group: Any = None, *, buffers: BufferMode = "average") -> None:
    """Replace the weights of every process in ``group`` by their mean over the processes:
    ``w <- (1/N) * sum_r w_r``, in place (Parameter objects kept, autograd versions bumped).

    On flat storage: one ``all_reduce`` per flat buffer, in place. Otherwise one per
    (device, dtype) group of tensors, through a temporary concatenation. ``buffers="skip"``
    leaves floating buffers (BatchNorm statistics) to each process.
    """
    op = "all_average_"
    world = _require_group(op, group)
    tensors, bump, signature = _members(weights, buffers, op)
    _check_peers(weights, signature, group, op)
    if world == 1 or not tensors:
        return
    with torch.no_grad():
        if bump:  # flat buffers: reduced where they are
            for flat in tensors:
                _reduce_in_place(flat, group, world, op)
            bump_versions(bump)
            return
        for members in group_by_device_dtype(tensors):
            if len(members) == 1 and members[0].is_contiguous():
                _reduce_in_place(members[0], group, world, op)
                continue
            joined = torch.cat([t.reshape(-1) for t in members])
            _reduce_in_place(joined, group, world, op)
            pieces = joined.split([t.numel() for t in members])
            torch._foreach_copy_(
                members, [p.view_as(t) for p, t in zip(pieces, members, strict=True)]
            )


def broadcast_(weights: Weights, src: int = 0, group: Any = None) -> None:
    """Copy process ``src``'s weights (parameters and floating buffers) into every process,
    in place: the learners start from the same network."""
    op = "broadcast_"
    world = _require_group(op, group)
    check_int(src, "src (a rank)", op, minimum=0, maximum=world - 1)
    tensors, bump, signature = _members(weights, "average", op)
    _check_peers(weights, signature, group, op)
    if world == 1:
        return
    with torch.no_grad():
        for t in tensors:
            if t.is_contiguous():
                _collective(op, lambda t=t: dist.broadcast(t, src=src, group=group))
            else:
                tmp = t.contiguous()
                _collective(op, lambda tmp=tmp: dist.broadcast(tmp, src=src, group=group))
                t.copy_(tmp)
        bump_versions(bump)


class PeriodicAverager(PeriodicRoutine):
    """Average ``weights`` across the processes of ``group`` on every ``every``-th
    :meth:`step` (call it once per optimizer step, on every process).

    ``state_dict()`` is ``{"counter": <Periodic's state>, "updates": n}``; a state saved
    with another ``every`` is refused, as :class:`~rlweights.periodic.Periodic` does.
    """

    def __init__(
        self, weights: Weights, every: int, group: Any = None, *, buffers: BufferMode = "average"
    ):
        super().__init__(every)
        _members(weights, buffers, "PeriodicAverager")  # validates the weight set and mode
        self.weights, self.group, self.buffers = weights, group, buffers

    @property
    def calls(self) -> int:
        """Calls of :meth:`step` counted so far."""
        return self.steps

    def _run(self) -> None:
        all_average_(self.weights, self.group, buffers=self.buffers)

    def __repr__(self) -> str:
        world = dist.get_world_size(self.group) if dist.is_initialized() else "?"
        return (
            f"PeriodicAverager(every={self.every}, processes={world}, calls={self.calls}, "
            f"updates={self.updates})"
        )
