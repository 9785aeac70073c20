"""The documentation site: it builds under ``--strict``, its API reference covers every public
name, and its pages speak of the project only.

The site is built once (``mkdocs build --strict``: a broken link, a missing page or an object
that mkdocstrings cannot find fails it); the API reference is read back from the inventory
that mkdocstrings writes (``objects.inv``, the list of every documented object), and every
name in the ``__all__`` of the public packages' modules must be in it.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from conftest import SUBPROCESS_TIMEOUT

ROOT = Path(__file__).resolve().parents[1]
# The packages whose every public name the API reference covers; their submodules too.
PACKAGES = ("rlweights.sb3", "rlweights.agents", "rlweights.envs")
MODULES = ("rlweights", "rlweights.tensorboard", "rlweights.distributed", "rlweights.drift")
FORBIDDEN = re.compile(r"this stop|stop [0-9]|session|device tool", re.I)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def _inventory(site: Path) -> set[str]:
    """The object names of a Sphinx-style ``objects.inv`` (four header lines, then zlib)."""
    raw = (site / "objects.inv").read_bytes()
    body = raw.split(b"\n", 4)[4]
    return {line.split(" ", 1)[0] for line in zlib.decompress(body).decode().splitlines()}


def _public_names() -> dict[str, list[str]]:
    """module -> the names of its ``__all__``, for every module of MODULES and PACKAGES."""
    modules = list(MODULES)
    for package in PACKAGES:
        found = importlib.import_module(package)
        modules.append(package)
        modules += [f"{package}.{m.name}" for m in pkgutil.iter_modules(found.__path__)]
    return {m: list(getattr(importlib.import_module(m), "__all__", [])) for m in modules}


def _documented_as(module: str, name: str) -> set[str]:
    """The paths under which a name may be documented: where it is exported, and where it is
    defined (``rw.polyak_`` is ``rlweights.ops.polyak_``)."""
    value = getattr(importlib.import_module(module), name)
    paths = {f"{module}.{name}"}
    if hasattr(value, "__module__") and hasattr(value, "__qualname__"):
        paths.add(f"{value.__module__}.{value.__qualname__}")
    if type(value).__name__ == "module":
        paths.add(value.__name__)
    return paths


def test_the_site_builds_and_covers_every_public_name(site):
    documented = _inventory(site)
    assert "rlweights.targets.PolyakUpdate" in documented  # the inventory is the right one
    missing = [
        f"{module}.{name}"
        for module, names in _public_names().items()
        for name in names
        if not name.startswith("__") and not _documented_as(module, name) & documented
    ]
    assert not missing, f"public names missing from the API reference: {missing}"


def test_the_guide_pages_are_in_the_site(site):
    for page in (
        "getting-started",
        "ops",
        "agents",
        "sb3",
        "tensorboard",
        "environments",
        "benchmarks",
        "architecture",
        "changelog",
    ):
        assert (site / page / "index.html").is_file(), page
    changelog = (site / "changelog" / "index.html").read_text(encoding="utf-8")
    assert "Keep a Changelog" in changelog  # CHANGELOG.md itself, included


def test_the_pages_speak_of_the_project_only():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "CHANGELOG.md"]
    found = [
        f"{page.relative_to(ROOT)}:{number}: {line.strip()}"
        for page in pages
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        if FORBIDDEN.search(line)
    ]
    assert not found, found


def test_the_source_view_is_written_only_where_it_wrote_before(tmp_path, monkeypatch):
    """The build's hook links the installed layout (``rlweights/agents`` -> ``agents/``) into
    its own folder, and refuses a folder of that name that it did not write."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("hooks", ROOT / "scripts" / "mkdocs_hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    view = tmp_path / "docs-src"
    monkeypatch.setattr(hooks, "VIEW", view)
    monkeypatch.setattr(hooks, "MARKER", view / ".written-by-mkdocs-hooks")
    view.mkdir()
    (view / "mine.txt").write_text("a user's file")
    with pytest.raises(SystemExit, match="was not written by"):
        hooks.on_startup()
    assert [p.name for p in view.iterdir()] == ["mine.txt"]
    (view / "mine.txt").unlink()
    view.rmdir()
    hooks.on_startup()
    hooks.on_startup()  # its own folder: written again
    assert (view / "rlweights" / "agents" / "sac.py").resolve() == ROOT / "agents" / "sac.py"
    assert (view / "rlweights" / "ops.py").resolve() == ROOT / "rlweights" / "ops.py"
