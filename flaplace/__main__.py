"""``python -m flaplace``: the command line (see :mod:`flaplace.cli`)."""

import sys

from flaplace.app.cli import main

sys.exit(main())
