"""A recording's finalized files, in the writer process and in the daemon, are the newest
(recorder.newest.FILES_KEPT) and how many: they were every file, for as long as a run lasted
(a month of 60 s segments: 43,200 paths, ~35 MB per run)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest

import recorder.newest
from recorder.admin.protocol import files_text, reply_files
from recorder.newest import FILES_KEPT, Newest
from recorder.sinks.process_child import _state


def test_it_holds_the_newest_and_counts_all() -> None:
    files: Newest[str] = Newest()
    assert not files and files.total == 0 and files.since(0) == [] and files.newest(3) == []
    names = [f"/data/r_{i:05d}.h5" for i in range(5_000)]
    files.extend(names)
    assert files and files.total == 5_000 and files.held == FILES_KEPT
    assert list(files) == names[-FILES_KEPT:] and files.first == 5_000 - FILES_KEPT
    assert files.newest(3) == names[-3:] and files.since(4_998) == names[-2:]
    assert files.since(0) == names[-FILES_KEPT:]  # the ones dropped are gone
    assert names[-1] in files and names[0] not in files
    assert files.copy().total == 5_000 and list(files.copy()) == list(files)
    assert files.mapped(Path).newest(1) == [Path(names[-1])]


def test_a_reader_loses_nothing_however_many_come_between_two_looks() -> None:
    """The daemon tells each file (its file event) from the recording's list, once per pump
    pass; a writer of tiny segments finalizes thousands between two."""
    files: Newest[int] = Newest(keep=10)
    files.hold(0)
    files.extend(range(2_500))
    assert files.since(0) == list(range(2_500))  # all, in order
    files.hold(files.total)  # read: only the newest stay
    assert files.held == 10 and list(files) == list(range(2_490, 2_500))
    files.extend(range(2_500, 2_600))
    assert files.since(2_500) == list(range(2_500, 2_600))


def test_a_newest_appended_to_another_counts_what_it_dropped() -> None:
    run: Newest[str] = Newest(["adopted.h5"], keep=5)
    rec: Newest[str] = Newest((f"{i}.h5" for i in range(12)), keep=5)
    run.extend(rec)
    assert run.total == 13 and list(run) == [f"{i}.h5" for i in range(7, 12)]
    small: Newest[str] = Newest(["a.h5"], keep=5)
    small.extend(Newest(["b.h5"], keep=5))
    assert small.total == 2 and list(small) == ["a.h5", "b.h5"]


def test_positions_stay_right_when_a_writer_reports_from_a_position() -> None:
    """The daemon's copy of the writer's files (IsolatedRecording._apply): the ones from
    ``paths_from`` on, replaced; also from a position it holds no more, or past its end."""
    files: Newest[str] = Newest(keep=3)
    files.replace_from(0, ["a", "b"])
    files.replace_from(2, ["c"])
    files.replace_from(2, ["c", "d"])  # the same again, and one more
    assert files.total == 4 and list(files) == ["b", "c", "d"]
    files.replace_from(0, ["x"])  # before what it holds: positions from 0 on are new
    assert files.total == 1 and list(files) == ["x"]
    files.replace_from(5, ["f"])  # a gap: counted, never shown at the wrong position
    assert files.total == 6 and list(files) == ["f"] and files.since(5) == ["f"]


def test_the_writer_s_replies_carry_every_new_file_and_the_daemon_holds_the_newest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The writer process's replies (process_child._state, its reply()) and the daemon's copy
    (IsolatedRecording._apply: replace_from), driven directly: a frame that finalizes
    thousands of tiny segments sends them all; neither side holds more than FILES_KEPT once
    they were sent and told."""
    monkeypatch.setattr(recorder.newest, "FILES_KEPT", 50)
    rec: Any = SimpleNamespace(status="recording", reason="", current_path=None,
                               paths=Newest(), last_durable_offset={}, counters={"flushes": 0},
                               last_flush_seconds=0.0, flush_seconds=[])
    parent: Newest[Path] = Newest()
    parent.hold(0)  # the daemon's reader (RunController._announce_files)
    told: list[Path] = []
    rec.paths.hold(0)  # as _child_main
    sent = 0
    for burst in (3, 2_500, 0, 1, 700):
        for _ in range(burst):
            rec.paths.append(Path(f"/d/r_s{rec.paths.total:05d}.h5"))
        state = msgpack.unpackb(msgpack.packb(_state(rec, None, sent)))
        sent = rec.paths.total
        rec.paths.hold(sent)
        assert len(state["paths"]) == burst
        parent.replace_from(state["paths_from"], map(Path, state["paths"]))
        told += parent.since(len(told))
        parent.hold(len(told))
        assert rec.paths.held <= 50 and parent.held <= 50
    assert told == [Path(f"/d/r_s{i:05d}.h5") for i in range(3_204)]
    assert parent.total == rec.paths.total == 3_204


def test_a_recording_holds_its_newest_files_and_a_stop_reply_says_how_many(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An in-process HDF5Recording rotated through more segments than it keeps."""
    from recorder.client.events import IterationClosed, IterationOpened, IterationStatus
    from recorder.sinks.hdf5 import HDF5Recording
    from recorder.sinks.options import OutputOptions, SegmentOptions

    monkeypatch.setattr(recorder.newest, "FILES_KEPT", 4)
    rec = HDF5Recording(OutputOptions(directory=tmp_path, isolate=False,
                                      segment=SegmentOptions(max_iterations=1)), run_name="r")
    for i in range(10):
        rec.handle(IterationOpened("t", "s", i, i, offset=2 * i))
        rec.handle(IterationClosed("t", "s", i, IterationStatus.COMPLETE, None, i, i,
                                   offset=2 * i + 1))
    paths = rec.close()
    assert rec.status == "complete", rec.reason
    every = sorted(tmp_path.glob("r_*.h5"))
    assert len(every) == 10 and rec.paths.total == 10
    assert paths == list(rec.paths) == every[-4:]
    files = rec.paths.mapped(str)
    assert files_text(list(files), files.total).startswith("10 files, the last 4 listed; ")
    assert reply_files(list(files)) == [str(p) for p in every[-4:]]
