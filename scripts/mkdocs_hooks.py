"""MkDocs hook (``hooks:`` in mkdocs.yml): the source tree as it installs, for the API pages.

The repository's folders ``agents/`` and ``envs/`` install as ``rlweights.agents`` and
``rlweights.envs`` (pyproject's ``package-dir``), a mapping that mkdocstrings' source reader
(griffe) does not follow. Before each build this writes ``build/docs-src/rlweights/``: links to
every entry of ``rlweights/``, and ``agents`` and ``envs`` linked in beside them, so that
``::: rlweights.agents.sac`` reads ``agents/sac.py``. Nothing is copied or imported. A
``build/docs-src`` that this hook did not write (no marker file in it) is left alone: the build
stops and says so.
"""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VIEW = ROOT / "build" / "docs-src"
MARKER = VIEW / ".written-by-mkdocs-hooks"
MAPPED = {"agents": ROOT / "agents", "envs": ROOT / "envs"}


def on_startup(**_: object) -> None:
    if VIEW.exists() and not MARKER.exists():
        raise SystemExit(f"{VIEW} exists and was not written by {__file__}: move it away")
    package = VIEW / "rlweights"
    shutil.rmtree(VIEW, ignore_errors=True)
    package.mkdir(parents=True)
    MARKER.touch()
    for entry in (ROOT / "rlweights").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name, folder in MAPPED.items():
        (package / name).symlink_to(folder)
