"""The one error class a user's mistake raises; anything else reaching the command line is a bug.

``nestvit`` prints a :class:`UserError` (bad input: a file, an argument, a config key) as one line naming
the problem and the fix, and exits with status 2. Other exceptions are internal errors: the command line
says so, asks for a report and shows the traceback with ``--debug``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

__all__ = ["UserError", "did_you_mean", "listed"]


class UserError(Exception):
    """A user's mistake: bad input, a missing or damaged file, a config key or value that does not fit."""


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """``" (did you mean X?)"`` naming the options closest to a mistyped ``word``, or ``""`` when none is close."""
    options = list(options)
    close = difflib.get_close_matches(word, options, n=2, cutoff=0.75)
    if not close and "." in word:  # a dotted key in the wrong section (train.epochs): the keys of its last part
        last = word.rpartition(".")[2]
        close = [o for o in options if o.rpartition(".")[2] == last][:2]
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def listed(items: Sequence[str], most: int = 3, sep: str = ", ") -> str:
    """``a, b, c and 4 more``: the first ``most`` of ``items`` and how many others, for a message."""
    return sep.join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")

