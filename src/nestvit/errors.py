"""The one error class a user's mistake raises; anything else reaching the command line is a bug.

``nestvit`` prints a :class:`UserError` (bad input: a file, an argument, a config key) as one line naming
the problem and the fix, and exits with status 2. Other exceptions are internal errors: the command line
says so, asks for a report and shows the traceback with ``--debug``.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A user's mistake: bad input, a missing or damaged file, a config key or value that does not fit."""
