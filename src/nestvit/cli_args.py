"""Argument types shared by the sub-commands: each refuses a bad value with argparse's one-line usage error."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def positive_int(text: str) -> int:
    """An integer >= 1 (batch sizes, counts, top-k)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def writable_dir(path: str | Path) -> Path:
    """Check, before any work, that ``path`` is (or can be made) a writable folder; returns it as a Path.

    Raises ``ValueError`` naming the folder, so an unwritable ``--out`` fails at once instead of after
    the whole evaluation."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path}: exists and is not a folder; choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {path}: cannot create the folder ({e.strerror}); choose a writable path") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: the folder is not writable; choose a writable path")
    return path
