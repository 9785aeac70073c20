"""A native run and SB3's in lockstep (same as `rlweights bench-lockstep`)."""

import sys

from rlweights.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-lockstep", *sys.argv[1:]]))
