"""``python -m rlweights`` is the ``rlweights`` command."""

import sys

from rlweights.cli import main

sys.exit(main())
