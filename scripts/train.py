"""Train an agent: the same as ``rlweights train`` (see ``--help``)."""

import sys

from rlweights.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
