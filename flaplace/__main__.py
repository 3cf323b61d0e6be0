"""``python -m flaplace``: the command line (see [`flaplace.app.cli`][flaplace.app.cli])."""

import sys

from flaplace.app.cli import main

sys.exit(main())
