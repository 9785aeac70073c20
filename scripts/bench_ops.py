"""Benchmark Polyak target updates side by side (same as `rlweights bench`)."""

import sys

from rlweights.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
