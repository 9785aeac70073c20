"""Atomic file writes: a reader, or a crash, never sees a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "write_json"]


def atomic_write(path: str | Path, write: Callable[[IO], None], mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file in ``path``'s directory, flush it to disk, then
    rename it over ``path`` (atomic on POSIX and Windows). On any error the temporary file is
    removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    """``data`` as indented JSON, written atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2) + "\n"), mode="w")
