"""Benchmark the SB3 plug-in (same as `rlweights bench-sb3`)."""

import sys

from rlweights.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-sb3", *sys.argv[1:]]))
