"""rlweights bench-learning on a toy budget: curves, table and PNG; a second start trains
nothing that finished; the statistics against hand-computed references."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rlweights.bench.learning import (
    bootstrap_interval,
    iqm,
    markdown,
    summarise,
    variants_markdown,
)
from rlweights.cli import main


def test_iqm_and_bootstrap_against_references():
    assert iqm(np.array([1.0, 2.0, 3.0, 4.0, 100.0])) == pytest.approx(3.0)  # 2, 3, 4
    assert iqm(np.array([5.0, 1.0, 3.0, 7.0])) == pytest.approx(4.0)  # 3, 5
    values = np.array([0.0, 10.0])
    low, high = bootstrap_interval(values, resamples=20_000)
    # Resampled means of two values are 0, 5 or 10 (1/4, 1/2, 1/4): the 2.5 % and 97.5 %
    # percentiles are 0 and 10.
    assert (low, high) == (0.0, 10.0)
    same = np.full(5, 3.0)
    assert bootstrap_interval(same) == (3.0, 3.0)


def _curves(algo: str, finals: dict[str, list[float]]) -> list[dict]:
    """One-point curves of environment E: each implementation's final returns by seed."""
    return [
        {
            "algo": algo,
            "env_id": "E",
            "impl": impl,
            "seed": s,
            "steps": [10],
            "returns": [r],
            "final_return": r,
            "wall_seconds": 1.0,
        }
        for impl, returns in finals.items()
        for s, r in enumerate(returns)
    ]


def test_table_says_whether_native_is_worse_beyond_the_intervals():
    curves = _curves("dqn", {"native": [0.0, 1.0, 2.0], "sb3": [10.0, 11.0, 12.0]})
    table = markdown(summarise(curves))
    assert "| dqn | E | 10 | 3 | 1.0 [0.0, 2.0], 1.0 | 11.0 [10.0, 12.0], 11.0 | **no** |" in table
    assert "--compile" not in table
    # runs of the native agent under --compile: their column, and a verdict against eager
    for s, r in enumerate([1.5, 2.5, 3.5]):
        curves.append({**curves[0], "impl": "compile", "seed": s, "returns": [r]})
        curves[-1]["final_return"] = r
    table = markdown(summarise(curves))
    assert "native --compile: mean [95 % CI], IQM | compiled not worse than eager |" in table
    assert table.splitlines()[2].endswith("| 1 / 1 / 1 | 2.5 [1.5, 3.5], 2.5 | yes |")


def test_compiled_runs_alone_are_the_native_column():
    """Long runs of the native agent under --compile alone (no eager runs): compared with the
    reference in the native column, marked, with no eager-against-compiled columns."""
    curves = _curves("tqc", {"compile": [0.0, 1.0, 2.0], "sb3": [10.0, 11.0, 12.0]})
    table = markdown(summarise(curves))
    row = (
        "| tqc | E | 10 | 3 | 1.0 [0.0, 2.0], 1.0 (--compile) | 11.0 [10.0, 12.0], 11.0 | **no** |"
    )
    assert row in table
    assert "| sb3-contrib: mean [95 % CI], IQM |" in table  # TQC's --impl sb3 is sb3-contrib's
    assert "compiled not worse than eager" not in table
    assert table.splitlines()[2].endswith("| 1 / 1 |")


def test_sbx_is_the_reference_where_sb3_has_no_runs(tmp_path):
    """DroQ's reference is SBX (SB3 has no DroQ): its column, verdict and run command."""
    from rlweights.bench.learning import Cell, _command

    curves = _curves("droq", {"native": [5.0, 6.0, 7.0], "sbx": [0.0, 1.0, 2.0]})
    table = markdown(summarise(curves))
    assert "| SBX: mean [95 % CI], IQM |" in table and "native / SBX |" in table
    assert "| droq | E | 10 | 3 | 6.0 [5.0, 7.0], 6.0 | 1.0 [0.0, 2.0], 1.0 | yes |" in table
    command = _command(Cell("droq", "Pendulum-v1", 300, "sbx", 1), tmp_path, 3, 1)
    i = command.index("--impl")
    assert command[i : i + 2] == ["--impl", "sbx"] and "--compile=off" not in command


def test_wall_seconds_read_as_seconds_in_the_table():
    curves = [
        {
            "algo": "sac",
            "env_id": "E",
            "impl": impl,
            "seed": 0,
            "steps": [10],
            "returns": [1.0],
            "final_return": 1.0,
            "wall_seconds": wall,
        }
        for impl, wall in (("native", 1750.4), ("sb3", 58.123))
    ]
    assert markdown(summarise(curves)).splitlines()[2].endswith("| 1750 / 58.1 |")


def test_a_compile_cell_trains_the_native_agent_with_compile(tmp_path):
    from rlweights.bench.learning import Cell, _command

    command = _command(Cell("sac", "Pendulum-v1", 300, "compile", 1), tmp_path, 3, 1)
    i = command.index("--impl")
    assert command[i : i + 3] == ["--impl", "native", "--compile=on"]
    native = _command(Cell("sac", "Pendulum-v1", 300, "native", 1), tmp_path, 3, 1)
    assert "--compile=off" in native  # eager, whatever --compile auto would choose
    assert Cell("sac", "Pendulum-v1", 300, "compile", 1).name == "sac-Pendulum-v1-compile-s1"


def test_a_stored_run_resumes_on_the_environment_of_its_cell(tmp_path):
    """A stored run's checkpoint names its environment; the resumed run is told the cell's
    own id (--env), so an id read from the file imports no module by itself."""
    from rlweights.bench.learning import Cell, _command, _run_dirs

    cell = Cell("sac", "Pendulum-v1", 300, "native", 1)
    run = _run_dirs([cell], tmp_path, 3, 1)[cell]
    run.mkdir()
    (run / "model.pt").write_bytes(b"")
    command = _command(cell, tmp_path, 3, 1)
    assert command[-4:] == ["--resume", str(run), "--env", "Pendulum-v1"]


def test_a_toy_benchmark_writes_curves_table_and_png_and_resumes(tmp_path):
    args = ["bench-learning", "--runs", "sac:Pendulum-v1:200", "--seeds", "0", "1"]
    args += ["--points", "2", "--eval-episodes", "1", "--workers", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert sorted((c["impl"], c["seed"]) for c in curves) == [
        ("native", 0),
        ("native", 1),
        ("sb3", 0),
        ("sb3", 1),
    ]
    assert all(c["steps"] == [100, 200] for c in curves)
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert "| sac | Pendulum-v1 | 200 | 2 |" in (tmp_path / "table.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/model.pt")}
    assert main(args) == 0  # everything finished before: nothing trains again
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/model.pt")} == stamps
    seeds = args.index("--seeds")
    more = [*args[: seeds + 3], "2", *args[seeds + 3 :], "--report-only"]  # seeds 0 1 2
    assert main(more) == 0
    assert not list(tmp_path.glob("runs/sac-Pendulum-v1-native-s2*"))
    assert len(json.loads((tmp_path / "curves.json").read_text())) == 4


def test_variants_are_native_runs_with_more_flags_and_get_a_verdict_against_native():
    from rlweights.bench.learning import _cells, _command, _variants

    variants = _variants(["reset:--reset-every 50", "sp:--shrink-perturb 0.5,0.5 --sp-every 50"])
    assert variants["sp"] == ("--shrink-perturb", "0.5,0.5", "--sp-every", "50")
    cells = _cells(["sac:Pendulum-v1:300"], [0], ["native"], ("--gradient-steps", "4"), variants)
    assert [c.name for c in cells] == [
        "sac-Pendulum-v1-native-s0",
        "sac-Pendulum-v1-reset-s0",
        "sac-Pendulum-v1-sp-s0",
    ]
    command = _command(cells[1], __import__("pathlib").Path("runs"), 3, 1)
    train = command.index("train")
    assert command[train + 2 : train + 6] == ["--gradient-steps", "4", "--reset-every", "50"]
    assert command[command.index("--impl") + 1] == "native"
    for bad in ("native:--weight-clip 1", "Reset:--reset-every 5", "reset:", "reset"):
        with pytest.raises(ValueError, match="expected NAME:FLAGS"):
            _variants([bad])
    curves = [
        {"algo": "sac", "env_id": "E", "impl": impl, "seed": s, "steps": [10], "returns": [r]}
        | {"final_return": r, "wall_seconds": 2.0}
        for impl, finals in (
            ("native", [0.0, 1.0, 2.0]),
            ("reset", [5.0, 6.0, 7.0]),
            ("sp", [1.0, 2.0, 3.0]),
            ("worse", [-9.0, -8.0, -7.0]),
        )
        for s, r in enumerate(finals)
    ]
    table = variants_markdown(summarise(curves), {**variants, "worse": ("--weight-clip", "0.1")})
    assert (
        "| sac | E | 10 | reset | `--reset-every 50` | 3 | 6.0 [5.0, 7.0], 6.0 | better |" in table
    )
    assert (
        "| sp | `--shrink-perturb 0.5,0.5 --sp-every 50` | 3 | 2.0 [1.0, 3.0], 2.0 | "
        "intervals overlap |" in table
    )
    assert "| worse | `--weight-clip 0.1` | 3 | -8.0 [-9.0, -7.0], -8.0 | **worse** |" in table
    assert "| native | `-` | 3 | 1.0 [0.0, 2.0], 1.0 | - |" in table


def test_a_toy_variant_benchmark_trains_the_variant_with_its_flags(tmp_path):
    args = ["bench-learning", "--runs", "sac:Pendulum-v1:200", "--seeds", "0", "--impls", "native"]
    args += ["--flags=--gradient-steps 2", "--variant", "reset:--reset-every 100"]
    args += ["--points", "2", "--eval-episodes", "1", "--workers", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    configs = {
        run: json.loads(
            next(tmp_path.glob(f"runs/sac-Pendulum-v1-{run}-s0-*/config.json")).read_text()
        )
        for run in ("native", "reset")
    }
    assert [(c["gradient_steps"], c["reset_every"]) for c in configs.values()] == [(2, 0), (2, 100)]
    assert (
        "| sac | Pendulum-v1 | 200 | reset | `--reset-every 100` | 1 |"
        in (tmp_path / "variants.md").read_text()
    )


def test_curves_are_averaged_at_the_steps_every_run_has():
    from rlweights.bench.learning import aligned

    group = [
        {"steps": [10, 20, 30], "returns": [1.0, 2.0, 3.0]},
        {"steps": [10, 30], "returns": [5.0, 7.0]},  # resumed: its evaluation at 20 was lost
    ]
    steps, returns = aligned(group)
    assert steps.tolist() == [10, 30]
    assert returns.tolist() == [[1.0, 3.0], [5.0, 7.0]]


def test_a_stored_run_counts_only_for_the_same_configuration(tmp_path):
    from pathlib import Path

    from rlweights.bench.learning import Cell, _command

    def run(cell, points=3, episodes=1):
        command = _command(cell, Path("runs"), points, episodes)
        return command[command.index("--run-name") + 1]

    cell = Cell("sac", "Pendulum-v1", 300, "native", 0)
    same = run(cell)
    assert run(Cell("sac", "Pendulum-v1", 300, "native", 0)) == same
    others = {
        run(Cell("sac", "Pendulum-v1", 400, "native", 0)),
        run(Cell("sac", "Pendulum-v1", 300, "native", 0, ("--gradient-steps", "2"))),
        run(cell, points=4),
        run(cell, episodes=2),
    }
    assert same not in others and len(others) == 4
    # a finished 100-step run is not reported as the 150-step benchmark
    args = ["bench-learning", "--impls", "native", "--seeds", "0", "--points", "1"]
    args += ["--eval-episodes", "1", "--workers", "1", "--out", str(tmp_path), "--runs"]
    assert main([*args, "sac:Pendulum-v1:100"]) == 0
    (short,) = tmp_path.glob("runs/*/summary.json")
    stored = short.read_bytes()
    assert main([*args, "sac:Pendulum-v1:150"]) == 0
    (curve,) = json.loads((tmp_path / "curves.json").read_text())
    assert curve["steps"] == [150]
    assert short.read_bytes() == stored  # the other run is kept as it was
    assert "| sac | Pendulum-v1 | 150 | 1 |" in (tmp_path / "table.md").read_text()
