"""Benchmark weight averaging across processes (same as `rlweights bench-distributed`)."""

import sys

from rlweights.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-distributed", *sys.argv[1:]]))
