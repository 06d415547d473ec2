"""Pure parts of the public client: timeouts, whole-iteration collection, flow control."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import msgpack
import pytest

from recorder.client import (
    Ack,
    IncompleteReason,
    Iteration,
    IterationClosed,
    IterationCollector,
    IterationOpened,
    IterationStatus,
    K2egClient,
    PVSample,
    RecurringSnapshot,
    SnapshotProperties,
    SnapshotType,
    StartAt,
    ValuesReceived,
    iteration_timeout_s,
)
from recorder.client.assembler import IterationAssembler
from recorder.client.client import _primed_start
from recorder.client.wire import Record
from recorder.errors import ClientError
from recorder.sim.messages import data_message, header_message, tail_message

PROPS = SnapshotProperties("s", ["pva://A:X", "pva://B:Y"], time_window=500)


def opened(i: int, topic: str = "s") -> IterationOpened:
    return IterationOpened(topic, "s", i, 1_000 * i, offset=10 * i)


def values(i: int, *pvs: str, batch: int = 1, nbytes: int = 0) -> ValuesReceived:
    samples = tuple(PVSample(pv, {"value": float(i)}) for pv in pvs)
    return ValuesReceived("s", i, batch, 1_000 * i, samples, offset=10 * i + batch,
                          nbytes=nbytes)


def closed(i: int, *, complete: bool = True, tail: bool = True) -> IterationClosed:
    return IterationClosed(
        "s", "s", i,
        IterationStatus.COMPLETE if complete else IterationStatus.INCOMPLETE,
        None if complete else IncompleteReason.NO_TAIL,
        1_000 * i, 2_000 * i if tail else None, offset=10 * i + 9,
    )


def test_iteration_timeout_follows_the_properties() -> None:
    assert iteration_timeout_s(PROPS, slack_s=2.0) == pytest.approx(3.0)
    tb = SnapshotProperties("s", ["pva://A"], time_window=3000, type=SnapshotType.TIMEDBUFFERED,
                            sub_push_delay_msec=1000)
    assert iteration_timeout_s(tb, slack_s=1.0) == pytest.approx(7.0)
    trig = SnapshotProperties("s", ["pva://A"], time_window=10_000, triggered=True)
    assert iteration_timeout_s(trig, slack_s=1.5) == pytest.approx(1.5)  # one submission


def test_start_positions() -> None:
    assert StartAt.end().kind == "end"
    assert StartAt.beginning().kind == "beginning"
    assert StartAt.at(5).offset == 5
    assert StartAt.at({0: 3, 2: 9}).offsets == {0: 3, 2: 9}
    assert StartAt.at_timestamp(1_700_000_000_000).timestamp_ms == 1_700_000_000_000


def _client_primed_until_501() -> tuple[K2egClient, IterationAssembler]:
    """A client (no Kafka) whose topic "s" resumes at offset 501 of partition 0, primed."""
    client = object.__new__(K2egClient)
    client._core_lock = threading.Lock()
    client._skips = {}
    client._assembler = asm = IterationAssembler()
    asm.prime_until("s", {0: 501})
    return client, asm


def test_a_resume_into_a_topic_created_again_records_what_it_holds() -> None:
    """The topic was deleted and created again while the daemon was down: the resume asked
    for offset 490 (its open iteration's start, priming up to 501) and Kafka's reset read
    the new topic from 0 (the adapter tells the gap). None of it was recorded before: all is
    recorded now, not taken for the primed past (which dropped every message below 501)."""
    client, asm = _client_primed_until_501()
    client._on_offset_gap("s", 0, 490, 0)
    ts = 1_700_000_000_000
    msgs = [header_message("s", ts, 1), data_message("A:X", {"value": 1.0}, ts, 1),
            tail_message("s", ts, 1)]
    events = asm.feed_many([Record("s", 0, i, msgpack.packb(m), [("k2eg-ser-type", b"Msgpack")])
                            for i, m in enumerate(msgs)], 0.0)
    assert [type(e).__name__ for e in events] == [
        "IterationOpened", "ValuesReceived", "IterationClosed"]
    # deleted and not created yet when its offsets were asked: nothing to prime
    start, primed = _primed_start(StartAt.at({0: 490}), {0: 501}, {})
    assert start.offsets == {0: 501} and primed == {}


def test_a_primed_resume_that_finds_its_first_offsets_deleted_loses_only_past_the_durable(
) -> None:
    """Read from 490 (the open iteration's start), resume offset 501: the retention deleted
    490..494 before the first fetch. Those were recorded before the crash: nothing is lost
    (no `lost.retention`, no "the recording has a gap"); deleted past 501, only those are."""
    client, _asm = _client_primed_until_501()
    client._on_offset_gap("s", 0, 490, 495)
    assert client._skips.get("s", {}).get("lost.retention", 0) == 0
    client._on_offset_gap("s", 0, 490, 505)
    assert client._skips["s"]["lost.retention"] == 4


def test_collector_builds_whole_iterations_with_every_requested_pv() -> None:
    got: list[Iteration] = []
    collect = IterationCollector(got.append, PROPS.pv_names)
    for event in (
        opened(1), values(1, "A:X"), values(1, "A:X", "B:Y", batch=2), closed(1),
        opened(2), values(2, "A:X"), closed(2, complete=False, tail=False),
    ):
        collect(event)
    assert [it.iter_index for it in got] == [1, 2]
    first, second = got
    assert first.complete and first.tail_timestamp_ns == 2_000
    assert [s.value for s in first.values["A:X"]] == [1.0, 1.0]
    assert len(first.values["B:Y"]) == 1
    assert not second.complete and second.values["B:Y"] == []  # requested, nothing sent
    assert second.closed.reason is IncompleteReason.NO_TAIL


def test_collector_without_an_opened_event_still_delivers() -> None:
    got: list[Iteration] = []
    collect = IterationCollector(got.append, ["A:X"])
    collect(values(3, "A:X", "C:Z"))  # header lost: values first
    collect(closed(3))
    assert sorted(got[0].values) == ["A:X", "C:Z"]
    collect(closed(4))  # nothing at all before the close
    assert got[1].values == {"A:X": []}


class FakeAdapter:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def pause(self, topic: str) -> None:
        self.calls.append(("pause", topic))

    def resume(self, topic: str) -> None:
        self.calls.append(("resume", topic))


class FakeClient:
    """What a RecurringSnapshot needs from its client; callbacks run at once."""

    def __init__(self) -> None:
        self._adapter = FakeAdapter()
        self.counts: Counter[str] = Counter()
        self.queued: list[Callable[[], None]] = []

    def _dispatch(self, fn: Callable[[], None]) -> None:
        self.queued.append(fn)

    def run_dispatched(self) -> None:
        queued, self.queued = self.queued, []
        for fn in queued:
            fn()

    def _count(self, key: str, n: int = 1) -> None:
        self.counts[key] += n


def make_sub(
    fake: FakeClient, handler: Any = None, max_pending: int = 4, max_bytes: int = 1 << 30
) -> RecurringSnapshot:
    ack = Ack("repeating_snapshot", "r", "started", "s")
    return RecurringSnapshot(
        cast(K2egClient, fake), PROPS, "s", ack, False, handler, max_pending, max_bytes
    )


def test_iterator_backpressure_pauses_at_the_limit_and_resumes_at_half() -> None:
    fake = FakeClient()
    sub = make_sub(fake, max_pending=4)
    sub._push([opened(1), values(1, "A:X")])
    sub._push([closed(1), opened(2)])
    assert sub.paused and fake._adapter.calls == [("pause", "s")]
    sub._push([values(2, "A:X")])  # overshoot is kept, not dropped
    assert sub.pending == 5
    got = [sub.get(0) for _ in range(2)]
    assert [type(e) for e in got] == [IterationOpened, ValuesReceived]
    assert sub.paused  # 3 pending > 2
    sub.get(0)
    assert not sub.paused and fake._adapter.calls[-1] == ("resume", "s")
    with pytest.raises(ClientError):
        make_sub(fake, handler=print).get(0)


def test_iterator_backpressure_counts_message_bytes() -> None:
    """A few events of large arrays (images) pause the topic by their bytes, long before
    the event bound, and it resumes once both are down to half."""
    fake = FakeClient()
    sub = make_sub(fake, max_pending=1000, max_bytes=1000)
    sub._push([opened(1), values(1, "A:X", nbytes=400)])
    assert not sub.paused and sub.pending_bytes == 400
    sub._push([values(1, "B:Y", batch=2, nbytes=700), closed(1)])
    assert sub.paused and sub.pending_bytes == 1100  # overshoot is kept, not dropped
    assert sub.stats["backpressure_pauses"] == 1
    sub.get(0)  # the header: no bytes
    sub.get(0)
    assert sub.paused and sub.pending_bytes == 700  # > half of 1000
    sub.get(0)
    assert not sub.paused and sub.pending_bytes == 0
    assert fake._adapter.calls == [("pause", "s"), ("resume", "s")]


def test_handler_backpressure_counts_message_bytes() -> None:
    fake = FakeClient()
    seen: list[Any] = []
    sub = make_sub(fake, handler=seen.append, max_pending=1000, max_bytes=1000)
    sub._push([opened(1), values(1, "A:X", nbytes=999), values(1, "B:Y", batch=2, nbytes=1)])
    assert sub.paused and sub.pending_bytes == 1000
    fake.run_dispatched()
    assert len(seen) == 3 and sub.pending_bytes == 0 and not sub.paused


def test_user_pause_wins_over_backpressure_release() -> None:
    fake = FakeClient()
    sub = make_sub(fake, max_pending=2)
    sub.pause()
    sub._push([opened(1), values(1, "A:X")])
    sub.get(0)
    sub.get(0)
    assert sub.paused  # back-pressure released, the user's pause holds
    sub.resume()
    assert not sub.paused
    assert fake._adapter.calls == [("pause", "s"), ("resume", "s")]


def test_handler_mode_delivers_in_order_and_counts_handler_errors() -> None:
    fake = FakeClient()
    seen: list[int] = []

    def handler(event: Any) -> None:
        seen.append(event.iter_index)
        if isinstance(event, ValuesReceived):
            raise RuntimeError("handler bug")

    sub = make_sub(fake, handler=handler, max_pending=3)
    sub._push([opened(1), values(1, "A:X"), closed(1)])
    assert sub.paused and sub.pending == 3
    fake.run_dispatched()
    assert seen == [1, 1, 1]
    assert fake.counts["handler_errors"] == 1
    assert sub.pending == 0 and not sub.paused
    sub._end()
    assert not sub.wait_finished(0)  # the end marker is queued behind earlier callbacks
    fake.run_dispatched()
    assert sub.wait_finished(0)
    sub._push([opened(2)])
    assert fake.counts["events.after_end"] == 1


def test_iterator_end_and_the_final_tail_lookup() -> None:
    fake = FakeClient()
    sub = make_sub(fake)
    sub._push([opened(1), closed(1), opened(2), closed(2, complete=False, tail=False)])
    assert sub._tail_after({0: 0}) == closed(1)
    assert sub._tail_after({0: 20}) is None  # tail of 1 is at offset 19
    sub._end()
    assert [e.iter_index for e in sub.events()] == [1, 1, 2, 2]
    assert sub.get(0) is None and sub.get() is None
    with pytest.raises(TimeoutError):
        make_sub(fake).get(0.01)


def test_a_tail_produced_long_before_the_stop_ack_is_not_the_final_one() -> None:
    from recorder.client.client import FINAL_BEFORE_ACK_MS, produced_before
    from recorder.client.events import IterationClosed, IterationStatus

    def closed(tail_ms: int | None) -> IterationClosed:
        return IterationClosed("t", "s", 2, IterationStatus.COMPLETE, None, 1, 2,
                               tail_kafka_time_ms=tail_ms)

    ack = 1_700_000_000_000
    assert produced_before(closed(ack - FINAL_BEFORE_ACK_MS - 1), ack)
    assert not produced_before(closed(ack - FINAL_BEFORE_ACK_MS), ack)
    assert not produced_before(closed(ack + 500), ack)  # read after the ack: LogAppendTime
    assert not produced_before(closed(None), ack)  # no timestamps: the quiet rule alone
    assert not produced_before(closed(ack - 10_000), None)


def test_a_subscriptions_lines_carry_the_context_it_was_made_in() -> None:
    """The daemon subscribes from a run's worker thread, with ``run=`` bound; the
    subscription's own lines (an incomplete iteration, a handler that raised) are logged
    from the client's consumer and dispatcher threads, which do not have it: they named the
    snapshot only, not the run."""
    import threading

    from structlog.testing import capture_logs

    from recorder.logging import bind_run

    fake = FakeClient()
    with bind_run(run="r1"):
        sub = make_sub(fake)
    with capture_logs() as logs:
        pusher = threading.Thread(target=sub._push, args=([opened(1), closed(1, complete=False)],))
        pusher.start()
        pusher.join()
    (line,) = [e for e in logs if e["event"] == "iteration incomplete"]
    assert line["run"] == "r1" and line["snapshot"] == sub.snapshot_name


def test_a_subscription_logs_incomplete_iterations_once_a_minute_per_reason() -> None:
    """Every iteration incomplete (a gateway error in each tail, 10 a second): one line a
    minute, not one per iteration; the count is in ``stats``."""
    fake = FakeClient()
    sub = make_sub(fake, max_pending=1000)
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        for i in range(1, 21):
            sub._push([opened(i), closed(i, complete=False)])
    assert sub.stats["iterations.incomplete"] == 20
    assert len([e for e in logs if e["event"] == "iteration incomplete"]) == 1


def test_the_final_tail_is_the_newest_across_partitions() -> None:
    """A topic with several partitions (pre-filled in partition 0; the gateway's keyed final
    iteration in partition 1): the stop took partition 0's old tail, the first in the dict,
    for the newest one, and with decision 0015 waited for the final iteration it had read
    already, until its timeout (the benchmark's stop hung for its whole shutdown budget)."""
    from dataclasses import replace

    fake = FakeClient()
    sub = make_sub(fake)
    old = closed(150)  # partition 0, offset 1509
    final = replace(closed(151), partition=1, offset=1)
    sub._push([opened(150), old, replace(opened(151), partition=1), final])
    assert sub._tail_after({0: 1000, 1: 0}) == final
    assert sub._tail_after({0: 1000, 1: 2}) == old  # only partition 0's is after the offsets
    newer = closed(152)  # partition 0 again, after partition 1's
    sub._push([opened(152), newer])
    assert sub._tail_after({0: 1000, 1: 0}) == newer
