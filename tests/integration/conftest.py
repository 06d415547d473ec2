"""Fixtures shared by the daemon tests (the broker and unique names are in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from daemon_support import DaemonProcess


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """Daemon child processes a test starts; each is killed by PID at teardown."""
    started: list[DaemonProcess] = []
    yield started
    for d in started:
        d.kill()
