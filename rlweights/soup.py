"""``rlweights average``: a weighted average of checkpoints of one architecture (a model soup).

Reads checkpoints of ``rlweights train`` (``model.pt``; every network is averaged, the
result evaluates with ``rlweights evaluate`` but cannot be resumed), Stable-Baselines3 models
(``.zip``; the policy is averaged, everything else is taken from the first model, so the
result loads with ``SAC.load`` and friends) and plain ``state_dict`` files. No file is ever
unpickled with code: tensors load with ``torch.load(weights_only=True)`` and SB3 zips are
opened as zip archives, reading only their ``policy.pth``. The output is written atomically;
on any error nothing is written and the command exits with code 2.
"""

from __future__ import annotations

import argparse
import io
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rlweights.files import atomic_write
from rlweights.ops import average_

__all__ = ["add_arguments", "average_checkpoints", "load_any", "main_from_args"]

AGENT_FORMAT = "rlweights-agent"


class SoupError(ValueError):
    """A file or a combination of files that cannot be averaged."""


def _torch_load(data: bytes | Path, where: str) -> Any:
    try:
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or carrying code that weights_only refuses
        reason = str(exc).strip().split("\n")[0].split(". ")[0] or type(exc).__name__
        raise SoupError(f"{where} is not a readable checkpoint ({reason})") from None


def load_any(path: Path) -> tuple[str, dict[str, Tensor], Any]:
    """(kind, flat {name: tensor} to average, the whole loaded object for writing back)."""
    if not path.is_file():
        raise SoupError(f"no file at {path}")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                if "policy.pth" in names:  # a Stable-Baselines3 model
                    policy = _torch_load(archive.read("policy.pth"), f"{path}:policy.pth")
                    return "sb3", _tensors(policy, path), policy
        except zipfile.BadZipFile as exc:
            raise SoupError(f"{path} is not a readable zip archive ({exc})") from None
    state = _torch_load(path, str(path))
    if isinstance(state, dict) and state.get("format") == AGENT_FORMAT:
        flat = {
            f"{net}/{key}": value
            for net, weights in state["weights"].items()
            for key, value in weights.items()
        }
        return "agent", flat, state
    return "state_dict", _tensors(state, path), state


def _tensors(state: Any, path: Path) -> dict[str, Tensor]:
    if not isinstance(state, dict) or not state:
        raise SoupError(f"{path} holds no state_dict (a mapping of names to tensors)")
    bad = [str(k) for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise SoupError(f"{path} is not a plain state_dict: {', '.join(bad[:3])} are no tensors")
    return dict(state)


def average_checkpoints(paths: list[Path], weights: list[float] | None) -> tuple[str, Any]:
    """Load and average; returns (kind, the object to write)."""
    if len(paths) < 2:
        raise SoupError("give at least two checkpoints to average")
    if weights is not None and len(weights) != len(paths):
        raise SoupError(f"{len(weights)} weights for {len(paths)} checkpoints: give one each")
    loaded = [load_any(p) for p in paths]
    kinds = {kind for kind, _, _ in loaded}
    if len(kinds) > 1:
        raise SoupError(f"cannot average different kinds of checkpoints: {', '.join(kinds)}")
    kind = loaded[0][0]
    if kind == "agent":
        algos = {(obj["algo"], obj["impl"]) for _, _, obj in loaded}
        if len(algos) > 1:
            raise SoupError(f"the checkpoints come from different agents: {sorted(algos)}")
    sources = [flat for _, flat, _ in loaded]
    result = {name: value.clone() for name, value in sources[0].items()}
    try:
        average_(result, sources, weights)
    except (TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise SoupError(f"the checkpoints do not fit together: {first}") from None
    first = loaded[0][2]
    if kind == "agent":
        nets: dict[str, dict[str, Tensor]] = {}
        for name, value in result.items():
            net, key = name.split("/", 1)
            nets.setdefault(net, {})[key] = value
        out = {k: v for k, v in first.items() if k != "training"}  # a soup cannot resume
        out["weights"] = nets
        out["averaged_from"] = [str(p) for p in paths]
        return kind, out
    return kind, result


def _write(kind: str, result: Any, first: Path, out: Path) -> None:
    if kind != "sb3":
        atomic_write(out, lambda f: torch.save(result, f))
        return
    buffer = io.BytesIO()
    torch.save(result, buffer)

    def write(f: Any) -> None:
        with zipfile.ZipFile(first) as src, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as dst:
            for item in src.infolist():
                data = buffer.getvalue() if item.filename == "policy.pth" else src.read(item)
                dst.writestr(item, data)

    atomic_write(out, write)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="+", type=Path, help="two or more files")
    parser.add_argument("--out", type=Path, required=True, help="where to write the average")
    parser.add_argument(
        "--weights", nargs="+", type=float, help="one weight per checkpoint (normalised)"
    )


def main_from_args(args: argparse.Namespace) -> int:
    try:
        kind, result = average_checkpoints(args.checkpoints, args.weights)
        if args.out.exists() and args.out.is_dir():
            raise SoupError(f"--out {args.out} is a directory; give a file path")
        _write(kind, result, args.checkpoints[0], args.out)
    except (SoupError, OSError) as exc:
        print(f"rlweights average: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote the average of {len(args.checkpoints)} {kind} checkpoints to {args.out}")
    return 0
