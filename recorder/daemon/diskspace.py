"""Free space where the runs write, judged before a disk fills (pure code).

A recording whose disk fills stops: everything flushed before is kept, its run waits
(``retrying``) and resumes by itself once the disk has room again (decision 0007). This module
is the warning before that happens, and the judge of "room again". The
probe thread (:mod:`recorder.daemon.diskprobe`) reads ``statvfs`` of every run's output
directory; :class:`DiskWatch` turns its readings into one :class:`DiskStatus` per filesystem
(runs on the same filesystem are reported together) and into changes to log. A filesystem needs
an operator's look (its ``warning`` is set) when

* its free space is below the minimum (``RECORDER_DISK_MIN_FREE``: a share of its size such as
  ``5%``, or a size such as ``50G``);
* at the rate its free space fell over the last minutes it would be full within
  ``RECORDER_DISK_FULL_WARNING_S`` (default one hour; 0: no such warning). The rate is the
  least-squares slope of the samples of the last :data:`TREND_WINDOW_S`, once they span
  :data:`TREND_MIN_SPAN_S`;
* a check has not returned for ``stuck_after_s``: a hung network filesystem. The writers on it
  are stuck too; the daemon's main loop is not, because the checks run in their own thread.

A warning clears with hysteresis (free space 10 % above the minimum, a time to full twice the
horizon), so a disk that hovers at the limit does not flap in the log.

Free space is what an unprivileged user may still write (``f_bavail``): the service user does
not get the blocks reserved for root.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from recorder.admin.status import DiskStatus

__all__ = [
    "RESUME_MIN_FREE",
    "TREND_MIN_SPAN_S",
    "TREND_WINDOW_S",
    "DiskChange",
    "DiskReading",
    "DiskTrend",
    "DiskWatch",
    "MinFree",
    "format_bytes",
    "format_duration",
    "out_of_space",
]

TREND_WINDOW_S = 300.0  # samples older than this do not count for the rate
TREND_MIN_SPAN_S = 60.0  # no rate before the samples span this long
CLEAR_MARGIN = 1.10  # a low-space warning clears above 110 % of the minimum
CLEAR_HORIZON = 2.0  # a filling-up warning clears when full_in exceeds twice the horizon
STUCK = "storage not answering"  # how a check that does not return is reported

RESUME_MIN_FREE = 64 * 1024**2
"""A recording that failed for want of space resumes once its filesystem has at least this
much free, and its minimum (with the 10 % margin): less would fail again at once."""
_NO_SPACE = (
    "no space left on device",  # ENOSPC, as Python and h5py say it
    "errno = 28",  # ... as the HDF5 library says it
    "disk quota exceeded",  # EDQUOT
    "errno = 122",
    "file too large",  # EFBIG: a file-size limit; a new segment file starts below it
    "errno = 27",
)

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(%|[kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class MinFree:
    """The least free space a filesystem should keep: a share of its size or a size."""

    fraction: float | None = None  # 0.05 for "5%"
    nbytes: int | None = None

    @classmethod
    def parse(cls, text: str) -> MinFree:
        """``"5%"``, ``"50G"`` / ``"50GiB"`` / ``"50 GB"`` (binary units), ``"0"``; raises
        ValueError saying what is accepted."""
        m = _SIZE_RE.match(str(text))
        if m is None:
            raise ValueError(
                f"{text!r} is not a free-space minimum: give a percentage of the disk "
                "(e.g. 5%) or a size (e.g. 50G, 500M; K/M/G/T/P are powers of 1024)"
            )
        number, unit = float(m.group(1)), m.group(2).lower()
        if unit == "%":
            if number >= 100:
                raise ValueError(f"{text!r}: a free-space minimum must be below 100%")
            return cls(fraction=number / 100)
        return cls(nbytes=int(number * _UNITS[unit]))

    def bytes_for(self, total_bytes: int) -> int:
        if self.fraction is not None:
            return math.ceil(total_bytes * self.fraction)
        return self.nbytes or 0

    def __str__(self) -> str:
        if self.fraction is not None:
            return f"{self.fraction * 100:g}%"
        return format_bytes(self.nbytes or 0)


@dataclass(frozen=True, slots=True)
class DiskReading:
    """One filesystem as the probe last saw it (free/total None with ``error`` when the check
    failed)."""

    device: int
    mount: str
    directories: tuple[str, ...]
    runs: tuple[str, ...]
    free_bytes: int | None
    total_bytes: int | None
    at: float  # monotonic seconds of the check
    at_wall_ms: int
    error: str | None = None


@dataclass(frozen=True, slots=True)
class DiskChange:
    """Something to log: a filesystem's ``warning`` was set (``kind`` ``warning``) or cleared
    (``ok``)."""

    kind: str
    status: DiskStatus


@dataclass(slots=True)
class DiskTrend:
    """Free-space samples of one filesystem; the rate at which it fills."""

    window_s: float = TREND_WINDOW_S
    min_span_s: float = TREND_MIN_SPAN_S
    samples: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, at: float, free_bytes: int) -> None:
        if self.samples and at <= self.samples[-1][0]:
            return  # the same check again
        self.samples.append((at, free_bytes))
        while self.samples and self.samples[0][0] < at - self.window_s:
            self.samples.popleft()

    def fill_rate(self) -> float | None:
        """Bytes per second the free space falls (least-squares slope, negated); None until
        the samples span ``min_span_s``."""
        s = self.samples
        if len(s) < 2 or s[-1][0] - s[0][0] < self.min_span_s:
            return None
        n = len(s)
        t0 = s[0][0]
        mean_t = sum(t - t0 for t, _ in s) / n
        mean_f = sum(f for _, f in s) / n
        var = sum((t - t0 - mean_t) ** 2 for t, _ in s)
        if var <= 0:
            return None
        cov = sum((t - t0 - mean_t) * (f - mean_f) for t, f in s)
        return -cov / var

    def full_in_s(self, free_bytes: int) -> float | None:
        """Seconds until no space is left at :meth:`fill_rate`; None when not filling."""
        rate = self.fill_rate()
        if rate is None or rate <= 0:
            return None
        return free_bytes / rate


@dataclass(slots=True)
class _Filesystem:
    trend: DiskTrend
    warning: str | None = None


class DiskWatch:
    """Readings in, one :class:`DiskStatus` per filesystem and the changes to log out."""

    def __init__(
        self,
        min_free: MinFree,
        full_warning_s: float = 3600.0,
        stuck_after_s: float = 30.0,
        *,
        window_s: float = TREND_WINDOW_S,
        min_span_s: float = TREND_MIN_SPAN_S,
    ) -> None:
        self.min_free = min_free
        self.full_warning_s = full_warning_s
        self.stuck_after_s = stuck_after_s
        self._window_s = window_s
        self._min_span_s = min_span_s
        self._fs: dict[int, _Filesystem] = {}
        self._statuses: tuple[DiskStatus, ...] = ()
        self._read_at: dict[str, float] = {}  # directory -> when its last reading was taken

    @property
    def statuses(self) -> tuple[DiskStatus, ...]:
        """The latest status of every filesystem, by mount point."""
        return self._statuses

    def has_room(self, directory: str, since: float | None = None) -> bool:
        """Whether a recording into ``directory`` could resume: its filesystem is not low
        (hysteresis included), its last check returned, and it has :data:`RESUME_MIN_FREE`
        free. True when the directory is not watched (nothing says otherwise). ``since``
        (monotonic, when its disk ran out): a reading taken before says nothing about room
        now, so False until a later one."""
        for d in self._statuses:
            if directory in d.directories:
                if since is not None and self._read_at.get(directory, -math.inf) < since:
                    return False
                if d.free_bytes is None or (d.warning or "").startswith(STUCK):
                    return False
                floor = (d.min_free_bytes or 0) * CLEAR_MARGIN
                return d.free_bytes >= max(RESUME_MIN_FREE, floor)
        return True

    def warnings(self) -> list[str]:
        """``"<mount>: <warning>"`` for every filesystem that needs a look."""
        return [f"{d.path}: {d.warning}" for d in self._statuses if d.warning]

    def update(
        self,
        now: float,
        readings: Sequence[DiskReading],
        busy: Sequence[tuple[str, float]] = (),
    ) -> list[DiskChange]:
        """Take the probe's latest readings and the checks in progress (each its directory
        and since when, monotonic: :meth:`DiskProbe.busy`); returns the warnings set and
        cleared since the last call."""
        stuck: dict[str, str] = {
            directory: f"{STUCK}: checking {directory} has not returned for {now - since:.0f} s"
            for directory, since in busy
            if now - since >= self.stuck_after_s
        }
        statuses: list[DiskStatus] = []
        seen: set[int] = set()
        for r in readings:
            seen.add(r.device)
            fs = self._fs.get(r.device)
            if fs is None:
                fs = self._fs[r.device] = _Filesystem(DiskTrend(self._window_s, self._min_span_s))
            if r.free_bytes is not None:
                fs.trend.add(r.at, r.free_bytes)
            hung = next((stuck[d] for d in r.directories if d in stuck), None)
            status = self._judge(fs, r, hung)
            fs.warning = status.warning
            statuses.append(status)
        self._read_at = {d: r.at for r in readings if r.free_bytes is not None
                         for d in r.directories}
        for device in set(self._fs) - seen:  # no run writes there any more
            del self._fs[device]
        for directory, why in stuck.items():
            if not any(directory in s.directories for s in statuses):
                # its first check hangs: nothing known but that
                statuses.append(DiskStatus(path=directory, directories=(directory,),
                                           warning=why))
        before = {d.path: d.warning for d in self._statuses}
        # a warning reported under a run's directory (its filesystem was not known: its check
        # hung or failed) clears under the mount point its directory is now reported at
        warned_dirs = {x for d in self._statuses if d.warning for x in d.directories}
        self._statuses = tuple(sorted(statuses, key=lambda d: d.path))
        changes: list[DiskChange] = []
        for d in self._statuses:
            if d.warning is not None:
                if before.get(d.path) is None:
                    changes.append(DiskChange("warning", d))
            elif before.get(d.path) is not None or not warned_dirs.isdisjoint(d.directories):
                changes.append(DiskChange("ok", d))
        return changes

    def _judge(self, fs: _Filesystem, r: DiskReading, hung: str | None) -> DiskStatus:
        free, total = r.free_bytes, r.total_bytes
        min_free = None if total is None else self.min_free.bytes_for(total)
        full_in = None if free is None else fs.trend.full_in_s(free)
        held = fs.warning is not None  # hysteresis: a warning clears with a margin
        low_below = (min_free or 0) * (CLEAR_MARGIN if held else 1.0)
        horizon = self.full_warning_s * (CLEAR_HORIZON if held else 1.0)
        warning = hung
        if warning is None and r.error is not None:
            warning = f"cannot check free space: {r.error}"
        if warning is None and free is not None and total and free < low_below:
            warning = (f"{format_bytes(free)} free ({_share(free, total)}), below the "
                       f"minimum of {self.min_free}")
        if warning is None and full_in is not None and full_in < horizon:
            warning = f"full in {format_duration(full_in)} at the current rate"
        return DiskStatus(
            path=r.mount,
            directories=r.directories,
            runs=r.runs,
            free_bytes=free,
            total_bytes=total,
            min_free_bytes=min_free,
            full_in_s=full_in,
            warning=warning,
            checked_at=r.at_wall_ms,
        )


def out_of_space(reason: str) -> bool:
    """Whether a recording's failure ``reason`` says its disk (or quota, or file-size limit)
    ran out."""
    text = reason.lower()
    return any(marker in text for marker in _NO_SPACE)


def _share(free: int, total: int) -> str:
    return f"{100 * free / total:.1f}%" if total else "?"


def format_bytes(n: float) -> str:
    """``812.3 GiB``-style (powers of 1024, as ``df -h``)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """``~2 d 5 h``, ``~3 h 10 min``, ``~25 min``, ``~40 s``."""
    s = max(0, round(seconds))
    if s < 90:
        return f"~{s} s"
    minutes = round(s / 60)
    if minutes < 120:
        return f"~{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"~{hours} h {minutes} min" if minutes else f"~{hours} h"
    days, hours = divmod(hours, 24)
    return f"~{days} d {hours} h" if hours else f"~{days} d"
