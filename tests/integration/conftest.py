"""Fixtures shared by the daemon tests (the broker and unique names are in tests/conftest.py)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import threading
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


@pytest.fixture
def notify_lines() -> Iterator[tuple[str, list[str]]]:
    """A systemd notify socket (AF_UNIX datagrams, as systemd binds it): its address and
    every message received, collected by a thread."""
    directory = tempfile.mkdtemp(prefix="k2n")  # short: socket paths are limited to 108 bytes
    path = f"{directory}/notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    received: list[str] = []
    done = threading.Event()

    def collect() -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                received.append(sock.recv(65536).decode())

    thread = threading.Thread(target=collect, daemon=True)
    thread.start()
    yield path, received
    done.set()
    thread.join(5)
    sock.close()
    shutil.rmtree(directory, ignore_errors=True)
