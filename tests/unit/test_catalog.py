"""recorder.catalog's pure parts (times, grouping) and the writer lock's semantics."""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import fcntl
import os
from pathlib import Path

import pytest

from recorder.catalog import FileEntry, RecordingEntry, parse_when, utc
from recorder.sinks import writelock


def _ns(*args: int) -> int:
    return int(dt.datetime(*args, tzinfo=dt.UTC).timestamp()) * 10**9  # type: ignore[misc]


NOW = _ns(2026, 11, 22, 15, 30, 12) + 250_000_000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-22", _ns(2026, 11, 22)),
        ("2026-11-22T13:00", _ns(2026, 11, 22, 13, 0)),
        ("2026-11-22 13:00:05", _ns(2026, 11, 22, 13, 0, 5)),
        ("2026-11-22T13:00:05Z", _ns(2026, 11, 22, 13, 0, 5)),
        ("2026-11-22T14:00:05+01:00", _ns(2026, 11, 22, 13, 0, 5)),
        ("2026-11-22T13:00:05.5", _ns(2026, 11, 22, 13, 0, 5) + 500_000_000),
        ("now", NOW),
        ("  NOW ", NOW),
        ("90s", NOW - 90 * 10**9),
        ("30m", NOW - 1800 * 10**9),
        ("2h", NOW - 7200 * 10**9),
        ("1.5h", NOW - 5400 * 10**9),
        ("1d", NOW - 86400 * 10**9),
        ("1W", NOW - 7 * 86400 * 10**9),
        ("today", _ns(2026, 11, 22)),
        ("yesterday", _ns(2026, 11, 21)),
    ],
)
def test_parse_when(text: str, expected: int) -> None:
    assert parse_when(text, NOW) == expected


@pytest.mark.parametrize("text", ["", "last week", "2h ago", "-2h", "22/11/2026", "13:00x"])
def test_parse_when_refuses_with_the_forms_it_takes(text: str) -> None:
    with pytest.raises(ValueError, match=r"ISO 8601.*now.*30m, 2h, 1d"):
        parse_when(text, NOW)


def _file(segment: int, status: str, start: int, end: int, *, reason: str = "",
          partial: bool = False, iterations: int = 10, incomplete: int = 0) -> FileEntry:
    return FileEntry(
        path=Path(f"/data/run_{segment:04d}.h5" + (".partial" if partial else "")),
        run="run", recording_uid="uid", segment=segment, status=status, reason=reason,
        start_ns=start, end_ns=end, iterations=iterations, incomplete=incomplete,
        values=iterations * 3, bytes=1000 + segment, format_version="3.0", partial=partial,
    )


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        (["complete", "complete"], "complete"),
        (["complete", "aborted"], "aborted"),
        (["failed", "aborted"], "failed"),
        (["complete", "unfinished"], "unfinished"),
        (["failed", "unfinished", "recording"], "recording"),
    ],
)
def test_a_recording_has_the_status_of_its_least_finished_file(
    statuses: list[str], expected: str
) -> None:
    files = tuple(_file(i, s, i * 100, i * 100 + 50, partial=s in ("recording", "unfinished"))
                  for i, s in enumerate(statuses))
    assert RecordingEntry("run", "uid", files).status == expected


def test_a_recording_sums_and_spans_its_files() -> None:
    files = (
        _file(0, "complete", 1_000, 2_000, iterations=10, incomplete=1),
        _file(1, "aborted", 2_000, 3_500, reason="daemon killed", iterations=5),
    )
    rec = RecordingEntry("run", "uid", files)
    assert (rec.start_ns, rec.end_ns) == (1_000, 3_500)
    assert (rec.iterations, rec.incomplete, rec.values, rec.bytes) == (15, 1, 45, 2001)
    assert rec.reason == "daemon killed"
    assert rec.paths == [f.path for f in files]
    doc = rec.to_json()
    assert doc["status"] == "aborted"
    assert [f["segment"] for f in doc["files"]] == [0, 1]
    assert doc["start"] == utc(1_000).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_an_iteration_cut_by_a_crash_and_resumed_counts_once() -> None:
    """A leftover's last row (`writer_crashed`, incomplete) whose iteration the resumed
    recording's next segment begins with is one iteration, with the later row's status; a
    last row whose iteration the next segment does not begin with stays one of its own."""
    crashed = dataclasses.replace(
        _file(0, "aborted", 1_000, 2_000, iterations=10, incomplete=1), goes_on=10)
    resumed = dataclasses.replace(_file(1, "complete", 2_000, 3_000, iterations=5),
                                  first_iter=10)
    assert (RecordingEntry("run", "uid", (crashed, resumed)).iterations,
            RecordingEntry("run", "uid", (crashed, resumed)).incomplete) == (14, 0)
    other = dataclasses.replace(resumed, first_iter=11)
    rec = RecordingEntry("run", "uid", (crashed, other))
    assert (rec.iterations, rec.incomplete) == (15, 1)
    assert RecordingEntry("run", "uid", (crashed,)).iterations == 10  # alone: its rows


def test_a_recordings_reason_is_that_of_the_file_that_gives_its_status() -> None:
    """A complete segment's reason ("continued in the next segment") is not why the
    recording is aborted; a complete recording has no reason to show."""
    rotated = "segment limit reached; continued in the next segment"
    files = (
        _file(0, "complete", 1_000, 2_000, reason=rotated),
        _file(1, "complete", 2_000, 3_000, reason=rotated),
        _file(2, "aborted", 3_000, 4_000, reason="the writer stopped without finalizing"),
    )
    assert RecordingEntry("run", "uid", files).reason == "the writer stopped without finalizing"
    assert RecordingEntry("run", "uid", files[:2]).reason == ""


def test_the_writer_lock_is_seen_from_another_descriptor_and_released(tmp_path: Path) -> None:
    path = tmp_path / "x.h5.partial"
    path.write_bytes(b"data")
    assert writelock.writer_active(path) is False
    lock = writelock.acquire(path)
    assert lock is not None and lock.held
    assert writelock.writer_active(path) is True
    assert writelock.acquire(path) is None  # one writer at a time
    lock.release()
    lock.release()  # idempotent
    assert not lock.held
    assert writelock.writer_active(path) is False


def test_the_writer_lock_keeps_hdf5_writers_out_and_lets_readers_in(tmp_path: Path) -> None:
    # HDF5 takes flock(LOCK_SH) to read and flock(LOCK_EX) to write: the guard is a shared one
    path = tmp_path / "x.h5.partial"
    path.write_bytes(b"data")
    lock = writelock.acquire(path)
    assert lock is not None and lock.guards_hdf5
    other = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a writer: refused
        fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a reader: welcome
        fcntl.flock(other, fcntl.LOCK_UN)
        lock.release()
        assert not lock.guards_hdf5
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once the writer is done
    finally:
        os.close(other)


def test_the_writer_lock_goes_with_its_object(tmp_path: Path) -> None:
    path = tmp_path / "x.h5.partial"
    path.write_bytes(b"data")
    lock = writelock.acquire(path)
    assert writelock.writer_active(path) is True
    del lock
    assert writelock.writer_active(path) is False


def test_the_writer_lock_of_a_missing_file(tmp_path: Path) -> None:
    assert writelock.acquire(tmp_path / "missing") is None
    assert writelock.writer_active(tmp_path / "missing") is None


def test_a_partial_finalized_while_it_is_read_is_listed_as_its_final_file(
    tmp_path: Path,
) -> None:
    """``ls`` beside a daemon: a ``.partial`` listed, then renamed to its final name (a
    segment rotated, a run stopped) while it is being read, is the final file, not an
    unreadable one (``ls`` then exited 1 with "No such file or directory")."""
    from recorder.catalog import scan

    partial = tmp_path / "run_0000.h5.partial"
    final = tmp_path / "run_0000.h5"
    partial.write_bytes(b"")

    def describe(path: Path) -> FileEntry:
        if path == partial:  # the finalization ends while the file is being read
            partial.rename(final)
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        assert path == final
        return dataclasses.replace(_file(0, "complete", 1_000, 2_000), path=final)

    catalog = scan([tmp_path], describe=describe)
    assert catalog.unreadable == []
    assert [[f.path for f in r.files] for r in catalog.recordings] == [[final]]


def test_a_file_removed_while_it_is_read_is_not_listed(tmp_path: Path) -> None:
    """A file an archive job removed while ``ls`` read it is gone, not unreadable."""
    from recorder.catalog import scan

    gone = tmp_path / "run_0000.h5"
    gone.write_bytes(b"")

    def describe(path: Path) -> FileEntry:
        path.unlink()
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))

    catalog = scan([tmp_path], describe=describe)
    assert catalog.unreadable == [] and catalog.recordings == []
