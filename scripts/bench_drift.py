"""Benchmark drift monitoring (same as `rlweights bench-drift`)."""

import sys

from rlweights.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-drift", *sys.argv[1:]]))
