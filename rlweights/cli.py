"""The ``rlweights`` command: the one table of subcommands. ``scripts/`` only call in here.

Each subcommand lives in the module that implements it and is imported only when it runs, so
``rlweights --help`` works with the core alone and a subcommand whose extra is missing says
which extra to install (exit status 2).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from typing import NoReturn

from rlweights import __version__
from rlweights.extras import missing_extra

__all__ = ["COMMANDS", "build_parser", "for_terminal", "main"]

# name -> (module, function adding the arguments, handler, description or None for the
# module's docstring, one-line summary)
COMMANDS: dict[str, tuple[str, str, str, str | None, str]] = {
    "train": (
        "rlweights.agents.cli",
        "add_train_arguments",
        "train_main",
        "TRAIN_DESCRIPTION",
        "train a native DQN/SAC/TD3/DDPG/TQC/DroQ agent (or SB3's or SBX's: --impl) on a "
        "Gymnasium env",
    ),
    "evaluate": (
        "rlweights.agents.cli",
        "add_evaluate_arguments",
        "evaluate_main",
        "EVALUATE_DESCRIPTION",
        "evaluate a checkpoint written by 'rlweights train'",
    ),
    "soup": (
        "rlweights.soup",
        "add_arguments",
        "main_from_args",
        None,
        "weighted average of checkpoints of one architecture (model soup)",
    ),
    "demo": (
        "rlweights.agents.demo",
        "add_arguments",
        "main_from_args",
        None,
        "what target networks do: Baird's counterexample, DQN on a chain MDP",
    ),
    "bench": (
        "rlweights.bench.ops",
        "add_arguments",
        "main_from_args",
        None,
        "benchmark target updates and EMAs: SB3, CleanRL, torch, rlweights",
    ),
    "bench-sb3": (
        "rlweights.bench.sb3",
        "add_arguments",
        "main_from_args",
        None,
        "benchmark SB3's target-update call site and SAC / TQC training",
    ),
    "bench-drift": (
        "rlweights.bench.drift",
        "add_arguments",
        "main_from_args",
        None,
        "benchmark drift measurements, alone and inside SB3 SAC",
    ),
    "bench-train": (
        "rlweights.bench.train",
        "add_arguments",
        "main_from_args",
        None,
        "benchmark native agents' steps/s (eager, --compile) against SB3's and SBX's",
    ),
    "bench-learning": (
        "rlweights.bench.learning",
        "add_arguments",
        "main_from_args",
        None,
        "learning curves of native agents next to SB3 (or SBX) over seeds, with intervals",
    ),
    "bench-distributed": (
        "rlweights.bench.distributed",
        "add_arguments",
        "main_from_args",
        None,
        "benchmark averaging across processes against torch's average_parameters",
    ),
    "bench-compile": (
        "rlweights.bench.compile",
        "add_arguments",
        "main_from_args",
        None,
        "when compiling a native agent's gradient step pays: compile seconds and break-even",
    ),
    "bench-lockstep": (
        "rlweights.bench.lockstep",
        "add_arguments",
        "main_from_args",
        None,
        "a native run and SB3's in lockstep (shared weights and draws): where they part",
    ),
    "bench-startup": (
        "rlweights.bench.startup",
        "add_arguments",
        "main_from_args",
        None,
        "time the command's start-up ('rlweights --help', 'train --help') against importing torch",
    ),
}


# reST markup of docstrings, as a terminal shows it: :func:`x` -> x, ``x`` -> 'x'.
_REST = [
    (re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`]+)`"), r"\1"),
    (re.compile(r"``([^`]+)``"), r"'\1'"),
    (re.compile(r"`([^`]+)`_?"), r"\1"),
]


def for_terminal(text: str | None) -> str | None:
    """A docstring or help text without reST markup, for ``--help``."""
    if text is None:
        return None
    for pattern, replacement in _REST:
        text = pattern.sub(replacement, text)
    return text


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (what was wrong, and where to read more), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _chosen(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of the whole command tree. Only the arguments of ``only`` (all subcommands
    when None) are added, so that only that subcommand's module is imported."""
    parser = _Parser(
        prog="rlweights",
        description=(
            "Fast, validated in-place weight operations for deep RL: Polyak/hard target "
            "updates, averaging, clipping, native DQN/SAC/TD3/DDPG/TQC/DroQ agents, an SB3 "
            "plug-in and weight drift in TensorBoard. 'rlweights COMMAND --help' explains each "
            "command."
        ),
    )
    parser.add_argument("--version", action="version", version=f"rlweights {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, add, handler, description, summary) in COMMANDS.items():
        if only is not None and name != only:
            commands.add_parser(name, help=summary)
            continue
        module = importlib.import_module(module_name)
        sub = commands.add_parser(
            name,
            help=summary,
            description=for_terminal(
                getattr(module, description) if description else module.__doc__
            ),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        getattr(module, add)(sub)
        for action in sub._actions:  # argparse keeps no public list of them
            action.help = for_terminal(action.help)
        sub.set_defaults(handler=getattr(module, handler))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = _chosen(argv)
    try:
        parser = build_parser(chosen if chosen in COMMANDS else "")
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        return args.handler(args)
    except ImportError as exc:
        line = missing_extra(exc)
        if line is None:
            raise
        print(f"rlweights {chosen}: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
