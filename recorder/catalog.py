"""Which recordings are on disk: runs, time spans, status, files (``k2eg-recorder ls``).

    from recorder.catalog import find_recordings
    for rec in find_recordings("/data/k2eg-recorder/bpm", run="bpm-10hz", since="2h"):
        print(rec.run, rec.start, rec.status, rec.iterations, [f.path.name for f in rec.files])
        with rec.open() as r:            # recorder.reader.Recording over its files
            r.table()

Each file is described by what it says about itself: a finalized file by its root
attributes and its ``/iterations`` status column; a ``.partial`` file by its last complete
commit, and as ``recording`` while a writer holds it (:mod:`recorder.sinks.writelock`) or
``unfinished`` when none does (left by a crash or a failed writer: ``recover`` it). No PV
data is read, so a directory of thousands of files is listed in seconds. Files of one
recording (the same ``recording_uid``: its segments, and the segments a restarted daemon
resumed into) are grouped, in segment order. A file's counts are of its ``/iterations`` rows;
a recording's are of its iterations: one open at a rotation (or cut by a crash and resumed),
with a row in each of two files, counts once, with the later row's status.

Times are ns since the Unix epoch (UTC). A file covers ``start_ns`` (its segment's start,
the recording's for the first segment, or the header timestamp of its first iteration when
that came earlier) to ``end_ns`` (finalized: its ``end_time_ns``; being written: its last
commit; or the last gateway timestamp of its iterations when that is later). ``since`` /
``until`` keep the files that overlap the window, so a recording that began before the
window shows only its files from the window on.
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recorder.errors import DamagedFileError, FileFormatError
from recorder.sinks.buffer import ITERATION_REASONS, SPLIT_REASONS
from recorder.sinks.describe import data_span_ns, iso_ns, plain, utc
from recorder.sinks.h5open import open_for_reading
from recorder.sinks.livefile import read_commit
from recorder.sinks.options import PARTIAL_SUFFIX, final_path
from recorder.sinks.writelock import writer_active

if TYPE_CHECKING:
    from recorder.reader import Recording

__all__ = [
    "Catalog",
    "FileEntry",
    "RecordingEntry",
    "candidates",
    "describe_file",
    "find_recordings",
    "live_status",
    "now_at",
    "parse_when",
    "scan",
    "utc",
]

SUFFIXES = (".h5", ".hdf5", ".nxs")
"""Names the recorder writes (``output.file_template`` must end in one of them)."""
STATUS_ORDER = ("recording", "unfinished", "failed", "aborted", "complete")
"""A recording's status is the first of these that one of its files has. ``unfinished``: a
``.partial`` file no writer holds (left by a crash or a failed writer; ``recover`` it)."""

_DAY_NS = 86400 * 1_000_000_000
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)


def parse_when(text: str, now_ns: int | None = None) -> int:
    """A point in time as ns since the epoch: ISO 8601 (``2026-11-22``,
    ``2026-11-22T13:00``, ``2026-11-22 13:00:00+01:00``; without an offset it is UTC, as
    in the files), ``now``, ``today`` / ``yesterday`` (00:00 UTC), or a duration ago
    (``90s``, ``30m``, ``2h``, ``1d``, ``1w``). Raises ValueError saying which forms are
    accepted."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    s = text.strip()
    word = s.lower()
    if word == "now":
        return now_ns
    if word in ("today", "yesterday"):
        day = now_ns // _DAY_NS * _DAY_NS
        return day - _DAY_NS if word == "yesterday" else day
    m = _RELATIVE.match(s)
    if m:
        return now_ns - int(float(m.group(1)) * _UNITS_S[m.group(2).lower()] * 1e9)
    try:
        when = dt.datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(
            f"cannot read the time {text!r}: use ISO 8601 (2026-11-22, 2026-11-22T13:00, "
            "...+01:00; UTC without an offset), 'now', 'today', 'yesterday', or a time ago "
            "such as 30m, 2h, 1d"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of a recording (a segment)."""

    path: Path
    run: str
    recording_uid: str
    segment: int
    status: str  # recording | unfinished | complete | aborted | failed (see STATUS_ORDER)
    reason: str
    start_ns: int  # the segment's start (the recording's, for segment 0), or its first header
    end_ns: int  # finalized: end_time_ns; being written: its last commit (start_ns if none),
    # or its last gateway timestamp
    iterations: int  # its /iterations rows
    incomplete: int  # rows whose status is not complete
    values: int
    bytes: int
    format_version: str
    partial: bool  # still a .partial: being written (recording), or unfinished
    first_iter: int | None = None  # iter_index of its first row
    goes_on: int | None = None  # iter_index of its last row when that iteration may go on in
    # the next segment (reason recording_stopped / writer_crashed, see SPLIT_REASONS)


@dataclass(frozen=True, slots=True)
class RecordingEntry:
    """The files of one recording (one ``recording_uid``), in segment order."""

    run: str
    recording_uid: str
    files: tuple[FileEntry, ...]

    @property
    def paths(self) -> list[Path]:
        return [f.path for f in self.files]

    @property
    def start_ns(self) -> int:
        return min(f.start_ns for f in self.files)

    @property
    def end_ns(self) -> int:
        return max(f.end_ns for f in self.files)

    @property
    def start(self) -> dt.datetime:
        return utc(self.start_ns)

    @property
    def end(self) -> dt.datetime:
        return utc(self.end_ns)

    @property
    def status(self) -> str:
        """The first of :data:`STATUS_ORDER` one of its files has: ``recording`` while a
        writer writes one, ``unfinished`` when one is a ``.partial`` no writer holds, else
        ``failed`` / ``aborted`` when a file says so, else ``complete``."""
        have = {f.status for f in self.files}
        return next((s for s in STATUS_ORDER if s in have), "complete")

    @property
    def reason(self) -> str:
        """The reason given by the first file with the recording's :attr:`status` (``""``
        for a complete recording): not a complete segment's "continued in the next
        segment" when a later one was aborted."""
        status = self.status
        if status == "complete":
            return ""
        return next((f.reason for f in self.files if f.status == status and f.reason), "")

    @property
    def iterations(self) -> int:
        """Its iterations: an iteration open at a rotation (or cut by a crash and resumed),
        which has a row in each of two files, counts once."""
        return sum(f.iterations for f in self.files) - self.split

    @property
    def incomplete(self) -> int:
        """Its incomplete iterations: one split between two files has the later row's
        status (the earlier row, `recording_stopped` or `writer_crashed`, is incomplete)."""
        return sum(f.incomplete for f in self.files) - self.split

    @property
    def split(self) -> int:
        """How many of its iterations have a row in each of two consecutive files: the
        earlier file's last row (see :data:`SPLIT_REASONS`) and the next segment's first."""
        return sum(a.goes_on is not None and a.goes_on == b.first_iter and b.segment > a.segment
                   for a, b in itertools.pairwise(self.files))

    @property
    def values(self) -> int:
        return sum(f.values for f in self.files)

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    @property
    def partial(self) -> bool:
        return any(f.partial for f in self.files)

    def open(self) -> Recording:
        """Its files as one :class:`recorder.reader.Recording` (live ones included)."""
        from recorder.reader import open_recording

        return open_recording(self.paths)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready description (``k2eg-recorder ls --json``)."""
        return {
            "run": self.run,
            "recording_uid": self.recording_uid,
            "status": self.status,
            "reason": self.reason,
            "start": iso_ns(self.start_ns),
            "end": iso_ns(self.end_ns),
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "iterations": self.iterations,
            "incomplete": self.incomplete,
            "values": self.values,
            "bytes": self.bytes,
            "files": [
                {"path": str(f.path), "segment": f.segment, "status": f.status,
                 "reason": f.reason, "partial": f.partial, "start": iso_ns(f.start_ns),
                 "end": iso_ns(f.end_ns), "iterations": f.iterations,
                 "incomplete": f.incomplete, "values": f.values, "bytes": f.bytes,
                 "format_version": f.format_version}
                for f in self.files
            ],
        }


@dataclass
class Catalog:
    """What :func:`scan` found."""

    recordings: list[RecordingEntry] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # (file, why)
    foreign: list[Path] = field(default_factory=list)  # HDF5 files that are not ours
    missing: list[Path] = field(default_factory=list)  # paths asked for that do not exist


def describe_file(path: str | os.PathLike[str]) -> FileEntry:
    """What the file at ``path`` says about itself. Raises :class:`FileFormatError` for an
    HDF5 file that is not a k2eg-recorder file, OSError when it cannot be read."""
    path = Path(path)
    size = path.stat().st_size
    partial = path.name.endswith(PARTIAL_SUFFIX)
    with open_for_reading(path, live_first=partial) as f:
        a = {k: plain(v) for k, v in f.attrs.items() if k in _ATTRS}
        if a.get("format") != "k2eg-recorder":
            raise FileFormatError(f"{path} is not a k2eg-recorder file")
        start_ns = _ns(a.get("segment_start_time")) or int(a.get("start_time_ns") or 0)
        if int(a.get("segment", 0)) == 0 and 0 < int(a.get("start_time_ns") or 0) < start_ns:
            start_ns = int(a["start_time_ns"])  # the first segment: from the recording's start
        if a.get("layout") == "live":
            commit = read_commit(f)
            n_iter = int(commit.limits["n_iterations"])
            values = int(commit.limits["n_samples"])
            status = live_status(commit.status, path)
            end_ns = int(commit.time_ns) or start_ns
        else:
            n_iter = int(a.get("n_iterations", -1))
            if n_iter < 0:  # written before n_iterations (format 1.x)
                n_iter = int(f["iterations/iter_index"].shape[0])
            values = int(a.get("n_values", 0))
            status = str(a.get("status", ""))
            end_ns = int(a.get("end_time_ns") or 0) or start_ns
        incomplete = 0
        first_iter = goes_on = None
        if n_iter:
            column = f["iterations/status"][:n_iter]
            incomplete = int(np.count_nonzero(column))
            index = f["iterations/iter_index"]
            first_iter = int(index[0])
            if "reason" in f["iterations"] and int(f["iterations/reason"][n_iter - 1]) in _SPLIT:
                goes_on = int(index[n_iter - 1])
            # the segment was opened after the header of its first iteration (its start was
            # decided when the first event came; iterations read back after a restart or
            # still open at a rotation came earlier): the gateway's timestamps widen the span
            # to the data it holds
            span = data_span_ns(f["iterations"], n_iter)
            if span is not None:
                if not start_ns or span[0] < start_ns:
                    start_ns = span[0]
                end_ns = max(end_ns, span[1])
    return FileEntry(
        path=path,
        run=str(a.get("run_name", "")),
        recording_uid=str(a.get("recording_uid", "")),
        segment=int(a.get("segment", 0)),
        status=status,
        reason=str(a.get("status_reason", "")),
        start_ns=start_ns,
        end_ns=max(end_ns, start_ns),
        iterations=n_iter,
        incomplete=incomplete,
        values=values,
        bytes=size,
        format_version=str(a.get("format_version", "")),
        partial=partial,
        first_iter=first_iter,
        goes_on=goes_on,
    )


def live_status(commit_status: str, path: str | os.PathLike[str]) -> str:
    """The status of a ``.partial`` file whose last commit says ``commit_status``:
    ``unfinished`` instead of ``recording`` when no writer holds it any more (left by a
    crash or a failed writer: ``recover`` it)."""
    if commit_status == "recording" and writer_active(path) is False:
        return "unfinished"
    return commit_status


def scan(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    run: str | Sequence[str] | None = None,
    since: str | int | None = None,
    until: str | int | None = None,
    describe: Callable[[Path], FileEntry] = describe_file,
) -> Catalog:
    """Describe the recorder's files in ``paths`` (directories, not recursive, and files)
    and group them into recordings, oldest first. ``run`` keeps those runs; ``since`` /
    ``until`` (ns, or text for :func:`parse_when`) keep the files that overlap the window.
    ``describe`` reads one file (the CLI passes :func:`describe_file` in a worker process
    with a deadline, :class:`recorder.deadline.DeadlineWorker`)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    runs = {run} if isinstance(run, str) else None if run is None else set(run)
    now = time.time_ns()
    lo = _when(since, now)
    hi = _when(until, now)
    out = Catalog()
    groups: dict[tuple[str, str], list[FileEntry]] = {}
    seen: set[Path] = set()
    found, out.missing = candidates(paths, out.unreadable)
    for listed in found:
        path = now_at(listed)
        if path is None:  # removed since it was listed (an archive job): not there to list
            continue
        key = path.resolve()
        if key in seen:
            continue
        seen.add(key)
        try:
            try:
                entry = describe(path)
            except FileNotFoundError:  # finalized (renamed) or removed while it was read
                moved = now_at(path)
                if moved == path:
                    raise
                if moved is None or moved.resolve() in seen:
                    continue
                seen.add(moved.resolve())
                path = moved
                entry = describe(path)
        except FileFormatError as exc:
            if not isinstance(exc, DamagedFileError):  # ours, but damaged: unreadable
                out.foreign.append(path)
                continue
            out.unreadable.append((path, str(exc)))
            continue
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            why = str(exc)
            if "file signature not found" in why:
                out.foreign.append(path)  # not HDF5 at all
            else:
                out.unreadable.append((path, why))
            continue
        if runs is not None and entry.run not in runs:
            continue
        if (lo is not None and entry.end_ns < lo) or (hi is not None and entry.start_ns > hi):
            continue
        groups.setdefault((entry.run, entry.recording_uid), []).append(entry)
    for (run_name, uid), files in groups.items():
        files[:] = _without_finalized_twins(files)
        files.sort(key=lambda f: (f.segment, f.start_ns, f.path.name))
        out.recordings.append(RecordingEntry(run_name, uid, tuple(files)))
    out.recordings.sort(key=lambda r: (r.start_ns, r.run, r.recording_uid))
    return out


def _without_finalized_twins(files: list[FileEntry]) -> list[FileEntry]:
    """``files`` (of one recording) less each ``.partial`` whose final name holds its
    finalized file (the same segment): a finalization killed after the rename, before the
    ``.partial`` was removed, was complete (``recover`` only removes that ``.partial``)."""
    finalized = {(f.path.resolve(), f.segment) for f in files if not f.partial}
    return [f for f in files
            if not (f.partial and (final_path(f.path).resolve(), f.segment) in finalized)]


def find_recordings(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    run: str | Sequence[str] | None = None,
    since: str | int | None = None,
    until: str | int | None = None,
) -> list[RecordingEntry]:
    """The recordings in ``paths``, oldest first (see :func:`scan`)."""
    return scan(paths, run=run, since=since, until=until).recordings


# --------------------------------------------------------------------------------------------
_SPLIT = frozenset(ITERATION_REASONS[r] for r in SPLIT_REASONS)
_ATTRS = frozenset({
    "format", "format_version", "layout", "run_name", "recording_uid", "segment", "status",
    "status_reason", "start_time_ns", "segment_start_time", "end_time_ns", "n_iterations",
    "n_values",
})


def candidates(paths: Iterable[str | os.PathLike[str]],
               unlisted: list[tuple[Path, str]] | None = None) -> tuple[list[Path], list[Path]]:
    """(the recorder's files in ``paths``, the paths that do not exist): a directory gives
    its ``*.h5`` / ``*.hdf5`` / ``*.nxs`` files and their ``.partial``, not recursively,
    sorted; a file is taken as it is. A directory that cannot be listed (no permission), or
    a path that is neither a file nor a directory (a FIFO), is added to ``unlisted`` with the
    reason, when given, and skipped (so is a path that cannot be looked up)."""
    found: list[Path] = []
    missing: list[Path] = []
    for p in map(Path, paths):
        try:
            p.is_dir()
        except OSError as exc:  # a name too long, a directory on the way not searchable
            if unlisted is not None:
                unlisted.append((p, f"cannot look it up: {exc.strerror or exc}"))
            continue
        if p.is_dir():
            try:
                found.extend(sorted(c for c in p.iterdir() if _ours(c.name) and c.is_file()))
            except OSError as exc:
                if unlisted is not None:
                    unlisted.append((p, f"cannot list the directory: {exc.strerror or exc}"))
        elif p.is_file():
            found.append(p)
        elif p.exists():  # a FIFO, a socket, a device: there, but not a recording
            if unlisted is not None:
                unlisted.append((p, "not a regular file nor a directory"))
        else:
            missing.append(p)
    return found, missing


def now_at(path: Path) -> Path | None:
    """Where a listed file is now: a ``.partial`` finalized since it was listed (a segment
    rotated, a run stopped: the catalog is read beside the daemon) is its final file; None
    when it is gone."""
    if path.exists():
        return path
    final = final_path(path)
    return final if final != path and final.exists() else None


def _ours(name: str) -> bool:
    name = name.removesuffix(PARTIAL_SUFFIX)
    return name.lower().endswith(SUFFIXES) and not name.startswith(".")


def _when(value: str | int | None, now_ns: int) -> int | None:
    if value is None or isinstance(value, int):
        return value
    return parse_when(value, now_ns)


def _ns(iso: Any) -> int:
    """ns since the epoch of an ISO 8601 attribute (0 when absent or unreadable)."""
    if not isinstance(iso, str) or not iso:
        return 0
    try:
        when = dt.datetime.fromisoformat(iso)
    except ValueError:
        return 0
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000
