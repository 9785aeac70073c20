"""The package's shape: one installed namespace, a torch-only core, dependencies one way.

* A wheel built from the repository holds only ``rlweights`` (the folders ``agents/`` and
  ``envs/`` install as ``rlweights.agents`` and ``rlweights.envs``); installed non-editable
  into a fresh environment it trains, and a user's own ``agents``/``envs`` stay theirs.
* With gymnasium, stable_baselines3, tensorboard and tqdm unimportable, the core works and
  every feature that needs an extra names it in one line.
* Module by module (read from the source), nothing imports a layer above its own, no
  private name crosses a module boundary and the module-level imports have no cycle.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
from conftest import SUBPROCESS_TIMEOUT

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("gymnasium", "stable_baselines3", "tensorboard", "tqdm")

# Hide the named packages from every import finder, as if they were not installed: imports
# raise ModuleNotFoundError and importlib.util.find_spec returns None (torch asks it too).
BLOCKER = """
import sys
BLOCKED = set({blocked!r})
class _Hide:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None
    def __getattr__(self, attr):
        return getattr(self.finder, attr)
sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
"""


def _python(
    code: str, *, blocked: tuple[str, ...] = (), cwd: Path = ROOT, exe: str = sys.executable
):
    script = BLOCKER.format(blocked=blocked) + textwrap.dedent(code)
    return subprocess.run(
        [exe, "-c", script], capture_output=True, text=True, cwd=cwd, timeout=SUBPROCESS_TIMEOUT
    )


def test_import_rlweights_loads_no_extra_and_no_application():
    done = _python(
        """
        import sys
        import torch  # torch itself imports tqdm when it is installed (torch.hub)
        before = set(sys.modules)
        import rlweights as rw
        heavy = ("gymnasium", "stable_baselines3", "tensorboard", "tqdm", "sb3_contrib")
        loaded = sorted(
            m for m in set(sys.modules) - before
            if m.split(".")[0] in heavy
            or m.startswith(("rlweights.agents", "rlweights.envs", "rlweights.bench"))
            or m in ("rlweights.sb3", "rlweights.cli", "rlweights.tensorboard")
        )
        print(loaded)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _loaded(prefixes: tuple[str, ...]) -> str:
    """Code printing, as one JSON line, the loaded modules that start with ``prefixes``."""
    return f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({prefixes!r}))))"


COMPILER = ("torch._dynamo", "torch._inductor")


def test_import_rlweights_loads_core_and_routines_only_and_no_compiler():
    done = _python(
        f"""
        import json, sys
        import rlweights as rw
        {_loaded(("torch", "rlweights."))}
        for name in rw.__all__:
            if name != "distributed":
                getattr(rw, name)
        {_loaded(("rlweights.",))}
        {_loaded(COMPILER)}
        assert rw.distributed.PeerError and rw.flat.layout_of
        {_loaded(("rlweights.distributed",))}
        """
    )
    assert done.returncode == 0, done.stderr
    at_import, used, compiler, distributed = map(json.loads, done.stdout.splitlines())
    assert at_import == []  # not even torch: the command's help needs none
    assert used and {_layer(m) for m in used} <= {CORE, ROUTINES}, used
    assert "rlweights.distributed" not in used
    assert compiler == []
    assert distributed == ["rlweights.distributed"]


def test_the_facade_gives_what_it_names_for_type_checkers():
    import rlweights as rw

    tree = ast.parse((ROOT / "rlweights" / "__init__.py").read_text())
    (block,) = [
        n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"
    ]
    named = {a.name: node.module for node in block.body for a in node.names}
    assert set(named) == set(rw.__all__) - {"__version__"} <= set(dir(rw))
    for name, module in named.items():
        if module == "rlweights":
            assert getattr(rw, name) is importlib.import_module(f"rlweights.{name}")
        else:
            assert getattr(rw, name) is getattr(importlib.import_module(module), name), name
    with pytest.raises(AttributeError, match="module 'rlweights' has no attribute 'polyak'"):
        rw.polyak  # noqa: B018


def test_core_works_without_any_extra():
    done = _python(
        """
        import torch
        from torch import nn
        import rlweights as rw
        from rlweights import distributed  # imports without a process group

        torch.manual_seed(0)
        online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        target = rw.make_target(online)
        before = {k: v.double().clone() for k, v in target.state_dict().items()}
        with torch.no_grad():
            for p in online.parameters():
                p.add_(1.0)
        rw.polyak_(target, online, 0.25)
        for name, p in online.named_parameters():
            want = before[name] + 0.25 * (p.double() - before[name])
            torch.testing.assert_close(target.get_parameter(name).double(), want)
        rw.copy_(target, online)
        assert float(rw.distance(target, online)) == 0.0
        assert set(rw.distances(target, online)) >= {"0.weight", "2.bias"}
        a, b = nn.Linear(3, 3), nn.Linear(3, 3)
        want = (a.weight.double() + 3 * b.weight.double()) / 4
        soup = nn.Linear(3, 3)
        rw.average_(soup, [a, b], coefficients=[1.0, 3.0])
        torch.testing.assert_close(soup.weight.double(), want)
        rw.clamp_(soup, -0.1, 0.1)
        assert soup.weight.abs().max() <= 0.1
        rw.max_norm_(soup, 0.05)
        assert torch.linalg.vector_norm(soup.weight, dim=1).max() <= 0.05 + 1e-6
        for routine in (
            rw.PolyakUpdate(online, target, tau=0.5),
            rw.HardUpdate(online, target, every=2),
            rw.EMA(online, tau=0.1),
            rw.SWA(online),
        ):
            for _ in range(3):
                routine.step()
            state = routine.state_dict()
            routine.load_state_dict(state)
            assert routine.steps == 3 and state["counter"]["steps"] == 3, repr(routine)
        optimizer = torch.optim.Adam(online.parameters())
        handle = rw.constrain(optimizer, online, rw.constraints.MaxNorm(1.0))
        online(torch.randn(5, 3)).sum().backward()
        optimizer.step()
        assert all(
            float(torch.linalg.vector_norm(m.weight, dim=1).max()) <= 1.0 + 1e-6
            for m in (online[0], online[2])
        )
        handle.remove()
        rw.reset_optimizer_state_(optimizer, online)
        print("core ok")
        """,
        blocked=EXTRAS,
    )
    assert done.returncode == 0, done.stderr
    assert "core ok" in done.stdout


@pytest.mark.parametrize(
    ("module", "extra"),
    [
        ("rlweights.sb3", "sb3"),
        ("rlweights.tensorboard", "tensorboard"),
        ("rlweights.agents", "agents"),
        ("rlweights.agents.train", "agents"),
        ("rlweights.envs", "agents"),
    ],
)
def test_an_integration_without_its_extra_names_it(module, extra):
    done = _python(
        f"""
        from rlweights.extras import MissingExtraError
        try:
            import {module}
        except MissingExtraError as exc:
            print(exc)
        """,
        blocked=EXTRAS,
    )
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line.count("\n") == 0
    assert f"pip install 'rlweights[{extra}]'" in line


@pytest.mark.parametrize(
    ("args", "blocked", "extra"),
    [
        (["train", "--steps", "10"], EXTRAS, "agents"),
        (["evaluate", "missing.pt"], EXTRAS, "agents"),
        (["demo", "chain"], EXTRAS, "agents"),
        (["train", "--impl", "sb3", "--steps", "10"], ("stable_baselines3",), "sb3"),
        (["bench-sb3", "--rounds", "1"], EXTRAS, "sb3"),
    ],
    ids=["train", "evaluate", "demo", "train-sb3", "bench-sb3"],
)
def test_the_command_names_the_missing_extra(args, blocked, extra, tmp_path):
    done = _python(
        f"""
        import sys
        from rlweights.cli import main
        sys.exit(main({[*args]!r}))
        """,
        blocked=blocked,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"pip install 'rlweights[{extra}]'" in done.stderr
    assert not (tmp_path / "runs").exists()  # nothing written


def test_help_works_with_the_core_alone():
    for args in ([], ["soup"], ["bench"]):
        done = _python(
            f"""
            import sys
            from rlweights.cli import main
            sys.exit(main({[*args, "--help"]!r}))
            """,
            blocked=EXTRAS,
        )
        assert done.returncode == 0, done.stderr
        assert "usage: rlweights" in done.stdout


# Commands whose help needs no agents: none of them imports torch to print it.
NO_AGENTS = (
    "",
    "soup",
    "bench",
    "bench-sb3",
    "bench-drift",
    "bench-distributed",
    "bench-learning",
    "bench-startup",
    "bench-lockstep",
)


@pytest.mark.parametrize("command", [*NO_AGENTS, "train"])
def test_help_starts_without_torch_or_without_its_compiler(command):
    # train's flags come from the agents' configs, which need torch (not its compiler)
    unloaded = COMPILER if command == "train" else ("torch",)
    done = _python(
        f"""
        import json, sys
        from rlweights.cli import main
        try:
            main({[*command.split(), "--help"]!r})
        except SystemExit:
            pass
        {_loaded(unloaded)}
        """
    )
    assert done.returncode == 0, done.stderr
    assert "usage: rlweights" in done.stdout
    assert done.stdout.splitlines()[-1] == "[]"


# ---- the installed wheel -------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    (found,) = out.glob("rlweights-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh environment with the wheel installed (not editable); the dependencies are
    reused from this environment through a path entry, which (unlike a site directory) does
    not run this environment's editable-install hooks."""
    env = tmp_path_factory.mktemp("env") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(purelib, "reuse-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    return env


def test_the_wheel_has_one_top_level_package(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        tops = {n.split("/")[0] for n in names}
        (dist_info,) = [t for t in tops if t.endswith(".dist-info")]
        assert tops == {"rlweights", dist_info}
        assert "rlweights/agents/train.py" in names
        assert "rlweights/envs/chain.py" in names
        assert "rlweights/py.typed" in names
        top_level = f"{dist_info}/top_level.txt"
        if top_level in names:
            assert zf.read(top_level).decode().split() == ["rlweights"]


@pytest.mark.parametrize("where", ["plain", "with-user-packages"])
def test_the_installed_wheel_trains(installed, tmp_path, where):
    work = tmp_path / "project"
    work.mkdir()
    if where == "with-user-packages":  # a user's project with folders of these common names
        for name in ("agents", "envs"):
            (work / name).mkdir()
            (work / name / "__init__.py").write_text(f"OWNER = 'user {name}'\n")
    python = str(installed / "bin" / "python")
    checks = (
        """
        import rlweights, rlweights.agents, rlweights.envs, rlweights.sb3
        assert rlweights.__file__.startswith(sys.prefix), rlweights.__file__
        assert rlweights.agents.__file__.startswith(sys.prefix), rlweights.agents.__file__
        """
        + (
            """
        import agents, envs
        assert (agents.OWNER, envs.OWNER) == ("user agents", "user envs")
        """
            if where == "with-user-packages"
            else """
        for name in ("agents", "envs"):
            try:
                __import__(name)
            except ModuleNotFoundError:
                pass
            else:
                raise AssertionError(f"import {name} works: the wheel installed it")
        """
        )
        + """
        print("imports ok")
        """
    )
    done = _python("import sys\n" + textwrap.dedent(checks), cwd=work, exe=python)
    assert done.returncode == 0, done.stderr
    assert "imports ok" in done.stdout
    env = {**os.environ, "PATH": f"{installed / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    train = subprocess.run(
        [
            str(installed / "bin" / "rlweights"),
            "train",
            "--steps",
            "300",
            "--no-progress",
            "--logdir",
            "runs",
            "--run-name",
            "wheel",
            "--eval-episodes",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert train.returncode == 0, train.stderr
    assert (work / "runs" / "wheel" / "model.pt").is_file()
    if where == "with-user-packages":
        assert (work / "agents" / "__init__.py").read_text() == "OWNER = 'user agents'\n"


# ---- dependencies run one way ----------------------------------------------------------------

# Layer of each module of the installed package (by dotted name); a module may import its own
# layer and those below, never one above, at module level or lazily inside a function.
CORE, ROUTINES, INTEGRATION, APPLICATION, TOP = range(5)
LAYERS = {
    CORE: (
        "weights",
        "flat",
        "ops",
        "checks",
        "periodic",
        "registration",
        "files",
        "extras",
        "tracing",
    ),
    ROUTINES: ("targets", "running_average", "constraints", "plasticity", "capture", "drift"),
    INTEGRATION: ("sb3", "tensorboard", "distributed", "soup"),
    APPLICATION: ("agents", "envs"),
    TOP: ("bench", "cli", "__main__"),
}
# The package facade holds the core's and the routines' names; it names rw.distributed too,
# which it imports only when that attribute is first used.
FACADE_LAZY = ("rlweights.distributed",)
STDLIB = set(sys.stdlib_module_names)


def _layer(module: str) -> int | None:
    """The layer of a module or of a name in it (``rlweights.ops.polyak_``); None: unlisted."""
    if module == "rlweights":
        return ROUTINES
    name = module.split(".")[1]
    return next((layer for layer, names in LAYERS.items() if name in names), None)


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in (
        ("rlweights", "rlweights"),
        ("agents", "rlweights.agents"),
        ("envs", "rlweights.envs"),
    ):
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _imports(module: str, source: str, is_package: bool) -> list[tuple[str, list[str], bool, int]]:
    """(imported module, imported names, at module level?, line) of every import."""
    tree = ast.parse(source)
    top_level = {id(node) for node in tree.body}
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], id(node) in top_level, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1]
                    + ([base] if base else [])
                )
            out.append((base, [a.name for a in node.names], id(node) in top_level, node.lineno))
    return out


def _layer_problems(sources: dict[str, tuple[str, str, bool]]) -> list[str]:
    """What breaks the layers in ``sources`` (module -> (where, source, is a package))."""
    problems = []
    for module, (where, source, is_package) in sources.items():
        mine = _layer(module)
        if mine is None:
            problems.append(f"{where}: {module} is in no layer (add it to LAYERS)")
            continue
        for imported, names, _, line in _imports(module, source, is_package):
            at = f"{where}:{line}"
            top = imported.split(".")[0]
            if top in ("agents", "envs"):
                problems.append(f"{at} imports {imported!r}: use rlweights.{imported}")
            if top == "rlweights":
                for target in [imported] + [f"{imported}.{n}" for n in names]:
                    if target == module or not (target == imported or target in sources):
                        continue
                    if module == "rlweights" and target in FACADE_LAZY:
                        continue
                    theirs = _layer(target)
                    if theirs is None or theirs > mine:
                        problems.append(f"{at}: {module} imports {target} (a higher layer)")
            elif mine <= ROUTINES and top not in STDLIB and top not in ("torch", "numpy"):
                problems.append(f"{at}: the core or routine module {module} imports {imported}")
    return problems


def _sources() -> dict[str, tuple[str, str, bool]]:
    return {
        module: (str(path.relative_to(ROOT)), path.read_text(), path.name == "__init__.py")
        for module, path in _modules().items()
    }


def test_dependencies_run_one_way():
    problems = _layer_problems(_sources())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("module", "imports", "layer"),
    [
        ("rlweights.ops", "from rlweights.targets import make_target", "rlweights.targets"),
        ("rlweights.flat", "import rlweights", "rlweights"),
        ("rlweights.capture", "from rlweights import distributed", "rlweights.distributed"),
        ("rlweights.targets", "from rlweights.sb3 import attach", "rlweights.sb3"),
        ("rlweights.soup", "from rlweights.agents.train import train", "rlweights.agents.train"),
        ("rlweights.envs.chain", "import rlweights.cli", "rlweights.cli"),
        ("rlweights", "from rlweights.sb3 import attach", "rlweights.sb3"),
    ],
)
def test_an_import_of_a_higher_layer_is_found(module, imports, layer):
    """Each layer is told from the one above it: the layer test finds one import added."""
    sources = _sources()
    where, source, is_package = sources[module]
    assert not _layer_problems({module: sources[module]})
    sources[module] = (where, f"{source}\n\ndef late():\n    {imports}\n", is_package)
    problems = _layer_problems({module: sources[module], layer: sources[layer]})
    assert len(problems) == 1, problems
    assert problems[0].endswith(f": {module} imports {layer} (a higher layer)")


def test_a_module_in_no_layer_is_found():
    sources = {"rlweights.helpers": ("rlweights/helpers.py", "import torch\n", False)}
    assert _layer_problems(sources) == [
        "rlweights/helpers.py: rlweights.helpers is in no layer (add it to LAYERS)"
    ]


def test_no_private_name_crosses_a_module_and_no_import_cycle():
    modules = _modules()
    problems, graph = [], {}
    for module, path in modules.items():
        graph[module] = set()
        for imported, names, at_top, line in _imports(
            module, path.read_text(), path.name == "__init__.py"
        ):
            if not imported.startswith("rlweights"):
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                problems.append(
                    f"{path.relative_to(ROOT)}:{line} imports {private} from {imported}"
                )
            if at_top:
                for target in [imported] + [f"{imported}.{n}" for n in names]:
                    if target in modules and target != module:
                        graph[module].add(target)
    assert not problems, "\n".join(problems)

    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(graph[module]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "module-level import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_version_is_the_changelogs():
    """pyproject, ``rlweights.__version__`` and the CHANGELOG's latest release agree."""
    import tomllib

    import rlweights

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", _changelog(), re.M)
    assert releases, "CHANGELOG.md names no release ('## [X.Y.Z] - YYYY-MM-DD')"
    assert version == rlweights.__version__ == releases[0]


def _changelog() -> str:
    return (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")


def test_the_release_builds_and_its_readme_renders(tmp_path):
    """``python -m build`` makes a wheel and an sdist (the sdist's wheel built from the sdist
    alone); ``twine check --strict`` renders the README as PyPI would; both carry the
    license, and the wheel's metadata says MIT."""
    out = tmp_path / "dist"
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = out.glob("rlweights-*.whl")
    (sdist,) = out.glob("rlweights-*.tar.gz")
    check = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = zf.read(metadata).decode()
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: MIT" in text
    assert "Classifier: Programming Language :: Python :: 3" in text
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    with tarfile.open(sdist) as tf:
        assert any(n.endswith("/LICENSE") for n in tf.getnames())
