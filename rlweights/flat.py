"""Flat storage: one contiguous buffer per (role, device, dtype), Parameters as views of it.

The role says what a buffer holds: ``"param"`` for parameters, ``"buffer"`` for floating
buffers (BatchNorm running statistics), as ``Entry.kind`` names them.

After ``flatten_``, a Polyak update of a whole network is one ``lerp_`` per buffer, a
hard copy one ``copy_``, a clip one ``clamp_``: the cost becomes the memory traffic instead of
Python and kernel-launch overhead. Parameter (and buffer) *objects* are kept, only their
storage is rebound, so optimizers, hooks and other references stay valid.

Why each piece is there:

* Views break when a module is moved or cast (``.to()``, ``.half()``,
  ``load_state_dict(assign=True)``, ``vector_to_parameters``). Every op checks the layout
  cheaply before it uses it (the data pointers of the views, plus a structural re-check
  whenever any module anywhere registered a parameter, buffer or submodule) and falls back to
  the per-tensor path if it is broken, so a stale buffer is never updated.
* A Parameter rebound to a view does not share the buffer's autograd version counter, so a
  write into the flat buffer is invisible to autograd. Every op that writes a flat buffer bumps
  the versions of its views (``torch.autograd.graph.increment_version``): changing weights
  between a forward and its backward still raises autograd's error.
* Each view gets a storage object of its own size (DLPack), over the flat buffer's memory:
  ``torch.save`` of the module, of its ``state_dict()`` or of a submodule's, and pickling,
  write each tensor's own elements, not the whole buffer (a saved actor does not carry the
  critic). ``copy.deepcopy`` and unpickling give a plain module with compact tensors;
  ``rlweights.make_target`` flattens the copy again.

Limitation: replacing a tensor by writing into ``module._parameters`` / ``module._buffers``
directly bypasses PyTorch's registration hooks and is not detected; assign attributes
(``module.weight = ...``) or call ``flatten_`` again after such surgery.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from operator import attrgetter
from typing import Literal

import torch
from torch import Tensor, nn

from rlweights.registration import GENERATION, StructureWatch, install_hooks, overwrites_params
from rlweights.weights import (
    Entry,
    ModuleHandle,
    entries,
    group_by_device_dtype,
    is_float,
    module_entries,
)

__all__ = [
    "FlatGroup",
    "FlatLayoutWarning",
    "FlatWeights",
    "bump_versions",
    "flatten_",
    "layout_of",
    "lives_in_other_layout",
    "registered_layout",
]

Role = Literal["param", "buffer"]

_data_ptr = Tensor.data_ptr
_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, FlatWeights] = weakref.WeakKeyDictionary()
_LAYOUT_ATTR = "_rlweights_layout"


class _LayoutRef:
    """What ``flatten_`` leaves on the module: a weak reference to its layout, so that a
    compiled function finds the layout through the module it was given (guarded by that
    module's own attribute) rather than through the global table, whose keys move whenever
    some other flattened module is collected (a recompile, or a failed guard mid-compile).
    A copy of the module points at the original's layout, which names another module, so
    ``registered_layout`` finds none for it; a pickle carries an empty one."""

    __slots__ = ("ref",)

    def __init__(self, layout: FlatWeights | None = None):
        self.ref = None if layout is None else weakref.ref(layout)

    def __call__(self) -> FlatWeights | None:
        return None if self.ref is None else self.ref()

    def __reduce__(self) -> tuple:
        return (_LayoutRef, ())


_SIGNATURES: dict[tuple, int] = {}


class FlatLayoutWarning(UserWarning):
    """A flattened module's layout broke (moved, cast, tensors replaced); ops fall back to
    the slower per-tensor path until ``flatten_`` is called again."""


@dataclass(frozen=True, slots=True)
class FlatGroup:
    """One contiguous buffer and the tensors that are views of it."""

    role: Role
    device: torch.device
    dtype: torch.dtype
    flat: Tensor
    names: tuple[str, ...]
    views: tuple[Tensor, ...]


class FlatWeights(ModuleHandle):
    """Handle returned by ``flatten_``; usable wherever a weight set is expected.

    ``groups`` holds the flat buffers: ``role="param"`` for parameters, ``"buffer"`` for
    floating buffers (BatchNorm statistics); ``param_flats`` / ``buffer_flats`` are those
    buffers by role and ``param_views`` / ``buffer_views`` the tensors that are views of them.
    Non-floating tensors (``num_batches_tracked``) stay where they were and are listed in
    ``others``. Writing into ``group.flat`` yourself bypasses autograd's version counters;
    use the ops.

    ``generation`` is the registration count (``rlweights.registration``) at which the
    module's structure was last found unchanged (-1 once it broke): while it equals the
    current count, checking the data pointers of the views is enough. ``watch`` turns True at
    a registration on the module or its submodules; code compiled around the layout guards
    on it (see ``rlweights.ops``).
    """

    def __init__(self, module: nn.Module, groups: list[FlatGroup], others: list[Entry]):
        self._module = weakref.ref(module)
        self.groups: tuple[FlatGroup, ...] = tuple(groups)
        self.others: tuple[Entry, ...] = tuple(others)
        self.param_flats = tuple(g.flat for g in groups if g.role == "param")
        self.buffer_flats = tuple(g.flat for g in groups if g.role == "buffer")
        self.param_views = [v for g in groups if g.role == "param" for v in g.views]
        self.buffer_views = [v for g in groups if g.role == "buffer" for v in g.views]
        self._ptr_checks = [
            ((*g.views, g.flat), [*map(_data_ptr, g.views), _data_ptr(g.flat)]) for g in groups
        ]
        self._structure = _structure(module)
        self.generation = GENERATION[0]
        self.watch = StructureWatch(module.modules())
        self._warned = False
        self._dead = False
        sig = (
            tuple((g.role, g.device, g.dtype, g.names, _shapes(g.views)) for g in groups),
            tuple((e.name, e.kind, *_meta(e.tensor)) for e in others),
        )
        # Two layouts with the same signature pair group by group: names, shapes, dtypes,
        # devices and offsets all agree, so that validation is done once, here.
        self.signature = _SIGNATURES.setdefault(sig, len(_SIGNATURES))

    @property
    def module(self) -> nn.Module:
        module = self._module()
        if module is None:
            raise ReferenceError("the module of this FlatWeights handle no longer exists")
        return module

    @property
    def numel(self) -> int:
        return sum(g.flat.numel() for g in self.groups)

    @property
    def intact(self) -> bool:
        """True while every tensor of the module is still the view this layout made."""
        if self._dead:
            return False
        if self.generation != GENERATION[0] or overwrites_params():
            module = self._module()
            if module is None or _structure(module) != self._structure:
                # Replaced or added tensors never come back: stay broken (and always
                # "stale", so that cached plans re-check) until flatten_ rebuilds.
                self._dead = True
                self.generation = -1
                return False
            self.generation = GENERATION[0]
        return all(list(map(_data_ptr, views)) == ptrs for views, ptrs in self._ptr_checks)

    def __repr__(self) -> str:
        module = self._module()
        name = type(module).__name__ if module is not None else "<dead module>"
        groups = ", ".join(
            f"{g.role}:{str(g.dtype).removeprefix('torch.')}@{g.device}[{g.flat.numel()}]"
            for g in self.groups
        )
        state = "intact" if self.intact else "broken"
        return f"FlatWeights({name}, {groups or 'no floating tensors'}, {state})"


def bump_versions(tensors: list[Tensor]) -> None:
    """Bump autograd's version counter of ``tensors`` (views of a flat buffer, rebound with
    ``.data``, do not share the buffer's counter): after a write into a flat buffer, a
    backward through a graph that saved the old values raises instead of using them."""
    if tensors:
        torch._C._increment_version(tensors)


def _shapes(tensors: tuple[Tensor, ...]) -> tuple[torch.Size, ...]:
    return tuple(t.shape for t in tensors)


def _meta(t: Tensor) -> tuple[torch.dtype, torch.device, torch.Size]:
    return t.dtype, t.device, t.shape


def _structure(module: nn.Module) -> list[tuple[str, int]]:
    """Names and identities of every tensor, to notice replaced or added ones."""
    return [(e.name, id(e.tensor)) for e in module_entries(module)]


def layout_of(weights: object) -> FlatWeights | None:
    """The intact flat layout of a module or handle, else None (warning once if it broke)."""
    if isinstance(weights, FlatWeights):
        layout = weights
    elif isinstance(weights, nn.Module):
        layout = _LAYOUTS.get(weights)
        if layout is None:
            return None
    else:
        return None
    if layout.intact:
        return layout
    if not layout._warned:
        layout._warned = True
        warnings.warn(
            "a flattened module was moved, cast or had tensors replaced, so its flat layout is "
            "broken; ops fall back to the slower per-tensor path. Call rw.flatten_(module) "
            "again (after .to(), .half(), load_state_dict(assign=True), ...).",
            FlatLayoutWarning,
            stacklevel=3,
        )
    return None


def registered_layout(module: nn.Module) -> FlatWeights | None:
    """The layout ``flatten_`` made for ``module``, without checking that it is still
    intact (``layout_of`` checks): a lookup through the module that ``torch.compile`` can
    trace, for code that checked the layout before (see ``rlweights.capture``)."""
    holder = getattr(module, _LAYOUT_ATTR, None)
    layout = holder() if isinstance(holder, _LayoutRef) else None
    if layout is None or layout._module() is not module:
        return None
    return layout


def lives_in_other_layout(module: nn.Module) -> bool:
    """True if some tensor of ``module`` is a view of a flat buffer that was made for another
    module whose layout is intact: a submodule flattened on its own, or ``module`` being part
    of a larger flattened network. Flattening ``module`` would break that layout."""
    own = _LAYOUTS.get(module)
    if own is not None and own.intact:
        return False
    spans = [
        (g.device, g.flat.data_ptr(), g.flat.data_ptr() + g.flat.nbytes)
        for other, layout in list(_LAYOUTS.items())
        if other is not module and layout.intact
        for g in layout.groups
        if g.flat.numel()
    ]
    if not spans:
        return False
    return any(
        device == e.tensor.device and start <= e.tensor.data_ptr() < end
        for e in module_entries(module)
        if e.tensor.numel()
        for device, start, end in spans
    )


def _own_storage(view: Tensor) -> Tensor:
    """The same memory as ``view``, seen through a storage object of its own size (DLPack):
    ``torch.save``, pickling and ``state_dict`` of the module then write each tensor's
    elements only, not the whole flat buffer it lives in. The flat buffer stays alive as
    long as such a tensor does. Plain ``view`` where DLPack cannot carry the dtype."""
    try:
        own = torch.from_dlpack(view)
    except (RuntimeError, TypeError, BufferError):
        return view
    return own if own.data_ptr() == view.data_ptr() else view


def _flatten_group(role: Role, members: list[Entry]) -> FlatGroup:
    """One new buffer for ``members`` (one device and dtype); each tensor becomes a view."""
    first = members[0].tensor
    size = sum(e.tensor.numel() for e in members)
    flat = torch.empty(size, dtype=first.dtype, device=first.device)
    views, offset = [], 0
    for e in members:
        n = e.tensor.numel()
        view = flat[offset : offset + n].view(e.tensor.shape)
        view.copy_(e.tensor)
        e.tensor.data = _own_storage(view)  # rebinds storage; the Parameter object is kept
        views.append(e.tensor)
        offset += n
    names = tuple(e.name for e in members)
    return FlatGroup(role, first.device, first.dtype, flat, names, tuple(views))


def flatten_(module: nn.Module) -> FlatWeights:
    """Move a module's floating tensors into contiguous buffers, one per (role, device, dtype).

    Each Parameter (and floating buffer) becomes a view of its buffer; the objects themselves
    are kept, so optimizers, hooks and references stay valid. Values are unchanged. Parameters
    and buffers get separate buffers so that a target update can lerp the first and copy the
    second. Idempotent: an intact layout is returned as is, a broken one is rebuilt.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"flatten_ takes an nn.Module, got {type(module).__name__}")
    existing = _LAYOUTS.get(module)
    if existing is not None:
        if existing.intact:
            return existing
        existing._dead = True  # never again, even if new views reuse its addresses
        existing.generation = -1
    install_hooks()
    found, _ = entries(module)
    movable: dict[Role, list[Entry]] = {"param": [], "buffer": []}
    others = []
    for e in found:
        if is_float(e.tensor) and e.tensor.device.type != "meta":
            movable["param" if e.kind == "param" else "buffer"].append(e)
        else:
            others.append(e)
    with torch.no_grad():
        groups = [
            _flatten_group(role, members)
            for role, of_role in movable.items()
            for members in group_by_device_dtype(of_role, key=attrgetter("tensor"))
        ]
    layout = FlatWeights(module, groups, others)
    _LAYOUTS[module] = layout
    object.__setattr__(module, _LAYOUT_ATTR, _LayoutRef(layout))
    return layout
