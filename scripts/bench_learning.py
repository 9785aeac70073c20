"""Learning curves of native agents next to SB3 over seeds (same as `rlweights bench-learning`)."""

import sys

from rlweights.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-learning", *sys.argv[1:]]))
