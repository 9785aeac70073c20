"""The rlweights command and the scripts, smoke-run with tiny budgets as a user would."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SUBPROCESS_TIMEOUT

ROOT = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).parent / "rlweights"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, capture_output=True, text=True, cwd=ROOT, timeout=SUBPROCESS_TIMEOUT
    )


@pytest.mark.parametrize(
    "command",
    [
        "",
        "train",
        "evaluate",
        "soup",
        "bench",
        "bench-sb3",
        "bench-drift",
        "bench-train",
        "bench-distributed",
        "bench-startup",
        "bench-compile",
        "bench-lockstep",
        "demo",
        "demo baird",
        "demo chain",
    ],
)
def test_help(command):
    args = [*command.split(), "--help"] if command else ["--help"]
    cmd = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "rlweights"]
    done = _run(*cmd, *args)
    assert done.returncode == 0, done.stderr
    assert "usage: rlweights" in done.stdout
    # Issue 13: help showed raw reST (``model.pt``); it is written for a terminal.
    assert not re.search(r"``|:(func|class|mod|meth|attr):`", done.stdout), done.stdout
    if not command:
        for sub in ("train", "evaluate", "soup", "demo", "bench-train", "bench-distributed"):
            assert sub in done.stdout


def test_bench_script_smoke(tmp_path):
    out = tmp_path / "bench.json"
    done = _run(
        sys.executable,
        "scripts/bench_ops.py",
        "--models",
        "sac_critic",
        "--rounds",
        "2",
        "--min-batch-ms",
        "0.2",
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert "| rw.polyak_ (make_target) |" in done.stdout
    result = json.loads(out.read_text())
    rows = result["models"]["sac_critic"]["rows"]
    assert result["models"]["sac_critic"]["params"] == 144386
    expected = {
        "SB3 polyak_update",
        "CleanRL inline loop",
        "torch._foreach_lerp_",
        "AveragedModel EMA",
        "ema-pytorch EMA (foreach)",
        "rw.EMA",
        "rw.polyak_ (plain modules)",
        "rw.polyak_ (make_target)",
        "one flat lerp_, unchecked",
        "flat copy_ (memory bound)",
    }
    assert set(rows) == expected
    assert all(r["median_us"] > 0 for r in rows.values())
    assert {g["goal"] for g in result["goals"]} >= {"SAC critic: rw.polyak_ >= 6x faster than SB3"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_bench_refuses_cuda_without_a_gpu():
    done = _run(sys.executable, "-m", "rlweights", "bench", "--device", "cuda")
    assert done.returncode != 0
    assert "torch sees no CUDA device" in done.stderr
    assert "Traceback" not in done.stderr


def test_bench_rejects_bad_rounds():
    done = _run(sys.executable, "-m", "rlweights", "bench", "--rounds", "0")
    assert done.returncode != 0 and "--rounds must be >= 1" in done.stderr


def test_bench_startup_script_smoke(tmp_path):
    out = tmp_path / "startup.json"
    done = _run(sys.executable, "scripts/bench_startup.py", "--rounds", "1", "--json", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    rows = result["commands"]
    assert list(rows) == ["rlweights --help", "rlweights train --help", 'python -c "import torch"']
    torch_s = rows['python -c "import torch"']["median_s"]
    for row in rows.values():
        assert row["median_s"] > 0
        assert row["vs_torch_s"] == pytest.approx(row["median_s"] - torch_s)
    assert result["rounds"] == 1 and result["torch"] == torch.__version__
    assert "| `rlweights train --help` |" in done.stdout


def test_bench_startup_rejects_bad_rounds(capsys):
    from rlweights.cli import main

    assert main(["bench-startup", "--rounds", "0"]) == 2
    assert capsys.readouterr().err == (
        "rlweights bench-startup: error: --rounds must be >= 1, got 0\n"
    )


def test_bench_sb3_script_smoke(tmp_path):
    out = tmp_path / "sb3.json"
    done = _run(
        sys.executable,
        "scripts/bench_sb3.py",
        "--rounds",
        "2",
        "--train-rounds",
        "1",
        "--train-steps",
        "150",
        *("--models", "sac", "tqc", "--gradient-steps", "3"),
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert set(result["call_site"]) == {
        "SB3 (plain model)",
        "plain model, dispatcher installed",
        "attached model",
    }
    assert set(result["training"]) == {"sac", "tqc"}
    for training in result["training"].values():
        assert len(training) == 3
        assert all(0 < row["update_share"] < 1 for row in training.values())
    assert "| plain SB3 |" in done.stdout
    assert "| TQC, 150 steps, 3 gradient steps per step |" in done.stdout


def test_bench_drift_script_smoke(tmp_path):
    out = tmp_path / "drift.json"
    args = ["--rounds", "1", "--sac-rounds", "1", "--sac-steps", "150", "--every", "50"]
    done = _run(sys.executable, "scripts/bench_drift.py", *args, "--json", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert set(result["measure_vs_update"]) == {"sac_critic", "mlp_16m"}
    assert 0 < result["sac"]["measure_share"] < 1
    assert 0 < result["native_sac"]["measure_share"] < 1
    assert "DriftMonitor.measure" in done.stdout


def test_bench_train_smoke(tmp_path):
    out = tmp_path / "bench-train.json"
    done = _run(
        sys.executable,
        "scripts/bench_train.py",
        *("--algos", "sac", "--impls", "native", "sb3", "--rounds", "1", "--steps", "400"),
        *("--json", str(out)),
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    sac = result["algos"]["sac"]
    assert sac["steps"] == 400 and sac["hidden"] == [256, 256]
    assert sac["speedup"] == pytest.approx(
        sac["steps_per_second"]["native"] / sac["steps_per_second"]["sb3"]
    )
    flops = sac["bound"]["flops_per_update"]
    # SAC's update at 256-256, batch 256: about half a GFLOP (critic, actor, targets)
    assert 3e8 < flops < 9e8
    threads = sac["bound"]["threads"]
    assert set(threads) == {"1", str(result["machine"]["threads"])}  # one thread and the run's
    for bound in threads.values():
        assert bound["bound_updates_per_second"] == pytest.approx(
            bound["matmul_flops_per_second"] / flops
        )
        assert 0 < bound["updates_per_second"] < bound["bound_updates_per_second"]
        assert bound["env_steps_per_second"] > 0
    # the ceiling: above every implementation's speed (nothing passes the matmuls and the env)
    ceiling = sac["ceiling_steps_per_second"][str(result["machine"]["threads"])]
    assert max(sac["steps_per_second"].values()) < ceiling
    assert "| SAC | Pendulum-v1 | 256-256 | 256 | 400 |" in done.stdout


def test_bench_compile_smoke(tmp_path):
    """Compile seconds from an empty inductor cache and from the cache that run left, and the
    break-even they imply, against the formula written out here."""
    from rlweights.bench.compile import break_even

    assert break_even(10.0, 0.003, 0.001) == pytest.approx(5000.0)
    assert break_even(10.0, 0.001, 0.002) is None  # compiled slower: it never pays
    out = tmp_path / "bench-compile.json"
    args = ("--algos", "dqn", "--repeats", "1", "--rounds", "1", "--steps", "5")
    done = _run(sys.executable, "scripts/bench_compile.py", *args, "--json", str(out))
    assert done.returncode == 0, done.stderr
    dqn = json.loads(out.read_text())["algos"]["dqn"]
    assert dqn["compiled"]  # it compiled, not an eager fallback
    # the warm process reuses the cold one's kernels: compiling is much cheaper
    assert dqn["compile_seconds_warm"] < dqn["compile_seconds_cold"]
    gain = (dqn["eager_ms_per_step"] - dqn["compiled_ms_per_step"]) / 1e3
    for kind in ("cold", "warm"):
        want = dqn[f"compile_seconds_{kind}"] / gain if gain > 0 else None
        assert dqn[f"break_even_{kind}"] == (pytest.approx(want) if want else None)
    assert "| dqn | " in done.stdout and "never (eager) |" in done.stdout


@pytest.mark.slow  # four timed training runs: a benchmark tool's smoke, over a minute
def test_bench_revisions_smoke(tmp_path):
    """Two revisions' runs alternated (here one environment as both): each run timed, the
    table's ratio the median of the rounds' new / old."""
    out = tmp_path / "revisions.json"
    python = sys.executable
    args = ("--rounds", "2", "--algos", "sac", "--impls", "native", "--steps", "300")
    done = _run(python, "scripts/bench_revisions.py", python, python, *args, "--json", str(out))
    assert done.returncode == 0, done.stderr
    runs = json.loads(out.read_text())["sac native"]
    ratio = statistics.median(n / o for n, o in zip(runs["new"], runs["old"], strict=True))
    assert f"| sac native | {statistics.median(runs['old']):.0f} |" in done.stdout
    assert f"| {ratio:.2f}x |" in done.stdout


@pytest.mark.parametrize("algo", ["sac", "td3"])
def test_the_bound_replays_exactly_the_matmuls_of_the_update(algo):
    import gymnasium as gym
    from torch.utils.flop_counter import FlopCounterMode

    from rlweights.agents.registry import ALGOS, make_config
    from rlweights.bench.train import UpdateMatmuls

    env = gym.make("Pendulum-v1")
    config = make_config(algo, "Pendulum-v1", hidden=(64, 32), batch_size=16)
    agent = ALGOS[algo][1](config, env.observation_space, env.action_space)
    batch = {
        "obs": torch.randn(16, 3),
        "actions": torch.rand(16, 1) * 2 - 1,
        "rewards": torch.randn(16),
        "next_obs": torch.randn(16, 3),
        "terminated": torch.zeros(16),
    }

    def cycle():  # TD3: a critic-only update, then one with the delayed actor
        for _ in range(2):
            agent.train_step(batch)

    with FlopCounterMode(display=False) as counter:
        cycle()
    products = UpdateMatmuls.record(cycle)
    assert products.flops == counter.get_total_flops()  # torch's own count of the same calls
    assert {str(func) for func, _, _ in products.calls} >= {"aten.mm.default", "aten.bmm.default"}
    again = UpdateMatmuls.record(products.replay)  # the replay makes those calls, alone

    def layouts(mode):
        return [
            (func, [(a.shape, a.stride()) for a in args if isinstance(a, torch.Tensor)], kwargs)
            for func, args, kwargs in mode.calls
        ]

    assert layouts(again) == layouts(products) and again.flops == products.flops


def test_bench_train_update_ratio_row_trains_sac_at_20_updates_per_step(monkeypatch):
    from rlweights.bench import train as bench

    seen = []

    def timed(impl, config):
        seen.append(config)
        return {"steps_per_second": 12.5, "compile_seconds": 0.0}

    # the bound: 400 updates/s at the matmuls alone, the environment alone 1000 steps/s
    bound = {"bound_updates_per_second": 400.0, "updates_per_second": 100.0}
    bound["env_steps_per_second"] = 1000.0
    bound = {"threads": {"1": bound, "2": {**bound, "updates_per_second": 80.0}}}
    measured = []
    monkeypatch.setattr(bench, "_isolated", timed)
    monkeypatch.setattr(bench, "update_bound", lambda config, compiled: measured.append(1) or bound)
    result = bench.run(["sac", "sac-utd20"], 1, {"sac": 400, "sac-utd20": 300}, ["native"])
    sac, utd = seen
    assert (sac.algo, sac.gradient_steps, sac.train_freq) == ("sac", 1, 1)
    assert (utd.algo, utd.gradient_steps, utd.train_freq, utd.total_steps) == ("sac", 20, 1, 300)
    assert utd.env_id == sac.env_id and utd.hidden == sac.hidden
    # the same update: its bound is measured once, for the SAC row
    assert measured == [1]
    assert result["algos"]["sac-utd20"]["bound"] is result["algos"]["sac"]["bound"]
    # the ceiling: one environment step and the row's updates per step at the bound
    assert result["algos"]["sac"]["ceiling_steps_per_second"]["1"] == pytest.approx(
        1 / (1 / 400 + 1 / 1000)
    )
    utd_ceiling = 1 / (20 / 400 + 1 / 1000)  # 19.6 environment steps/s
    assert result["algos"]["sac-utd20"]["ceiling_steps_per_second"]["2"] == pytest.approx(
        utd_ceiling
    )
    result["algos"] = {"sac-utd20": result["algos"]["sac-utd20"]}
    result["machine"]["threads"] = 2
    row = (
        "| 12 (250 updates/s) | - | - | 1 thread: 25% of 400/s; 2 threads: 20% of 400/s | "
        f"20 (native {12.5 / utd_ceiling:.0%}) |"
    )
    assert row in bench.markdown(result)


def test_bench_train_droq_row_runs_without_sb3_and_compares_with_sbx(monkeypatch):
    from rlweights.bench import train as bench

    speeds = {"native": [10.0, 12.0, 11.0], "compile": [20.0, 30.0, 24.0], "sbx": [10.0] * 3}
    seen: dict[str, list] = {}

    def timed(impl, config):
        seen.setdefault(impl, []).append(config)
        return {"steps_per_second": speeds[impl][len(seen[impl]) - 1], "compile_seconds": 0.0}

    bound = {"bound_updates_per_second": 400.0, "updates_per_second": 100.0}
    bound["env_steps_per_second"] = 1000.0
    monkeypatch.setattr(bench, "_isolated", timed)
    monkeypatch.setattr(bench, "update_bound", lambda config, compiled: {"threads": {"1": bound}})
    impls = ["native", "compile", "sb3", "sbx"]
    monkeypatch.setattr(bench, "available", lambda impls, device="cpu": impls)
    result = bench.run(["droq"], 3, {"droq": 300}, impls)
    assert set(seen) == {"native", "compile", "sbx"}  # SB3 has no DroQ
    assert all(c.algo == "droq" and c.gradient_steps == 20 for c in seen["native"])
    row = result["algos"]["droq"]
    assert "vs_sb3" not in row
    assert row["vs_sbx"]["compile"] == pytest.approx(2.4)  # median of 2.0, 3.0, 2.4
    result["machine"]["threads"] = 1
    assert "| 11 (220 updates/s) | 24 (480 updates/s) | - | 10 (200 updates/s) | - | " in (
        bench.markdown(result)
    )


def test_bench_distributed_smoke(tmp_path):
    out = tmp_path / "bench-distributed.json"
    done = _run(
        sys.executable,
        "scripts/bench_distributed.py",
        *("--models", "sac_critic", "--rounds", "2", "--json", str(out)),
    )
    assert done.returncode == 0, done.stderr
    row = json.loads(out.read_text())["models"]["sac_critic"]
    assert row["params"] == 144_386
    assert row["speedup"]["torch average_parameters"] == 1.0
    assert all(us > 0 for us in row["us"].values()) and len(row["us"]) == 4
    assert "| rw.all_average_ (flat module) |" in done.stdout


def test_docstring_markup_becomes_terminal_text(monkeypatch, capsys):
    import rlweights.soup
    from rlweights import cli

    assert (
        cli.for_terminal(
            "Reads ``model.pt`` with :func:`torch.load`, see :class:`~rlweights.EMA` and `docs`_."
        )
        == "Reads 'model.pt' with torch.load, see rlweights.EMA and docs."
    )
    # A command whose docstring and argument help carry markup shows them plainly.
    monkeypatch.setattr(rlweights.soup, "__doc__", "Average ``model.pt`` files (:func:`average_`).")
    with pytest.raises(SystemExit):
        cli.main(["soup", "--help"])
    out = capsys.readouterr().out
    assert "Average 'model.pt' files (average_)." in out and "``" not in out
