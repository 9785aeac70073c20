"""Baird's counterexample with and without target networks (same as `rlweights demo baird`)."""

import sys

from rlweights.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", "baird", *sys.argv[1:]]))
