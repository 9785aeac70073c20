"""Weight averaging across processes with ``torch.distributed`` (gloo on CPU, NCCL on GPU).

N learners that train copies of a network and average them every K steps (local SGD,
"model averaging", policy averaging across actors) need one thing from the core: make every
process's weights the mean of all processes' weights, fast. On flat storage
(``rw.flatten_``) that is one ``all_reduce`` per flat buffer, straight into the buffer:

```python
>>> torch.distributed.init_process_group("gloo")      # under torchrun
>>> rw.flatten_(policy)
>>> rw.distributed.broadcast_(policy, src=0)          # start from the same weights
>>> averager = rw.distributed.PeriodicAverager(policy, every=1000)
>>> averager.step()                                   # after each optimizer step

```

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
order; whether a module is flattened on one process and not on another does not matter (the
tensors are reduced in the same groups, in the same order, either way). Every call starts
with one ``all_reduce`` of a single number, in which the processes agree whether any of
them holds a weight set not yet compared with the others' (the first call for a module, a
module reloaded or changed since, a sequence or mapping of tensors); if so, all of them
gather and compare their weight sets (one small gather) and raise
``WeightMismatchError`` on every process naming what differs, instead of
hanging or reducing mismatched buffers. A peer that dies or stops answering makes the
collective fail after the process group's timeout (``init_process_group(timeout=...)``);
that surfaces as ``PeerError``, and the weights of the failed call may then be
partially averaged.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from operator import itemgetter
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
_Signature = tuple[tuple[str, str, str, tuple[int, ...]], ...]


class PeerError(RuntimeError):
    """A collective failed: a peer process died, or did not answer within the timeout."""


# The signature last checked across processes, per module or handle and process group.
_CHECKED: weakref.WeakKeyDictionary[object, dict[int | None, _Signature]] = (
    weakref.WeakKeyDictionary()
)
_LAYOUT_SIGNATURES: weakref.WeakKeyDictionary[FlatWeights, tuple[str, _Signature]] = (
    weakref.WeakKeyDictionary()
)
_ROLES = ("param", "buffer")


def _require_group(op: str, group: Any) -> int:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{op}: torch.distributed is not initialised; launch with torchrun and call "
            "torch.distributed.init_process_group() first"
        )
    return dist.get_world_size(group)


def _members(
    weights: Weights, buffers: BufferMode, op: str
) -> tuple[list[list[Tensor]], list[Tensor], _Signature]:
    """(the tensors to reduce, in groups that are each reduced as one buffer; the flat views
    whose autograd versions to bump afterwards; the signature every process must agree on).

    A group is one (role, device, dtype): the parameters' groups first, then the floating
    buffers', in the order of the tensors. That is exactly a flat layout's buffers, so a
    flattened module gives its flat buffers (reduced where they are) and a module that is not
    flattened the same groups of tensors (reduced through a concatenation): the processes
    run the same collectives either way. The signature lists (name, role, dtype, shape) of
    every tensor in reduction order; cached per layout."""
    check_choice(buffers, ("average", "skip"), "buffers", op)
    roles = _ROLES if buffers == "average" else _ROLES[:1]
    layout = layout_of(weights)
    if layout is not None:
        groups = [g for role in roles for g in layout.groups if g.role == role]
        views = [v for g in groups for v in g.views]
        cached = _LAYOUT_SIGNATURES.get(layout)
        if cached is None or cached[0] != buffers:
            named = [
                (name, g.role, v) for g in groups for name, v in zip(g.names, g.views, strict=True)
            ]
            cached = (buffers, _signed(named))
            _LAYOUT_SIGNATURES[layout] = cached
        return [[g.flat] for g in groups], views, cached[1]
    found, _ = entries(weights, op)
    members = [
        (e.name, "buffer" if e.kind == "buffer" else "param", e.tensor)
        for e in found
        if is_float(e.tensor)
    ]
    grouped = [
        group
        for role in roles
        for group in group_by_device_dtype([m for m in members if m[1] == role], key=itemgetter(2))
    ]
    signature = _signed(m for group in grouped for m in group)
    return [[t for _, _, t in group] for group in grouped], [], signature


def _signed(members: Iterable[tuple[str, str, Tensor]]) -> _Signature:
    return tuple(
        (name, role, str(t.dtype).removeprefix("torch."), tuple(t.shape))
        for name, role, t in members
    )


def _describe(first: _Signature, other: _Signature, rank: int) -> str:
    """What rank ``rank``'s signature ``other`` holds where rank 0's, ``first``, differs."""
    for a, b in zip(first, other, strict=False):
        if a != b:
            return (
                f"rank {rank} has {b[1]} {b[0]!r} {b[2]} {list(b[3])} where rank 0 has "
                f"{a[1]} {a[0]!r} {a[2]} {list(a[3])}"
            )
    if len(other) < len(first):
        return f"rank {rank} lacks rank 0's tensors from {first[len(other)][0]!r} on"
    return f"rank {rank} has tensors that rank 0 lacks, from {other[len(first)][0]!r} on"


def _needs_check(weights: Weights, sig: _Signature, group: Any) -> bool:
    """Whether this process holds a weight set not yet compared with the other processes'
    (sequences and mappings of tensors: always; a module or handle: unless this signature
    was compared in this group before)."""
    owner = weights if isinstance(weights, (nn.Module, FlatWeights)) else None
    key = id(group) if group is not None else None
    return owner is None or _CHECKED.get(owner, {}).get(key) != sig


def _any_process(flag: bool, group: Any, op: str) -> bool:
    """Whether ``flag`` is True on any process of ``group`` (one ``all_reduce`` of one
    number; on the current CUDA device under NCCL, which reduces CUDA tensors only)."""
    nccl = dist.get_backend(group) == dist.Backend.NCCL
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    value = torch.tensor([float(flag)], device=device)
    _collective(op, lambda: dist.all_reduce(value, group=group))  # a sum: > 0 if any
    return bool(value.item() > 0)


def _check_peers(weights: Weights, sig: _Signature, group: Any, op: str) -> None:
    """Compare every process's signature when any process asks for it (``_needs_check``),
    all of them together: a process whose weight set changed never gathers alone while the
    others reduce (which hung every process for the whole timeout). A module's signature is
    remembered once the processes agree on it."""
    if not _any_process(_needs_check(weights, sig, group), group, op):
        return
    gathered: list[Any] = [None] * dist.get_world_size(group)
    _collective(op, lambda: dist.all_gather_object(gathered, sig, group=group))
    rank = dist.get_rank(group)
    wrong = [r for r, other in enumerate(gathered) if other != gathered[0]]
    if wrong:
        raise WeightMismatchError(
            f"{op}: the processes hold different weight sets (this is rank {rank} of "
            f"{len(gathered)}): {_describe(gathered[0], gathered[wrong[0]], wrong[0])}; every "
            "process must average the same architecture, with the same dtypes, nothing written"
        )
    if isinstance(weights, (nn.Module, FlatWeights)):
        key = id(group) if group is not None else None
        _CHECKED.setdefault(weights, {})[key] = sig


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


def _each_group(groups: list[list[Tensor]], call: Callable[[Tensor], None]) -> None:
    """Run the collective ``call`` on each group as one buffer: a single contiguous tensor
    (a flat buffer) where it is, several through a concatenation copied back afterwards."""
    for members in groups:
        if len(members) == 1 and members[0].is_contiguous():
            call(members[0])
            continue
        joined = torch.cat([t.reshape(-1) for t in members])
        call(joined)
        pieces = joined.split([t.numel() for t in members])
        torch._foreach_copy_(members, [p.view_as(t) for p, t in zip(pieces, members, strict=True)])


def all_average_(weights: Weights, group: Any = None, *, buffers: BufferMode = "average") -> None:
    """Replace the weights of every process in ``group`` by their mean over the processes:
    ``w <- (1/N) * sum_r w_r``, in place (Parameter objects kept, autograd versions bumped).

    On flat storage: one ``all_reduce`` per flat buffer, in place. Otherwise one per
    (role, device, dtype) group of tensors, through a temporary concatenation (the same
    collectives). ``buffers="skip"`` leaves floating buffers (BatchNorm statistics) to each
    process.
    """
    op = "all_average_"
    world = _require_group(op, group)
    groups, bump, signature = _members(weights, buffers, op)
    if world == 1:
        return
    _check_peers(weights, signature, group, op)
    with torch.no_grad():
        _each_group(groups, lambda buffer: _reduce_in_place(buffer, group, world, op))
        bump_versions(bump)


def broadcast_(weights: Weights, src: int = 0, group: Any = None) -> None:
    """Copy process ``src``'s weights (parameters and floating buffers) into every process,
    in place: the learners start from the same network. One ``broadcast`` per flat buffer
    (or per (role, device, dtype) group of tensors, as ``all_average_``)."""
    op = "broadcast_"
    world = _require_group(op, group)
    check_int(src, "src (a rank)", op, minimum=0, maximum=world - 1)
    groups, bump, signature = _members(weights, "average", op)
    if world == 1:
        return
    _check_peers(weights, signature, group, op)

    def send(buffer: Tensor) -> None:
        _collective(op, lambda: dist.broadcast(buffer, src=src, group=group))

    with torch.no_grad():
        _each_group(groups, send)
        bump_versions(bump)


class PeriodicAverager(PeriodicRoutine):
    """Average ``weights`` across the processes of ``group`` on every ``every``-th
    ``step`` (call it once per optimizer step, on every process).

    ``state_dict()`` is ``{"counter": <Periodic's state>, "updates": n}``; a state saved
    with another ``every`` is refused, as ``Periodic`` does.
    """

    def __init__(
        self, weights: Weights, every: int, group: Any = None, *, buffers: BufferMode = "average"
    ):
        super().__init__(every)
        _members(weights, buffers, "PeriodicAverager")  # validates the weight set and mode
        self.weights, self.group, self.buffers = weights, group, buffers

    @property
    def calls(self) -> int:
        """Calls of ``step`` counted so far."""
        return self.steps

    def _run(self) -> None:
        all_average_(self.weights, self.group, buffers=self.buffers)

    def __repr__(self) -> str:
        world = dist.get_world_size(self.group) if dist.is_initialized() else "?"
        return (
            f"PeriodicAverager(every={self.every}, processes={world}, calls={self.calls}, "
            f"updates={self.updates})"
        )
