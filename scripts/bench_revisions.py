"""Environment steps per second of two revisions of rlweights, eager and ``--compile``, run
alternately (old, new, new, old, ...) so that the machine's drift falls on both alike.

Each revision is given as the Python of an environment in which it is installed (a checkout
of it with ``pip install -e``); every run is one of ``rlweights bench-train``'s timed runs
(``rlweights.bench.train._isolated``: a fresh process, the first training steps excluded so
that compiling is not timed), started by that Python. Prints a table of medians and the
median of the per-round ratios new / old; ``--json`` keeps every run.

    git worktree add ../old REV && (cd ../old && python -m venv .venv && ...)
    python scripts/bench_revisions.py ../old/.venv/bin/python .venv/bin/python --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# One timed run in the revision's own code: its config maker moved between revisions.
_RUN = """
import json, sys
from rlweights.bench import train as bench
try:
    from rlweights.agents.registry import make_config
except ImportError:
    from rlweights.agents.train import make_config
algo, impl, steps, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
config = make_config(
    bench.algorithm(algo), total_steps=steps, eval_every=0, eval_episodes=1, drift_every=0,
    seed=seed, **bench.SETTINGS[algo],
)
print(json.dumps(bench._isolated(impl, config)))
"""


def one(python: Path, algo: str, impl: str, steps: int, seed: int, threads: int) -> float:
    """Steps per second of one timed run of ``algo`` (``impl``: native or compile)."""
    steps = 10 * steps if algo == "dqn" else steps  # as rlweights bench-train times DQN
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    # run outside any checkout: "python -c" imports from its working directory first
    with tempfile.TemporaryDirectory() as elsewhere:
        done = subprocess.run(
            [str(python), "-c", _RUN, algo, impl, str(steps), str(seed)],
            capture_output=True,
            text=True,
            env=env,
            cwd=elsewhere,
        )
    if done.returncode != 0:
        raise SystemExit(f"{python}: the run of {algo} {impl} failed:\n{done.stderr}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["steps_per_second"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="the Python of the old revision's environment")
    parser.add_argument("new", type=Path, help="the Python of the new revision's environment")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--algos", nargs="+", default=["sac", "td3", "dqn"])
    parser.add_argument("--impls", nargs="+", default=["native", "compile"])
    parser.add_argument("--steps", type=int, default=1500, help="per SAC/TD3 run; DQN: 10x")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs: dict[str, dict[str, list[float]]] = {}
    for r in range(args.rounds):
        for algo in args.algos:
            for impl in args.impls:
                order = ("old", "new") if r % 2 == 0 else ("new", "old")
                for which in order:
                    python = getattr(args, which)
                    rate = one(python, algo, impl, args.steps, r, args.threads)
                    runs.setdefault(f"{algo} {impl}", {}).setdefault(which, []).append(rate)
                    print(f"round {r} {algo} {impl} {which}: {rate:.1f} steps/s", flush=True)
    print("| row | old steps/s | new steps/s | new / old (median of rounds) | per round |")
    print("|---|---:|---:|---:|---|")
    for row, rates in runs.items():
        ratios = [n / o for n, o in zip(rates["new"], rates["old"], strict=True)]
        print(
            f"| {row} | {statistics.median(rates['old']):.0f} | "
            f"{statistics.median(rates['new']):.0f} | {statistics.median(ratios):.2f}x | "
            + ", ".join(f"{x:.2f}" for x in ratios)
            + " |"
        )
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
