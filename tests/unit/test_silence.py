"""The silence watch of periodic runs and the sink's restart check (pure logic)."""

from __future__ import annotations

import math

from recorder.client.events import IterationClosed, IterationOpened, IterationStatus
from recorder.daemon.backoff import Backoff
from recorder.daemon.silence import WINDOWS, SilenceWatch, silence_limit_s
from recorder.sinks.buffer import RecordingBuffer


def test_limit_is_several_windows_never_below_the_minimum_and_zero_turns_it_off() -> None:
    assert silence_limit_s(100, 30.0) == 30.0
    assert silence_limit_s(20_000, 30.0) == WINDOWS * 20.0
    assert math.isinf(silence_limit_s(100, 0))


def test_resends_back_off_while_silent_and_hearing_resets_everything() -> None:
    w = SilenceWatch(10.0, last_heard=0.0, backoff=Backoff(10.0, 2.0, 35.0, jitter=0))
    due = [t for t in range(0, 120) if w.due(float(t))]
    assert due == [10, 20, 40, 75, 110]  # 10 s, then 10, 20, 35 (cap), 35
    assert w.silent and w.resends == 5 and w.silent_for(120.0) == 120.0
    assert w.heard(121.0) == 121.0
    assert not w.silent and w.resends == 0
    assert w.heard(122.0) is None  # not silent: nothing to report
    assert [t for t in range(122, 160) if w.due(float(t))] == [132, 142]  # backoff reset


def _closed(i: int) -> IterationClosed:
    return IterationClosed("t", "s", i, IterationStatus.COMPLETE, None, 1, 2, offset=i)


def test_buffer_knows_an_index_that_would_repeat_in_its_segment() -> None:
    buf = RecordingBuffer({})
    for i in range(1, 4):
        buf.handle(IterationOpened("t", "s", i, 1, offset=i))
        buf.handle(_closed(i))
    assert buf.repeats(1) and buf.repeats(3)
    assert not buf.repeats(4)  # next
    buf.handle(IterationOpened("t", "s", 6, 1, offset=6))
    assert not buf.repeats(5)  # reordered: never seen here
    assert not buf.repeats(6)  # open
    buf.handle(_closed(6))
    for i in range(7, 400):  # the recent window (256) fills: older indexes are known too
        buf.handle(IterationOpened("t", "s", i, 1, offset=i))
        buf.handle(_closed(i))
    assert buf.repeats(2) and buf.repeats(50)
    assert buf.carry_over().repeats(2) is False  # a new segment starts afresh
