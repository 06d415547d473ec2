"""Trigger tags stored with their iteration (``tag_iteration``), in-process and isolated."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import pytest

from recorder.cli import main as cli_main
from recorder.client.events import (
    IterationClosed,
    IterationEvent,
    IterationOpened,
    IterationStatus,
    ValuesReceived,
)
from recorder.client.values import PVSample
from recorder.reader import open_file, open_recording
from recorder.sinks.bridge.mapping import RECORDER_SOURCE
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions, SegmentOptions
from recorder.sinks.process import IsolatedRecording

Rec = HDF5Recording | IsolatedRecording


def opened(i: int) -> IterationOpened:
    return IterationOpened("t", "s", i, 1_000 + i, offset=3 * i)


def values(i: int) -> ValuesReceived:
    sample = PVSample("P", {"value": float(i), "timeStamp": {"secondsPastEpoch": i,
                                                            "nanoseconds": 0}})
    return ValuesReceived("t", i, 1, 0, (sample,), offset=3 * i + 1)


def closed(i: int) -> IterationClosed:
    return IterationClosed("t", "s", i, IterationStatus.COMPLETE, None, 1_000 + i, 2_000 + i,
                           n_values=1, n_pvs=1, n_batches=1, offset=3 * i + 2)


def events(i: int) -> list[IterationEvent]:
    return [opened(i), values(i), closed(i)]


@pytest.fixture(params=["inprocess", "isolated"])
def make(request: pytest.FixtureRequest) -> Iterator[Callable[..., Rec]]:
    made: list[Rec] = []

    def factory(options: OutputOptions, **kwargs: Any) -> Rec:
        cls = HDF5Recording if request.param == "inprocess" else IsolatedRecording
        rec: Rec = cls(options, run_name="tags", **kwargs)
        made.append(rec)
        return rec

    yield factory
    for rec in made:
        if isinstance(rec, IsolatedRecording) and rec.alive and rec.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rec.pid, signal.SIGKILL)
        rec.close("aborted")


EXPECTED = {
    0: {},
    1: {"shot": "1", "mode": "before-open"},
    2: {"shot": "2", "mode": "during", "extra": "merged"},
    3: {"é": "ü", "x": ""},
    4: {},
}


def _drive(rec: Rec) -> None:
    for ev in events(0):
        rec.handle(ev)
    rec.tag_iteration(1, {"shot": "1", "mode": "before-open"})  # ack before the gateway
    for ev in events(1):
        rec.handle(ev)
    rec.handle(opened(2))
    rec.tag_iteration(2, {"shot": "2", "mode": "x"})  # while open
    rec.handle(values(2))
    rec.tag_iteration(2, {"mode": "during", "extra": "merged"})  # merged, later keys win
    rec.handle(closed(2))
    rec.tag_iteration(3, {"é": "ü", "x": ""})
    rec.tag_iteration(99, {"shot": "never"})  # never produced
    for i in (3, 4):
        for ev in events(i):
            rec.handle(ev)


def _check(path: Path, *, live: bool) -> None:
    with open_file(path) as f:
        assert f.layout == ("live" if live else "final")
        its = f.iterations()
        assert its["iter_index"].tolist() == [0, 1, 2, 3, 4]
        assert list(its["tags"]) == [EXPECTED[i] for i in range(5)]
        assert f.unmatched_tags() == {99: {"shot": "never"}}
        trains = list(f.trains())
        assert [t[0][RECORDER_SOURCE]["tags"] for t in trains] == [EXPECTED[i] for i in range(5)]
        assert json.dumps(trains[1][0][RECORDER_SOURCE])  # plain Python
    if not live:
        with h5py.File(path, "r") as h:
            raw = [x.decode() for x in h["iterations/tags"][()]]
            assert raw[0] == "" and raw[4] == ""
            assert [json.loads(x) for x in raw[1:4]] == [EXPECTED[i] for i in (1, 2, 3)]
            assert h["iterations/tags"].dtype == h5py.string_dtype("utf-8")
            assert json.loads(h.attrs["unmatched_tags"]) == {"99": {"shot": "never"}}


def test_tags_before_during_and_never(tmp_path: Path, make: Callable[..., Rec]) -> None:
    rec = make(OutputOptions(directory=tmp_path))
    _drive(rec)
    rec.flush()
    assert rec.current_path is not None
    _check(rec.current_path, live=True)
    (final,) = rec.close()
    assert rec.counters["tags"] == 5
    _check(final, live=False)


def test_tags_follow_an_iteration_into_the_next_segment(
    tmp_path: Path, make: Callable[..., Rec]
) -> None:
    rec = make(OutputOptions(directory=tmp_path,
                             segment=SegmentOptions(max_iterations=2)))
    rec.tag_iteration(3, {"shot": "3"})  # before it opens; it lands in the second segment
    for i in range(2):
        for ev in events(i):
            rec.handle(ev)
    rec.handle(opened(2))
    rec.tag_iteration(2, {"shot": "2"})
    for i in (2, 3):
        if i == 3:
            rec.handle(opened(3))
        rec.handle(values(i))
        rec.handle(closed(i))
    first, second = rec.close()  # no empty third: a segment begins with an iteration
    with open_file(first) as f:
        assert f.iterations()["iter_index"].tolist() == [0, 1]
        assert list(f.iterations()["tags"]) == [{}, {}]
        assert f.unmatched_tags() == {3: {"shot": "3"}}  # continued in the next segment
    with open_file(second) as f:
        assert f.iterations()["iter_index"].tolist() == [2, 3]
        assert list(f.iterations()["tags"]) == [{"shot": "2"}, {"shot": "3"}]
        assert f.unmatched_tags() == {}


def test_tags_after_the_recording_stopped_are_dropped(
    tmp_path: Path, make: Callable[..., Rec]
) -> None:
    rec = make(OutputOptions(directory=tmp_path))
    (final,) = rec.close()
    before = rec.counters["dropped_events"]
    rec.tag_iteration(1, {"a": "b"})  # never raises
    assert rec.counters["dropped_events"] == before + 1
    with open_file(final) as f:
        assert f.unmatched_tags() == {} and len(f.iterations()["tags"]) == 0


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from recorder.client.events import IterationOpened, ValuesReceived, IterationClosed, \\
        IterationStatus
    from recorder.client.values import PVSample
    from recorder.sinks.hdf5 import HDF5Recording
    from recorder.sinks.options import OutputOptions
    import structlog, logging
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    rec = HDF5Recording(OutputOptions(directory=Path(sys.argv[1])), run_name="crash")
    def values(i):
        s = PVSample("P", {"value": float(i)})
        return ValuesReceived("t", i, 1, 0, (s,), offset=3 * i + 1)
    rec.tag_iteration(0, {"shot": "0"})
    rec.handle(IterationOpened("t", "s", 0, 1, offset=0))
    rec.handle(values(0))
    rec.handle(IterationClosed("t", "s", 0, IterationStatus.COMPLETE, None, 1, 2, offset=2))
    rec.handle(IterationOpened("t", "s", 1, 1, offset=3))
    rec.tag_iteration(1, {"shot": "1"})  # open when the writer dies
    rec.handle(values(1))
    rec.tag_iteration(7, {"shot": "7"})  # never seen
    rec.flush()
    rec.tag_iteration(2, {"shot": "lost"})  # not flushed: lost with the writer
    print("PATH", rec.current_path, flush=True)
    time.sleep(60)
    """
)


def _check_recovered(final: Path) -> None:
    with open_file(final) as f:
        its = f.iterations()
        assert its["iter_index"].tolist() == [0, 1]
        assert its["reason"].tolist()[1] == "writer_crashed"
        assert list(its["tags"]) == [{"shot": "0"}, {"shot": "1"}]
        assert f.unmatched_tags() == {7: {"shot": "7"}}
        assert f.values("P").tolist() == [0.0, 1.0]


def test_flushed_tags_survive_kill_9_and_recover(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("PATH "), line
        partial = Path(line.split(" ", 1)[1].strip())
    finally:
        proc.kill()
        proc.wait()
    assert partial.exists()
    assert cli_main(["recover", str(partial)]) == 0
    (final,) = tmp_path.glob("*.h5")
    _check_recovered(final)


def test_isolated_writer_killed_keeps_flushed_tags(tmp_path: Path) -> None:
    rec = IsolatedRecording(OutputOptions(directory=tmp_path), run_name="victim")
    try:
        rec.tag_iteration(0, {"shot": "0"})
        for ev in events(0):
            rec.handle(ev)
        rec.handle(opened(1))
        rec.tag_iteration(1, {"shot": "1"})
        rec.handle(values(1))
        rec.tag_iteration(7, {"shot": "7"})
        rec.flush()
        assert rec.pid is not None
        os.kill(rec.pid, signal.SIGKILL)
        rec.tag_iteration(2, {"shot": "lost"})
        rec.flush()
        assert rec.status == "failed"
        partial = rec.current_path
    finally:
        rec.close("aborted")
    assert partial is not None and partial.exists()
    assert cli_main(["recover", str(partial)]) == 0
    (final,) = tmp_path.glob("*.h5")
    _check_recovered(final)


def test_a_restarted_snapshot_continues_in_a_new_segment_with_its_own_tags(
    tmp_path: Path, make: Callable[..., Rec]
) -> None:
    """iter_index began again (the gateway restarted the snapshot): a file never holds two
    iterations of one index, so the recording rotates, and the new iteration 1's tags are
    not joined with the old iteration 1."""
    base = 0

    def run_of(i: int, value: float) -> list[IterationEvent]:
        nonlocal base
        base += 3
        sample = PVSample("P", {"value": value, "timeStamp": {"secondsPastEpoch": base,
                                                              "nanoseconds": 0}})
        return [
            IterationOpened("t", "s", i, 1_000 + base, offset=base),
            ValuesReceived("t", i, 1, 0, (sample,), offset=base + 1),
            IterationClosed("t", "s", i, IterationStatus.COMPLETE, None, 1_000 + base,
                            2_000 + base, n_values=1, n_pvs=1, n_batches=1, offset=base + 2),
        ]

    rec = make(OutputOptions(directory=tmp_path))
    for i in (1, 2, 3):
        opened_ev, *rest = run_of(i, float(i))
        rec.handle(opened_ev)
        if i == 2:
            rec.tag_iteration(2, {"shot": "old-2"})
        for ev in rest:
            rec.handle(ev)
    for i in (1, 2):  # the snapshot again, from iter_index 1
        opened_ev, *rest = run_of(i, 10.0 + i)
        rec.handle(opened_ev)
        if i == 1:
            rec.tag_iteration(1, {"shot": "new-1"})  # as the controller: once it is open
        for ev in rest:
            rec.handle(ev)
    first, second = rec.close()
    with open_file(first) as f:
        assert f.status == "complete"
        assert f.iterations()["iter_index"].tolist() == [1, 2, 3]
        assert list(f.iterations()["tags"]) == [{}, {"shot": "old-2"}, {}]
        assert f.values("P").tolist() == [1.0, 2.0, 3.0]
        assert "restarted" in f.attrs["status_reason"]
        assert f.unmatched_tags() == {}
    with open_file(second) as f:
        assert f.iterations()["iter_index"].tolist() == [1, 2]
        assert list(f.iterations()["tags"]) == [{"shot": "new-1"}, {}]
        assert f.values("P").tolist() == [11.0, 12.0]
        assert f.unmatched_tags() == {}
    if isinstance(rec, HDF5Recording):
        assert rec.counters["snapshot_restarts"] == 1
    with open_recording(second) as whole:  # both segments, the restart visible per row
        its = whole.iterations()
        assert its["iter_index"].tolist() == [1, 2, 3, 1, 2]
        assert its["segment"].tolist() == [0, 0, 0, 1, 1]
        assert list(its["tags"]) == [{}, {"shot": "old-2"}, {}, {"shot": "new-1"}, {}]
        assert whole.values("P").tolist() == [1.0, 2.0, 3.0, 11.0, 12.0]


def test_reordered_openings_are_not_taken_for_a_restart(tmp_path: Path) -> None:
    """Iteration 5 opened before 4 (data overtook a header) stays in one file."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="tags")
    for i in (1, 2, 3):
        for ev in events(i):
            rec.handle(ev)
    rec.handle(opened(5))
    rec.handle(opened(4))
    for i in (4, 5):
        rec.handle(values(i))
        rec.handle(closed(i))
    (only,) = rec.close()
    assert rec.counters["snapshot_restarts"] == 0
    with open_file(only) as f:
        assert sorted(f.iterations()["iter_index"].tolist()) == [1, 2, 3, 4, 5]
