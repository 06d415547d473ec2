"""recorder.client.assembler: recorded message sequences in, iteration events out.

Every case runs on both stream generations where it applies: legacy (gateway main, no
sequence keys) and sequenced (msg_seq / submission_seq / last_submission_data /
total_messages).
"""

from __future__ import annotations

import itertools
from typing import Any

import msgpack
import pytest
from confluent_kafka import Message
from k2eg_sequences import (
    MSGPACK_HEADERS,
    T0,
    Msg,
    data_msg,
    header_msg,
    iteration,
    ntscalar,
    records,
    scalar_pvs,
    tail_msg,
)

from recorder.client.assembler import IterationAssembler
from recorder.client.events import (
    IncompleteReason,
    IterationClosed,
    IterationEvent,
    IterationOpened,
    IterationStatus,
    ValuesReceived,
)
from recorder.client.wire import Record, decode_snapshot_message

TOPIC = "snap_1"
GENERATIONS = pytest.mark.parametrize("sequenced", [False, True], ids=["legacy", "sequenced"])


def as_messages(recs: list[Record]) -> list[Message]:
    """The records as the Kafka adapter's raw mode hands them over."""
    return [
        Message(topic=r.topic, partition=r.partition, offset=r.offset, value=r.value,
                headers=r.headers,
                timestamp=(0, 0) if r.timestamp_ms is None else (1, r.timestamp_ms))
        for r in recs
    ]


@pytest.fixture(autouse=True, params=["feed", "feed_many", "messages"])
def feed_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with records fed one by one, with each ``Run.feed`` call's records
    fed in one ``feed_many`` (the consumer thread's batched hot path), and with those as
    Kafka messages (the adapter's raw mode)."""
    monkeypatch.setattr(Run, "mode", request.param)
    return str(request.param)


class Run:
    """Feeds records into one assembler, keeping every event and the Kafka offset."""

    mode = "feed"

    def __init__(self, **kwargs: Any) -> None:
        self.asm = IterationAssembler(**kwargs)
        self.events: list[IterationEvent] = []
        self.offset = 0
        self.now = 0.0

    def feed(
        self,
        msgs: list[Msg] | list[bytes] | list[Msg | bytes],
        topic: str = TOPIC,
        now: float | None = None,
        kafka_ms: int | None = None,
    ) -> list[IterationEvent]:
        """``kafka_ms``: the records' Kafka timestamps are ``kafka_ms``, ``kafka_ms + 1``..."""
        if now is not None:
            self.now = now
        out: list[IterationEvent] = []
        recs = records(topic, msgs, start_offset=self.offset)
        if kafka_ms is not None:
            for i, rec in enumerate(recs):
                rec.timestamp_ms = kafka_ms + i
        if self.mode == "feed_many":
            out = self.asm.feed_many(recs, self.now)
        elif self.mode == "messages":
            out = self.asm.feed_many(as_messages(recs), self.now)
        else:
            for rec in recs:
                out += self.asm.feed(rec, self.now)
        self.offset += len(msgs)
        self.events += out
        return out

    def feed_records(self, recs: list[Record]) -> list[IterationEvent]:
        """Feed records built by the test (several partitions), as :meth:`feed` does."""
        out: list[IterationEvent] = []
        if self.mode == "feed":
            for rec in recs:
                out += self.asm.feed(rec, self.now)
        else:
            # each run of one partition's records as one consumed batch
            for _, group in itertools.groupby(recs, key=lambda rec: rec.partition):
                batch = list(group)
                if self.mode == "feed_many":
                    out += self.asm.feed_many(batch, self.now)
                else:
                    out += self.asm.feed_many(as_messages(batch), self.now)
        self.events += out
        return out

    def idle(self) -> list[IterationEvent]:
        out = self.asm.idle(self.now)
        self.events += out
        return out

    def expire(self, now: float) -> list[IterationEvent]:
        self.now = now
        out = self.asm.expire(now)
        self.events += out
        return out

    def closed(self) -> list[IterationClosed]:
        return [e for e in self.events if isinstance(e, IterationClosed)]

    def values(self, idx: int | None = None) -> list[ValuesReceived]:
        return [
            e
            for e in self.events
            if isinstance(e, ValuesReceived) and (idx is None or e.iter_index == idx)
        ]


def kinds(events: list[IterationEvent]) -> list[str]:
    out = []
    for e in events:
        if isinstance(e, IterationOpened):
            out.append(f"O{e.iter_index}")
        elif isinstance(e, ValuesReceived):
            out.append(f"V{e.iter_index}:{len(e.samples)}" + ("L" if e.late else ""))
        else:
            out.append(f"C{e.iter_index}:" + (e.reason.value if e.reason else "ok"))
    return out


def pvs_of(event: ValuesReceived) -> list[str]:
    return [s.pv for s in event.samples]


def assert_clean(asm: IterationAssembler) -> None:
    assert asm.counters["internal_error"] == 0
    assert asm.counters["malformed.internal"] == 0


@GENERATIONS
def test_values_events_carry_the_bytes_of_their_messages(sequenced: bool) -> None:
    """``nbytes`` (the client's back-pressure counts it) is the size of the Kafka messages
    that carried a batch's samples: over the hot path and the general one (a data message in
    another layout: it carries ``header_timestamp``)."""
    run = Run()
    it1 = iteration("snap_1", 1, [(T0, scalar_pvs(3)), (T0 + 5, scalar_pvs(2, prefix="W"))],
                    sequenced=sequenced)
    odd = it1[2]  # the second data message of the first batch
    assert odd.kind == "D" and odd.pv is not None
    odd.raw = data_msg(1, T0, odd.pv, ntscalar(1.0, nanos=1), msg_seq=odd.msg_seq,
                       sub=1 if sequenced else None, header_ts=T0)
    run.feed(it1)
    assert_clean(run.asm)
    data = [m for m in it1 if m.kind == "D"]
    assert [len(v.samples) for v in run.values()] == [3, 2]
    assert [v.nbytes for v in run.values()] == [
        sum(len(m.raw) for m in data[:3]), sum(len(m.raw) for m in data[3:])
    ]


# ------------------------------------------------------------------------------ normal
@GENERATIONS
def test_normal_periodic(sequenced: bool) -> None:
    run = Run()
    it1 = iteration("snap_1", 1, [(T0, scalar_pvs(3))], sequenced=sequenced)
    events = run.feed(it1)
    assert kinds(events) == ["O1", "V1:3", "C1:ok"]
    opened, values, closed = events
    assert isinstance(opened, IterationOpened)
    assert (opened.topic, opened.snapshot_name, opened.header_timestamp_ns, opened.offset) == (
        TOPIC,
        "snap_1",
        T0 * 10**6,
        0,
    )
    assert isinstance(values, ValuesReceived)
    assert values.batch == 1 and values.timestamp_ns == T0 * 10**6 and not values.late
    assert pvs_of(values) == ["PV:0", "PV:1", "PV:2"]
    assert values.submission_seq == (1 if sequenced else None)
    assert values.offset == 3
    assert [float(s.value) for s in values.samples] == [0.0, 1.0, 2.0]
    assert isinstance(closed, IterationClosed)
    assert closed.complete and closed.status is IterationStatus.COMPLETE
    assert (closed.n_values, closed.n_pvs, closed.n_batches, closed.offset) == (3, 3, 1, 4)
    assert closed.header_timestamp_ns == closed.tail_timestamp_ns == T0 * 10**6
    assert closed.expected_messages == (5 if sequenced else None)
    assert closed.missing_messages == (0 if sequenced else None)
    # the next period
    events = run.feed(iteration("snap_1", 2, [(T0 + 1000, scalar_pvs(3))], sequenced=sequenced))
    assert kinds(events) == ["O2", "V2:3", "C2:ok"]
    assert run.asm.counters["iterations.complete"] == 2
    assert_clean(run.asm)


@GENERATIONS
def test_legacy_style_values_flow_only_at_batch_end(sequenced: bool) -> None:
    """Data are held until the batch is known over (then emitted before the tail's close)."""
    run = Run()
    msgs = iteration("s", 1, [(T0, scalar_pvs(2))], sequenced=sequenced)
    assert kinds(run.feed(msgs[:1])) == ["O1"]
    assert kinds(run.feed(msgs[1:2])) == []
    if sequenced:  # last_submission_data on the 2nd data message ends the batch at once
        assert kinds(run.feed(msgs[2:3])) == ["V1:2"]
        assert kinds(run.feed(msgs[3:])) == ["C1:ok"]
    else:
        assert kinds(run.feed(msgs[2:3])) == []
        assert kinds(run.feed(msgs[3:])) == ["V1:2", "C1:ok"]


# ---------------------------------------------------------------------- timedbuffered
@GENERATIONS
def test_timedbuffered_many_samples_per_pv(sequenced: bool) -> None:
    run = Run()
    values = [("a:x", ntscalar(float(i), nanos=i)) for i in range(5)]
    values.insert(2, ("b:y", ntscalar(9.0)))
    run.feed(iteration("s", 1, [(T0, values)], sequenced=sequenced))
    [v] = run.values()
    assert pvs_of(v) == ["a:x", "a:x", "b:y", "a:x", "a:x", "a:x"]
    [c] = run.closed()
    assert c.complete and (c.n_values, c.n_pvs) == (6, 2)
    assert run.asm.counters["duplicate"] == 0


@GENERATIONS
def test_sub_push_partial_results_flow_while_open(sequenced: bool) -> None:
    run = Run()
    batches = [
        (T0, [("a:x", ntscalar(1.0, nanos=1)), ("b:y", ntscalar(2.0))]),
        (T0 + 1000, [("a:x", ntscalar(3.0, nanos=3)), ("a:x", ntscalar(4.0, nanos=4))]),
        (T0 + 2000, [("a:x", ntscalar(6.0, nanos=6))]),
    ]
    msgs = iteration("s", 1, batches, sequenced=sequenced)
    # header + batch 1
    out = run.feed(msgs[:3])
    if sequenced:
        assert kinds(out) == ["O1", "V1:2"]
    else:
        assert kinds(out) == ["O1"]
        # the caller's input is drained: the partial batch comes out
        assert kinds(run.idle()) == ["V1:2"]
    out = run.feed(msgs[3:5])
    assert kinds(out) == (["V1:2"] if sequenced else [])
    out = run.feed(msgs[5:])
    assert kinds(out) == (["V1:1", "C1:ok"] if sequenced else ["V1:2", "V1:1", "C1:ok"])
    vs = run.values()
    assert [v.batch for v in vs] == [1, 2, 3]
    assert [v.timestamp_ns // 10**6 for v in vs] == [T0, T0 + 1000, T0 + 2000]
    assert [v.submission_seq for v in vs] == ([1, 2, 3] if sequenced else [None] * 3)
    [c] = run.closed()
    assert c.complete and (c.n_values, c.n_batches, c.n_pvs) == (5, 3, 2)
    assert c.header_timestamp_ns == T0 * 10**6 and c.tail_timestamp_ns == (T0 + 2000) * 10**6
    assert run.idle() == []


def test_sequenced_header_alone_then_data_then_tail_alone() -> None:
    """Gateway-main shape with sequence keys: header-only first batch, tail-only last batch."""
    run = Run()
    msgs: list[bytes] = [
        header_msg("s", 1, T0, msg_seq=1, sub=1),
        data_msg(1, T0 + 1000, "a:x", ntscalar(1.0), msg_seq=2, sub=2),
        data_msg(1, T0 + 1000, "b:y", ntscalar(2.0), msg_seq=3, sub=2, last=True),
        tail_msg("s", 1, T0 + 2000, msg_seq=4, total=4, sub=3),
    ]
    assert kinds(run.feed(msgs)) == ["O1", "V1:2", "C1:ok"]
    assert run.closed()[0].expected_messages == 4


# -------------------------------------------------------------------------- triggered / stop
@GENERATIONS
def test_triggered_iterations_and_stop_final_iteration(sequenced: bool) -> None:
    run = Run()
    assert run.idle() == [] and run.expire(100.0) == []  # silent until the first trigger
    for idx in (1, 2):
        run.feed(
            iteration("trig_1", idx, [(T0 + idx * 5000, scalar_pvs(2))], sequenced=sequenced),
            topic="trig_1",
            now=100.0 + idx,
        )
    # stop: one final full iteration, then nothing (the ack goes to the reply topic)
    run.feed(
        iteration("trig_1", 3, [(T0 + 99_000, scalar_pvs(2))], sequenced=sequenced),
        topic="trig_1",
        now=200.0,
    )
    assert run.idle() == [] and run.expire(10_000.0) == []
    assert kinds(run.events) == [
        "O1",
        "V1:2",
        "C1:ok",
        "O2",
        "V2:2",
        "C2:ok",
        "O3",
        "V3:2",
        "C3:ok",
    ]
    assert all(e.topic == "trig_1" for e in run.events)


@GENERATIONS
def test_restart_resets_iter_index(sequenced: bool) -> None:
    run = Run()
    for idx in (1, 2, 3):
        run.feed(iteration("s", idx, [(T0 + idx * 1000, scalar_pvs(1))], sequenced=sequenced))
    # stopped, started again: iter_index begins at 1 with newer timestamps
    run.feed(iteration("s", 1, [(T0 + 60_000, scalar_pvs(1))], sequenced=sequenced))
    run.feed(iteration("s", 2, [(T0 + 61_000, scalar_pvs(1))], sequenced=sequenced))
    assert [c.iter_index for c in run.closed()] == [1, 2, 3, 1, 2]
    assert all(c.complete for c in run.closed())
    assert run.asm.counters["restart"] == 1 and run.asm.counters["late.header"] == 0


@pytest.mark.parametrize("lost", [(1,), (1, 3)], ids=["header", "header+data"])
def test_restart_header_is_not_taken_for_a_headerless_iteration_in_its_grace(
    lost: tuple[int, ...],
) -> None:
    """The last iteration of a run lost its header (and a data message): its tail came, it
    waits in its grace period. The snapshot is restarted at once: the new run's header for
    the same iter_index, newer than that tail, starts a new run; it was taken for the late
    header of the old iteration (closed complete with the new run's header, the new run's
    data dropped as late or as duplicate msg_seq, or merged into it)."""
    run = Run(missing_grace_s=10.0)
    old = iteration("s", 1, [(T0, scalar_pvs(2))], sequenced=True)
    run.feed([m for m in old if m.kind != "H" and m.msg_seq not in lost])
    assert run.closed() == []
    new = iteration("s", 1, [(T0 + 5000, scalar_pvs(2, base=10.0))], sequenced=True)
    run.feed(new)
    assert [(c.header_timestamp_ns, c.reason, c.n_values) for c in run.closed()] == [
        (None, IncompleteReason.NO_HEADER if lost == (1,) else IncompleteReason.MISSING_MESSAGES,
         3 - len(lost)),
        ((T0 + 5000) * 10**6, None, 2),
    ]
    assert [s.data["value"] for v in run.values() if v.timestamp_ns == (T0 + 5000) * 10**6
            for s in v.samples] == [10.0, 11.0]
    assert run.asm.counters["restart"] == 1 and run.asm.counters["header_after_data"] == 0


@GENERATIONS
@pytest.mark.parametrize("remembered", [True, False], ids=["remembered", "forgotten"])
def test_restart_with_the_gateways_clock_stepped_back_is_a_restart(
    sequenced: bool, remembered: bool,
) -> None:
    """The gateway restarted the snapshot (a reboot, after which chrony stepped its clock
    back 60 s): the new run's iter_index 1, 2, ... came with timestamps older than the newest
    of the old run, so every header was taken for a late one and every iteration of the new
    run dropped (late.*) until its timestamps passed the old run's newest, a minute of data
    lost. A header newer than an iteration it would come before (its own, or a later one
    still remembered) cannot be a late one: it is a restart. Old iteration 1 is remembered,
    or forgotten (more closed iterations than the assembler keeps; those it keeps span more
    than the step)."""
    run = Run(max_closed_per_topic=64 if remembered else 8)
    for idx in range(1, 21):  # the old run: iterations 1..20, one every 10 s
        run.feed(iteration("s", idx, [(T0 + idx * 10_000, scalar_pvs(1))],
                           sequenced=sequenced))
    for idx in (1, 2):  # restarted 1 s later, its clock 60 s back: older than the old newest
        run.feed(iteration("s", idx, [(T0 + 141_000 + idx * 1000, scalar_pvs(1))],
                           sequenced=sequenced))
    assert [c.iter_index for c in run.closed()] == [*range(1, 21), 1, 2]
    assert all(c.complete for c in run.closed())
    assert run.asm.counters["restart"] == 1 and run.asm.counters["late.header"] == 0


@GENERATIONS
def test_replayed_old_header_is_late_not_a_restart(sequenced: bool) -> None:
    run = Run()
    it1 = iteration("s", 1, [(T0, scalar_pvs(1))], sequenced=sequenced)
    run.feed(it1)
    run.feed(iteration("s", 2, [(T0 + 1000, scalar_pvs(1))], sequenced=sequenced))
    assert run.feed([it1[0]]) == []
    assert run.feed(it1[1:]) == []
    assert run.asm.counters["late.header"] == 1
    assert run.asm.counters["late.data"] == 1 and run.asm.counters["late.tail"] == 1
    assert run.asm.open_iterations(TOPIC) == []


# ------------------------------------------------------------------------- lost messages
@GENERATIONS
def test_lost_tail_closed_by_next_header(sequenced: bool) -> None:
    run = Run()
    it1 = iteration("s", 1, [(T0, scalar_pvs(2))], sequenced=sequenced)
    it2 = iteration("s", 2, [(T0 + 1000, scalar_pvs(2))], sequenced=sequenced)
    run.feed(it1[:-1])  # tail lost
    out = run.feed(it2[:1])
    assert kinds(out) == (["C1:no_tail", "O2"] if sequenced else ["V1:2", "C1:no_tail", "O2"])
    c1 = run.closed()[0]
    assert c1.status is IterationStatus.INCOMPLETE and c1.tail_timestamp_ns is None
    assert c1.n_values == 2
    run.feed(it2[1:])
    assert run.closed()[1].complete
    # the lost tail shows up late: counted, nothing reopened
    assert run.feed(it1[-1:]) == []
    assert run.asm.counters["late.tail"] == 1
    assert run.asm.counters["iterations.incomplete.no_tail"] == 1


@GENERATIONS
def test_next_header_read_from_another_partition_does_not_cut_an_iteration(
    sequenced: bool,
) -> None:
    """The gateway publishes T(n) before H(n+1), but only one partition keeps that order: in a
    topic of several partitions (one added while the snapshot runs moves its key) H(n+1) can
    be read from one partition before the rest of iteration n from another. Iteration n is
    not cut short (no_tail, its data and tail then dropped as late): its tail closes it."""
    run = Run()
    it1 = iteration("s", 1, [(T0, scalar_pvs(3))], sequenced=sequenced)
    it2 = iteration("s", 2, [(T0 + 1000, scalar_pvs(3))], sequenced=sequenced)
    p0 = records(TOPIC, it1)
    p1 = records(TOPIC, it2, partition=1)
    run.feed_records(p0[:2] + p1 + p0[2:])
    run.idle()
    assert sorted((c.iter_index, c.reason, c.n_values) for c in run.closed()) == [
        (1, None, 3), (2, None, 3)]
    assert not any(k.startswith("late.") for k in run.asm.counters)
    assert run.asm.open_iterations(TOPIC) == []


def test_an_iteration_read_from_two_partitions_gives_each_partition_its_own_offsets() -> None:
    """Partition and offset of an event are what a sink saves as read up to (a resume goes on
    from there). An iteration whose messages are in two partitions (one added while the
    snapshot runs moves its key) labelled every event with the partition it was opened in
    and the highest offset of either: here partition 1 "read up to 101", and a resume would
    skip the iterations at offsets 3..101 of partition 1 unrecorded."""
    run = Run()
    it1 = iteration("s", 1, [(T0, scalar_pvs(3))], sequenced=True)
    it2 = iteration("s", 2, [(T0 + 1000, scalar_pvs(1))], sequenced=True)
    p0 = records(TOPIC, it1[:2], start_offset=100)  # H D, then the key moved to partition 1
    p1 = records(TOPIC, it1[2:] + it2, partition=1)  # D D T, H D T
    run.feed_records(p1[:3] + p0 + p1[3:])  # partition 1 read first
    run.idle()
    assert sorted((c.iter_index, c.reason) for c in run.closed()) == [(1, None), (2, None)]
    read = {0: [r.offset for r in p0], 1: [r.offset for r in p1]}
    for event in run.events:
        if not isinstance(event, IterationOpened):
            assert event.offset in read[event.partition], event
    saved: dict[int, int] = {}
    for event in run.events:
        if not isinstance(event, IterationOpened):
            saved[event.partition] = max(saved.get(event.partition, -1), event.offset)
    assert saved == {0: 101, 1: 5}


@GENERATIONS
def test_lost_tail_and_no_next_header_times_out(sequenced: bool) -> None:
    run = Run(iteration_timeout_s=5.0)
    run.asm.set_topic_timeout("slow", 30.0)
    it1 = iteration("s", 1, [(T0, scalar_pvs(2))], sequenced=sequenced)
    run.feed(it1[:-1], now=10.0)
    run.feed(it1[:-1], topic="slow", now=10.0)
    assert run.expire(14.9) == []
    out = run.expire(15.0)
    assert [(e.topic, e.reason) for e in out if isinstance(e, IterationClosed)] == [
        (TOPIC, IncompleteReason.TIMEOUT)
    ]
    assert run.expire(39.9) == []
    [c] = [e for e in run.expire(40.0) if isinstance(e, IterationClosed)]
    assert c.topic == "slow" and c.reason is IncompleteReason.TIMEOUT and c.n_values == 2
    # data after the timeout: late, not reopened
    assert run.feed(it1[1:2]) == []
    assert run.asm.counters["late.data"] == 1


@GENERATIONS
def test_an_iteration_still_receiving_its_data_is_not_cut_at_its_timeout(
    sequenced: bool,
) -> None:
    """A triggered timedbuffered iteration is one submission holding every value of its
    look-back window, and its timeout is the 2 s slack: a big one (30 s of 100 PVs at 120 Hz,
    360k values, against the ~170k values/s the daemon reads) takes longer than that to be
    read. It was closed TIMEOUT while its values were still coming in, and the rest of them
    and its tail were dropped as late. An iteration whose data keeps arriving stays open;
    one that receives nothing for its timeout still times out."""
    run = Run(iteration_timeout_s=2.0)
    msgs = iteration("s", 1, [(T0, scalar_pvs(40))], sequenced=sequenced)
    now = 10.0
    for m in msgs:  # one message every 0.1 s: 4.2 s for the iteration
        run.feed([m], now=now)
        for tick in (0.05, 0.1):  # the client expires every 50 ms
            run.expire(now + tick)
        now += 0.1
    [c] = run.closed()
    assert c.complete and c.n_values == 40, c
    assert run.asm.counters["late.data"] == 0 and run.asm.counters["late.tail"] == 0
    # a stuck one: its data stops, no tail
    it2 = iteration("s", 2, [(T0 + 1, scalar_pvs(4))], sequenced=sequenced)
    run.feed(it2[:3], now=20.0)
    run.feed(it2[3:4], now=21.0)
    for k in range(1, 60):
        run.expire(21.0 + 0.05 * k)
    [_, c2] = run.closed()
    assert c2.reason is IncompleteReason.TIMEOUT and c2.n_values == 3


def test_a_paused_topic_is_frozen_and_deferred_alone() -> None:
    """expire(frozen=...) leaves the open iterations of paused topics alone (their messages
    are in Kafka, unread), and defer(seconds, topic) moves only that topic's deadlines when
    it resumes; the other topic's iterations time out as before."""
    run = Run(iteration_timeout_s=5.0)
    it1 = iteration("s", 1, [(T0, scalar_pvs(2))], sequenced=True)
    run.feed(it1[:-2], now=10.0)
    run.feed(it1[:-2], topic="paused", now=10.0)
    out = run.asm.expire(15.0, frozen={"paused"})
    assert [(e.topic, e.reason) for e in out if isinstance(e, IterationClosed)] == [
        (TOPIC, IncompleteReason.TIMEOUT)]
    assert run.asm.expire(30.0, frozen={"paused"}) == []  # paused from 10 s to 30 s
    run.asm.defer(20.0, "paused")
    run.asm.defer(5.0, "no such topic")  # a topic removed while paused: nothing to move
    assert run.asm.expire(34.9) == []
    run.feed(it1[-2:], topic="paused", now=34.9)  # the rest, read after the resume
    [c] = [e for e in run.closed() if e.topic == "paused"]
    assert c.complete and c.n_values == 2


def test_deferred_deadlines_leave_out_time_kafka_was_unreachable() -> None:
    """defer(): the caller could not read for a while; deadlines and grace periods move."""
    run = Run(iteration_timeout_s=5.0, missing_grace_s=0.5)
    it1 = iteration("s", 1, [(T0, scalar_pvs(2))], sequenced=True)
    run.feed(it1[:-2], now=10.0)  # header + first value: no tail yet
    run.asm.defer(20.0)  # Kafka unreachable for 20 s
    assert run.expire(34.9) == []
    [c] = [e for e in run.expire(35.0) if isinstance(e, IterationClosed)]
    assert c.reason is IncompleteReason.TIMEOUT and c.n_values == 1
    run2 = Run(missing_grace_s=0.5)
    it2 = iteration("s", 2, [(T0, scalar_pvs(4))], sequenced=True)
    run2.feed([m for m in it2 if m.msg_seq != 3], now=1.0)  # tail in, one value missing
    run2.asm.defer(3.0)
    assert run2.expire(4.4) == []
    run2.feed([m for m in it2 if m.msg_seq == 3], now=4.4)  # the missing one, after all
    [c2] = run2.closed()
    assert c2.complete and c2.n_values == 4


@GENERATIONS
def test_lost_header(sequenced: bool) -> None:
    run = Run()
    msgs = iteration("s", 4, [(T0, scalar_pvs(2))], sequenced=sequenced)
    out = run.feed(msgs[1:])
    if sequenced:  # the tail's total_messages counts the header: it gets the grace period
        assert kinds(out) == ["O4", "V4:2"]
        out += run.expire(100.0)
    assert kinds(out) == ["O4", "V4:2", "C4:no_header"]
    opened = out[0]
    assert isinstance(opened, IterationOpened) and opened.header_timestamp_ns is None
    assert opened.snapshot_name is None
    c = run.closed()[0]
    assert c.snapshot_name == "s" and c.header_timestamp_ns is None and c.n_values == 2
    if sequenced:
        assert c.missing_messages == 1 and c.expected_messages == 4
    assert run.asm.counters["no_header"] == 1


@GENERATIONS
def test_fresh_start_skips_the_rest_of_an_iteration_under_way(sequenced: bool) -> None:
    """Read from "now", the rest of an iteration whose header came before the read position
    (e.g. an earlier recording's last one) is dropped and counted; the first header starts
    the recording, and from then on a headless iteration is recorded as before."""
    run = Run()
    run.asm.start_at_header(TOPIC)
    old = iteration("s", 51, [(T0, scalar_pvs(2))], sequenced=sequenced)
    new1 = iteration("s", 1, [(T0 + 1000, scalar_pvs(2))], sequenced=sequenced)
    lost = iteration("s", 2, [(T0 + 1100, scalar_pvs(2))], sequenced=sequenced)
    out = run.feed(old[1:] + new1)
    assert kinds(out) == ["O1", "V1:2", "C1:ok"]
    assert run.asm.counters["before_start.data"] == 2
    assert run.asm.counters["before_start.tail"] == 1
    assert run.asm.counters["no_header"] == 0
    out = run.feed(lost[1:])  # after the first header: a lost header is an incomplete iteration
    assert kinds(out)[:2] == ["O2", "V2:2"]
    assert run.asm.counters["no_header"] == 1
    assert_clean(run.asm)


@GENERATIONS
def test_fresh_start_is_per_topic_and_ends_with_close(sequenced: bool) -> None:
    run = Run()
    run.asm.start_at_header("other")
    msgs = iteration("s", 4, [(T0, scalar_pvs(2))], sequenced=sequenced)
    assert kinds(run.feed(msgs[1:]))[:2] == ["O4", "V4:2"]  # TOPIC was not marked
    run.asm.start_at_header(TOPIC)
    run.asm.close(TOPIC)  # the subscription ended: the mark goes with it
    msgs = iteration("s", 9, [(T0 + 500, scalar_pvs(1))], sequenced=sequenced)
    assert kinds(run.feed(msgs[1:]))[:2] == ["O9", "V9:1"]
    run.asm.start_at_header(TOPIC)
    run.asm.close()
    msgs = iteration("s", 11, [(T0 + 900, scalar_pvs(1))], sequenced=sequenced)
    assert kinds(run.feed(msgs[1:]))[:2] == ["O11", "V11:1"]
    assert run.asm.counters["before_start.data"] == 0


def test_storage_node_header_timestamp_used_when_header_lost() -> None:
    run = Run()
    msgs = [
        data_msg(2, T0 + 10, "a", ntscalar(1.0), header_ts=T0),
        tail_msg("s", 2, T0 + 10, header_ts=T0),
    ]
    out = run.feed(msgs)
    assert isinstance(out[0], IterationOpened) and out[0].header_timestamp_ns == T0 * 10**6
    assert run.closed()[0].header_timestamp_ns == T0 * 10**6


@GENERATIONS
def test_tail_only_iteration(sequenced: bool) -> None:
    run = Run()
    msgs = iteration("s", 7, [(T0, scalar_pvs(2))], sequenced=sequenced)
    out = run.feed(msgs[-1:])
    # sequenced: the tail says 2 data messages exist, so they get a grace period first
    assert kinds(out) == (["O7"] if sequenced else ["O7", "C7:no_header"])
    if sequenced:
        assert kinds(run.expire(100.0)) == ["C7:missing_messages"]
        [c] = run.closed()
        assert c.missing_messages == 3 and c.reason is IncompleteReason.MISSING_MESSAGES
    assert_clean(run.asm)


@GENERATIONS
def test_header_arriving_after_its_data(sequenced: bool) -> None:
    run = Run()
    msgs = iteration("s", 1, [(T0, scalar_pvs(2))], sequenced=sequenced)
    run.feed([msgs[1], msgs[0], msgs[2], msgs[3]])
    c = run.closed()[0]
    assert c.complete and c.header_timestamp_ns == T0 * 10**6 and c.n_values == 2
    assert run.asm.counters["header_after_data"] == 1


# ----------------------------------------------------------------------------- duplicates
def test_sequenced_duplicate_msg_seq() -> None:
    run = Run()
    msgs = iteration("s", 1, [(T0, scalar_pvs(3))], sequenced=True)
    run.feed([msgs[0], msgs[1], msgs[1], msgs[2], msgs[0], msgs[3], msgs[4], msgs[4]])
    [c] = run.closed()
    assert c.complete and c.n_values == 3 and c.duplicates == 2
    assert run.asm.counters["duplicate"] == 1 and run.asm.counters["duplicate.header"] == 1
    assert run.asm.counters["late.tail"] == 1  # the repeated tail after the close


def test_legacy_duplicate_identical_payload() -> None:
    run = Run()
    a1 = data_msg(1, T0, "a:x", ntscalar(1.0, nanos=1))
    a1_again = data_msg(1, T0, "a:x", ntscalar(1.0, nanos=1))
    a2 = data_msg(1, T0, "a:x", ntscalar(2.0, nanos=1))  # same stamp, other value: kept
    a3 = data_msg(1, T0, "a:x", ntscalar(1.0, nanos=2))
    b1 = data_msg(1, T0, "b:y", ntscalar(1.0, nanos=1))  # same payload, other PV: kept
    run.feed([header_msg("s", 1, T0), a1, a1_again, a2, a3, b1, a2, tail_msg("s", 1, T0)])
    [v] = run.values()
    assert pvs_of(v) == ["a:x", "a:x", "a:x", "b:y"]
    [c] = run.closed()
    assert c.complete and c.duplicates == 2 and run.asm.counters["duplicate"] == 2
    # the same payload in the next iteration is not a duplicate (iter_index differs anyway)
    run.feed(
        [
            header_msg("s", 2, T0 + 1),
            data_msg(2, T0 + 1, "a:x", ntscalar(1.0, nanos=1)),
            tail_msg("s", 2, T0 + 1),
        ]
    )
    assert run.closed()[1].n_values == 1


def test_legacy_identical_payloads_without_time_stamp_are_all_kept() -> None:
    """A timedbuffered snapshot with ``pv_field_filter_list: [value]``: the gateway strips
    ``timeStamp``, so a PV whose value comes back (a toggling bit, an enum state) sends
    byte-identical data messages in one batch. They are distinct events, not a producer's
    retry: every one is kept (they were dropped as duplicates, losing most of the values)."""
    on = data_msg(1, T0, "a:bit", {"value": 1})
    off = data_msg(1, T0, "a:bit", {"value": 0})
    run = Run()
    run.feed([header_msg("s", 1, T0), on, off, on, off, on, tail_msg("s", 1, T0)])
    assert run.asm.counters["duplicate"] == 0
    [values] = run.values()
    assert [s.data for s in values.samples] == [{"value": v} for v in (1, 0, 1, 0, 1)]
    [c] = run.closed()
    assert c.complete and c.n_values == 5 and c.duplicates == 0


def test_legacy_duplicate_via_feed_message_without_raw() -> None:
    from recorder.client.wire import Data, decode_snapshot_message

    asm = IterationAssembler()
    raw = data_msg(1, T0, "a:x", ntscalar(1.0))
    msg = decode_snapshot_message(raw, MSGPACK_HEADERS)
    assert isinstance(msg, Data)
    msg.raw = None
    asm.feed_message(TOPIC, 0, 0, msg, 0.0)
    again = decode_snapshot_message(raw, MSGPACK_HEADERS)
    assert isinstance(again, Data)
    again.raw = None
    asm.feed_message(TOPIC, 0, 1, again, 0.0)
    assert asm.counters["duplicate"] == 1


def test_legacy_duplicate_check_does_not_grow_with_the_pvs_values_in_an_iteration() -> None:
    """Legacy timedbuffered: a fast PV has thousands of values in one window. Each new payload
    was compared with every earlier payload of its PV in the iteration (quadratic: a 1 kHz PV
    in a 60 s window took seconds per iteration, growing with the message rate)."""
    from recorder.client.wire import Data, decode_snapshot_message

    compared = 0

    class Counted(bytes):
        __hash__ = bytes.__hash__

        def __eq__(self, other: object) -> bool:
            nonlocal compared
            compared += 1
            return bytes.__eq__(self, other)  # type: ignore[no-any-return]

    asm = IterationAssembler()
    asm.feed(records(TOPIC, [header_msg("s", 1, T0)])[0], 0.0)
    n = 2000
    for i in range(n + 1):
        raw = data_msg(1, T0, "a:x", ntscalar(float(i % n), nanos=i % n))  # the last: again
        msg = decode_snapshot_message(raw, MSGPACK_HEADERS)
        assert isinstance(msg, Data)
        msg.raw = Counted(raw)
        asm.feed_message(TOPIC, 0, i + 1, msg, 0.0)
    assert asm.counters["duplicate"] == 1
    assert compared < 10 * n


def test_a_legacy_window_of_large_arrays_is_not_held_in_memory_until_its_tail() -> None:
    """Legacy timedbuffered: a window's sub-push batches flow out as they end (the writer has
    them), but the duplicate check kept every message of the iteration until its tail: the
    daemon held the whole window of a camera's images, beyond the queue's 64 MiB bound."""
    import tracemalloc

    def record(raw: bytes, offset: int) -> Record:
        return Record(TOPIC, 0, offset, raw, list(MSGPACK_HEADERS))

    asm = IterationAssembler()
    image = [0.0] * 8192  # ~74 kB per message
    tracemalloc.start()
    try:
        asm.feed(record(header_msg("s", 1, T0), 0), 0.0)
        base = tracemalloc.get_traced_memory()[0]
        for i in range(80):  # one batch per sub-push: each flows out when the next begins
            image[0] = float(i)
            raw = data_msg(1, T0 + i, "cam:image", ntscalar(image, nanos=i))
            asm.feed(record(raw, i + 1), 0.0)
            del raw
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert asm.open_iterations(TOPIC) == [1]
    # the pending batch (one image) and the validating Unpacker's buffer, not the 80 images
    assert held < 2_500_000
    for i in (79, 3):  # a producer retry of an image is still a duplicate; others are not
        image[0] = float(i)
        asm.feed(record(data_msg(1, T0 + i, "cam:image", ntscalar(image, nanos=i)), 90 + i), 0)
    image[0] = 3.5
    asm.feed(record(data_msg(1, T0 + 3, "cam:image", ntscalar(image, nanos=3)), 200), 0.0)
    assert asm.counters["duplicate"] == 2
    [closed] = [e for e in asm.feed(record(tail_msg("s", 1, T0 + 80), 201), 0.0)
                if isinstance(e, IterationClosed)]
    assert closed.n_values == 81 and closed.duplicates == 2


# --------------------------------------------------------------- interleaving / reordering
@GENERATIONS
def test_interleaved_batches(sequenced: bool) -> None:
    """Two publishing threads interleave batches 1 and 2 of one iteration."""
    run = Run()
    batches = [
        (T0, [("a", ntscalar(1.0, nanos=1)), ("b", ntscalar(2.0, nanos=2))]),
        (T0 + 1000, [("a", ntscalar(3.0, nanos=3)), ("b", ntscalar(4.0, nanos=4))]),
    ]
    h, a1, b1, a2, b2, t = iteration("s", 1, batches, sequenced=sequenced)
    run.feed([h, a1, a2, b1, b2, t])
    vs = run.values()
    assert [(v.batch, pvs_of(v), v.late) for v in vs] == [
        (1, ["a"], False),
        (2, ["a"], False),
        (3, ["b"], True),
        (4, ["b"], True),
    ]
    assert [v.timestamp_ns // 10**6 for v in vs] == [T0, T0 + 1000, T0, T0 + 1000]
    [c] = run.closed()
    assert c.complete and c.n_values == 4 and c.n_batches == 4
    assert run.asm.counters["interleaved"] == 2


def test_sequenced_reorder_by_msg_seq_within_batch() -> None:
    run = Run()
    h, d2, d3, d4, d5, t = iteration("s", 1, [(T0, scalar_pvs(4))], sequenced=True)
    run.feed([h, d4, d2, d3, d5, t])  # d5 carries last_submission_data
    [v] = run.values()
    assert pvs_of(v) == ["PV:0", "PV:1", "PV:2", "PV:3"]
    assert run.asm.counters["reordered"] == 1
    assert run.closed()[0].complete


def test_sequenced_tail_before_its_last_data() -> None:
    run = Run()
    h, d2, d3, t = iteration("s", 1, [(T0, scalar_pvs(2))], sequenced=True)
    out = run.feed([h, d2, t])
    assert kinds(out) == ["O1", "V1:1"]  # waiting for msg 3
    out = run.feed([d3])
    # its batch (submission 1) was already emitted at the tail: a late batch
    assert kinds(out) == ["V1:1L", "C1:ok"]
    c = run.closed()[0]
    assert c.complete and c.n_values == 2 and c.missing_messages == 0
    assert run.asm.counters["missing_recovered"] == 1


def test_sequenced_header_after_the_tail_of_a_whole_iteration() -> None:
    """A header retried by the (non-idempotent) producer lands after its data and tail: the
    tail's total_messages counts the header, so the iteration waits for it as it waits for a
    missing data message (D2 T H D3 was already complete; D2 D3 T H was closed no_header at
    the tail and its header dropped as late)."""
    run = Run()
    h, d2, d3, t = iteration("s", 1, [(T0, scalar_pvs(2))], sequenced=True)
    assert kinds(run.feed([d2, d3, t])) == ["O1", "V1:2"]  # the header is announced, not here
    out = run.feed([h])
    assert kinds(out) == ["C1:ok"]
    [c] = run.closed()
    assert c.complete and c.header_timestamp_ns == T0 * 10**6 and c.missing_messages == 0
    assert c.snapshot_name == "s" and c.n_values == 2
    assert run.asm.counters["late.header"] == 0
    assert run.asm.counters["header_after_data"] == 1
    # and a header that never comes: closed no_header once the grace period is over
    run2 = Run(missing_grace_s=0.5)
    msgs = iteration("s", 2, [(T0, scalar_pvs(2))], sequenced=True)
    assert kinds(run2.feed(msgs[1:], now=1.0)) == ["O2", "V2:2"]
    assert run2.expire(1.4) == []
    assert kinds(run2.expire(1.5)) == ["C2:no_header"]
    [c2] = run2.closed()
    assert (c2.missing_messages, c2.expected_messages, c2.n_values) == (1, 4, 2)


def test_sequenced_iteration_evicted_in_its_grace_is_not_no_tail() -> None:
    """A fast snapshot: more iterations open than max_open_per_topic while one waits in its
    grace period (header or data announced by its tail not here). Evicted, it gets the reason
    of its grace period: its tail came, so not no_tail."""
    run = Run(max_open_per_topic=2, missing_grace_s=10.0)
    its = [
        iteration("s", i, [(T0 + i * 60, scalar_pvs(1))], sequenced=True) for i in (1, 2, 3)
    ]
    run.feed(its[0][1:] + its[1][1:] + its[2])  # the headers of 1 and 2 lost
    assert [(c.iter_index, c.reason) for c in run.closed()] == [
        (1, IncompleteReason.NO_HEADER), (3, None)]
    assert run.asm.counters["evicted"] == 1
    run.expire(100.0)
    assert [c.reason for c in run.closed()][-1] is IncompleteReason.NO_HEADER
    # the same with a data message lost: evicted missing_messages, not no_tail
    run = Run(max_open_per_topic=2, missing_grace_s=10.0)
    its = [
        iteration("s", i, [(T0 + i * 60, scalar_pvs(2))], sequenced=True) for i in (1, 2, 3)
    ]
    run.feed([m for m in its[0] + its[1] if m.msg_seq != 3] + its[2])
    [c1, c3] = run.closed()
    assert (c1.iter_index, c1.reason, c1.missing_messages) == (
        1, IncompleteReason.MISSING_MESSAGES, 1)
    assert c3.iter_index == 3 and c3.complete


# ----------------------------------------------------------------------- missing messages
def test_sequenced_missing_messages_after_grace() -> None:
    run = Run(missing_grace_s=0.5)
    msgs = iteration("s", 1, [(T0, scalar_pvs(4))], sequenced=True)
    run.feed([m for m in msgs if m.msg_seq not in (3, 4)], now=1.0)
    assert run.asm.open_iterations(TOPIC) == [1]
    assert [e for e in run.expire(1.4) if isinstance(e, IterationClosed)] == []
    out = run.expire(1.5)
    [c] = [e for e in out if isinstance(e, IterationClosed)]
    assert c.reason is IncompleteReason.MISSING_MESSAGES
    assert (c.expected_messages, c.missing_messages, c.n_values) == (6, 2, 2)
    assert c.tail_timestamp_ns == T0 * 10**6
    assert run.asm.counters["missing_messages"] == 2
    # and a message that comes later still is late
    assert run.feed([msgs[2]]) == []
    assert run.asm.counters["late.data"] == 1


def test_sequenced_tail_without_total_messages_counts_by_its_msg_seq() -> None:
    """The official client's msg_seq mode needs only the tail's msg_seq (N: data 2..N-1),
    total_messages is optional there: a tail without it still says how many came before it,
    so a lost data message is missing, not a complete iteration."""
    run = Run(missing_grace_s=0.5)
    h, d2, d3, d4, _ = iteration("s", 1, [(T0, scalar_pvs(3))], sequenced=True)
    tail = tail_msg("s", 1, T0, msg_seq=5, sub=1)
    run.feed([h, d2, d4, tail], now=1.0)
    assert run.asm.open_iterations(TOPIC) == [1]
    run.expire(1.5)
    [c] = run.closed()
    assert c.reason is IncompleteReason.MISSING_MESSAGES
    assert (c.expected_messages, c.missing_messages, c.n_values) == (5, 1, 2)
    # all there: complete
    run = Run()
    run.feed([h, d2, d3, d4, tail])
    [c] = run.closed()
    assert c.complete and (c.expected_messages, c.missing_messages) == (5, 0)


def test_sequenced_newer_header_does_not_cut_the_grace_period() -> None:
    run = Run(missing_grace_s=1.0)
    it1 = iteration("s", 1, [(T0, scalar_pvs(2))], sequenced=True)
    it2 = iteration("s", 2, [(T0 + 1000, scalar_pvs(2))], sequenced=True)
    run.feed([it1[0], it1[1], it1[3]], now=0.0)  # msg 3 missing
    run.feed(it2[:1], now=0.1)
    assert run.asm.open_iterations(TOPIC) == [1, 2]
    run.feed([it1[2]], now=0.2)  # the straggler arrives
    assert [c.iter_index for c in run.closed()] == [1] and run.closed()[0].complete
    run.feed(it2[1:], now=0.3)
    assert all(c.complete for c in run.closed())


def test_sequenced_zero_grace_closes_immediately() -> None:
    run = Run(missing_grace_s=0.0)
    msgs = iteration("s", 1, [(T0, scalar_pvs(3))], sequenced=True)
    out = run.feed([m for m in msgs if m.msg_seq != 3])
    assert kinds(out)[-1] == "C1:missing_messages"


# ------------------------------------------------------------------------- gateway error
@GENERATIONS
def test_tail_error_is_gateway_error(sequenced: bool) -> None:
    run = Run()
    msgs = iteration(
        "s", 1, [(T0, scalar_pvs(2))], sequenced=sequenced, error=3, error_message="publish failed"
    )
    run.feed(msgs)
    [c] = run.closed()
    assert c.reason is IncompleteReason.GATEWAY_ERROR
    assert (c.error_code, c.error_message, c.n_values) == (3, "publish failed", 2)


# ---------------------------------------------------------------------- topics and bounds
@GENERATIONS
def test_keyed_by_topic_and_iter_index(sequenced: bool) -> None:
    run = Run()
    a = iteration("a", 1, [(T0, scalar_pvs(2, prefix="A"))], sequenced=sequenced)
    b = iteration("b", 1, [(T0, scalar_pvs(3, prefix="B"))], sequenced=sequenced)
    for ma, mb in zip(a, b, strict=False):
        run.feed([ma], topic="a")
        run.feed([mb], topic="b")
    run.feed(b[len(a) :], topic="b")
    run.idle()
    closed = {c.topic: c for c in run.closed()}
    assert closed["a"].complete and closed["a"].n_values == 2
    assert closed["b"].complete and closed["b"].n_values == 3
    for v in run.values():
        assert all(s.pv.startswith(v.topic.upper()) for s in v.samples)


def test_max_open_per_topic_evicts_oldest() -> None:
    run = Run(max_open_per_topic=2)
    # data-only iterations (headers lost) do not close each other: the bound does
    for idx in (1, 2, 3):
        run.feed([data_msg(idx, T0 + idx, "a", ntscalar(1.0))])
    assert run.asm.open_iterations(TOPIC) == [2, 3]
    [c] = run.closed()
    assert c.iter_index == 1 and c.reason is IncompleteReason.NO_TAIL
    assert run.asm.counters["evicted"] == 1


def test_remembered_closed_iterations_are_bounded() -> None:
    run = Run(max_closed_per_topic=3)
    for idx in range(1, 7):
        run.feed(iteration("s", idx, [(T0 + idx, scalar_pvs(1))], sequenced=False))
    topic = run.asm._topics[TOPIC]
    assert list(topic.closed) == [4, 5, 6]


def test_close_topic_and_all() -> None:
    run = Run()
    run.feed(iteration("s", 1, [(T0, scalar_pvs(2))], sequenced=False)[:-1], topic="x")
    run.feed(iteration("s", 1, [(T0, scalar_pvs(2))], sequenced=True)[:2], topic="y")
    out = run.asm.close("x")
    assert kinds(out) == ["V1:2", "C1:closed"]
    assert run.asm.close("nope") == []
    out = run.asm.close()
    assert kinds(out) == ["V1:1", "C1:closed"]
    assert isinstance(out[-1], IterationClosed) and out[-1].topic == "y"
    assert run.asm.counters["iterations.incomplete.closed"] == 2


# -------------------------------------------------------------------------------- malformed
def test_malformed_records_are_counted_and_skipped() -> None:
    asm = IterationAssembler(max_message_bytes=10_000)
    good = header_msg("s", 1, T0)
    bad: list[tuple[Record, str]] = [
        (Record(TOPIC, 0, 0, good, None), "no_header"),
        (Record(TOPIC, 0, 1, good, [("k2eg-ser-type", b"Json")]), "wrong_serialization"),
        (Record(TOPIC, 0, 2, None, MSGPACK_HEADERS), "empty"),
        (Record(TOPIC, 0, 3, b"\xc1garbage", MSGPACK_HEADERS), "not_msgpack"),
        (Record(TOPIC, 0, 4, msgpack.packb([1, 2]), MSGPACK_HEADERS), "not_a_map"),
        (
            Record(TOPIC, 0, 5, msgpack.packb({"error": 0, "reply_id": "x"}), MSGPACK_HEADERS),
            "missing_key",
        ),
        (
            Record(
                TOPIC,
                0,
                6,
                msgpack.packb({"message_type": 9, "timestamp": 1, "iter_index": 1}),
                MSGPACK_HEADERS,
            ),
            "unknown_message_type",
        ),
        (Record(TOPIC, 0, 7, b"\x80" + b"\x00" * 20_000, MSGPACK_HEADERS), "too_large"),
    ]
    for rec, reason in bad:
        assert asm.feed(rec, 0.0) == []
        assert asm.counters["malformed." + reason] >= 1, reason
    assert sum(v for k, v in asm.counters.items() if k.startswith("malformed.")) == len(bad)
    assert asm.open_iterations(TOPIC) == []
    # the stream goes on
    out = asm.feed(Record(TOPIC, 0, 8, good, MSGPACK_HEADERS), 0.0)
    assert kinds(out) == ["O1"]


def test_feed_message_rejects_unknown_objects() -> None:
    asm = IterationAssembler()
    assert asm.feed_message(TOPIC, 0, 0, object(), 0.0) == []  # type: ignore[arg-type]
    assert asm.counters["malformed.unknown_message_type"] == 1


def test_ns_timestamps_sequence() -> None:
    run = Run()
    ns = T0 * 1_000_000 + 123
    run.feed([header_msg("s", 1, ns), data_msg(1, ns, "a", ntscalar(1.0)), tail_msg("s", 1, ns)])
    [c] = run.closed()
    assert c.complete and c.header_timestamp_ns == ns and run.values()[0].timestamp_ns == ns


# ------------------------------------------------------------------------ batched hot path
def test_feed_run_stops_at_another_topic() -> None:
    asm = IterationAssembler()
    a = records("a", [m.raw for m in iteration("s", 1, [(T0, scalar_pvs(3))], sequenced=True)])
    b = records("b", [m.raw for m in iteration("s", 1, [(T0, scalar_pvs(2))], sequenced=False)])
    recs = a[:3] + b + a[3:]
    out: list[IterationEvent] = []
    assert asm.feed_run(recs, 0, 0.0, out) == 3
    assert asm.feed_run(recs, 3, 0.0, out) == 3 + len(b)
    assert asm.feed_run(recs, 3 + len(b), 0.0, out) == len(recs)
    assert asm.feed_run(recs, len(recs), 0.0, out) == len(recs)
    closed = [e for e in out if isinstance(e, IterationClosed)]
    assert [(c.topic, c.complete, c.n_values) for c in closed] == [("b", True, 2), ("a", True, 3)]


def _hot_stream(sequenced: bool, n: int = 6) -> list[bytes]:
    raws = [m.raw for m in iteration("s", 1, [(T0, scalar_pvs(n))], sequenced=sequenced)]
    for raw in raws:  # the PV names are known (the hot path takes only known names)
        decode_snapshot_message(raw, MSGPACK_HEADERS)
    return raws


def _general_path_offsets(asm: IterationAssembler, monkeypatch: pytest.MonkeyPatch
                          ) -> list[int]:
    """The offsets of the records ``asm`` feeds through its general path from now on."""
    general: list[int] = []
    feed_one = asm._feed_one

    def spy(state: Any, rec: Record, now: float, out: list[IterationEvent]) -> None:
        general.append(rec.offset)
        feed_one(state, rec, now, out)

    monkeypatch.setattr(asm, "_feed_one", spy)
    return general


@GENERATIONS
def test_hot_path_is_taken(sequenced: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    raws = _hot_stream(sequenced, 20)
    asm = IterationAssembler()
    general = _general_path_offsets(asm, monkeypatch)
    out = asm.feed_many(records(TOPIC, raws), 0.0)
    # header, the last data (sequenced: last_submission_data), tail; the first data opens
    # the batch through _on_data without the general decoding
    assert general == ([0, 20, 21] if sequenced else [0, 21])
    assert kinds(out) == ["O1", "V1:20", "C1:ok"]


@GENERATIONS
def test_malformed_in_the_middle_of_a_hot_run(sequenced: bool) -> None:
    """Truncated, trailing bytes, garbage inside the PV map, a non-map PV value: each is
    counted and skipped, and the messages after it are still accepted."""
    raws = _hot_stream(sequenced)
    data = raws[3]  # a data message appended to a pending batch (the hot path)
    at = data.index(b"\xa5alarm")
    bad = [
        data[:-1],
        data + b"\x00",
        data[:at] + b"\xc1" + data[at + 1 :],
        data[: data.index(b"\xa4PV:2") + 5] + b"\x05",  # the PV value is not a map
        b"",  # not msgpack at all
    ]
    run = Run()
    run.feed(raws[:3] + bad + raws[3:])
    counters = run.asm.counters
    assert counters["malformed.not_msgpack"] == 4 and counters["malformed.bad_type"] == 1
    assert_clean(run.asm)
    [closed] = run.closed()
    assert closed.complete and closed.n_values == 6
    assert [s.pv for v in run.values() for s in v.samples] == [f"PV:{i}" for i in range(6)]


@GENERATIONS
def test_duplicates_on_the_hot_path(sequenced: bool) -> None:
    raws = _hot_stream(sequenced)
    run = Run()
    run.feed([*raws[:4], raws[3], raws[2], *raws[4:]])
    assert run.asm.counters["duplicate"] == 2
    [closed] = run.closed()
    assert closed.complete and closed.duplicates == 2 and closed.n_values == 6
    assert [s.pv for v in run.values() for s in v.samples] == [f"PV:{i}" for i in range(6)]


def test_legacy_same_pv_new_payload_on_the_hot_path_is_kept() -> None:
    """Legacy, timedbuffered: the same PV twice with other bytes is a new sample."""
    pv1 = data_msg(1, T0, "a", ntscalar(1.0, nanos=1))
    pv2 = data_msg(1, T0, "a", ntscalar(2.0, nanos=2))
    run = Run()
    run.feed([header_msg("s", 1, T0), pv1, pv2, pv1, pv2, tail_msg("s", 1, T0)])
    assert run.asm.counters["duplicate"] == 2
    [values] = run.values()
    assert [s.data["value"] for s in values.samples] == [1.0, 2.0]


def test_reorder_on_the_hot_path() -> None:
    raws = _hot_stream(True)
    run = Run()
    run.feed([raws[0], raws[1], raws[4], raws[2], raws[3], *raws[5:]])
    assert run.asm.counters["reordered"] == 1
    [values] = run.values()
    assert [s.pv for s in values.samples] == [f"PV:{i}" for i in range(6)]


def test_big_messages_on_the_hot_path() -> None:
    """A message above 1 MiB is validated, then the validating Unpacker is replaced."""
    big = ntscalar([float(i) for i in range(140_000)])
    raws = [
        header_msg("s", 1, T0, msg_seq=1, sub=1),
        data_msg(1, T0, "w:0", big, msg_seq=2, sub=1),
        data_msg(1, T0, "w:1", big, msg_seq=3, sub=1),
        data_msg(1, T0, "w:1", big, msg_seq=4, sub=1)[:-3],
        data_msg(1, T0, "w:2", big, msg_seq=5, sub=1, last=True),
        tail_msg("s", 1, T0, msg_seq=6, total=6, sub=1),
    ]
    assert len(raws[2]) > 1 << 20
    run = Run(missing_grace_s=0)
    run.feed(raws + raws[1:3])
    assert run.asm.counters["malformed.not_msgpack"] == 1
    [closed] = run.closed()
    assert closed.n_values == 3 and closed.missing_messages == 1
    assert run.asm.counters["late.data"] == 2
    assert [s.pv for v in run.values() for s in v.samples] == ["w:0", "w:1", "w:2"]
    assert len(run.values()[0].samples[1].data["value"]) == 140_000


def test_other_header_spellings_take_the_general_path() -> None:
    raws = _hot_stream(True, 3)
    asm = IterationAssembler()
    recs = [Record(TOPIC, 0, i, raw, [("K2EG-SER-TYPE", b"msgpack")]) for i, raw in enumerate(raws)]
    out = asm.feed_many(recs, 0.0)
    closed = [e for e in out if isinstance(e, IterationClosed)]
    assert len(closed) == 1 and closed[0].complete and closed[0].n_values == 3


@GENERATIONS
def test_truncated_after_a_known_layout(sequenced: bool) -> None:
    """Messages cut anywhere, right after the metadata the previous message had too."""
    raws = _hot_stream(sequenced, 4)
    data = raws[2]
    run = Run()
    cuts = [data[:n] for n in range(1, 80)]
    run.feed([*raws[:2], *cuts, b"\xc1" + data[1:], *raws[2:]])
    assert run.asm.counters["malformed.not_msgpack"] == len(cuts) + 1
    assert_clean(run.asm)
    [closed] = run.closed()
    assert closed.complete and closed.n_values == 4


@GENERATIONS
def test_the_close_carries_the_kafka_timestamp_of_the_tail_message(sequenced: bool) -> None:
    """A stop compares it with its ack's (the final iteration is produced just before)."""
    run = Run()
    msgs = iteration("snap_1", 1, [(T0, scalar_pvs(3))], sequenced=sequenced)
    run.feed(msgs, kafka_ms=1_700_000_000_000)
    run.feed(iteration("snap_1", 2, [(T0 + 1000, scalar_pvs(3))], sequenced=sequenced))
    first, second = [e for e in run.events if isinstance(e, IterationClosed)]
    assert first.tail_kafka_time_ms == 1_700_000_000_000 + len(msgs) - 1
    assert second.tail_kafka_time_ms is None


@GENERATIONS
def test_an_iteration_with_a_too_large_data_message_is_not_complete(sequenced: bool) -> None:
    """A PV value in a message over ``max_message_bytes`` (a big image) is dropped
    (``malformed.too_large``); its iteration then lacks that PV and must not be recorded
    as complete: a legacy gateway's tail does not say how many messages it sent, and the
    iteration was closed complete without the image."""
    run = Run(max_message_bytes=4096)
    seq = (lambda n: n) if sequenced else (lambda n: None)
    big = ntscalar(1.0)
    big["value"] = [float(i) for i in range(1000)]  # ~9 kB
    run.feed([
        header_msg("s", 1, T0, msg_seq=seq(0)),
        data_msg(1, T0, "SMALL", ntscalar(2.0), msg_seq=seq(1)),
        data_msg(1, T0, "IMG", big, msg_seq=seq(2)),
        tail_msg("s", 1, T0, msg_seq=seq(3), total=4 if sequenced else None),
    ])
    run.idle()
    run.expire(100.0)
    assert run.asm.counters["malformed.too_large"] == 1
    [c] = run.closed()
    assert not c.complete
    assert c.reason is IncompleteReason.MISSING_MESSAGES
    assert c.missing_messages == 1
    assert [s.pv for v in run.values(1) for s in v.samples] == ["SMALL"]
    # the next iteration is not affected
    run.feed([header_msg("s", 2, T0 + 1, msg_seq=seq(0)),
              data_msg(2, T0 + 1, "SMALL", ntscalar(3.0), msg_seq=seq(1)),
              tail_msg("s", 2, T0 + 1, msg_seq=seq(2), total=3 if sequenced else None)])
    run.expire(200.0)
    assert run.closed()[-1].complete


@GENERATIONS
def test_skip_until_drops_the_earlier_life_of_a_snapshot_however_late(sequenced: bool) -> None:
    """The final iteration of a stopped snapshot (timestamped before the stop's ack) read
    after the snapshot was started again is dropped, counted before_start.*; the new life's
    iterations are kept, before and after it."""
    asm = IterationAssembler()
    asm.start_at_header(TOPIC)
    asm.skip_until(TOPIC, (T0 + 5) * 1_000_000 + 999_999)
    new1 = iteration("s", 1, [(T0 + 100, scalar_pvs(3))], sequenced=sequenced)
    old = iteration("s", 46, [(T0 + 5, scalar_pvs(3))], sequenced=sequenced)
    new2 = iteration("s", 2, [(T0 + 200, scalar_pvs(3))], sequenced=sequenced)
    for msgs in (new1 + old + new2, old + new1 + new2):
        asm.close(TOPIC)
        asm.skip_until(TOPIC, (T0 + 5) * 1_000_000 + 999_999)
        asm.counters.clear()
        events = asm.feed_many(records(TOPIC, msgs), 0.0)
        closed = [e.iter_index for e in events if isinstance(e, IterationClosed)]
        assert closed == [1, 2]
        assert all(e.iter_index != 46 for e in events)
        assert asm.counters["before_start.header"] == 1
        assert asm.counters["before_start.data"] == 3
        assert asm.counters["before_start.tail"] == 1


# -------------------------------------------------------------------------- resume priming
def _with_copy(sequenced: bool, at: int) -> list[Msg]:
    """Iteration 1 (header, PV:0..2, tail) with ``msgs[at]`` published twice (a producer
    retry: the copy right after it), then a whole iteration 2."""
    msgs = iteration("s", 1, [(T0, scalar_pvs(3))], sequenced=sequenced)
    msgs.insert(at + 1, msgs[at])
    return msgs + iteration("s", 2, [(T0 + 1000, scalar_pvs(3))], sequenced=sequenced)


@GENERATIONS
def test_a_resume_primed_from_the_open_iteration_drops_a_copy_of_a_recorded_message(
    sequenced: bool,
) -> None:
    """Killed after PV:1 (offset 2) was made durable; the producer's copy of it (offset 3)
    lies right after. The resume reads from the iteration's header (offset 0) with its
    offset 3: what is below only primes the duplicate check, so the copy is dropped as it
    would have been without the crash, and nothing recorded before is emitted again."""
    msgs = _with_copy(sequenced, 2)
    run = Run()
    run.asm.prime_until(TOPIC, {0: 3})
    run.feed(msgs)
    run.expire(10.0)  # sequenced: its grace period for the missing messages ends
    # as without the copy: the rest of an iteration cut by a crash
    assert kinds(run.events) == (
        ["O1", "V1:1", "O2", "V2:3", "C2:ok", "C1:missing_messages"] if sequenced
        else ["O1", "V1:1", "C1:no_header", "O2", "V2:3", "C2:ok"])
    assert [s.pv for v in run.values(1) for s in v.samples] == ["PV:2"]
    [first] = [c for c in run.closed() if c.iter_index == 1]
    assert run.asm.counters["duplicate"] == 1
    if sequenced:  # the header and PV:0, PV:1 are in the file written before the crash
        assert first.missing_messages == 3
    opened = [e for e in run.events if isinstance(e, IterationOpened)]
    assert [(e.iter_index, e.offset) for e in opened] == [(1, 4), (2, 6)]
    assert_clean(run.asm)


@GENERATIONS
def test_a_primed_copy_after_its_iterations_tail_opens_nothing(sequenced: bool) -> None:
    """The copy of PV:2 comes after the tail (a retried batch), the crash came after the
    tail was durable: the copy is a duplicate, not a headerless iteration of one value."""
    msgs = iteration("s", 1, [(T0, scalar_pvs(3))], sequenced=sequenced)
    msgs = [*msgs, msgs[3], *iteration("s", 2, [(T0 + 1000, scalar_pvs(3))],
                                        sequenced=sequenced)]
    run = Run()
    run.asm.prime_until(TOPIC, {0: 5})
    run.feed(msgs)
    assert kinds(run.events) == ["O2", "V2:3", "C2:ok"]
    assert run.asm.counters["duplicate"] == 1
    assert_clean(run.asm)


@GENERATIONS
def test_priming_is_not_taken_for_a_restarted_snapshots_same_iteration(sequenced: bool) -> None:
    """The snapshot was restarted after the crash: its new iteration 1 carries the same
    values and msg_seq numbers, but newer timestamps: nothing of it is a duplicate."""
    old = iteration("s", 1, [(T0, scalar_pvs(3))], sequenced=sequenced)
    new = iteration("s", 1, [(T0 + 60_000, scalar_pvs(3))], sequenced=sequenced)
    run = Run()
    run.asm.prime_until(TOPIC, {0: 3})
    run.feed([*old[:3], *new])
    assert kinds(run.events) == ["O1", "V1:3", "C1:ok"]
    assert run.asm.counters["duplicate"] == 0


def test_a_legacy_copy_without_time_stamp_is_kept_by_priming_too() -> None:
    """Without ``timeStamp`` equal bytes are a PV that took the same value again."""
    on = data_msg(1, T0, "a:bit", {"value": 1})
    run = Run()
    run.asm.prime_until(TOPIC, {0: 2})
    run.feed([header_msg("s", 1, T0), on, on, tail_msg("s", 1, T0)])
    assert kinds(run.events) == ["O1", "V1:1", "C1:no_header"]


@GENERATIONS
def test_priming_ends_and_the_hot_path_comes_back(
    sequenced: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    raws = [m.raw for m in _with_copy(sequenced, 2)]
    _hot_stream(sequenced, 20)  # the PV names are known (the hot path takes only those)
    asm = IterationAssembler()
    asm.prime_until(TOPIC, {0: 3})
    assert asm.feed_many(records(TOPIC, raws[:3]), 0.0) == []  # priming emits nothing
    asm.feed_many(records(TOPIC, raws[3:], start_offset=3), 0.0)
    general = _general_path_offsets(asm, monkeypatch)
    later = iteration("s", 3, [(T0 + 2000, scalar_pvs(20))], sequenced=sequenced)
    out = asm.feed_many(records(TOPIC, [m.raw for m in later], start_offset=100), 0.0)
    assert general == ([100, 120, 121] if sequenced else [100, 121])
    assert kinds(out) == ["O3", "V3:20", "C3:ok"]


@GENERATIONS
def test_a_copy_of_the_only_message_primed_is_dropped(sequenced: bool) -> None:
    """Killed right after the header and PV:0 (offset 1) were durable, PV:0's copy at 2."""
    msgs = _with_copy(sequenced, 1)
    run = Run()
    run.asm.prime_until(TOPIC, {0: 2})
    run.feed(msgs)
    assert [s.pv for v in run.values(1) for s in v.samples] == ["PV:1", "PV:2"]
    assert run.asm.counters["duplicate"] == 1


@GENERATIONS
@pytest.mark.parametrize("copied", [0, 4], ids=["header", "tail"])
def test_a_primed_copy_of_a_header_or_tail_opens_nothing(sequenced: bool, copied: int) -> None:
    """A retried batch copies iteration 1's header or tail after the tail the crash left
    durable: without the crash the copy is late and dropped; after it the copy must not
    open iteration 1 again (an empty, incomplete iteration in the resumed segment)."""
    msgs = iteration("s", 1, [(T0, scalar_pvs(3))], sequenced=sequenced)
    msgs = [*msgs, msgs[copied], *iteration("s", 2, [(T0 + 1000, scalar_pvs(3))],
                                            sequenced=sequenced)]
    run = Run()
    run.asm.prime_until(TOPIC, {0: 5})
    run.feed(msgs)
    run.expire(10.0)
    assert kinds(run.events) == ["O2", "V2:3", "C2:ok"]
    assert_clean(run.asm)
