"""rlweights soup: the weighted average of checkpoints of one architecture (a model soup).

Reads three kinds of checkpoints, all of one kind per call:

  model.pt of 'rlweights train'  every network is averaged; the result evaluates with
  (or its run folder)            'rlweights evaluate' but cannot be resumed; the runs must
                                 be of one algorithm and one environment
  Stable-Baselines3 .zip models  the policy is averaged, the rest is taken from the first
                                 model, so the result loads with SAC.load and the like
  plain state_dict files         every tensor is averaged

--coefficients gives one number per checkpoint (relative: they are normalised to sum to 1;
the mean when left out). No file is unpickled with code: tensors load with
torch.load(weights_only=True), SB3 zips are read as zip archives (their policy.pth only).
The output is written atomically; on any error nothing is written and the exit code is 2.
--out never replaces an input, nor writes into the folder of a run (one that holds a
model.pt or config.json) unless --force says so.

  rlweights soup run_a run_b --out soup.pt
  rlweights soup a.zip b.zip c.zip --coefficients 2 1 1 --out soup.zip
"""

from __future__ import annotations

import argparse
import io
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlweights.files import atomic_write, checksum_matches, sealed

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["add_arguments", "average_checkpoints", "load_any", "main_from_args"]

AGENT_FORMAT = "rlweights-agent"


class SoupError(ValueError):
    """A file or a combination of files that cannot be averaged."""


def _torch_load(data: bytes | Path, where: str) -> Any:
    import torch  # here and below: 'rlweights soup --help' starts without torch

    try:
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or carrying code that weights_only refuses
        reason = str(exc).strip().split("\n")[0].split(". ")[0] or type(exc).__name__
        raise SoupError(f"{where} is not a readable checkpoint ({reason})") from None


def _checkpoint_file(path: Path) -> Path:
    """The file a checkpoint argument names: a run folder stands for its ``model.pt``, as
    for 'rlweights evaluate' and 'rlweights train --resume'."""
    return path / "model.pt" if path.is_dir() else path


def load_any(path: Path) -> tuple[str, dict[str, Tensor], Any]:
    """(kind, flat {name: tensor} to average, the whole loaded object for writing back)."""
    path = _checkpoint_file(path)
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
        # version 1 was written before checksums; from version 2 on a missing one is damage
        if not checksum_matches(state, required=state.get("version") != 1):
            raise SoupError(f"{path} is damaged: its content does not match its checksum")
        flat = {
            f"{net}/{key}": value
            for net, weights in state["weights"].items()
            for key, value in weights.items()
        }
        return "agent", flat, state
    return "state_dict", _tensors(state, path), state


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0]


def _listing(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _check_fit(paths: list[Path], sources: list[dict[str, Tensor]]) -> None:
    """Every checkpoint holds the first one's tensors, with its shapes and dtypes."""
    first, fix = _checkpoint_file(paths[0]), "average checkpoints of one architecture"
    for path, flat in zip(paths[1:], sources[1:], strict=True):
        path = _checkpoint_file(path)
        mine = [k for k in sources[0] if k not in flat]
        theirs = [k for k in flat if k not in sources[0]]
        if mine or theirs:
            only = [f"only in {p}: {_listing(n)}" for p, n in ((first, mine), (path, theirs)) if n]
            raise SoupError(f"{first} and {path} hold different tensors ({'; '.join(only)}): {fix}")
        differ = []
        for key, a in sources[0].items():
            b = flat[key]
            if a.shape != b.shape:
                differ.append(f"{key!r} shape {tuple(a.shape)} vs {tuple(b.shape)}")
            elif a.dtype != b.dtype:
                differ.append(f"{key!r} dtype {a.dtype} vs {b.dtype}")
        if differ:
            shown = "; ".join(differ[:3]) + (f"; {len(differ) - 3} more" if len(differ) > 3 else "")
            raise SoupError(f"{first} and {path} do not fit together: {shown}: {fix}")


def _tensors(state: Any, path: Path) -> dict[str, Tensor]:
    if not isinstance(state, dict) or not state:
        raise SoupError(f"{path} holds no state_dict (a mapping of names to tensors)")
    import torch

    bad = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise SoupError(f"{path} is not a plain state_dict: {', '.join(bad[:3])} are no tensors")
    return dict(state)


def average_checkpoints(
    paths: list[Path], coefficients: list[float] | None = None
) -> tuple[str, Any]:
    """Load and average (uniformly when ``coefficients`` is None); returns (kind, the object
    to write)."""
    from rlweights.ops import average_

    if len(paths) < 2:
        raise SoupError("give at least two checkpoints to average")
    if coefficients is not None and len(coefficients) != len(paths):
        raise SoupError(
            f"{len(coefficients)} coefficients for {len(paths)} checkpoints: give one each"
        )
    loaded = [load_any(p) for p in paths]
    kinds = {kind for kind, _, _ in loaded}
    if len(kinds) > 1:
        raise SoupError(f"cannot average different kinds of checkpoints: {', '.join(kinds)}")
    kind = loaded[0][0]
    if kind == "agent":
        algos = {(obj["algo"], obj["impl"]) for _, _, obj in loaded}
        if len(algos) > 1:
            raise SoupError(f"the checkpoints come from different agents: {sorted(algos)}")
        envs = [obj.get("config", {}).get("env_id") for _, _, obj in loaded]
        for path, env in zip(paths[1:], envs[1:], strict=True):
            if env != envs[0]:
                raise SoupError(
                    f"the checkpoints come from different environments: {envs[0]} "
                    f"({_checkpoint_file(paths[0])}) and {env} ({_checkpoint_file(path)}); "
                    "average runs of one environment"
                )
    sources = [flat for _, flat, _ in loaded]
    _check_fit(paths, sources)
    result = {name: value.clone() for name, value in sources[0].items()}
    try:
        average_(result, sources, coefficients)
    except (TypeError, ValueError) as exc:  # the coefficients
        raise SoupError(_first_line(exc)) from None
    first = loaded[0][2]
    if kind == "agent":
        nets: dict[str, dict[str, Tensor]] = {}
        for name, value in result.items():
            net, key = name.split("/", 1)
            nets.setdefault(net, {})[key] = value
        # A soup cannot resume: no training state; its checksum is its own.
        out = {k: v for k, v in first.items() if k != "training"}
        out["weights"] = nets
        out["averaged_from"] = [str(_checkpoint_file(p)) for p in paths]
        return kind, sealed(out)
    return kind, result


def _write(kind: str, result: Any, first: Path, out: Path) -> None:
    import torch

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
    parser.add_argument(
        "checkpoints", nargs="+", type=Path, help="two or more files (or run folders)"
    )
    parser.add_argument("--out", type=Path, required=True, help="where to write the average")
    parser.add_argument(
        "--coefficients",
        nargs="+",
        type=float,
        metavar="C",
        help="one coefficient per checkpoint (relative, normalised to sum to 1; default: equal)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="write --out even in the folder of a run (replacing its model.pt, if that is --out)",
    )


def _check_out(out: Path, inputs: list[Path], force: bool) -> None:
    """The output must not replace an input (a run's resumable checkpoint, a model), nor,
    unless ``force``, write into a run's folder (another run's checkpoint)."""
    if out.exists() and out.is_dir():
        raise SoupError(f"--out {out} is a directory; give a file path")
    for path in map(_checkpoint_file, inputs):
        if out.resolve() == path.resolve() or (out.exists() and out.samefile(path)):
            raise SoupError(
                f"--out {out} is one of the checkpoints to average: writing there would "
                "replace it; give another path"
            )
    held = [name for name in ("model.pt", "config.json") if (out.parent / name).exists()]
    if held and not force:
        raise SoupError(
            f"--out {out} is in the run folder {out.parent} (it holds {' and '.join(held)}): "
            "writing there could replace that run's checkpoint; give a path outside run "
            "folders, or add --force to write there anyway"
        )


def main_from_args(args: argparse.Namespace) -> int:
    try:
        _check_out(args.out, args.checkpoints, args.force)
        kind, result = average_checkpoints(args.checkpoints, args.coefficients)
        _write(kind, result, args.checkpoints[0], args.out)
    except (SoupError, OSError) as exc:
        print(f"rlweights soup: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote the average of {len(args.checkpoints)} {kind} checkpoints to {args.out}")
    return 0
