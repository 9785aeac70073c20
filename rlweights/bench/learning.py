"""Learning curves of the native agents next to SB3's, over seeds.

Run as 'rlweights bench-learning' or 'python scripts/bench_learning.py'. Needs the sb3 and
agents extras (matplotlib for the PNG). For every ALGO:ENV[:STEPS] and every seed, the
native agent and SB3's algorithm of the same name ('rlweights train --impl sb3': the same
hyperparameters, from the environment's preset, and the same seed) train and evaluate on
the same schedule (--points evaluations of --eval-episodes deterministic episodes).

Runs go side by side, one process per worker (--workers, default: one per core), each
with one thread. Every run is a 'rlweights train' run folder under OUT/runs: a killed
benchmark keeps the runs that finished and resumes the others where their last checkpoint
left them when it is started again with the same arguments. A folder's name ends in a digest
of its run's whole configuration (steps, flags, evaluation schedule), so a stored run counts
only for the same configuration; runs of other configurations stay as they are.

Writes OUT/curves.json (per run: the evaluation steps and returns, the final return, the
wall-clock seconds), OUT/table.md (final return over seeds: mean with a 95 % bootstrap
interval, interquartile mean; wall-clock time) and OUT/curves.png (mean curve over seeds with
its 95 % bootstrap band, native next to SB3).

--flags adds 'rlweights train' flags to every run (the same hyperparameters on both sides,
e.g. --flags="--gradient-steps 8"); --variant NAME:FLAGS adds runs of the native agent with
more flags, reported as NAME next to the plain native runs (OUT/variants.md): resets or
shrink-and-perturb against none, for instance.

--report-only trains nothing and reports the runs that finished.

  rlweights bench-learning --runs dqn:CartPole-v1 sac:Pendulum-v1:20000 --seeds 0 1 2 3 4
  rlweights bench-learning --runs sac:Pendulum-v1:10000 --impls native \
      --flags="--gradient-steps 8" --variant "reset:--reset-every 2500" --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlweights.files import atomic_write, write_json

__all__ = [
    "Cell",
    "add_arguments",
    "aligned",
    "bootstrap_interval",
    "iqm",
    "main_from_args",
    "summarise",
    "variants_markdown",
]

# compile: the native agent with --compile; sbx: SBX's algorithm (the reference of DroQ)
IMPLS = ("native", "compile", "sb3", "sbx")
DEFAULT_IMPLS = ("native", "sb3")


@dataclass(frozen=True)
class Cell:
    """One run of the benchmark."""

    algo: str
    env_id: str
    budget: int | None  # steps; None: the preset's (or the algorithm's default) step count
    impl: str  # native, compile, sb3, or the name of a --variant
    seed: int
    flags: tuple[str, ...] = ()  # more 'rlweights train' flags (--flags, then the variant's)

    @property
    def name(self) -> str:
        env = "".join(c if c.isalnum() or c in "._-" else "-" for c in self.env_id)
        return f"{self.algo}-{env}-{self.impl}-s{self.seed}"


def iqm(values: np.ndarray) -> float:
    """Interquartile mean: the mean of the middle half (a quarter cut from each end)."""
    values = np.sort(np.asarray(values, dtype=float))
    cut = len(values) // 4
    return float(values[cut : len(values) - cut].mean())


def bootstrap_interval(
    values: np.ndarray, level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (rows: seeds; columns, if any,
    are bootstrapped together: one interval per column)."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    means = values[picks].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail], axis=0)
    return low, high


def _configuration(cell: Cell, points: int, episodes: int) -> list[str]:
    """The 'rlweights train' arguments of the cell's run: all but where it is written."""
    from rlweights.agents.registry import make_config

    steps = cell.budget or make_config(cell.algo, cell.env_id).total_steps
    reference = cell.impl in ("sb3", "sbx")
    impl = ["--impl", cell.impl if reference else "native"]
    if not reference:  # the native agent as asked, never as --compile auto chooses
        impl.append("--compile=on" if cell.impl == "compile" else "--compile=off")
    return [
        *cell.flags,
        *("--algo", cell.algo, "--env", cell.env_id, *impl),
        *("--seed", str(cell.seed), "--steps", str(steps)),
        *("--eval-every", str(max(steps // points, 1)), "--eval-episodes", str(episodes)),
    ]


def _run_name(cell: Cell, configuration: list[str]) -> str:
    """The cell's name and a digest of its whole configuration: a stored run counts (and
    resumes) only for the same steps, flags and evaluation schedule."""
    digest = hashlib.sha256(json.dumps(configuration).encode()).hexdigest()[:10]
    return f"{cell.name}-{digest}"


def _run_dirs(cells: list[Cell], runs: Path, points: int, episodes: int) -> dict[Cell, Path]:
    return {c: runs / _run_name(c, _configuration(c, points, episodes)) for c in cells}


def _command(cell: Cell, runs: Path, points: int, episodes: int) -> list[str]:
    configuration = _configuration(cell, points, episodes)
    name = _run_name(cell, configuration)
    base = [sys.executable, "-m", "rlweights", "train", "--no-progress"]
    if (runs / name / "model.pt").is_file():  # killed before: continue where it stopped
        # --env: the cell's id, not one read from the stored run, may import a module
        return [*base, "--resume", str(runs / name), "--env", cell.env_id]
    return [*base, *configuration, "--logdir", str(runs), "--run-name", name]


def _curve(run: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    points = events.Scalars("eval/return")
    summary = json.loads((run / "summary.json").read_text())
    return {
        "steps": [p.step for p in points],
        "returns": [p.value for p in points],
        "final_return": summary["final_eval_return"],
        "wall_seconds": summary["wall_seconds"],
    }


def summarise(curves: list[dict]) -> list[dict]:
    """One row per (algo, env, impl): final returns over seeds and their statistics."""
    groups: dict[tuple, list[dict]] = {}
    for c in curves:
        groups.setdefault((c["algo"], c["env_id"], c["impl"]), []).append(c)
    rows = []
    for (algo, env_id, impl), group in groups.items():
        finals = np.array([c["final_return"] for c in group], dtype=float)
        low, high = bootstrap_interval(finals)
        rows.append(
            {
                "algo": algo,
                "env_id": env_id,
                "impl": impl,
                "steps": max(c["steps"][-1] for c in group if c["steps"]),
                "seeds": sorted(c["seed"] for c in group),
                "final_mean": float(finals.mean()),
                "final_low": float(low),
                "final_high": float(high),
                "final_iqm": iqm(finals),
                "finals": finals.tolist(),
                "wall_seconds": float(np.mean([c["wall_seconds"] for c in group])),
            }
        )
    return rows


_REFERENCE_NAMES = {"sb3": "SB3", "sbx": "SBX"}


def _reference_name(algo: str, impl: str) -> str:
    """SB3, sb3-contrib (an ``--impl sb3`` run of an algorithm that SB3 itself lacks: TQC)
    or SBX."""
    if impl == "sb3":
        from rlweights.sb3.algorithms import ALGORITHMS

        if any(row.name == algo.upper() and row.package == "sb3_contrib" for row in ALGORITHMS):
            return "sb3-contrib"
    return _REFERENCE_NAMES[impl]


def _seconds(value: float) -> str:
    """Wall seconds for a table: three significant figures, whole seconds from 100 on (no
    exponent: 1750, not 1.75e+03)."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _reaches(a: dict | None, b: dict | None) -> str:
    """'yes' when ``a``'s interval reaches ``b``'s (``a`` not worse), '-' when one is missing."""
    if not (a and b):
        return "-"
    return "yes" if a["final_high"] >= b["final_low"] else "**no**"


def markdown(rows: list[dict]) -> str:
    """Native next to the reference per (algo, env): SB3's runs, or SBX's where there are no
    SB3 runs (DroQ); 'not worse' when the native interval reaches the reference's. With runs
    of the native agent under ``--compile``, two more columns: their returns, and whether they
    are not worse than the eager runs'. A pair with compiled runs only (the long runs, where
    compiling saves hours) puts them in the native column, marked ``(--compile)``."""
    extra = " native --compile: mean [95 % CI], IQM | compiled not worse than eager |"
    by_key = {(r["algo"], r["env_id"], r["impl"]): r for r in rows}
    compiled = any(
        r["impl"] == "compile" and (r["algo"], r["env_id"], "native") in by_key for r in rows
    )
    pairs = list(dict.fromkeys((r["algo"], r["env_id"]) for r in rows))
    references = {
        key: "sb3" if (*key, "sb3") in by_key or (*key, "sbx") not in by_key else "sbx"
        for key in pairs
    }
    ref = " or ".join(sorted({_reference_name(key[0], i) for key, i in references.items()}))
    lines = [
        f"| algo | env | steps | seeds | native: mean [95 % CI], IQM | {ref}: mean [95 % CI], "
        f"IQM | native not worse | wall s per run, native / {ref}"
        + (" / --compile |" + extra if compiled else " |"),
        "|---|---|---:|---:|---|---|---|---|" + ("---|---|" if compiled else ""),
    ]
    for algo, env_id in pairs:
        native = by_key.get((algo, env_id, "native"))
        sb3 = by_key.get((algo, env_id, references[algo, env_id]))
        fast = by_key.get((algo, env_id, "compile"))
        only_compiled = native is None and fast is not None
        if only_compiled:
            native, fast = fast, None

        def cell(r: dict | None, mark: str = "") -> str:
            if r is None:
                return "-"
            return (
                f"{r['final_mean']:.1f} [{r['final_low']:.1f}, {r['final_high']:.1f}], "
                f"{r['final_iqm']:.1f}{mark}"
            )

        timed = (native, sb3, fast) if compiled else (native, sb3)
        walls = " / ".join(_seconds(r["wall_seconds"]) if r else "-" for r in timed)
        some = native or sb3 or fast
        line = (
            f"| {algo} | {env_id} | {some['steps']} | {len(some['seeds'])} "
            f"| {cell(native, ' (--compile)' if only_compiled else '')} "
            f"| {cell(sb3)} | {_reaches(native, sb3)} | {walls} |"
        )
        if compiled:
            line += f" {cell(fast)} | {_reaches(fast, native)} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def aligned(group: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(steps, returns: one row per run) at the evaluation steps every run of ``group`` has
    (a resumed run may lack the evaluation its stop interrupted)."""
    common = sorted(set.intersection(*(set(c["steps"]) for c in group)))
    rows = [dict(zip(c["steps"], c["returns"], strict=True)) for c in group]
    return np.array(common), np.array([[row[t] for t in common] for row in rows])


def plot(curves: list[dict], path: Path) -> None:
    """Mean curve over seeds with a 95 % bootstrap band, one panel per (algo, env)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((c["algo"], c["env_id"]) for c in curves))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (algo, env_id) in zip(axes[0], panels, strict=True):
        labels = {
            "native": "rlweights",
            "compile": "rlweights --compile",
            **{impl: _reference_name(algo, impl) for impl in _REFERENCE_NAMES},
        }
        known = ("native", "compile", "sb3", "sbx")
        more = [i for i in dict.fromkeys(c["impl"] for c in curves) if i not in known]
        colors = ["tab:orange", "tab:green", "tab:blue", "tab:red", "tab:purple", "tab:brown"]
        for impl, color in zip([*known, *more], colors + ["tab:gray"] * len(more), strict=False):
            group = [
                c for c in curves if (c["algo"], c["env_id"], c["impl"]) == (algo, env_id, impl)
            ]
            if not group:
                continue
            steps, returns = aligned(group)
            low, high = bootstrap_interval(returns)
            label = f"{labels.get(impl, impl)} ({len(group)} seeds)"
            ax.plot(steps, returns.mean(axis=0), color=color, label=label)
            ax.fill_between(steps, low, high, color=color, alpha=0.2)
        ax.set_title(f"{algo.upper()} {env_id}")
        ax.set_xlabel("environment steps")
        ax.set_ylabel("evaluation return")
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _variants(specs: list[str]) -> dict[str, tuple[str, ...]]:
    """``--variant NAME:FLAGS`` -> {NAME: flags}."""
    found: dict[str, tuple[str, ...]] = {}
    for spec in specs:
        name, _, flags = spec.partition(":")
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", name) or name in IMPLS or not flags.strip():
            raise ValueError(
                f"--variant {spec!r}: expected NAME:FLAGS, NAME in lower case letters, digits, "
                f"'-' and '_' and none of {', '.join(IMPLS)}, e.g. 'reset:--reset-every 2500'"
            )
        if name in found:
            raise ValueError(f"--variant {name!r} is given twice")
        found[name] = tuple(shlex.split(flags))
    return found


def _cells(
    specs: list[str],
    seeds: list[int],
    impls: list[str],
    flags: tuple[str, ...] = (),
    variants: dict[str, tuple[str, ...]] | None = None,
) -> list[Cell]:
    cells = []
    for spec in specs:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"--runs {spec!r}: expected ALGO:ENV or ALGO:ENV:STEPS")
        steps = None
        if len(parts) == 3:
            try:
                steps = int(float(parts[2]))
            except ValueError:
                raise ValueError(f"--runs {spec!r}: STEPS must be a number") from None
        for seed in seeds:  # every run of one seed side by side: the same load
            for impl in impls:
                cells.append(Cell(parts[0], parts[1], steps, impl, seed, flags))
            for name, more in (variants or {}).items():
                cells.append(Cell(parts[0], parts[1], steps, name, seed, (*flags, *more)))
    return cells


def variants_markdown(rows: list[dict], variants: dict[str, tuple[str, ...]]) -> str:
    """Each variant next to the plain native runs of the same (algo, env): final returns over
    seeds, and whether its interval lies above, overlaps or lies below the native one."""
    lines = [
        "| algo | env | steps | run | flags | seeds | final: mean [95 % CI], IQM | "
        "against native | wall s per run |",
        "|---|---|---:|---|---|---:|---|---|---:|",
    ]
    by_key = {(r["algo"], r["env_id"], r["impl"]): r for r in rows}
    for algo, env_id in dict.fromkeys((r["algo"], r["env_id"]) for r in rows):
        native = by_key.get((algo, env_id, "native"))
        for name in ["native", *variants]:
            r = by_key.get((algo, env_id, name))
            if r is None:
                continue
            if name == "native" or native is None:
                verdict = "-"
            elif r["final_low"] > native["final_high"]:
                verdict = "better"
            elif r["final_high"] < native["final_low"]:
                verdict = "**worse**"
            else:
                verdict = "intervals overlap"
            flags = " ".join(variants.get(name, ())) or "-"
            lines.append(
                f"| {algo} | {env_id} | {r['steps']} | {name} | `{flags}` | {len(r['seeds'])} | "
                f"{r['final_mean']:.1f} [{r['final_low']:.1f}, {r['final_high']:.1f}], "
                f"{r['final_iqm']:.1f} | {verdict} | {_seconds(r['wall_seconds'])} |"
            )
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["dqn:CartPole-v1"],
        metavar="ALGO:ENV[:STEPS]",
        help="what to train (STEPS: default the preset's); default dqn:CartPole-v1",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=IMPLS,
        default=list(DEFAULT_IMPLS),
        help="native, sb3 (default both), compile (the native agent with --compile), sbx "
        "(SBX's algorithm: the reference of droq)",
    )
    parser.add_argument(
        "--flags",
        default="",
        metavar="FLAGS",
        help="more 'rlweights train' flags for every run, e.g. --flags='--gradient-steps 8'",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:FLAGS",
        help="also runs of the native agent with these flags, reported as NAME next to the "
        "native runs (OUT/variants.md); repeatable, e.g. --variant 'reset:--reset-every 2500'",
    )
    parser.add_argument("--points", type=int, default=10, help="evaluations per run (10)")
    parser.add_argument("--eval-episodes", type=int, default=10, help="per evaluation (10)")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="runs side by side (cores)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-learning"), help="output folder")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the curves, table and PNG of the runs that finished",
    )


def main_from_args(args: argparse.Namespace) -> int:
    try:
        variants = _variants(args.variant)
        flags = tuple(shlex.split(args.flags))
        cells = _cells(args.runs, args.seeds, args.impls, flags, variants)
        if args.points < 1 or args.eval_episodes < 1 or args.workers < 1:
            raise ValueError("--points, --eval-episodes and --workers must be >= 1")
    except ValueError as exc:
        print(f"rlweights bench-learning: error: {exc}", file=sys.stderr)
        return 2
    runs = args.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    folders = _run_dirs(cells, runs, args.points, args.eval_episodes)
    failed = []
    if args.report_only:
        cells = [c for c in cells if (folders[c] / "summary.json").is_file()]
    for cell in cells:
        if (folders[cell] / "summary.json").is_file():
            print(f"{cell.name}: done before", flush=True)
    todo = [c for c in cells if not (folders[c] / "summary.json").is_file()]

    def done(finished: Any) -> None:
        name = todo[finished.index].name
        if finished.returncode == 0:
            print(f"{name}: {finished.stdout.strip().splitlines()[-1]}", flush=True)
        else:
            line = f"{name} failed ({finished.returncode}): {finished.stderr.strip()[-500:]}"
            failed.append(line)
            print(line, file=sys.stderr, flush=True)

    from rlweights.agents.side_by_side import SideBySide

    commands = [_command(c, runs, args.points, args.eval_episodes) for c in todo]
    runner = SideBySide(args.workers, threads=1)  # one thread per run, runs on every core
    runner.run(commands, on_done=done)
    if runner.stopped is not None:
        print("rlweights bench-learning: stopped; run it again to go on", file=sys.stderr)
        return 128 + runner.stopped
    finished = [c for c in cells if (folders[c] / "summary.json").is_file()]
    curves = [{**vars(c), **_curve(folders[c])} for c in finished]
    write_json(args.out / "curves.json", curves)
    rows = summarise(curves) if curves else []
    table = markdown(rows) if curves else "no finished runs\n"
    atomic_write(args.out / "table.md", lambda f: f.write(table), mode="w")
    if variants and curves:
        more = variants_markdown(rows, variants)
        atomic_write(args.out / "variants.md", lambda f: f.write(more), mode="w")
        table += "\n" + more
    if curves:
        plot(curves, args.out / "curves.png")
    print(table, end="")
    if failed:
        print(f"rlweights bench-learning: {len(failed)} runs failed", file=sys.stderr)
        return 1
    return 0
