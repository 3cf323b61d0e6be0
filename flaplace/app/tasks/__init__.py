"""Tasks (moved from flaplace.tasks; the readers module is split up next)."""

from flaplace.app.tasks.readers import *  # noqa: F403
