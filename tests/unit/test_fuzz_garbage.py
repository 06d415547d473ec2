"""Property tests: garbage never escapes as an exception; valid-but-faulty streams keep the
event invariants (Opened, Values*, Closed per iteration; nothing after Closed)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgpack
from confluent_kafka import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from k2eg_sequences import MSGPACK_HEADERS, T0, iteration, ntscalar, pack

from recorder.client.assembler import IterationAssembler, _Topic
from recorder.client.events import IterationClosed, IterationOpened, ValuesReceived
from recorder.client.replies import ReplyTracker
from recorder.client.wire import DecodeError, Record, decode_reply, decode_snapshot_message

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=10),
    st.binary(max_size=10),
)
structures = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.text(max_size=8), children, max_size=5),
    ),
    max_leaves=20,
)
META = st.sampled_from(
    [
        "message_type",
        "timestamp",
        "iter_index",
        "msg_seq",
        "submission_seq",
        "last_submission_data",
        "total_messages",
        "error",
        "error_message",
        "snapshot_name",
        "header_timestamp",
        "reply_id",
        "publishing_topic",
        "message",
        "a:x",
    ]
)
# maps that look like gateway messages, with any values: reach deep into the decoders
near_valid = st.dictionaries(META, st.one_of(scalars, structures, st.integers(-2, 3)), max_size=8)
headers = st.one_of(
    st.just(MSGPACK_HEADERS),
    st.none(),
    st.lists(
        st.tuples(
            st.sampled_from(["k2eg-ser-type", "x"]),
            st.one_of(st.none(), st.binary(max_size=8), st.sampled_from([b"Msgpack", b"json"])),
        ),
        max_size=2,
    ),
)


def malformed_total(counter: Counter[str]) -> int:
    return sum(v for k, v in counter.items() if k.startswith("malformed."))


@SETTINGS
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=10))
def test_garbage_bytes(blobs: list[bytes]) -> None:
    asm = IterationAssembler()
    for i, blob in enumerate(blobs):
        try:
            decode_snapshot_message(blob, MSGPACK_HEADERS)
            valid = True
        except DecodeError:
            valid = False
        before = malformed_total(asm.counters)
        asm.feed(Record("t", 0, i, blob, MSGPACK_HEADERS), float(i))
        # counted exactly when it is not a decodable message
        assert (malformed_total(asm.counters) == before + 1) is (not valid)
        try:
            decode_reply(blob, MSGPACK_HEADERS)
        except DecodeError as exc:
            assert exc.reason
    asm.idle(100.0)
    asm.expire(1e9)
    asm.close()
    assert asm.counters["internal_error"] == 0 and asm.counters["malformed.internal"] == 0


@SETTINGS
@given(st.lists(st.tuples(st.one_of(near_valid, structures), headers), min_size=1, max_size=12))
def test_garbage_but_valid_msgpack(items: list[tuple[Any, Any]]) -> None:
    asm = IterationAssembler(max_open_per_topic=2, max_closed_per_topic=4)
    tracker = ReplyTracker()
    tracker.expect("r", "snapshot", deadline=5.0, multi=True)
    n_malformed_replies = 0
    for i, (obj, hdrs) in enumerate(items):
        try:
            raw = msgpack.packb(obj)
        except (TypeError, ValueError, OverflowError):
            continue
        events = asm.feed(Record("t", 0, i, raw, hdrs), float(i))
        for e in events:
            assert e.topic == "t"
        try:
            tracker.feed(decode_reply(raw, hdrs))
        except DecodeError as exc:
            n_malformed_replies += 1
            assert exc.reason
    asm.idle(0.0)
    asm.expire(1e9)
    asm.close()
    tracker.expire(1e9)
    assert asm.counters["internal_error"] == 0 and asm.counters["malformed.internal"] == 0
    assert tracker.pending == 0


def plan_messages(plan: list[tuple[bool, int, int]]) -> list[bytes]:
    """The messages of real iterations, one per ``(sequenced, n_pvs, n_batches)`` of ``plan``
    (sub-push batches of NTScalars)."""
    msgs: list[bytes] = []
    for n, (sequenced, n_pvs, n_batches) in enumerate(plan, start=1):
        batches = [
            (
                T0 + n * 10_000 + b * 1000,
                [(f"p{i}", ntscalar(float(i), nanos=b)) for i in range(n_pvs)],
            )
            for b in range(n_batches)
        ]
        msgs += [m.raw for m in iteration("s", n, batches, sequenced=sequenced)]
    return msgs


@SETTINGS
@given(
    plan=st.lists(
        st.tuples(st.booleans(), st.integers(1, 4), st.integers(1, 3)), min_size=1, max_size=6
    ),
    ops=st.lists(
        st.tuples(st.sampled_from(["keep", "drop", "dup", "swap"]), st.booleans()),
        min_size=0,
        max_size=80,
    ),
    idle_every=st.integers(1, 7),
)
def test_faulty_streams_keep_event_invariants(
    plan: list[tuple[bool, int, int]], ops: list[tuple[str, bool]], idle_every: int
) -> None:
    """Real iterations (legacy or sequenced, sub-push batches), then random drops, duplicates
    and swaps: the events must stay well-formed and nothing may crash."""
    msgs = plan_messages(plan)
    stream: list[bytes] = []
    for i, raw in enumerate(msgs):
        op, _ = ops[i] if i < len(ops) else ("keep", False)
        if op == "drop":
            continue
        stream.append(raw)
        if op == "dup":
            stream.append(raw)
        elif op == "swap" and len(stream) >= 2:
            stream[-1], stream[-2] = stream[-2], stream[-1]
    asm = IterationAssembler(max_open_per_topic=3, missing_grace_s=0.5)
    events = []
    for i, raw in enumerate(stream):
        events += asm.feed(Record("t", 0, i, raw, MSGPACK_HEADERS), i * 0.01)
        if i % idle_every == 0:
            events += asm.idle(i * 0.01)
    events += asm.expire(1e9)
    events += asm.close()
    assert asm.counters["internal_error"] == 0

    state: dict[int, str] = {}  # iter_index -> "open" / "closed" for the current run
    values: Counter[int] = Counter()
    batches: Counter[int] = Counter()
    for e in events:
        if isinstance(e, IterationOpened):
            assert state.get(e.iter_index) != "open"
            state[e.iter_index] = "open"
            values[e.iter_index] = 0
            batches[e.iter_index] = 0
        elif isinstance(e, ValuesReceived):
            assert state.get(e.iter_index) == "open"
            batches[e.iter_index] += 1
            assert e.batch == batches[e.iter_index]
            assert len(e.samples) > 0
            values[e.iter_index] += len(e.samples)
        else:
            assert isinstance(e, IterationClosed)
            assert state.get(e.iter_index) == "open"
            state[e.iter_index] = "closed"
            assert e.n_values == values[e.iter_index]
            assert e.n_batches == batches[e.iter_index]
            if e.complete:
                assert e.reason is None and (e.missing_messages or 0) == 0
            else:
                assert e.reason is not None
    assert "open" not in state.values()
    if stream == msgs:  # nothing was lost: every iteration is complete
        closed = [e for e in events if isinstance(e, IterationClosed)]
        assert len(closed) == len(plan) and all(c.complete for c in closed)


def test_huge_declared_sizes_do_not_allocate() -> None:
    asm = IterationAssembler()
    for blob in (b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff"):
        assert asm.feed(Record("t", 0, 0, blob, MSGPACK_HEADERS), 0.0) == []
    assert asm.counters["malformed.not_msgpack"] == 3
    raw = pack({"message_type": 1, "timestamp": T0, "iter_index": 1, "a": {"value": 1}})
    assert asm.feed(Record("t", 0, 1, raw[:-1], MSGPACK_HEADERS), 0.0) == []
    assert asm.counters["malformed.not_msgpack"] == 4


def _projection(events: list[Any]) -> list[Any]:
    out: list[Any] = []
    for e in events:
        if isinstance(e, ValuesReceived):
            samples = [(s.pv, s.data, s.float32_paths) for s in e.samples]
            head = ("V", e.iter_index, e.batch, e.timestamp_ns, e.submission_seq, e.late)
            out.append((*head, e.partition, e.offset, samples))
        else:
            out.append(e)
    return out


@SETTINGS
@given(
    plan=st.lists(
        st.tuples(st.booleans(), st.integers(1, 4), st.integers(1, 3)), min_size=1, max_size=5
    ),
    ops=st.lists(
        st.sampled_from(["keep", "drop", "dup", "swap", "cut", "extra", "flip", "other_topic"]),
        max_size=60,
    ),
    run_len=st.integers(1, 20),
    raw_mode=st.booleans(),
)
def test_batched_hot_path_equals_the_general_path(
    plan: list[tuple[bool, int, int]], ops: list[str], run_len: int, raw_mode: bool
) -> None:
    """``feed_many`` (hot path: parsed in place, validated by ``Unpacker.skip``) gives the very
    events and counters of the general path (full decoding of every record), on real streams
    with drops, duplicates, swaps, truncated and corrupted messages and other topics."""
    msgs = plan_messages(plan)
    for raw in msgs:  # the PV names are known: the hot path is taken
        decode_snapshot_message(raw, MSGPACK_HEADERS)
    recs: list[Record] = []
    for i, good in enumerate(msgs):
        op = ops[i] if i < len(ops) else "keep"
        topic = "u" if op == "other_topic" else "t"
        raw = good
        if op == "drop":
            continue
        if op == "cut":
            raw = raw[: len(raw) // 2 + 1]
        elif op == "extra":
            raw = good + b"\xc0"
        elif op == "flip":
            raw = raw[:-4] + bytes((raw[-4] ^ 0xFF,)) + raw[-3:]
        recs.append(Record(topic, 0, i, raw, MSGPACK_HEADERS))
        if op == "dup":
            recs.append(Record(topic, 0, i, raw, MSGPACK_HEADERS))
        elif op == "swap" and len(recs) >= 2:
            recs[-1], recs[-2] = recs[-2], recs[-1]

    reference = IterationAssembler(max_open_per_topic=3, missing_grace_s=0.5)
    expected: list[Any] = []
    for rec in recs:  # the general path only
        state = reference._topics.setdefault(rec.topic, _Topic(rec.topic, 10.0))
        reference._feed_one(state, rec, 0.0, expected)
    expected += reference.close()

    batched = IterationAssembler(max_open_per_topic=3, missing_grace_s=0.5)
    got: list[Any] = []
    for start in range(0, len(recs), run_len):
        chunk = recs[start : start + run_len]
        if raw_mode:  # as the Kafka adapter's raw mode hands them over
            messages = [
                Message(topic=r.topic, partition=r.partition, offset=r.offset, value=r.value,
                        headers=r.headers)
                for r in chunk
            ]
            got += batched.feed_many(messages, 0.0)
        else:
            got += batched.feed_many(chunk, 0.0)
    got += batched.close()
    assert _projection(got) == _projection(expected)
    assert +batched.counters == +reference.counters


def test_iter_index_beyond_int64_is_malformed_on_the_hot_path() -> None:
    """The batched hot path parses the gateway's layouts itself: an iter_index beyond int64
    (which files cannot keep) is refused there as on the general path."""
    from k2eg_sequences import data_msg

    for kw in ({}, {"msg_seq": 2, "sub": 1}):  # legacy, sequenced
        asm = IterationAssembler()
        msgs = [data_msg(1, T0, "hot", ntscalar(1.0), **kw),
                data_msg(2**64 - 1, T0, "hot", ntscalar(2.0), **kw)]
        events = asm.feed_many([Record("t", 0, i, raw, MSGPACK_HEADERS)
                                for i, raw in enumerate(msgs)], 0.0)
        assert asm.counters["malformed.bad_type"] == 1
        assert {e.iter_index for e in events} == {1}
