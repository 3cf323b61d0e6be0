"""``python -m flaplace``: the command line (see :mod:`flaplace.cli`)."""

import sys

from flaplace.cli import main

sys.exit(main())
