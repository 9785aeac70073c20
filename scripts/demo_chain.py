"""DQN's Q-error on rlweights/Chain-v0 per target update (same as `rlweights demo chain`)."""

import sys

from rlweights.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", "chain", *sys.argv[1:]]))
