"""The ``rlweights`` command. Subcommands grow with the project; ``scripts/`` only call in here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from rlweights import __version__, bench, bench_distributed, bench_drift, bench_sb3, soup

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (what was wrong, and where to read more), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _commands() -> list[tuple[str, str, str | None, Callable, Callable]]:
    """(name, summary, description, add_arguments, handler) of every subcommand."""
    from agents import bench_train, demo
    from agents import cli as agents_cli

    found = [
        (
            "train",
            "train a native DQN/SAC/TD3 agent (or SB3's, with --impl sb3) on a Gymnasium env",
            agents_cli.TRAIN_DESCRIPTION,
            agents_cli.add_train_arguments,
            agents_cli.train_main,
        ),
        (
            "evaluate",
            "evaluate a checkpoint written by 'rlweights train'",
            "Run deterministic episodes with a saved agent and print the mean return.",
            agents_cli.add_evaluate_arguments,
            agents_cli.evaluate_main,
        ),
    ]
    for name, module, summary in (
        ("average", soup, "weighted average of checkpoints of one architecture (model soup)"),
        ("demo", demo, "what target networks do: Baird's counterexample, DQN on a chain MDP"),
        ("bench", bench, "benchmark target updates and EMAs: SB3, CleanRL, torch, rlweights"),
        ("bench-sb3", bench_sb3, "benchmark SB3's target-update call site and SAC training"),
        ("bench-drift", bench_drift, "benchmark drift measurements, alone and inside SB3 SAC"),
        ("bench-train", bench_train, "benchmark native agents' steps/s against SB3's"),
        (
            "bench-distributed",
            bench_distributed,
            "benchmark averaging across processes against torch's average_parameters",
        ),
    ):
        found.append((name, summary, module.__doc__, module.add_arguments, module.main_from_args))
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rlweights",
        description=(
            "Fast, validated in-place weight operations for deep RL: Polyak/hard target "
            "updates, averaging, clipping, native DQN/SAC/TD3 agents, an SB3 plug-in and "
            "weight drift in TensorBoard. 'rlweights COMMAND --help' explains each command."
        ),
    )
    parser.add_argument("--version", action="version", version=f"rlweights {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary, description, add_arguments, handler in _commands():
        sub = commands.add_parser(
            name,
            help=summary,
            description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_arguments(sub)
        sub.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
