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
            "updates, averaging, clipping. 'rlweights COMMAND --help' explains each command."
        ),
    )
    parser.add_argument("--version", action="version", version=f"rlweights {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench_parser = commands.add_parser(
        "bench",
        help="benchmark Polyak target updates against SB3, CleanRL, foreach and AveragedModel",
        description=bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(handler=bench.main_from_args)
    sb3_parser = commands.add_parser(
        "bench-sb3",
        help="benchmark SB3's own target-update call site and SAC training, plain vs attached",
        description=bench_sb3.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench_sb3.add_arguments(sb3_parser)
    sb3_parser.set_defaults(handler=bench_sb3.main_from_args)
    drift_parser = commands.add_parser(
        "bench-drift",
        help="benchmark drift measurements against Polyak updates and inside SB3 SAC",
        description=bench_drift.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench_drift.add_arguments(drift_parser)
    drift_parser.set_defaults(handler=bench_drift.main_from_args)
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
