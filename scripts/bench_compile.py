"""When compiling a native agent's step pays (same as `rlweights bench-compile`)."""

import sys

from rlweights.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench-compile", *sys.argv[1:]]))
