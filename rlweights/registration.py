"""Which tensors a module holds can change behind a cached structure's back: PyTorch's global
registration hooks count every registration of a parameter, buffer or submodule anywhere in the
process, so that cached structures (weight-set entries, flat layouts, pair plans) re-check
themselves only when that count has moved.
"""

from __future__ import annotations

import torch

__all__ = ["GENERATION", "install_hooks", "overwrites_params"]

# Bumped by PyTorch's global registration hooks whenever any module anywhere registers a
# parameter, buffer or submodule; a layout re-checks its structure when this has moved.
GENERATION = [0]
_HOOKS: list = []


def overwrites_params() -> bool:
    """Under this (rare) future flag ``Module._apply`` replaces Parameters through the
    ``_parameters`` dict, which no registration hook sees: re-check the structure."""
    return torch.__future__.get_overwrite_module_params_on_conversion()


def _count(*_args: object) -> None:
    GENERATION[0] += 1


def install_hooks() -> None:
    """Count registrations of parameters, buffers and submodules anywhere in the process
    (PyTorch's global registration hooks), so that cached structures know when to re-check."""
    if _HOOKS:
        return
    from torch.nn.modules import module as m

    _HOOKS.append(m.register_module_parameter_registration_hook(_count))
    _HOOKS.append(m.register_module_buffer_registration_hook(_count))
    _HOOKS.append(m.register_module_module_registration_hook(_count))
