"""How long the ``rlweights`` command takes to start, next to importing torch.

Each round starts ``rlweights --help``, ``rlweights train --help`` and
``python -c "import torch"`` as fresh processes of this Python, in an order that rotates every
round, and times each from start to exit. The table gives the median time of each and the
median over rounds of its difference to importing torch: the command's list of subcommands
needs no torch at all; ``train --help`` builds its flags from the agents' configs, which
import torch, so it aims at torch's own import time plus at most 0.3 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

from rlweights.files import write_json

__all__ = ["COMMANDS", "add_arguments", "main_from_args", "markdown", "run"]

TORCH = 'python -c "import torch"'
COMMANDS: dict[str, list[str]] = {
    "rlweights --help": ["-m", "rlweights", "--help"],
    "rlweights train --help": ["-m", "rlweights", "train", "--help"],
    TORCH: ["-c", "import torch"],
}


def _seconds(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, capture_output=True)
    return time.perf_counter() - start


def run(rounds: int = 11) -> dict:
    """Time every command ``rounds`` times, interleaved; medians in seconds."""
    names = list(COMMANDS)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(_seconds(COMMANDS[name]))
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "torch": version("torch"),
        "rounds": rounds,
        "commands": {
            name: {
                "median_s": statistics.median(times[name]),
                "vs_torch_s": statistics.median(
                    t - base for t, base in zip(times[name], times[TORCH], strict=True)
                ),
            }
            for name in names
        },
    }


def markdown(result: dict) -> str:
    lines = [
        f"{result['date']}, {result['machine']}, Python {result['python']}, torch "
        f"{result['torch']}; medians of {result['rounds']} interleaved rounds.",
        "",
        "| command | time | minus `import torch` |",
        "|---|---:|---:|",
    ]
    for name, row in result["commands"].items():
        lines.append(f"| `{name}` | {row['median_s']:.2f} s | {row['vs_torch_s']:+.2f} s |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds (default 11)")
    parser.add_argument("--json", type=Path, help="also write the raw results as JSON here")


def main_from_args(args: argparse.Namespace) -> int:
    if args.rounds < 1:
        print(
            f"rlweights bench-startup: error: --rounds must be >= 1, got {args.rounds}",
            file=sys.stderr,
        )
        return 2
    result = run(args.rounds)
    print(markdown(result), end="")
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0
