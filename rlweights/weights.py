"""Weight sets: resolving what the user passes into matched, validated pairs of tensors.

A *weight set* is an ``nn.Module`` (its parameters without duplicates, so tied weights count
once, then its buffers, matched **by name**), a mapping of names to tensors (a ``state_dict``,
matched by name), a sequence of tensors (matched **by position**), a single tensor, or the
``FlatWeights`` handle returned by ``rlweights.flatten_``.

Everything here runs before any op writes: a bad call raises and leaves every tensor untouched.
"""

from __future__ import annotations

import fnmatch
import itertools
import weakref
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias, TypeVar

import torch
from torch import Tensor, nn

from rlweights.registration import GENERATION, install_hooks, overwrites_params

__all__ = [
    "Entry",
    "ModuleHandle",
    "NonFiniteError",
    "WeightMismatchError",
    "Weights",
    "check_apart",
    "check_no_overlap",
    "check_writable",
    "entries",
    "group_by_device_dtype",
    "is_float",
    "match",
    "module_entries",
    "select",
]


class ModuleHandle:
    """Base of handles that stand for a module's weights (``rlweights.FlatWeights``):
    an op given a handle acts on ``handle.module``."""

    @property
    def module(self) -> nn.Module:
        raise NotImplementedError


Weights: TypeAlias = nn.Module | Tensor | Iterable[Tensor] | Mapping[str, Tensor] | ModuleHandle
"""Anything an op accepts as a set of weights."""

Kind = Literal["param", "buffer", "state", "tensor"]

_MAX_LISTED = 6


class WeightMismatchError(ValueError):
    """Two weight sets cannot be paired: names, counts, shapes, dtypes or devices differ.

    The message names the offending tensors and what differs. Nothing was written.
    """


class NonFiniteError(ValueError):
    """A source holds NaN or infinite values and the op was asked to refuse them.

    Raised with ``nonfinite="raise"``; nothing was written.
    """


@dataclass(slots=True)
class Entry:
    """One named tensor of a weight set; ``kind`` says where it came from."""

    name: str
    tensor: Tensor
    kind: Kind


def _listing(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def entries(weights: Weights, what: str = "weights") -> tuple[list[Entry], bool]:
    """The tensors of a weight set, in order, and whether they are matched by name.

    ``what`` names the argument in error messages (``"target"``, ``"sources[2]"``, ...).
    """
    if isinstance(weights, ModuleHandle):
        weights = weights.module
    if isinstance(weights, nn.Module):
        return cached_module_entries(weights), True
    if isinstance(weights, Tensor):
        return [Entry("0", weights, "tensor")], False
    if isinstance(weights, Mapping):
        found = []
        for name, value in weights.items():
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"{what}[{name!r}] is a {type(value).__name__}, not a tensor: a mapping "
                    "weight set must map names to tensors (a state_dict)."
                )
            found.append(Entry(str(name), value, "state"))
        return found, True
    if isinstance(weights, Iterable) and not isinstance(weights, (str, bytes)):
        found = []
        for i, value in enumerate(weights):
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"{what}[{i}] is a {type(value).__name__}, not a tensor: pass an nn.Module, "
                    "a sequence of tensors, a state_dict or the handle of rw.flatten_."
                )
            found.append(Entry(str(i), value, "tensor"))
        return found, False
    raise TypeError(
        f"{what} is a {type(weights).__name__}: expected an nn.Module, a tensor, a sequence of "
        "tensors, a mapping of names to tensors (state_dict) or the handle of rw.flatten_."
    )


def module_entries(module: nn.Module) -> list[Entry]:
    """``named_parameters()`` then ``named_buffers()`` (duplicates removed), in one walk."""
    params, buffers, seen = [], [], set()
    for prefix, sub in module.named_modules():
        dot = prefix + "." if prefix else ""
        for name, p in sub._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                params.append(Entry(dot + name, p, "param"))
        for name, b in sub._buffers.items():
            if b is not None and id(b) not in seen:
                seen.add(id(b))
                buffers.append(Entry(dot + name, b, "buffer"))
    return params + buffers


_ENTRIES: weakref.WeakKeyDictionary[nn.Module, tuple[int, list[Entry]]]
_ENTRIES = weakref.WeakKeyDictionary()


def cached_module_entries(module: nn.Module) -> list[Entry]:
    """``module_entries``, remembered until any module registers a tensor or submodule.

    Only *which* tensors a module holds is cached; shapes, dtypes and devices are checked at
    every call by ``match``, so ``.to()`` and casts are always seen.
    """
    install_hooks()
    cached = _ENTRIES.get(module)
    if cached is not None and cached[0] == GENERATION[0] and not overwrites_params():
        return cached[1]
    found = module_entries(module)
    _ENTRIES[module] = (GENERATION[0], found)
    return found


def select(
    found: list[Entry],
    include: str | Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    what: str,
) -> list[Entry]:
    """Keep the entries whose names match an ``include`` glob and no ``exclude`` glob."""
    inc = [include] if isinstance(include, str) else list(include or [])
    exc = [exclude] if isinstance(exclude, str) else list(exclude or [])
    kept = [
        e
        for e in found
        if (not inc or any(fnmatch.fnmatchcase(e.name, p) for p in inc))
        and not any(fnmatch.fnmatchcase(e.name, p) for p in exc)
    ]
    if inc and not kept:
        raise ValueError(
            f"include={include!r} matches no tensor of {what}; its names are "
            f"{_listing(e.name for e in found)} (patterns are shell globs, e.g. 'encoder.*')."
        )
    return kept


def match(
    target: list[Entry],
    target_named: bool,
    source: list[Entry],
    source_named: bool,
    op: str,
    source_what: str = "source",
    writes: bool = True,
) -> list[tuple[Entry, Entry]]:
    """Pair target and source entries (by name when both are named, else by position).

    Raises ``WeightMismatchError`` naming every offending tensor when names, counts,
    shapes, dtypes or devices differ, or (``writes``) when target tensors share memory (with
    each other, within themselves, or with a source) or hold no data (meta tensors).
    """
    if target_named and source_named:
        by_name = {e.name: e for e in source}
        target_names = {e.name for e in target}
        # A state_dict lists tied weights under every name; a module lists them once. A name
        # on one side only is fine when its tensor is the same memory as a matched one.
        target = [e for e in target if e.name in by_name or not _aliases(e, target, by_name)]
        missing = [e.name for e in target if e.name not in by_name]
        extra = [
            e.name
            for e in source
            if e.name not in target_names and not _aliases(e, source, target_names)
        ]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing from {source_what}: {_listing(missing)}")
            if extra:
                parts.append(f"only in {source_what}: {_listing(extra)}")
            raise WeightMismatchError(
                f"{op}: target and {source_what} hold different tensors ({'; '.join(parts)}). "
                "Both must have the same architecture; use include=/exclude= patterns to "
                "transfer part of a network."
            )
        pairs = [(e, by_name[e.name]) for e in target]
    else:
        if len(target) != len(source):
            raise WeightMismatchError(
                f"{op}: target has {len(target)} tensors but {source_what} has {len(source)}; "
                "sequences are matched by position and must have the same length."
            )
        pairs = list(zip(target, source, strict=True))
    problems = []
    for t, s in pairs:
        label = t.name if t.name == s.name else f"{t.name}/{s.name}"
        tt, st = t.tensor, s.tensor
        if tt.shape != st.shape:
            problems.append(f"{label!r} shape {tuple(tt.shape)} vs {tuple(st.shape)}")
        if tt.dtype != st.dtype:
            problems.append(f"{label!r} dtype {tt.dtype} vs {st.dtype}")
        if tt.device != st.device:
            problems.append(f"{label!r} device {tt.device} vs {st.device}")
    if problems:
        raise WeightMismatchError(
            f"{op}: target and {source_what} do not match (target vs {source_what}): "
            f"{'; '.join(problems[:_MAX_LISTED])}"
            + (f" and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else "")
            + ". Nothing was written."
        )
    if writes:  # modules list each tensor once already (tied weights deduplicated)
        check_writable([t for t, _ in pairs], op)
        check_no_overlap([t for t, _ in pairs if t.kind in ("tensor", "state")], op)
        check_apart(pairs, op)
    return pairs


def _aliases(entry: Entry, side: list[Entry], matched_names: Container[str]) -> bool:
    """Whether ``entry`` is the same memory as another entry of its side that is matched."""
    t = entry.tensor
    if t.numel() == 0:
        return False
    key = (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)
    return any(
        other.name in matched_names
        and other is not entry
        and (o := other.tensor).numel()
        and (o.data_ptr(), o.shape, o.stride(), o.dtype, o.device) == key
        for other in side
    )


def check_writable(written: list[Entry], op: str) -> None:
    """Refuse tensors to be written that hold no data (meta tensors) or whose elements share
    memory with each other (an expanded tensor, a stride of 0): a write would store several
    results in one place, and torch would refuse it halfway through an op. Contiguous tensors
    (nearly all weights) cost one attribute check each."""
    for e in written:
        t = e.tensor
        if t.is_meta:
            raise WeightMismatchError(
                f"{op}: tensor {e.name!r} is a meta tensor: it has a shape but no data to read "
                "or write. Materialise the weights first (module.to_empty(device=...), then "
                "load or initialise them); nothing was written."
            )
        if not t.is_contiguous() and _overlaps_itself(t):
            raise WeightMismatchError(
                f"{op}: tensor {e.name!r} (shape {tuple(t.shape)}, strides {t.stride()}) has "
                "elements that share memory (an expanded tensor, a stride of 0), so one write "
                "would land on several elements; pass a tensor that owns its elements "
                "(.clone(), e.g. nn.Parameter(t.clone())). Nothing was written."
            )


def _overlaps_itself(t: Tensor) -> bool:
    """Whether some elements of ``t`` are the same memory: torch's own test, or more elements
    than the memory span they lie in can hold."""
    if torch._debug_has_internal_overlap(t) == 1:
        return True
    extent = 1 + sum((n - 1) * abs(step) for n, step in zip(t.shape, t.stride(), strict=True))
    return 0 < extent < t.numel()


def check_no_overlap(written: list[Entry], op: str) -> None:
    """Refuse tensors to be written that share memory: they would be updated twice.

    Conservative: the memory span of each tensor is compared, so two strided views that
    interleave without sharing an element are refused too.
    """
    spans = [(*_span(e.tensor), e.name) for e in written if e.tensor.numel()]
    spans.sort(key=lambda s: (str(s[0]), s[1]))
    for (dev_a, _, end_a, name_a), (dev_b, start_b, _, name_b) in itertools.pairwise(spans):
        if dev_a == dev_b and start_b < end_a:
            raise WeightMismatchError(
                f"{op}: target tensors {name_a!r} and {name_b!r} overlap in memory, so they "
                "would be written twice; pass each tensor once (modules already count tied "
                "weights once)."
            )


def _span(t: Tensor) -> tuple[torch.device, int, int]:
    """The device and the byte range ``[start, end)`` a non-empty tensor's elements lie in."""
    extent = 1 + sum(
        (size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=False)
    )
    start = t.data_ptr()
    return t.device, start, start + extent * t.element_size()


def check_apart(pairs: list[tuple[Entry, Entry]], op: str) -> None:
    """Refuse a target tensor that shares memory with a source tensor, unless it *is* its own
    source (same address, shape and strides): writing it would change values that are still
    to be read, so the result would depend on the order of the writes, or an op would fail
    halfway. Conservative, like ``check_no_overlap`` (memory spans are compared).

    One sweep over the spans sorted by address: about ``n log n`` for ``n`` tensors; none
    when the two sides hold different storages (the usual case, checked first)."""
    target_storages = {t.tensor.untyped_storage().data_ptr() for t, _ in pairs}
    if target_storages.isdisjoint(s.tensor.untyped_storage().data_ptr() for _, s in pairs):
        return
    spans = []
    for i, (t, s) in enumerate(pairs):
        for side, e in ((0, t), (1, s)):
            if e.tensor.numel():
                device, start, end = _span(e.tensor)
                spans.append((str(device), start, end, side, i, e))
    spans.sort(key=lambda span: span[:2])
    open_spans: list[tuple[str, int, int, int, int, Entry]] = []
    for span in spans:
        device, start, _, side, i, e = span
        open_spans = [o for o in open_spans if o[0] == device and o[2] > start]
        for _, _, _, other_side, j, other in open_spans:
            if other_side == side:
                continue
            t, s = (e, other) if side == 0 else (other, e)
            a, b = t.tensor, s.tensor
            if i == j and a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
                continue  # the target is its own source: every op reads before it writes
            raise WeightMismatchError(
                f"{op}: target tensor {t.name!r} and source tensor {s.name!r} share memory "
                "(one is a view of the other, or they overlap), so writing the target would "
                "change the source before it is read; pass a copy of the source (.clone())."
            )
        open_spans.append(span)


def is_float(t: Tensor) -> bool:
    """Floating or complex: a tensor that ops interpolate (integer tensors are copied)."""
    return t.is_floating_point() or t.is_complex()


_Item = TypeVar("_Item")


def group_by_device_dtype(
    items: Iterable[_Item], key: Callable[[_Item], Tensor] | None = None
) -> list[list[_Item]]:
    """``items`` grouped by the (device, dtype) of their tensor (``key(item)``; the item
    itself by default): the groups in the order their first member came, each group's items
    in their order. A group is what one ``torch._foreach_*`` call, one flat buffer or one
    concatenation can take."""
    groups: dict[tuple[torch.device, torch.dtype], list[_Item]] = {}
    for item in items:
        t = item if key is None else key(item)
        groups.setdefault((t.device, t.dtype), []).append(item)
    return list(groups.values())
