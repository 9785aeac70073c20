"""Atomic file writes (a reader, or a crash, never sees a half-written file) and checksums
of what checkpoints hold."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "WriteError",
    "atomic_write",
    "checksum",
    "checksum_matches",
    "finite_or_none",
    "sealed",
    "write_json",
]


class WriteError(OSError):
    """A file that ``atomic_write`` could not write (a full disk, a read-only folder):
    the file is left as it was. ``filename`` is its path, ``errno`` and ``strerror`` the
    operating system's reason."""

    def __str__(self) -> str:
        return f"could not write {self.filename}: {self.strerror}"


def _umask() -> int:
    """The process's umask (read without changing it where Linux allows)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO], None], mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file in ``path``'s directory, flush it to disk, then
    rename it over ``path`` (atomic on POSIX and Windows). The file gets the permissions any
    new file gets (``0o666`` less the umask: 644 under the usual 022). On any error the
    temporary file is removed and ``path`` is left as it was; an error of the operating system
    (``OSError``: no space left, no permission) is raised as ``WriteError``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 600
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        # torch.save reports its file's failed write as a RuntimeError of its own, raised
        # while handling the OSError: the operating system's reason is found in the chain.
        reason = exc if isinstance(exc, Exception) else None  # not KeyboardInterrupt
        while reason is not None and not isinstance(reason, OSError):
            reason = reason.__cause__ or reason.__context__
        if reason is not None:
            raise WriteError(reason.errno, reason.strerror or str(reason), str(path)) from exc
        raise


def finite_or_none(data: Any) -> Any:
    """``data`` with every NaN or infinite float replaced by None (JSON has no NaN)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite_or_none(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_none(value) for value in data]
    return data


def write_json(path: str | Path, data: Any) -> None:
    """``data`` as indented, strict JSON (a non-finite float becomes ``null``), written
    atomically."""
    text = json.dumps(finite_or_none(data), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text), mode="w")


def _digest(value: Any, sha: Any) -> None:
    import torch  # here: the commands that write only JSON start without torch

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        sha.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        sha.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    elif isinstance(value, np.ndarray):
        sha.update(f"A{value.dtype}{value.shape}".encode())
        sha.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict):
        sha.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            sha.update(repr(key).encode())
            _digest(value[key], sha)
    elif isinstance(value, (list, tuple)):
        sha.update(f"L{len(value)}".encode())
        for item in value:
            _digest(item, sha)
    else:
        sha.update(f"V{value!r}".encode())


def checksum(state: Any) -> str:
    """SHA-256 of everything ``state`` holds (tensors byte for byte, with their dtypes and
    shapes; arrays; nested dicts, lists and plain values): one changed byte changes it."""
    sha = hashlib.sha256()
    _digest(state, sha)
    return sha.hexdigest()


def sealed(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with a ``"checksum"`` entry: the ``checksum`` of everything else."""
    rest = {key: value for key, value in state.items() if key != "checksum"}
    return {**rest, "checksum": checksum(rest)}


def checksum_matches(state: dict[str, Any], required: bool = True) -> bool:
    """Remove the ``"checksum"`` entry of a ``sealed`` ``state``; whether it matches the
    rest. Without one: ``not required`` (files of a format written before checksums)."""
    stored = state.pop("checksum", None)
    return not required if stored is None else stored == checksum(state)
