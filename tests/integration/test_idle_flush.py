"""Idle flushes: when the input is drained, buffered data is flushed after IDLE_FLUSH_S
instead of flush_interval_s, and only when something new arrived."""

from __future__ import annotations

from pathlib import Path

from test_hdf5_roundtrip import make_samples

from recorder.client.events import IterationClosed, IterationOpened, IterationStatus, ValuesReceived
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import IDLE_FLUSH_S, OutputOptions, flush_due_after
from recorder.sinks.process import IsolatedRecording


def test_due_after() -> None:
    assert flush_due_after(1.0, False) == 1.0
    assert flush_due_after(1.0, True) == IDLE_FLUSH_S
    assert flush_due_after(0.05, True) == 0.05  # never later than the interval


def _iteration(rec: HDF5Recording | IsolatedRecording, i: int) -> None:
    rec.handle(IterationOpened("t", "s", i, i, offset=3 * i))
    rec.handle(ValuesReceived("t", i, 1, 1, tuple(make_samples(i)), offset=3 * i + 1))
    rec.handle(IterationClosed("t", "s", i, IterationStatus.COMPLETE, None, i, i,
                               offset=3 * i + 2))


def test_hdf5_recording_idle_flush(tmp_path: Path) -> None:
    now = [0.0]
    rec = HDF5Recording(OutputOptions(directory=tmp_path, flush_interval_s=10.0),
                        run_name="idle", clock=lambda: now[0])
    _iteration(rec, 1)
    now[0] = IDLE_FLUSH_S / 2
    assert not rec.maybe_flush(idle=True)  # too soon
    now[0] = IDLE_FLUSH_S * 1.5
    assert not rec.maybe_flush()  # not idle: the 10 s interval applies
    assert rec.maybe_flush(idle=True)
    assert rec.last_durable_offset[("t", 0)] == 5
    now[0] = IDLE_FLUSH_S * 5
    assert not rec.maybe_flush(idle=True)  # nothing new since: no empty commits
    _iteration(rec, 2)
    assert rec.maybe_flush(idle=True)
    assert rec.last_durable_offset[("t", 0)] == 8
    rec.close()


def test_isolated_recording_idle_flush(tmp_path: Path) -> None:
    now = [0.0]
    rec = IsolatedRecording(OutputOptions(directory=tmp_path, flush_interval_s=10.0),
                            run_name="idle", clock=lambda: now[0])
    try:
        _iteration(rec, 1)
        now[0] = IDLE_FLUSH_S * 1.5
        assert not rec.maybe_flush()
        assert rec.maybe_flush(idle=True)  # asks the writer, does not wait
        now[0] = IDLE_FLUSH_S * 5
        assert not rec.maybe_flush(idle=True)  # nothing new
    finally:
        rec.close()
    assert rec.status == "complete"
