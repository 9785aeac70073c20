"""Which tensors a module holds can change behind a cached structure's back: PyTorch's global
registration hooks count every registration of a parameter, buffer or submodule anywhere in the
process, so that cached structures (weight-set entries, flat layouts, pair plans) re-check
themselves only when that count has moved.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["GENERATION", "StructureWatch", "install_hooks", "overwrites_params"]

# Bumped by PyTorch's global registration hooks whenever any module anywhere registers a
# parameter, buffer or submodule; a layout re-checks its structure when this has moved.
GENERATION = [0]
_HOOKS: list = []


def overwrites_params() -> bool:
    """Under this (rare) future flag ``Module._apply`` replaces Parameters through the
    ``_parameters`` dict, which no registration hook sees: re-check the structure."""
    return torch.__future__.get_overwrite_module_params_on_conversion()


# The watches of each watched module, by id (the hooks see every module of the process, and
# some cannot be hashed), with a weak reference that tells a reused id apart.
_WATCHES: dict[int, tuple[weakref.ref[nn.Module], weakref.WeakSet[StructureWatch]]] = {}


class StructureWatch:
    """``changed`` turns True when a parameter, buffer or submodule is registered on any of
    the watched modules (``load_state_dict(assign=True)``, ``module.weight = ...``, a layer
    replaced), as the registration happens. A compiled function guards on the flag: its
    cached code stops being used the moment the structure may have changed, without any
    check at run time (see ``rlweights.capture.check_plan``)."""

    __slots__ = ("__weakref__", "changed")

    def __init__(self, modules: Iterable[nn.Module]):
        install_hooks()
        self.changed = False
        for module in modules:
            _watches_of(module).add(self)


def _watches_of(module: nn.Module) -> weakref.WeakSet[StructureWatch]:
    key = id(module)
    entry = _WATCHES.get(key)
    if entry is None or entry[0]() is not module:
        entry = (weakref.ref(module, lambda _, key=key: _WATCHES.pop(key, None)), weakref.WeakSet())
        _WATCHES[key] = entry
    return entry[1]


def _count(module: nn.Module, *_args: object) -> None:
    GENERATION[0] += 1
    entry = _WATCHES.get(id(module))
    if entry is not None and entry[0]() is module:
        for watch in entry[1]:
            watch.changed = True


def install_hooks() -> None:
    """Count registrations of parameters, buffers and submodules anywhere in the process
    (PyTorch's global registration hooks), so that cached structures know when to re-check."""
    if _HOOKS:
        return
    from torch.nn.modules import module as m

    _HOOKS.append(m.register_module_parameter_registration_hook(_count))
    _HOOKS.append(m.register_module_buffer_registration_hook(_count))
    _HOOKS.append(m.register_module_module_registration_hook(_count))
