"""systemd notification protocol (``sd_notify``) in the standard library, no binding needed.

Under a ``Type=notify`` unit systemd passes ``NOTIFY_SOCKET`` (a filesystem path or an
abstract socket written ``@name``); the daemon sends newline-separated ``KEY=VALUE``
datagrams to it. Outside systemd the variable is unset and every call is a no-op, so the
daemon code does not branch on "are we under systemd".

Usage in the daemon::

    notifier = Notifier.from_env()
    watchdog = WatchdogPinger(notifier, watchdog_interval())   # None when WatchdogSec= unset
    notifier.ready("recording 3 runs")
    while not stop.is_set():
        ...                               # poll, dispatch, write
        watchdog.maybe_ping(time.monotonic())   # from the main loop, never from a thread
    notifier.stopping("flushing files")
    notifier.extend_timeout(30.0)         # when the final flush may outlast TimeoutStopSec=

Sending never raises: a vanished socket must not take the recorder down. Each call returns
whether the datagram was sent; ``Notifier.last_error`` keeps the last failure.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier", "WatchdogPinger", "watchdog_interval"]


def _address(raw: str) -> str | None:
    """``/run/systemd/notify`` stays, ``@name`` becomes the abstract ``\\0name``."""
    if raw.startswith("/"):
        return raw
    if raw.startswith("@") and len(raw) > 1:
        return "\0" + raw[1:]
    return None  # vsock: and other transports are not supported: treat as "not under systemd"


def _clean(text: str) -> str:
    """A STATUS= value is one line: newlines would start a new (bogus) assignment."""
    return " ".join(text.splitlines()).strip()


class Notifier:
    """Sends ``sd_notify`` datagrams to ``NOTIFY_SOCKET`` (or does nothing when it is unset)."""

    def __init__(self, notify_socket: str | None) -> None:
        self._address = _address(notify_socket) if notify_socket else None
        self._socket: socket.socket | None = None
        self.last_error: OSError | None = None

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, unset_environment: bool = False
    ) -> Notifier:
        """Read ``NOTIFY_SOCKET``; with ``unset_environment`` remove it from ``os.environ`` so
        child processes do not inherit it (what ``sd_notify(unset_environment=1, ...)`` does)."""
        env = os.environ if environ is None else environ
        notifier = cls(env.get("NOTIFY_SOCKET"))
        if unset_environment and environ is None:
            os.environ.pop("NOTIFY_SOCKET", None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; False when disabled or on error."""
        if self._address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode("utf-8")
        try:
            if self._socket is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket = sock
            self._socket.sendto(payload, self._address)
        except OSError as exc:
            self.last_error = exc
            self.close()  # a fresh socket next time (systemd may have been re-executed)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup finished: ``READY=1`` (plus ``STATUS=``), systemd now considers us started."""
        parts = ["READY=1"]
        if status is not None:
            parts.append(f"STATUS={_clean(status)}")
        parts.append(f"MAINPID={os.getpid()}")
        return self.notify(*parts)

    def status(self, text: str) -> bool:
        """Free-form one-line status shown by ``systemctl status``."""
        return self.notify(f"STATUS={_clean(text)}")

    def watchdog(self) -> bool:
        """Keep-alive ping; systemd restarts the unit when pings stop for ``WatchdogSec=``."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun."""
        parts = ["STOPPING=1"]
        if status is not None:
            parts.append(f"STATUS={_clean(status)}")
        return self.notify(*parts)

    def reloading(self, status: str | None = None) -> bool:
        """A reload has begun (``READY=1`` again when it is over). ``MONOTONIC_USEC`` is what
        ``Type=notify-reload`` (systemd >= 253) requires; older systemd ignores it."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        parts = ["RELOADING=1", f"MONOTONIC_USEC={now_usec}"]
        if status is not None:
            parts.append(f"STATUS={_clean(status)}")
        return self.notify(*parts)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before the current start/stop timeout fires
        (``EXTEND_TIMEOUT_USEC``). Repeat it before it runs out: each call sets a new
        deadline counted from *now*."""
        usec = max(1, int(seconds * 1_000_000))
        return self.notify(f"EXTEND_TIMEOUT_USEC={usec}")

    def close(self) -> None:
        if self._socket is not None:
            try:
                self._socket.close()
            finally:
                self._socket = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def watchdog_interval(
    environ: Mapping[str, str] | None = None, *, pid: int | None = None
) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, half of ``WATCHDOG_USEC`` (as sd_watchdog_enabled(3)
    recommends), or None when the watchdog is off or meant for another process
    (``WATCHDOG_PID`` set to a different PID)."""
    env = os.environ if environ is None else environ
    raw_usec = env.get("WATCHDOG_USEC")
    if not raw_usec:
        return None
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    if usec <= 0:
        return None
    raw_pid = env.get("WATCHDOG_PID")
    if raw_pid:
        try:
            target = int(raw_pid)
        except ValueError:
            return None
        if target != (os.getpid() if pid is None else pid):
            return None
    return usec / 1_000_000 / 2


class WatchdogPinger:
    """Rate-limits ``WATCHDOG=1`` to one ping per ``interval_s``; call ``maybe_ping`` from the
    main loop on every pass (time injected as monotonic seconds)."""

    def __init__(self, notifier: Notifier, interval_s: float | None) -> None:
        self._notifier = notifier
        self.interval_s = interval_s
        self._last: float | None = None

    @property
    def enabled(self) -> bool:
        return self.interval_s is not None and self._notifier.enabled

    def due(self, now: float) -> bool:
        if self.interval_s is None:
            return False
        return self._last is None or now - self._last >= self.interval_s

    def maybe_ping(self, now: float) -> bool:
        """Ping when an interval has passed since the last ping; True when one was sent."""
        if not self.due(now):
            return False
        self._last = now
        return self._notifier.watchdog()
