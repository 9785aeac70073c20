"""Time the command's start-up against importing torch (same as `rlweights bench-startup`)."""

import sys

from rlweights.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-startup", *sys.argv[1:]]))
