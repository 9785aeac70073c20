"""A run folder: the files of one training run, and the lock that keeps it to one process.

A run folder holds only what ``rlweights train`` writes: ``.rlweights-run`` (the marker of a
folder that rlweights created; only such a folder, or one with an rlweights checkpoint, is
ever taken for a run), ``config.json``, ``model.pt``, ``summary.json``, TensorBoard event files
and, for a moment, the temporary files of atomic writes (``.NAME.XXXXXXXX.tmp``; a kill during
a write can leave one behind: it is removed at the next start or resume of the run).

While a process trains a run it holds an exclusive OS lock on the folder (``flock`` on the
directory itself, so nothing is written; the operating system releases it when the process
ends, however it ends). A second process that wants the same run is refused. Windows has no
``flock``: there the folder is not locked.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from rlweights.files import atomic_write

__all__ = [
    "MARKER",
    "RunFolderError",
    "clean_temporaries",
    "create",
    "discard",
    "holding",
    "is_marked",
    "mark",
    "never_checkpointed",
    "reset_for_rerun",
]

MARKER = ".rlweights-run"
"""The file that marks a folder as a run folder that rlweights created: only such a folder is
written into or resumed."""
_OWN_FILES = {MARKER, "config.json", "model.pt", "summary.json"}
# The temporary files of rlweights.files.atomic_write (tempfile's 8 characters) for the
# files above, and nothing else.
_TEMPORARY = re.compile(
    r"^\.(" + "|".join(map(re.escape, sorted(_OWN_FILES))) + r")\.[a-z0-9_]{8}\.tmp$"
)
_EVENTS = re.compile(r"^events\.out\.tfevents\..+")

# The locks this process holds: folder -> [open descriptor (None on Windows), holders].
_HELD: dict[Path, list] = {}


class RunFolderError(ValueError):
    """A run folder that another process holds, or that cannot be written."""


def _lock(run_dir: Path) -> int | None:
    """An open descriptor of ``run_dir`` holding an exclusive ``flock`` (no file is written)."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RunFolderError(
            f"run {run_dir} is in use by another process: wait until it ends, or choose "
            "another --run-name"
        ) from None
    return fd


@contextmanager
def holding(run_dir: str | Path) -> Iterator[None]:
    """Hold the run folder's lock inside the ``with`` block (re-entrant in one process).
    Raises ``RunFolderError`` when another process holds it."""
    key = Path(run_dir).resolve()
    if key in _HELD:
        _HELD[key][1] += 1
    else:
        _HELD[key] = [_lock(key), 1]
    try:
        yield
    finally:
        _HELD[key][1] -= 1
        if not _HELD[key][1]:
            fd = _HELD.pop(key)[0]
            if fd is not None:
                os.close(fd)  # closing the descriptor releases the lock


def create(run_dir: Path) -> None:
    """Make a new run folder (its parents too); raises ``FileExistsError`` when something is
    there already. Hold its lock, then ``mark`` it."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir()


def mark(run_dir: str | Path) -> None:
    """Write the marker of a folder that rlweights created (atomically). It also proves that
    the folder can be written: a read-only folder or a full disk raises
    ``RunFolderError`` here, before a run starts. Call it while holding the lock."""
    try:
        atomic_write(Path(run_dir) / MARKER, lambda f: f.write("rlweights run folder\n"), "w")
    except OSError as exc:
        raise RunFolderError(
            f"run folder {run_dir} cannot be written ({exc.strerror or exc}): make it "
            "writable, or free some space"
        ) from None


def is_marked(run_dir: str | Path) -> bool:
    """Whether rlweights created ``run_dir`` (its marker is a regular file)."""
    marker = Path(run_dir) / MARKER
    return marker.is_file() and not marker.is_symlink()


def discard(run_dir: Path) -> None:
    """Remove a run folder that this process has just created and that holds nothing but
    what its set-up wrote (the marker, ``config.json``, temporary files): a run that wrote
    nothing else leaves no folder. Anything else in it keeps the folder."""
    for name in (MARKER, "config.json"):
        (run_dir / name).unlink(missing_ok=True)
    clean_temporaries(run_dir)
    with suppress(OSError):  # something else is in it
        run_dir.rmdir()


def clean_temporaries(run_dir: str | Path) -> list[Path]:
    """Remove what interrupted atomic writes of rlweights' own files left behind; returns the
    removed paths. Call it while holding the lock (a live run's temporary files are in use),
    in a folder that is a run (``is_marked``, or one with an rlweights checkpoint)."""
    removed = [p for p in Path(run_dir).iterdir() if _TEMPORARY.match(p.name) and p.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def never_checkpointed(run_dir: str | Path) -> bool:
    """A folder of a run that stopped before its first checkpoint: created by rlweights
    (``is_marked``), only ``rlweights train``'s files, a ``config.json`` and no
    ``model.pt``. The same command can start it again."""
    run_dir = Path(run_dir)
    if not is_marked(run_dir) or not (run_dir / "config.json").is_file():
        return False
    if (run_dir / "model.pt").exists():
        return False
    return all(
        p.name in _OWN_FILES or _EVENTS.match(p.name) or _TEMPORARY.match(p.name)
        for p in run_dir.iterdir()
    )


def reset_for_rerun(run_dir: str | Path) -> None:
    """Empty a ``never_checkpointed`` folder for a new start (its event files describe
    steps that the new start does again). Call it while holding the lock."""
    run_dir = Path(run_dir)
    clean_temporaries(run_dir)
    for path in run_dir.iterdir():
        if _EVENTS.match(path.name) and path.is_file():
            path.unlink()
