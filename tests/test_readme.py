"""The README's code blocks run, each as a reader would run it (with a smaller budget).

Every fenced block is Python or shell, and every shell line is one that a test below knows
how to run: ``rlweights train`` lines run with ``--steps 300`` added (the flags, the
environment and the algorithm as written), ``rlweights evaluate`` evaluates the folder one of
them wrote, Python blocks run as written with ``.learn(N)`` cut to 300 steps, the install
lines (from a clone: ``pip install -e .[...]``) name extras that pyproject defines, the
Quickstart installs what ``.ci/run`` installs and its test line is ``.ci/run``'s, and
``mkdocs serve`` is checked by building the same site. A new kind of line in the README
fails ``test_every_shell_line_is_known`` until it gets a runner.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from conftest import SUBPROCESS_TIMEOUT

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, flags=re.M | re.S)
SHELL = [
    shlex.split(line, comments=True)
    for language, body in BLOCKS
    if language == "bash"
    for line in body.splitlines()
    if line.strip()
]
PYTHON = [body for language, body in BLOCKS if language == "python"]
SMOKE_STEPS = "300"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NO_MKDOCS_2_WARNING": "1"}


def _kind(words: list[str]) -> str:
    if words[:3] == ["python3", "-m", "venv"]:
        return "quickstart"
    name = Path(words[0]).name
    if name == "rlweights":
        return f"rlweights {words[1]}"
    if name == "python" and words[1:3] == ["-m", "pytest"]:
        return "tests"
    if name == "pip" and words[1] == "install":
        return "install"
    if name == "mkdocs" and words[1:] == ["serve"]:
        return "docs"
    return "unknown"


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT
    )


def test_every_block_is_python_or_shell():
    assert BLOCKS, "the README has no code blocks"
    assert {language for language, _ in BLOCKS} <= {"python", "bash"}


def test_every_shell_line_is_known():
    unknown = [" ".join(words) for words in SHELL if _kind(words) == "unknown"]
    assert not unknown, f"README shell lines that no test runs: {unknown}"


def _ci_lines() -> list[str]:
    return (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()


def test_quickstart_installs_and_tests_what_ci_does():
    """The first Quickstart command installs what CI installs and then runs the main job (the
    train lines below run it); the second is CI's test command."""
    (quickstart,) = [words for words in SHELL if _kind(words) == "quickstart"]
    steps: list[list[str]] = [[]]
    for word in quickstart:
        if word == "&&":
            steps.append([])
        else:
            steps[-1].append(word)
    install = steps[1]
    assert Path(install[0]).name == "pip" and install[1] == "install"
    ci = _ci_lines()
    for requirement in install[2:]:
        if requirement != "-e":
            assert any(requirement in line and "pip install" in line for line in ci), requirement
    assert [Path(steps[2][0]).name, *steps[2][1:]] == ["rlweights", "train"]
    (tests,) = [words for words in SHELL if _kind(words) == "tests"]
    assert " ".join(["python", *tests[1:]]) in ci


def test_install_lines_name_defined_extras():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    named = set()
    for words in SHELL:
        if _kind(words) == "install":
            assert words[2] == "-e", f"an install line that is not from the clone: {words}"
            for requirement in words[3:]:
                match = re.fullmatch(r"\.\[([\w,]+)\]", requirement)
                assert match, requirement
                named |= set(match[1].split(","))
    assert named and named <= set(extras), named - set(extras)
    for extra in re.findall(r"`(\w+)`", README[README.index("Extras:") :].split("\n\n")[0]):
        assert extra in extras, f"the README names an extra {extra!r} that pyproject lacks"


def test_rlweights_lines_run(tmp_path):
    """Each ``rlweights train`` line trains (300 steps), all of them side by side in one
    folder (a line written twice runs once); then each ``rlweights evaluate`` line evaluates
    what they wrote."""
    lines = [words for words in SHELL if _kind(words).startswith("rlweights ")]
    lines += [["rlweights", "train"]]  # the Quickstart's main job
    assert {_kind(words) for words in lines} == {"rlweights train", "rlweights evaluate"}
    trains = list(dict.fromkeys(tuple(w) for w in lines if w[1] == "train"))
    extra = ["--steps", SMOKE_STEPS, "--no-progress"]
    started = [
        (
            words,
            subprocess.Popen(
                [sys.executable, "-m", "rlweights", *words[1:], *extra],
                cwd=tmp_path,
                env=ENV,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
        for words in trains
    ]
    for words, process in started:
        out, err = process.communicate(timeout=SUBPROCESS_TIMEOUT)
        assert process.returncode == 0, (words, out[-2000:], err[-2000:])
    for words in (w for w in lines if w[1] == "evaluate"):
        done = _run([sys.executable, "-m", "rlweights", *words[1:]], tmp_path)
        assert done.returncode == 0, (words, done.stdout[-2000:], done.stderr[-2000:])
        assert "mean return" in done.stdout, done.stdout
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert "sb3-sac" in folders
    # one folder per run: one line trains three seeds
    assert len(folders) == len(trains) + 2, folders


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_blocks_run(tmp_path, index):
    code = re.sub(r"\.learn\(\d[\d_]*", f".learn({SMOKE_STEPS}", PYTHON[index])
    done = _run([sys.executable, "-c", code], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    if "save_averaged" in code:
        from stable_baselines3 import SAC

        model = SAC.load(tmp_path / "sac_ema.zip")
        assert model.policy is not None


def test_docs_line_serves_the_site_that_ci_builds():
    """``mkdocs serve`` serves the site of ``mkdocs.yml``, which ``.ci/run`` and
    ``tests/test_docs.py`` build with ``--strict``."""
    assert any(_kind(words) == "docs" for words in SHELL)
    assert (ROOT / "mkdocs.yml").is_file()
    assert any("mkdocs build --strict" in line for line in _ci_lines())


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub and MkDocs' toc make it (for the headings used here)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_links_reach_their_files_and_headings():
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    assert links
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), f"README links to {path}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", target.read_text(encoding="utf-8"), re.M)
            assert anchor in {_slug(h) for h in headings}, f"no heading {anchor!r} in {path}"
