"""Benchmark native agents against SB3 side by side (same as `rlweights bench-train`)."""

import sys

from rlweights.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-train", *sys.argv[1:]]))
