"""The disk probe: ``statvfs`` of the runs' output directories, in a thread of its own.

A check can hang (a network filesystem that stopped answering), and it must not hang the main
loop, which pings systemd's watchdog and answers admin commands. So this thread does the checks;
the main loop reads the latest readings (:meth:`DiskProbe.latest`) and the check in progress
(:meth:`DiskProbe.busy`), and :class:`recorder.daemon.diskspace.DiskWatch` judges them, a check
that does not return included. A directory that does not exist yet (it is created with the
first file) is checked at its nearest existing parent: that is where its files will go.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from recorder.daemon.diskspace import DiskReading

__all__ = ["DiskProbe"]

_log = structlog.get_logger("recorder.disks")


class DiskProbe:
    """Checks every directory of :meth:`set_directories` every ``interval_s`` seconds."""

    def __init__(
        self,
        interval_s: float,
        *,
        statvfs: Callable[[Path], Any] = os.statvfs,
        stat: Callable[[Path], Any] = os.stat,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        name: str = "k2eg-recorder-disks",
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.interval_s = interval_s
        self._statvfs = statvfs
        self._stat = stat
        self._clock = clock
        self._wall = wall
        self._name = name
        self._lock = threading.Lock()
        self._runs_by_dir: dict[str, tuple[str, ...]] = {}
        self._latest: tuple[DiskReading, ...] = ()
        self._last: dict[str, DiskReading] = {}  # directory -> its latest reading
        self._checking: dict[str, float] = {}  # directory -> its check in progress since
        self._round_wait_s = min(1.0, interval_s)  # a round waits this long for its checks
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ any thread
    def set_directories(self, runs_by_dir: Mapping[str, Sequence[str]]) -> None:
        """The output directories to watch, each with the runs writing there; checked now."""
        with self._lock:
            self._runs_by_dir = {str(d): tuple(sorted(r)) for d, r in runs_by_dir.items()}
        self._wake.set()

    def latest(self) -> tuple[DiskReading, ...]:
        with self._lock:
            return self._latest

    def busy(self) -> tuple[tuple[str, float], ...]:
        """Every check in progress: its directory and since when (monotonic)."""
        with self._lock:
            return tuple(sorted(self._checking.items()))

    def start(self) -> DiskProbe:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        return self

    def close(self, timeout_s: float = 1.0) -> None:
        """Stop the thread (a check that hangs is left behind: the thread is a daemon)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    # ------------------------------------------------------------------ the checks
    def check(self) -> tuple[DiskReading, ...]:
        """One round over every directory: a reading per filesystem. Also stored as
        :meth:`latest` (the thread calls this every ``interval_s``). Each directory is checked
        in a thread of its own: one that hangs (a network filesystem that stopped answering)
        keeps its last reading and is not checked again until it returns, and does not hold
        up the others."""
        with self._lock:
            runs_by_dir = dict(self._runs_by_dir)
            for gone in set(self._last) - set(runs_by_dir):
                del self._last[gone]
            started = []
            for directory in sorted(runs_by_dir):
                if directory in self._checking:  # still hanging since an earlier round
                    continue
                self._checking[directory] = self._clock()
                t = threading.Thread(target=self._check_into, args=(directory,),
                                     name=f"{self._name}-check", daemon=True)
                started.append(t)
        for t in started:
            t.start()
        deadline = time.monotonic() + self._round_wait_s
        for t in started:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            last = dict(self._last)
        by_device: dict[int, DiskReading] = {}
        for directory in sorted(runs_by_dir):
            reading = last.get(directory)
            if reading is None:  # its first check has not returned
                continue
            runs = runs_by_dir[directory]
            seen = by_device.get(reading.device)
            if seen is not None:  # another directory on a filesystem already read
                reading = DiskReading(
                    seen.device, seen.mount, (*seen.directories, directory),
                    tuple(sorted({*seen.runs, *runs})), reading.free_bytes,
                    reading.total_bytes, reading.at, reading.at_wall_ms, reading.error,
                )
            elif reading.runs != runs:
                reading = DiskReading(
                    reading.device, reading.mount, reading.directories, runs,
                    reading.free_bytes, reading.total_bytes, reading.at, reading.at_wall_ms,
                    reading.error,
                )
            by_device[reading.device] = reading
        readings = tuple(by_device.values())
        with self._lock:
            self._latest = readings
        return readings

    def _check_into(self, directory: str) -> None:
        try:
            reading = self._check_one(directory, ())
            with self._lock:
                if directory in self._runs_by_dir:
                    self._last[directory] = reading
        except Exception:  # a bug here must not end the checks
            _log.exception("disk check failed", directory=directory)
        finally:
            with self._lock:
                self._checking.pop(directory, None)

    def _check_one(self, directory: str, runs: tuple[str, ...]) -> DiskReading:
        try:
            path = Path(directory)
            while True:
                try:
                    st = self._stat(path)
                    break
                except FileNotFoundError:
                    if path.parent == path:
                        raise
                    path = path.parent
            mount = path
            while mount.parent != mount and self._stat(mount.parent).st_dev == st.st_dev:
                mount = mount.parent
            v = self._statvfs(path)
            return DiskReading(
                st.st_dev, str(mount), (directory,), runs, v.f_bavail * v.f_frsize,
                v.f_blocks * v.f_frsize, self._clock(), int(self._wall() * 1000),
            )
        except OSError as exc:
            # no device known: a key of its own (negative, so no real device has it)
            return DiskReading(
                -1 - (hash(directory) & 0x7FFFFFFF), directory, (directory,), runs, None, None,
                self._clock(), int(self._wall() * 1000),
                error=f"{type(exc).__name__}: {exc.strerror or exc}",
            )

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:  # a bug here must not end the checks
                _log.exception("disk check failed")
            self._wake.wait(self.interval_s)
            self._wake.clear()
