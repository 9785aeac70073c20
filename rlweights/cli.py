"""The ``rlweights`` command. Subcommands grow with the project; ``scripts/`` only call in here."""

from __future__ import annotations

import argparse
import sys

from rlweights import __version__, bench, bench_drift, bench_sb3

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlweights",
        description=(
            "Fast, validated in-place weight operations for deep RL: Polyak/hard target "
            "updates, averaging, clipping, an SB3 plug-in and weight drift in TensorBoard. "
            "'rlweights COMMAND --help' explains each command."
        ),
    )
    parser.add_argument("--version", action="version", version=f"rlweights {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, summary in (
        ("bench", bench, "benchmark Polyak target updates: SB3, CleanRL, foreach, rlweights"),
        ("bench-sb3", bench_sb3, "benchmark SB3's target-update call site and SAC training"),
        ("bench-drift", bench_drift, "benchmark drift measurements, alone and inside SB3 SAC"),
    ):
        sub = commands.add_parser(
            name,
            help=summary,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(handler=module.main_from_args)
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
