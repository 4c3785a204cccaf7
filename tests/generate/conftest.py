"""One intra-op thread for the generation tests (restored afterwards).

On a small shared machine two threads that wait on each other's barriers are many times slower than
one when other processes hold the cores; these tests use small tensors, so one thread loses nothing.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every generation test on one thread (tests/conftest.py ``one_thread``)."""
