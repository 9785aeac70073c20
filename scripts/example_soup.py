"""A model soup: train one architecture with several seeds, average the weights, evaluate.

Three public commands do the work, run here as you would type them (each is printed first):

    rlweights train --algo sac --env Pendulum-v1 --seeds 0 1 2 --logdir LOGDIR --run-name sac
    rlweights soup LOGDIR/sac-s0 LOGDIR/sac-s1 LOGDIR/sac-s2 --out LOGDIR/soup.pt
    rlweights evaluate LOGDIR/soup.pt --json       (and each ingredient, on the same episodes)

then a table compares the soup with its ingredients. Averaging pays off where the runs share a
starting point (fine-tunes of one checkpoint); networks trained from different initialisations
are not aligned unit by unit, so their mean can be far worse than each of them: the table shows
which it is here. Any flag this script does not know goes to ``rlweights train``.

    python scripts/example_soup.py --seeds 0 1 2 --steps 10000 --logdir runs/example_soup
    python scripts/example_soup.py --runs runs/a runs/b --logdir runs/soup_ab  # existing runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def run_rlweights(*args: str, capture: bool = False) -> str:
    """Run one ``rlweights`` command as a user would (echoed first); its output goes to the
    terminal, or is returned with ``capture``. A failing command has said why: stop."""
    print("$ rlweights", *args, flush=True)
    command = [sys.executable, "-m", "rlweights", *args]
    done = subprocess.run(command, stdout=subprocess.PIPE if capture else None, text=True)
    if done.returncode != 0:
        sys.exit(done.returncode)
    return done.stdout or ""


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="S")
    parser.add_argument("--steps", type=int, default=10_000, help="steps per run (10000)")
    parser.add_argument("--logdir", type=Path, default=Path("runs/example_soup"))
    parser.add_argument("--episodes", type=int, default=10, help="evaluation episodes (10)")
    parser.add_argument("--runs", nargs="+", type=Path, help="average these runs; train none")
    args, train_flags = parser.parse_known_args(argv)

    runs = args.runs
    if runs is None:  # one command trains every seed, side by side, each in LOGDIR/sac-sSEED
        run_rlweights(
            *("train", "--algo", "sac", "--env", "Pendulum-v1", "--no-progress"),
            *("--seeds", *map(str, args.seeds), "--steps", str(args.steps)),
            *("--logdir", str(args.logdir), "--run-name", "sac", *train_flags),
        )
        runs = [args.logdir / f"sac-s{seed}" for seed in args.seeds]

    soup = args.logdir / "soup.pt"  # outside every run folder: a soup never replaces a run
    run_rlweights("soup", *map(str, runs), "--out", str(soup))

    # Every checkpoint plays the same deterministic episodes (rlweights evaluate's --seed).
    returns = {}
    for name, checkpoint in [*((run.name, run) for run in runs), ("soup", soup)]:
        flags = ("--episodes", str(args.episodes), "--json")
        found = json.loads(run_rlweights("evaluate", str(checkpoint), *flags, capture=True))
        returns[name] = (found["mean_return"], found["std_return"])

    print(f"\n| checkpoint | mean return over {args.episodes} episodes | std |")
    print("|---|---:|---:|")
    for name, (mean, std) in returns.items():
        print(f"| {name} | {mean:.1f} | {std:.1f} |")
    return {name: mean for name, (mean, _) in returns.items()}


if __name__ == "__main__":
    main()
