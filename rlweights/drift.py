"""Weight drift: what the weights are doing while an agent trains.

A ``DriftMonitor`` watches named modules (and, optionally, their target networks) and,
on each ``measure``, returns for every module and every parameter tensor:

* ``weight_norm``: ``||w||``; growing without bound means weights blow up;
* ``init_distance``: ``||w - w_0||`` from the weights at the start (a flat snapshot); a
  policy that stops moving away from its initialisation has stopped learning;
* ``update_ratio``: ``||w - w_prev|| / ||w||`` since the previous measurement (the first
  one compares with the start); the relative size of recent updates;
* ``nonfinite``: the number of NaN / inf values;
* ``target_distance``: ``||w - w_target||`` when a target network is given; how far the
  target lags the online network.

Values are tensors on the weights' device (no host sync until they are logged). Per-tensor
values come from segment reductions over contiguous storage: on flattened modules the flat
buffers are read directly, one pass per quantity. Tags: ``drift/<module>/<metric>`` for
totals and ``drift/<module>/layers/<tensor>/<metric>`` per tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from operator import itemgetter

import torch
from torch import Tensor, nn

from rlweights.flat import layout_of
from rlweights.weights import WeightMismatchError, group_by_device_dtype, is_float, module_entries

__all__ = ["METRICS", "DriftMonitor"]

METRICS = ("weight_norm", "init_distance", "update_ratio", "nonfinite", "target_distance")
"""The drift metrics of each module, in the order ``DriftMonitor`` logs them (``target_distance``
only for modules with a target)."""


@dataclass
class _Group:
    """The floating parameters of one (device, dtype), as contiguous storage, with the
    snapshots (start, previous measurement) and a scratch buffer of the same size."""

    names: list[str]
    tensors: list[Tensor]
    lengths: list[int]
    init: Tensor
    prev: Tensor
    scratch: Tensor

    def split(self, flat: Tensor) -> list[Tensor]:
        return list(torch.split(flat, self.lengths))


def _params(module: nn.Module) -> list[tuple[str, Tensor]]:
    return [
        (e.name, e.tensor)
        for e in module_entries(module)
        if e.kind == "param" and is_float(e.tensor)
    ]


def _contiguous(module: nn.Module, tensors: list[Tensor]) -> Tensor:
    """The tensors as one flat vector: the flat buffer itself when the module is flattened
    with exactly these tensors in it, else a concatenated copy."""
    layout = layout_of(module)
    if layout is not None:
        for flat in layout.param_flats:
            views = [v for g in layout.groups if g.flat is flat for v in g.views]
            if len(views) == len(tensors) and all(
                a is b for a, b in zip(views, tensors, strict=True)
            ):
                return flat
    return torch.cat([t.detach().reshape(-1) for t in tensors])


class DriftMonitor:
    """Drift metrics of named modules; see the module docstring for what each one means.

    ```python
    >>> monitor = DriftMonitor({"actor": actor, "critic": critic}, {"critic": critic_target})
    >>> metrics = monitor.measure()  # {"drift/critic/target_distance": tensor(...), ...}

    ```
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        targets: Mapping[str, nn.Module] | None = None,
        per_layer: bool = True,
    ):
        targets = dict(targets or {})
        unknown = set(targets) - set(modules)
        if unknown:
            raise ValueError(
                f"DriftMonitor: targets {sorted(unknown)} have no module of the same name; "
                f"modules are {sorted(modules)}"
            )
        self.modules = dict(modules)
        self.targets = targets
        self.per_layer = per_layer
        self._groups: dict[str, list[_Group]] = {}
        for name, module in self.modules.items():
            if not isinstance(module, nn.Module):
                raise TypeError(
                    f"DriftMonitor: {name!r} is a {type(module).__name__}, not a module"
                )
            self._groups[name] = self._snapshot(module)
            if name in targets:
                self._check_target(name, module, targets[name])

    @staticmethod
    def _snapshot(module: nn.Module) -> list[_Group]:
        groups = []
        for members in group_by_device_dtype(_params(module), key=itemgetter(1)):
            tensors = [t for _, t in members]
            with torch.no_grad():
                flat = _contiguous(module, tensors).clone()
            lengths = [t.numel() for t in tensors]
            names = [n for n, _ in members]
            groups.append(
                _Group(names, tensors, lengths, flat, flat.clone(), torch.empty_like(flat))
            )
        return groups

    def _check_target(self, name: str, module: nn.Module, target: nn.Module) -> None:
        mine = {n: t for n, t in _params(module)}
        theirs = {n: t for n, t in _params(target)}
        bad = [
            n
            for n in mine.keys() | theirs.keys()
            if n not in mine
            or n not in theirs
            or (mine[n].shape, mine[n].dtype, mine[n].device)
            != (theirs[n].shape, theirs[n].dtype, theirs[n].device)
        ]
        if bad:
            raise WeightMismatchError(
                f"DriftMonitor: target of {name!r} does not match it: {sorted(bad)[:6]}"
            )

    def reset(self, tensors: Mapping[str, Iterable[str]] | None = None) -> None:
        """Take the current weights as the new start (``init_distance`` restarts from 0): of
        every module, or (``tensors``: ``{module: [tensor names]}``) of those tensors only,
        after a re-initialisation of some layers (``rw.reinit_``), so that the chart shows
        the distance from the last initialisation."""
        if tensors is None:
            for name, module in self.modules.items():
                self._groups[name] = self._snapshot(module)
            return
        for name, chosen in tensors.items():
            if name not in self._groups:
                raise ValueError(
                    f"DriftMonitor.reset: no module {name!r}; modules are {sorted(self.modules)}"
                )
            wanted = set(chosen)
            known = {n for group in self._groups[name] for n in group.names}
            if wanted - known:
                raise ValueError(
                    f"DriftMonitor.reset: {name!r} has no tensors {sorted(wanted - known)[:6]}"
                )
            with torch.no_grad():
                for group in self._groups[name]:
                    starts = group.split(group.init)
                    for i, tensor_name in enumerate(group.names):
                        if tensor_name in wanted:
                            starts[i].copy_(group.tensors[i].reshape(-1))

    @torch.no_grad()
    def measure(self) -> dict[str, Tensor]:
        """All metrics as ``{tag: 0-dim tensor}``; updates the reference of ``update_ratio``."""
        out: dict[str, Tensor] = {}
        for name, module in self.modules.items():
            target = self.targets.get(name)
            target_params = dict(_params(target)) if target is not None else None
            per_tensor: dict[str, list[Tensor]] = {m: [] for m in METRICS}
            names: list[str] = []
            for group in self._groups[name]:
                cur = _contiguous(module, group.tensors)
                scratch = group.scratch
                norms = _norms(group, cur)
                per_tensor["weight_norm"].append(norms(cur))
                per_tensor["init_distance"].append(norms(torch.sub(cur, group.init, out=scratch)))
                per_tensor["update_ratio"].append(norms(torch.sub(cur, group.prev, out=scratch)))
                # x * 0 is NaN exactly where x is NaN or inf: its "L0 norm" counts them.
                per_tensor["nonfinite"].append(norms(torch.mul(cur, 0, out=scratch), 0))
                if target_params is not None:
                    tgt = _contiguous(target, [target_params[n] for n in group.names])
                    per_tensor["target_distance"].append(norms(torch.sub(cur, tgt, out=scratch)))
                group.prev.copy_(cur)
                names += group.names
            values = {m: torch.cat(v) for m, v in per_tensor.items() if v}
            out.update(self._totals(name, values))
            if self.per_layer:
                out.update(self._layers(name, names, values))
        return out

    @staticmethod
    def _ratio(moved: Tensor, norm: Tensor) -> Tensor:
        return moved / norm.clamp_min(torch.finfo(norm.dtype).tiny)

    def _totals(self, name: str, values: dict[str, Tensor]) -> dict[str, Tensor]:
        def total(v: Tensor) -> Tensor:
            return torch.linalg.vector_norm(v)

        norm = total(values["weight_norm"])
        out = {
            f"drift/{name}/weight_norm": norm,
            f"drift/{name}/init_distance": total(values["init_distance"]),
            f"drift/{name}/update_ratio": self._ratio(total(values["update_ratio"]), norm),
            f"drift/{name}/nonfinite": values["nonfinite"].sum(),
        }
        if "target_distance" in values:
            out[f"drift/{name}/target_distance"] = total(values["target_distance"])
        return out

    def _layers(self, name: str, names: list[str], values: dict[str, Tensor]) -> dict[str, Tensor]:
        per = dict(values)
        per["update_ratio"] = self._ratio(values["update_ratio"], values["weight_norm"])
        return {
            f"drift/{name}/layers/{layer}/{metric}": v[i]
            for metric, v in per.items()
            for i, layer in enumerate(names)
        }


def _norms(group: _Group, cur: Tensor):
    """A function: flat vector -> per-tensor norms (1-D), in one fused foreach reduction."""
    low = cur.dtype in (torch.float16, torch.bfloat16)

    def norms(flat: Tensor, order: float = 2) -> Tensor:
        parts = group.split(flat)
        if low:
            return torch.stack(torch._foreach_norm(parts, order, dtype=torch.float32))
        return torch.stack(torch._foreach_norm(parts, order))

    return norms
