"""sd_notify over a real AF_UNIX datagram socket (filesystem and abstract addresses)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from recorder.notify import Notifier, WatchdogPinger, watchdog_interval


class Listener:
    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def receive(self) -> dict[str, str]:
        data = self.sock.recv(4096)
        out: dict[str, str] = {}
        for line in data.decode("utf-8").split("\n"):
            key, _, value = line.partition("=")
            out[key] = value
        return out

    def nothing_pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.setblocking(True)
        return False


@pytest.fixture(params=["filesystem", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Listener]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(5)
    if request.param == "filesystem":
        path = str(tmp_path / "notify.sock")
        sock.bind(path)
        env_value = path
    else:
        name = f"k2eg-recorder-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        env_value = "@" + name
    try:
        yield Listener(sock, env_value)
    finally:
        sock.close()


def test_ready_status_watchdog_stopping_extend(listener: Listener) -> None:
    with Notifier.from_env({"NOTIFY_SOCKET": listener.env_value}) as notifier:
        assert notifier.enabled
        assert notifier.ready("recording 2 runs")
        msg = listener.receive()
        assert msg["READY"] == "1"
        assert msg["STATUS"] == "recording 2 runs"
        assert msg["MAINPID"] == str(os.getpid())

        assert notifier.status("line one\nline two")
        assert listener.receive() == {"STATUS": "line one line two"}

        assert notifier.watchdog()
        assert listener.receive() == {"WATCHDOG": "1"}

        assert notifier.stopping("flushing")
        assert listener.receive() == {"STOPPING": "1", "STATUS": "flushing"}

        assert notifier.extend_timeout(2.5)
        assert listener.receive() == {"EXTEND_TIMEOUT_USEC": "2500000"}

        assert notifier.reloading()
        msg = listener.receive()
        assert msg["RELOADING"] == "1"
        assert int(msg["MONOTONIC_USEC"]) > 0
        assert listener.nothing_pending()


def test_unset_socket_is_a_noop() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert notifier.last_error is None


def test_unsupported_address_is_disabled() -> None:
    assert not Notifier("vsock:2:1234").enabled
    assert not Notifier("relative/path").enabled
    assert not Notifier("@").enabled


def test_send_failure_is_reported_not_raised(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "nobody-listens.sock"))
    assert notifier.enabled
    assert notifier.watchdog() is False
    assert isinstance(notifier.last_error, OSError)


def test_recovers_after_listener_appears(tmp_path: Path) -> None:
    path = tmp_path / "late.sock"
    notifier = Notifier(str(path))
    assert notifier.status("early") is False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(5)
    sock.bind(str(path))
    try:
        assert notifier.status("late") is True
        assert sock.recv(100) == b"STATUS=late"
    finally:
        sock.close()
        notifier.close()


def test_unset_environment(monkeypatch: pytest.MonkeyPatch, listener: Listener) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.env_value)
    notifier = Notifier.from_env(unset_environment=True)
    assert "NOTIFY_SOCKET" not in os.environ
    assert notifier.watchdog()
    assert listener.receive() == {"WATCHDOG": "1"}
    notifier.close()


@pytest.mark.parametrize(
    ("env", "pid", "expected"),
    [
        ({}, 1, None),
        ({"WATCHDOG_USEC": "30000000"}, 1, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, 1, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "2"}, 1, None),
        ({"WATCHDOG_USEC": "0"}, 1, None),
        ({"WATCHDOG_USEC": "soon"}, 1, None),
        ({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "x"}, 1, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], pid: int, expected: float | None) -> None:
    assert watchdog_interval(env, pid=pid) == expected


def test_watchdog_interval_defaults_to_own_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 2.0


def test_watchdog_pinger_rate_limits(listener: Listener) -> None:
    notifier = Notifier(listener.env_value)
    pinger = WatchdogPinger(notifier, 10.0)
    assert pinger.enabled
    assert pinger.maybe_ping(100.0)  # first pass pings at once
    assert listener.receive() == {"WATCHDOG": "1"}
    assert not pinger.maybe_ping(105.0)
    assert not pinger.maybe_ping(109.99)
    assert pinger.maybe_ping(110.0)
    assert listener.receive() == {"WATCHDOG": "1"}
    assert listener.nothing_pending()
    notifier.close()


def test_watchdog_pinger_disabled_without_interval(listener: Listener) -> None:
    pinger = WatchdogPinger(Notifier(listener.env_value), None)
    assert not pinger.enabled
    assert not pinger.maybe_ping(0.0)
    assert listener.nothing_pending()
