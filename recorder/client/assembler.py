"""Iteration assembler (pure code): snapshot-topic records in, iteration events out.

State is kept per ``(topic, iter_index)``, never in one "current iteration" variable: several
iterations of a topic may be open at once (a lost tail, reordering, late messages), and a lost
message never stalls the stream (the official client's failure mode, protocol §5.3 item 1).

Per iteration the assembler emits ``IterationOpened``, one ``ValuesReceived`` per data *batch*
and one ``IterationClosed`` (see :mod:`recorder.client.events`), in order per topic.

Batches
    A batch is consecutive data of one iteration with the same ``submission_seq`` (sequenced
    gateways) or, without it, the same batch ``timestamp`` (legacy gateways publish one
    timestamp per submission). A batch is emitted as soon as it is known to be over: its
    message with ``last_submission_data``, any message of another batch or iteration, a tail,
    a header, or :meth:`IterationAssembler.idle` (the caller's input is drained). So sub-push
    partial results flow out while the iteration is still open. Within a batch, sequenced data
    are reordered by ``msg_seq``. Data for a batch that was already emitted (interleaved
    batches from a multi-threaded gateway, reordering) form a new ``ValuesReceived`` with the
    same ``timestamp_ns``/``submission_seq`` and ``late=True`` (counted ``interleaved``).

Closing
    * tail, ``error != 0``: incomplete, ``GATEWAY_ERROR``;
    * tail, sequenced with ``total_messages`` (else its ``msg_seq``, N of N): complete when
      all ``total_messages - 2`` data and the header came; if some are missing the iteration
      stays open ``missing_grace_s`` for late messages (a header retried by the producer may
      land after the tail), then
      closes ``MISSING_MESSAGES`` with ``missing_messages`` set (``NO_HEADER`` when only the
      header is missing);
    * tail otherwise: complete, or ``MISSING_MESSAGES`` (``missing_messages`` set) when a
      data message of the iteration was dropped as larger than ``max_message_bytes``
      (counted ``malformed.too_large`` and logged), or ``NO_HEADER`` if the header never
      came (data or the tail itself then opened the iteration, ``header_timestamp_ns``
      from the storage-node ``header_timestamp`` key when present, else None);
    * a header of a new iteration closes every open iteration of its partition still waiting
      for its tail as ``NO_TAIL`` (the gateway publishes T(n) before H(n+1), protocol §3.9;
      Kafka keeps that order within a partition only);
    * no tail within the topic's timeout (``set_topic_timeout``, e.g. 2 x window + slack)
      of its opening or of its last data message: ``TIMEOUT`` (at
      :meth:`IterationAssembler.expire`). An iteration still being read (a triggered
      timedbuffered one is one submission of every value of its window, which can take longer
      than its timeout to arrive) is not cut while its data keeps coming;
    * more than ``max_open_per_topic`` open: the oldest is closed ``NO_TAIL`` (``evicted``), or
      as at the end of its grace period if its tail came;
    * :meth:`IterationAssembler.close`: ``CLOSED``.

Starting fresh
    :meth:`IterationAssembler.start_at_header` marks a topic read from "now" (not resumed from
    stored offsets): until its first header, data and tails of iterations whose header came
    before the read position are counted ``before_start.data``/``before_start.tail`` and
    dropped, so a new recording begins with a whole iteration and never re-records the tail
    end of one an earlier recording of the same snapshot already holds.
    :meth:`IterationAssembler.skip_until` also drops every message of the topic whose
    timestamp is at or before a given time (``before_start.header``/``data``/``tail``): those
    of the snapshot's life before a stop, such as its final iteration read only after the
    snapshot was started again.

Resuming
    :meth:`IterationAssembler.prime_until` marks a topic resumed after a crash at given
    offsets but read from earlier ones (the first message of the oldest iteration still open
    then): a record below its partition's offset was recorded already and is only
    remembered for the duplicate check (no event, no counter); a data message read after
    the offset that is a copy of one of them (a producer retry: sequenced, the same
    ``timestamp`` and ``msg_seq`` in the iteration; legacy, as below) is dropped as a
    ``duplicate``, as it is without a crash. What is remembered of an iteration is
    forgotten when it closes, when a header opens another iteration or the snapshot
    restarts; until then and until every partition is past its offset the topic takes the
    general path.

Late, duplicate, restarted
    * Data or a tail for an iteration already closed is counted ``late.data``/``late.tail``
      and dropped: the iteration is not reopened and no event is emitted, because a sink has
      finished that iteration at ``IterationClosed`` (the event order per iteration is always
      Opened, Values*, Closed). The close event already says the iteration was incomplete.
    * Duplicates are dropped and counted (``duplicate``, and in the iteration's
      ``duplicates``): sequenced, the same ``msg_seq`` twice in an iteration; legacy, the same
      PV with a byte-identical payload twice in an iteration (gateway producer retries, the
      same PV listed twice in a timedbuffered snapshot, §3.8), when the payload has a
      ``timeStamp`` (without one, e.g. ``pv_field_filter_list: [value]``, equal values are
      equal bytes: such payloads are all kept). A repeated header or tail is
      counted ``duplicate.header``/``duplicate.tail``.
    * ``iter_index`` restarts at 1 when a snapshot is stopped and started again. A header for
      a remembered (closed) or lower ``iter_index`` whose timestamp is newer than anything seen
      on the topic, or than a remembered iteration it would have come before (that one or a
      later one: the gateway's clock was stepped back when it restarted), starts a new run
      (``restart``); otherwise it is a late header and dropped.
      Data or a tail can start a new run only for an ``iter_index`` below the highest seen.

Input: :meth:`IterationAssembler.feed` (one record), :meth:`~IterationAssembler.feed_many` /
:meth:`~IterationAssembler.feed_run` (a consumed batch: :class:`~recorder.client.wire.Record`
or the Kafka messages themselves; data messages in the gateway's usual layout are parsed and
appended in one inlined pass, everything else takes the reference decoding; same events) and
:meth:`~IterationAssembler.feed_message` (already decoded).

Every anomaly is counted in :attr:`IterationAssembler.counters`; malformed records (see
:class:`recorder.client.wire.DecodeError`) are counted ``malformed.<reason>`` and skipped.
Memory is bounded by ``max_open_per_topic`` and ``max_closed_per_topic`` (closed iteration
indexes remembered for late-message detection).
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from collections.abc import Container, Mapping, Sequence
from operator import attrgetter
from typing import Any, Final

import msgpack
import structlog

from recorder.client.events import (
    IncompleteReason,
    IterationClosed,
    IterationEvent,
    IterationOpened,
    IterationStatus,
    ValuesReceived,
)
from recorder.client.throttle import RepeatThrottle
from recorder.client.values import PVSample
from recorder.client.wire import (
    _INT64_MAX,
    _NS_THRESHOLD,
    _PV_NAMES,
    _UINTS,
    MAX_MESSAGE_BYTES,
    SERIALIZATION_HEADER,
    Data,
    DecodeError,
    Header,
    RawMessage,
    Record,
    SnapshotMessage,
    Tail,
    _match_legacy,
    _match_sequenced,
    _uint_of,
    decode_snapshot_message,
    index_fits,
    kafka_time_ms,
)

__all__ = ["IterationAssembler"]

_log = structlog.get_logger(__name__)
_pv_of = attrgetter("pv")
_COMPLETE: Final = IterationStatus.COMPLETE
_INCOMPLETE: Final = IterationStatus.INCOMPLETE
# the gateway's one Kafka header, as it spells it (other spellings take the general path)
_GATEWAY_HEADERS: Final = [(SERIALIZATION_HEADER, b"Msgpack")]
_BIG_MESSAGE: Final = 1 << 20  # the validating Unpacker is replaced after a larger message
_ENVELOPE_READ: Final = 1 << 20  # what _envelope_of reads at most at once
# warnings about messages too large to record: a line a minute per topic at most
_THROTTLE: Final = RepeatThrottle(60.0)
# legacy duplicate detection keeps larger messages as a digest, not their bytes: an iteration
# is remembered until its tail, a timedbuffered window of images would stay in memory
FINGERPRINT_BYTES: Final = 4096
_RECORD_FIELDS: Final = tuple(
    attrgetter(name) for name in ("topic", "partition", "offset", "value", "headers")
)


def _envelope_of(value: Any) -> tuple[int | None, int | None]:
    """``(message_type, iter_index)`` of a snapshot message without decoding its PV values
    (keys are read and values skipped in small reads, up to the first value too large for
    that: the gateway puts both keys before the PV's); None for what is not found."""
    kind: int | None = None
    idx: int | None = None
    try:
        unpacker = msgpack.Unpacker(io.BytesIO(value), read_size=4096,
                                    max_buffer_size=_ENVELOPE_READ)
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if key in ("message_type", "iter_index"):
                item = unpacker.unpack()
                if item.__class__ is int:
                    if key == "message_type":
                        kind = item
                    else:
                        idx = item
                if kind is not None and idx is not None:
                    break
            else:
                unpacker.skip()
    except Exception:  # not msgpack, or a value too large to skip in small reads
        pass
    return kind, idx


def _fingerprint(raw: bytes) -> bytes:
    """What the legacy duplicate check keeps of a message: its bytes, or for a large one a
    128-bit digest (equal messages, equal digests; distinct ones collide with odds 2**-128,
    and a digest is never mistaken for a message: messages are longer)."""
    if len(raw) <= FINGERPRINT_BYTES:
        return raw
    return hashlib.blake2b(raw, digest_size=16).digest()


class _Iteration:
    __slots__ = (
        "data_seqs",
        "deadline",
        "dropped",
        "duplicates",
        "emitted",
        "error",
        "error_message",
        "fingerprints",
        "grace_deadline",
        "header_seen",
        "header_ts",
        "iter_index",
        "last_ts",
        "n_batches",
        "n_data",
        "n_values",
        "offsets",
        "partition",
        "pvs",
        "snapshot_name",
        "tail_kafka_ms",
        "tail_partition",
        "tail_seen",
        "tail_ts",
        "total_messages",
    )

    def __init__(self, iter_index: int, partition: int, offset: int, deadline: float) -> None:
        self.iter_index = iter_index
        self.partition = partition
        # partition -> highest offset of the iteration's messages there (a topic of several
        # partitions may hold one iteration in two: events never mix their offsets)
        self.offsets = {partition: offset}
        self.tail_partition: int | None = None
        self.deadline = deadline
        self.grace_deadline: float | None = None
        self.snapshot_name: str | None = None
        self.header_seen = False
        self.header_ts: int | None = None
        self.tail_seen = False
        self.tail_ts: int | None = None
        self.tail_kafka_ms: int | None = None  # the tail's Kafka message timestamp
        self.error = 0
        self.error_message = ""
        self.total_messages: int | None = None
        self.last_ts = 0  # newest gateway timestamp seen in this iteration
        self.n_data = 0  # data messages accepted
        self.n_values = 0  # values emitted
        self.n_batches = 0
        self.duplicates = 0
        self.dropped = 0  # data messages dropped as too large (their values are missing)
        self.pvs: set[str] = set()
        self.emitted: set[int] = set()  # batch keys already emitted
        self.data_seqs: set[int] = set()  # sequenced: msg_seq of accepted data
        self.fingerprints: dict[Any, Any] | None = None  # legacy duplicate detection


class _Batch:
    __slots__ = (
        "iteration",
        "key",
        "last_seq",
        "late",
        "nbytes",
        "offset",
        "ordered",
        "partition",
        "samples",
        "seqs",
        "submission_seq",
        "timestamp_ns",
    )

    def __init__(  # noqa: PLR0917
        self,
        iteration: _Iteration,
        key: int,
        timestamp_ns: int,
        submission_seq: int | None,
        late: bool,
        partition: int,
    ) -> None:
        self.iteration = iteration
        self.partition = partition
        self.key = key
        self.timestamp_ns = timestamp_ns
        self.submission_seq = submission_seq
        self.late = late
        self.samples: list[PVSample] = []
        self.seqs: list[int] = []
        self.ordered = True
        self.last_seq = -1
        self.offset = -1
        self.nbytes = 0  # of the messages that carried the samples


def _has_time_stamp(msg: Data) -> bool:
    """Whether a data message's PV payload has an EPICS time stamp: only then can a legacy
    producer retry (byte-identical) be told from the PV taking the same value again."""
    return isinstance(msg.sample.data.get("timeStamp"), Mapping)


def _mark_key(msg: Header | Data | Tail) -> tuple[str, int]:
    """What a primed copy of a header or tail is known by (see ``_Primed.copies``)."""
    return (msg.__class__.__name__, msg.timestamp_ns)


class _Primed:
    """What a resumed topic read below its resume offsets (``prime_until``)."""

    __slots__ = ("copies", "until")

    def __init__(self, until: Mapping[int, int]) -> None:
        # partition -> the resume offset; a partition is dropped once read up to it
        self.until = dict(until)
        # iter_index -> data messages recorded before the crash: sequenced (timestamp,
        # msg_seq), legacy (PV, fingerprint of the message bytes)
        self.copies: dict[int, set[tuple[Any, Any]]] = {}


class _Topic:
    __slots__ = (
        "closed", "max_index", "max_ts", "name", "open", "pending", "primed", "timeout_s",
    )

    def __init__(self, name: str, timeout_s: float) -> None:
        self.name = name
        self.timeout_s = timeout_s
        self.open: dict[int, _Iteration] = {}
        self.closed: dict[int, int] = {}  # iter_index -> newest timestamp seen (bounded)
        self.pending: _Batch | None = None
        self.max_index: int | None = None
        self.max_ts = -1
        self.primed: _Primed | None = None  # a resume's priming, while it lasts


class IterationAssembler:
    """Turns snapshot-topic records into iteration events; see the module docstring."""

    def __init__(
        self,
        *,
        iteration_timeout_s: float = 10.0,
        max_open_per_topic: int = 4,
        max_closed_per_topic: int = 1024,
        missing_grace_s: float = 1.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        if max_open_per_topic < 1:
            raise ValueError("max_open_per_topic must be >= 1")
        self.iteration_timeout_s = iteration_timeout_s
        self.max_open_per_topic = max_open_per_topic
        self.max_closed_per_topic = max(1, max_closed_per_topic)
        self.missing_grace_s = missing_grace_s
        self.max_message_bytes = max_message_bytes
        self.counters: Counter[str] = Counter()
        self._topics: dict[str, _Topic] = {}
        self._timeouts: dict[str, float] = {}
        self._before_start: set[str] = set()  # topics that drop headless data until a header
        # topic -> ns: messages timestamped at or before it are of an earlier life (skip_until)
        self._skip_until: dict[str, int] = {}
        self._unpacker = msgpack.Unpacker()  # validates PV maps on the hot path (skip only)
        # no layout yet: 0xc1 is never valid msgpack, so a message starting with it fails the
        # validation below and takes the general path
        self._layout: tuple[bytes, bytes, int, int, int | None] = (b"\xc1", b"", 0, 0, None)

    # ---------------------------------------------------------------------------------- API
    def set_topic_timeout(self, topic: str, seconds: float) -> None:
        """Per-iteration timeout for ``topic`` (applies to iterations opened from now on)."""
        self._timeouts[topic] = seconds
        state = self._topics.get(topic)
        if state is not None:
            state.timeout_s = seconds

    def start_at_header(self, topic: str) -> None:
        """``topic`` is read from "now": drop data and tails of iterations already under way
        (no header read) until the topic's first header (``before_start.*``)."""
        self._before_start.add(topic)

    def skip_until(self, topic: str, timestamp_ns: int) -> None:
        """Drop the messages of ``topic`` whose (gateway) timestamp is at or before
        ``timestamp_ns``, counted ``before_start.<what>``: the snapshot was stopped then (its
        stop acknowledged) and started again, so they belong to its earlier life, however late
        they are read (a final iteration the gateway queued before its ack)."""
        self._skip_until[topic] = timestamp_ns

    def prime_until(self, topic: str, offsets: Mapping[int, int]) -> None:
        """``topic`` resumes at ``offsets`` (partition -> offset) but is read from earlier
        ones: records of a partition below its offset here were recorded already; they only
        prime the duplicate check (see "Resuming" in the module docstring)."""
        state = self._topic(topic)
        state.primed = _Primed(offsets) if offsets else None

    def priming_until(self, topic: str, partition: int) -> int:
        """The resume offset up to which ``topic``'s ``partition`` still primes (-1: none)."""
        state = self._topics.get(topic)
        primed = state.primed if state is not None else None
        return primed.until.get(partition, -1) if primed is not None else -1

    def unprime(self, topic: str, partition: int) -> None:
        """``topic``'s ``partition`` no longer reaches its resume offset (the topic was
        deleted and created again): nothing it holds was recorded, none of it primes."""
        state = self._topics.get(topic)
        if state is not None and state.primed is not None:
            state.primed.until.pop(partition, None)
            self._end_priming(state)

    def open_iterations(self, topic: str) -> list[int]:
        """``iter_index`` of the iterations currently open on ``topic`` (oldest first)."""
        state = self._topics.get(topic)
        return list(state.open) if state is not None else []

    def _topic(self, topic: str) -> _Topic:
        state = self._topics.get(topic)
        if state is None:
            state = self._topics[topic] = _Topic(
                topic, self._timeouts.get(topic, self.iteration_timeout_s)
            )
        return state

    def feed(self, record: Record, now: float) -> list[IterationEvent]:
        """Decode and assemble one record; malformed records are counted and give ``[]``."""
        out: list[IterationEvent] = []
        self.feed_run((record,), 0, now, out)
        return out

    def feed_many(
        self, records: Sequence[Record] | Sequence[RawMessage], now: float
    ) -> list[IterationEvent]:
        """:meth:`feed` every record, in order, and return all the events."""
        out: list[IterationEvent] = []
        i, n = 0, len(records)
        while i < n:
            i = self.feed_run(records, i, now, out)
        return out

    def feed_run(
        self,
        records: Sequence[Record] | Sequence[RawMessage],
        start: int,
        now: float,
        out: list[IterationEvent],
    ) -> int:
        """Feed ``records[start:]`` as long as they are of ``records[start].topic``.

        Events are appended to ``out``; returns the index of the first record not fed
        (another topic's, or ``len(records)``). Same result as :meth:`feed` of each record.
        ``records`` are :class:`Record` or, from the Kafka adapter's raw mode, the consumed
        messages themselves (:class:`~recorder.client.wire.RawMessage`: the same fields,
        read through methods; not mixed within one call).

        The hot path: a data message in the gateway's common layouts (legacy, 4 keys;
        sequenced without ``last_submission_data``, 6 keys), with the gateway's one Kafka
        header and a PV name already seen (wire's name cache), is parsed here: its metadata
        by comparing bytes with the previous such message's (same map size, timestamp,
        iter_index, submission_seq; else one regex), its whole bytes validated as exactly
        one complete msgpack object by a C-level ``Unpacker.skip`` on this assembler's own
        Unpacker, so a malformed message is never accepted. If the pending batch is its
        iteration's, it is appended inline (no ``Data``, no call); otherwise it goes to the
        data handler as a ``Data``. Everything else, including any message that fails a
        check, takes the general path (:func:`decode_snapshot_message`, then the message
        handlers), which is the reference behaviour and counts what is malformed.
        """
        n = len(records)
        if start >= n:
            return start
        first = records[start]
        if first.__class__ is Record:
            topic_of, partition_of, offset_of, value_of, headers_of = _RECORD_FIELDS
        else:  # a Kafka message (the adapter's raw mode): the same fields, through methods
            cls: Any = first.__class__
            topic_of, partition_of, offset_of, value_of, headers_of = (
                cls.topic,
                cls.partition,
                cls.offset,
                cls.value,
                cls.headers,
            )
        topic = topic_of(first)
        state = self._topic(topic)
        if state.primed is not None:  # a resume's priming: the general path, record by record
            return self._feed_primed(records, start, state, now, out)
        open_ = state.open
        counters = self.counters
        skip_until = self._skip_until.get(topic, 0)
        match_seq = _match_sequenced
        match_legacy = _match_legacy
        uints = _UINTS
        names = _PV_NAMES
        from_raw = PVSample.from_raw
        deadline = now + state.timeout_s  # of an iteration whose data comes in now
        max_bytes = self.max_message_bytes
        gateway_headers = _GATEWAY_HEADERS
        unpacker = self._unpacker
        skip_feed = unpacker.feed
        skip = unpacker.skip
        consumed = unpacker.tell()
        # the metadata layout of the last hot message: its bytes up to msg_seq's value
        # (sequenced) or to the PV key (legacy), its submission_seq key + value, the values
        prefix, psub_bytes, pts, pidx, psub = self._layout
        plen = len(prefix)
        ts = idx = 0
        seq: int | None = None
        sub: int | None = None
        kstart = 0
        # the iteration and batch of the last hot message, valid while no general path ran
        hot_idx: int | None = None
        hot_key: int | None = None
        hot_part = -1
        it: Any = None
        batch: Any = None
        data_seqs: set[int] = set()
        append_sample: Any = None
        append_seq: Any = None
        i = start
        while i < n:
            rec = records[i]
            if topic_of(rec) != topic:
                break
            i += 1
            raw: Any = value_of(rec)
            kend = 0
            if (
                headers_of(rec) == gateway_headers
                and raw.__class__ is bytes
                and len(raw) <= max_bytes
            ):
                try:
                    # 1. the metadata layout of the previous hot message (same map size,
                    # timestamp, iter_index; same submission_seq): bytes compared, not parsed
                    if raw.startswith(prefix):
                        pos = plen
                        if psub is not None:  # sequenced: msg_seq, then submission_seq
                            c = raw[pos]
                            if c < 0x80:
                                seq = c
                                pos += 1
                            elif c == 0xCD:
                                seq = raw[pos + 1] << 8 | raw[pos + 2]
                                pos += 3
                            elif c == 0xCC:
                                seq = raw[pos + 1]
                                pos += 2
                            elif c == 0xCE:
                                seq = int.from_bytes(raw[pos + 1 : pos + 5], "big")
                                pos += 5
                            else:
                                pos = 0
                            if pos and raw.startswith(psub_bytes, pos):
                                pos += len(psub_bytes)
                            else:
                                pos = 0
                        else:
                            seq = None
                        if pos:
                            c = raw[pos]
                            if 0xA0 <= c <= 0xBF:
                                kstart = pos + 1
                                kend = kstart + (c & 0x1F)
                            elif c == 0xD9:
                                kstart = pos + 2
                                kend = kstart + raw[pos + 1]
                            ts, idx, sub = pts, pidx, psub
                    # 2. the regex (the gateway's common layouts), which becomes the new layout
                    if not kend:
                        m = None
                        b0 = raw[0]
                        if b0 == 0x86:
                            m = match_seq(raw, 1)
                        elif b0 == 0x84:
                            m = match_legacy(raw, 1)
                        if m is not None and not index_fits(m.group(2)):
                            m = None  # an iter_index beyond int64: the general path says so
                        if m is not None:
                            if b0 == 0x86:
                                ts_b, idx_b, seq_b, sub_b, key_b = m.groups()
                                seq = uints.get(seq_b)
                                if seq is None:
                                    seq = _uint_of(seq_b)
                                sub = uints.get(sub_b)
                                if sub is None:
                                    sub = _uint_of(sub_b)
                                prefix = raw[: m.start(3)]
                                psub_bytes = raw[m.start(4) - 15 : m.end(4)]
                            else:
                                ts_b, idx_b, key_b = m.groups()
                                seq = sub = None
                                prefix = raw[: m.end(2)]
                            plen = len(prefix)
                            value = uints.get(ts_b)
                            ts = _uint_of(ts_b) if value is None else value
                            if ts <= _NS_THRESHOLD:
                                ts *= 1_000_000
                            if ts > _INT64_MAX:  # as wire.to_ns: not known
                                ts = 0
                            value = uints.get(idx_b)
                            idx = _uint_of(idx_b) if value is None else value
                            pts, pidx, psub = ts, idx, sub
                            kstart = m.end()
                            c = key_b[0]
                            kend = kstart + (
                                c & 0x1F if c < 0xC0 else int.from_bytes(key_b[1:], "big")
                            )
                except IndexError:  # truncated: the general path says why
                    kend = 0
            if kend:
                size = len(raw)
                pv = names.get(raw[kstart:kend]) if kend < size else None
                c = raw[kend] if pv is not None else 0
                if 0x80 <= c <= 0x8F or c == 0xDE or c == 0xDF:  # noqa: PLR1714
                    # the whole message must be exactly one complete msgpack object
                    try:
                        skip_feed(raw)
                        skip()
                        done = unpacker.tell()
                    except Exception:
                        done = -1
                    if done - consumed != size:
                        kend = 0  # malformed (or trailing bytes): the general path says why
                        consumed = -1
                    elif size > _BIG_MESSAGE:
                        consumed = -1
                    else:
                        consumed = done
                    if consumed < 0:
                        unpacker = self._new_unpacker()
                        skip_feed = unpacker.feed
                        skip = unpacker.skip
                        consumed = 0
                else:
                    kend = 0
            if not kend:
                hot_idx = None
                if rec.__class__ is not Record:
                    rec = Record(topic, partition_of(rec), offset_of(rec), raw, headers_of(rec),
                                 kafka_time_ms(rec))
                self._feed_one(state, rec, now, out)
                continue
            if 0 < ts <= skip_until:  # of the snapshot's earlier life (skip_until)
                counters["before_start.data"] += 1
                continue
            key = ~ts if sub is None else sub
            sample = from_raw(pv, raw, kend)  # type: ignore[arg-type]
            part = partition_of(rec)
            try:
                if idx != hot_idx or key != hot_key or part != hot_part:
                    # not the batch of the previous hot message: is one pending for it?
                    it = open_.get(idx)
                    batch = state.pending
                    if (
                        it is None
                        or batch is None
                        or batch.iteration is not it
                        or batch.key != key
                        or batch.partition != part
                        or it.grace_deadline is not None
                    ):
                        hot_idx = None
                        self._on_data(
                            state,
                            part,
                            offset_of(rec),
                            Data(idx, ts, sample, seq, sub, False, None, raw),
                            now,
                            out,
                        )
                        continue
                    # valid until the general path runs (only it flushes or closes)
                    hot_idx, hot_key, hot_part, data_seqs = idx, key, part, it.data_seqs
                    append_sample, append_seq = batch.samples.append, batch.seqs.append
                # _on_data, inlined: data appended to the pending batch of its iteration
                if ts > state.max_ts:  # noqa: PLR1730 (hot path: no call)
                    state.max_ts = ts
                if seq is not None:
                    if seq in data_seqs:
                        counters["duplicate"] += 1
                        it.duplicates += 1
                        continue
                    data_seqs.add(seq)
                    append_seq(seq)
                    if seq < batch.last_seq:
                        batch.ordered = False
                    batch.last_seq = seq
                else:
                    seen = it.fingerprints
                    if seen is None:
                        it.fingerprints = {pv: raw if size <= FINGERPRINT_BYTES
                                           else _fingerprint(raw)}
                    elif pv not in seen:
                        seen[pv] = raw if size <= FINGERPRINT_BYTES else _fingerprint(raw)
                    elif self._is_legacy_duplicate(
                        it, Data(idx, ts, sample, None, None, False, None, raw)
                    ):
                        counters["duplicate"] += 1
                        it.duplicates += 1
                        continue
                it.n_data += 1
                it.deadline = deadline
                append_sample(sample)
                batch.nbytes += size
                offset = offset_of(rec)
                if offset > batch.offset:  # noqa: PLR1730 (hot path: no call)
                    batch.offset = offset
            except Exception:  # never let one message stop the recorder; counted and logged
                hot_idx = None
                counters["internal_error"] += 1
                _log.exception("iteration assembly failed", topic=topic, offset=offset_of(rec))
        self._layout = (prefix, psub_bytes, pts, pidx, psub)
        return i

    def _feed_primed(
        self,
        records: Sequence[Record] | Sequence[RawMessage],
        start: int,
        state: _Topic,
        now: float,
        out: list[IterationEvent],
    ) -> int:
        """:meth:`feed_run` while ``state`` is primed: every record takes the general path;
        returns once priming ended (the rest of the run takes the fast path again)."""
        topic = state.name
        i, n = start, len(records)
        while i < n and state.primed is not None:
            rec: Any = records[i]
            if rec.__class__ is not Record:
                if rec.topic() != topic:
                    break
                rec = Record(topic, rec.partition(), rec.offset(), rec.value(), rec.headers(),
                             kafka_time_ms(rec))
            elif rec.topic != topic:
                break
            i += 1
            self._feed_one(state, rec, now, out)
        return i

    def _prime(self, state: _Topic, record: Record) -> bool:
        """Whether ``record`` is below its partition's resume offset (then it only primes
        the duplicate check); a partition read up to its resume offset is done priming."""
        primed = state.primed
        assert primed is not None
        partition, offset = record.partition, record.offset
        until = primed.until.get(partition)
        if until is None:
            return False
        if offset < until:
            try:
                msg = decode_snapshot_message(
                    record.value, record.headers, max_bytes=self.max_message_bytes
                )
            except Exception:  # counted when it was read before the crash
                msg = None
            if msg.__class__ is Data:
                key = self._copy_key(msg)
                if key is not None:
                    primed.copies.setdefault(msg.iter_index, set()).add(key)
            elif msg is not None:  # a header or tail: its copy must not open the iteration
                primed.copies.setdefault(msg.iter_index, set()).add(_mark_key(msg))
        if offset >= until - 1:
            del primed.until[partition]
            self._end_priming(state)
        return offset < until

    @staticmethod
    def _copy_key(msg: Data) -> tuple[Any, Any] | None:
        """What identifies a data message's producer-retry copy (None: nothing, see
        :meth:`_is_legacy_duplicate`)."""
        if msg.msg_seq is not None:
            return (msg.timestamp_ns, msg.msg_seq)
        if msg.raw is None or not _has_time_stamp(msg):
            return None
        return (msg.sample.pv, _fingerprint(msg.raw))

    def _primed_copy(self, state: _Topic, primed: _Primed, msg: Data) -> bool:
        """Whether ``msg`` is a copy of a message recorded before the resume: then counted
        as a duplicate (in its iteration if it is open)."""
        copies = primed.copies.get(msg.iter_index)
        if not copies or self._copy_key(msg) not in copies:
            return False
        it = state.open.get(msg.iter_index)
        if it is None:
            self.counters["duplicate"] += 1
        else:
            self._duplicate(it, "duplicate")
        return True

    def _primed_mark(self, state: _Topic, msg: Header | Tail) -> bool:
        """Whether ``msg`` is a copy of a header or tail read before the resume while its
        iteration is not open (then counted ``late.<what>``, as without the crash)."""
        primed = state.primed
        if primed is None or not primed.copies or msg.iter_index in state.open:
            return False
        copies = primed.copies.get(msg.iter_index)
        if not copies or _mark_key(msg) not in copies:
            return False
        self.counters["late.header" if msg.__class__ is Header else "late.tail"] += 1
        return True

    @staticmethod
    def _end_priming(state: _Topic) -> None:
        primed = state.primed
        if primed is not None and not primed.until and not primed.copies:
            state.primed = None

    def _forget_primed(self, state: _Topic, keep: int | None = None) -> None:
        """Forget what priming remembered of every iteration but ``keep``."""
        primed = state.primed
        if primed is None:
            return
        kept = primed.copies.get(keep) if keep is not None else None
        primed.copies = {} if kept is None or keep is None else {keep: kept}
        self._end_priming(state)

    def _new_unpacker(self) -> msgpack.Unpacker:
        """A fresh Unpacker for validating PV maps (after an error it may hold unread bytes;
        after a big message it holds a big buffer)."""
        unpacker = self._unpacker = msgpack.Unpacker()
        return unpacker

    def _feed_one(
        self, state: _Topic, record: Record, now: float, out: list[IterationEvent]
    ) -> None:
        """The general path of one record: full decoding, then the message handlers."""
        if state.primed is not None and self._prime(state, record):
            return
        try:
            msg = decode_snapshot_message(
                record.value, record.headers, max_bytes=self.max_message_bytes
            )
        except DecodeError as exc:
            self.counters["malformed." + exc.reason] += 1
            if exc.reason == "too_large":
                self._too_large(state, record)
            return
        except Exception:  # a decoder bug must not stop the recorder
            self.counters["malformed.internal"] += 1
            _log.exception("snapshot message decoding failed", topic=record.topic)
            return
        try:
            cls = msg.__class__
            if self._of_earlier_life(state.name, msg):
                return
            if cls is Data:
                self._on_data(state, record.partition, record.offset, msg, now, out)  # type: ignore[arg-type]
            elif cls is Header:
                self._on_header(state, record.partition, record.offset, msg, now, out)  # type: ignore[arg-type]
            elif cls is Tail:
                self._on_tail(state, record.partition, record.offset, msg, now, out,  # type: ignore[arg-type]
                              record.timestamp_ms)
            else:  # pragma: no cover - the decoder returns only those
                self.counters["malformed.unknown_message_type"] += 1
        except Exception:  # never let one message stop the recorder; counted and logged
            self.counters["internal_error"] += 1
            _log.exception("iteration assembly failed", topic=record.topic, offset=record.offset)

    def _too_large(self, state: _Topic, record: Record) -> None:
        """A message over ``max_message_bytes`` was dropped: logged, and if it is data of an
        open iteration, that iteration lacks a value and closes ``MISSING_MESSAGES`` (a
        legacy gateway's tail does not say how many messages it sent)."""
        kind, idx = _envelope_of(record.value)
        size = len(record.value) if record.value is not None else 0
        fields = _THROTTLE.log_fields(("too_large", state.name))
        if fields is not None:
            _log.warning("snapshot message larger than the client takes: dropped, its values "
                         "are missing from the recording", topic=state.name,
                         offset=record.offset, bytes=size, max_bytes=self.max_message_bytes,
                         iter_index=idx, **fields)
        if kind == 1 and idx is not None:
            it = state.open.get(idx)
            if it is not None:
                it.dropped += 1

    def _of_earlier_life(self, topic: str, msg: SnapshotMessage) -> bool:
        """Whether ``msg`` is of the snapshot's life before its stop (:meth:`skip_until`):
        then counted ``before_start.<what>``, to be dropped."""
        until = self._skip_until.get(topic, 0)
        if not until or not 0 < getattr(msg, "timestamp_ns", 0) <= until:
            return False
        cls = msg.__class__
        what = "data" if cls is Data else "header" if cls is Header else "tail"
        self.counters["before_start." + what] += 1
        return True

    def feed_message(
        self, topic: str, partition: int, offset: int, msg: SnapshotMessage, now: float
    ) -> list[IterationEvent]:
        """Assemble one decoded message (``feed`` without the decoding)."""
        state = self._topic(topic)
        out: list[IterationEvent] = []
        try:
            cls = msg.__class__
            if self._of_earlier_life(state.name, msg):
                return out
            if cls is Data:
                self._on_data(state, partition, offset, msg, now, out)  # type: ignore[arg-type]
            elif cls is Header:
                self._on_header(state, partition, offset, msg, now, out)  # type: ignore[arg-type]
            elif cls is Tail:
                self._on_tail(state, partition, offset, msg, now, out)  # type: ignore[arg-type]
            else:
                self.counters["malformed.unknown_message_type"] += 1
        except Exception:  # never let one message stop the recorder; counted and logged
            self.counters["internal_error"] += 1
            _log.exception("iteration assembly failed", topic=topic, offset=offset)
        return out

    def idle(self, now: float) -> list[IterationEvent]:
        """The caller's input is drained: emit every pending (partial) batch."""
        out: list[IterationEvent] = []
        for state in self._topics.values():
            if state.pending is not None:
                self._flush(state, out)
        return out

    def defer(self, seconds: float, topic: str | None = None) -> None:
        """Move every open iteration's deadlines (of ``topic``; every topic's if None)
        ``seconds`` later: time during which the caller could not read (Kafka unreachable,
        the topic paused) does not count against an iteration, whose messages may be in Kafka
        already."""
        if topic is None:
            states = list(self._topics.values())
        else:
            state = self._topics.get(topic)
            states = [] if state is None else [state]
        for state in states:
            for it in state.open.values():
                it.deadline += seconds
                if it.grace_deadline is not None:
                    it.grace_deadline += seconds

    def expire(self, now: float, frozen: Container[str] = ()) -> list[IterationEvent]:
        """Close iterations past their deadline (``TIMEOUT``) or past their grace period for
        missing messages (``MISSING_MESSAGES``); not those of the ``frozen`` topics (not being
        read now: their deadlines move by the paused time when reading resumes, :meth:`defer`)."""
        out: list[IterationEvent] = []
        for state in self._topics.values():
            if state.name in frozen:
                continue
            for it in list(state.open.values()):
                if it.grace_deadline is not None:
                    if now >= it.grace_deadline or now >= it.deadline:
                        self._close(state, it, self._grace_reason(it), out)
                elif now >= it.deadline:
                    self._close(state, it, IncompleteReason.TIMEOUT, out)
        return out

    def close(self, topic: str | None = None) -> list[IterationEvent]:
        """Close the open iterations of ``topic`` (every topic if None) as ``CLOSED`` and
        forget the topic's state."""
        out: list[IterationEvent] = []
        names = list(self._topics) if topic is None else [topic]
        if topic is None:
            self._before_start.clear()
            self._skip_until.clear()
        for name in names:
            self._before_start.discard(name)
            self._skip_until.pop(name, None)
            state = self._topics.pop(name, None)
            if state is None:
                continue
            if state.pending is not None:
                self._flush(state, out)
            for it in list(state.open.values()):
                self._close(state, it, IncompleteReason.CLOSED, out)
        return out

    # ------------------------------------------------------------------------------ messages
    def _on_data(  # noqa: PLR0917
        self,
        state: _Topic,
        partition: int,
        offset: int,
        msg: Data,
        now: float,
        out: list[IterationEvent],
    ) -> None:
        ts = msg.timestamp_ns
        primed = state.primed
        if primed is not None and primed.copies and self._primed_copy(state, primed, msg):
            return
        it = self._iteration_of(state, partition, offset, msg, now, "data", out)
        if it is None:
            return
        # duplicates
        seq = msg.msg_seq
        sample = msg.sample
        if seq is not None:
            if seq in it.data_seqs:
                self._duplicate(it, "duplicate")
                return
            it.data_seqs.add(seq)
        else:
            # legacy: same PV and byte-identical message (inlined _is_legacy_duplicate)
            raw = msg.raw
            seen = it.fingerprints
            if raw is None or seen is None or sample.pv not in seen:
                if raw is None:
                    if self._is_legacy_duplicate(it, msg):
                        self._duplicate(it, "duplicate")
                        return
                elif seen is None:
                    it.fingerprints = {sample.pv: _fingerprint(raw)}
                else:
                    seen[sample.pv] = _fingerprint(raw)
            elif self._is_legacy_duplicate(it, msg):
                self._duplicate(it, "duplicate")
                return
        it.n_data += 1
        it.deadline = now + state.timeout_s  # its data still comes in: not stuck
        # batch (the iteration's offset and newest timestamp are updated when it is flushed)
        sub = msg.submission_seq
        key = sub if sub is not None else ~ts
        batch = state.pending
        if (
            batch is None
            or batch.iteration is not it
            or batch.key != key
            or batch.partition != partition
        ):
            if batch is not None:
                self._flush(state, out)
            late = key in it.emitted
            if late:
                self.counters["interleaved"] += 1
            batch = state.pending = _Batch(it, key, ts, sub, late, partition)
        batch.samples.append(sample)
        if msg.raw is not None:
            batch.nbytes += len(msg.raw)
        if seq is not None:
            batch.seqs.append(seq)
            if seq < batch.last_seq:
                batch.ordered = False
            batch.last_seq = seq
        if offset > batch.offset:  # noqa: PLR1730 (hot path: no call)
            batch.offset = offset
        if msg.last_submission_data:
            self._flush(state, out)
        if it.grace_deadline is not None:
            self._settle_after_tail(state, it, now, out)

    def _is_legacy_duplicate(self, it: _Iteration, msg: Data) -> bool:
        """Same PV, byte-identical payload, already in this iteration (legacy stream), and a
        payload with an EPICS time stamp: without one (``pv_field_filter_list`` without
        ``timeStamp``) two events of a PV that took the same value again are byte-identical
        too, and a retry cannot be told from them; both are kept (checked only on a match:
        rare, and the sample is decoded only then)."""
        if not self._seen_in_iteration(it, msg):
            return False
        return _has_time_stamp(msg)

    def _seen_in_iteration(self, it: _Iteration, msg: Data) -> bool:
        """Same PV, byte-identical payload, already in this iteration (legacy stream).

        With the message bytes (decoded records) the fingerprint is the PV name and the
        message bytes are compared (same bytes = same PV, batch timestamp and payload; nothing
        is decoded; messages above :data:`FINGERPRINT_BYTES` by their digest). Without them
        (``feed_message`` with a hand-built message) the PV's EPICS timestamp narrows the
        search and the decoded structures are compared.
        """
        sample = msg.sample
        payload: Any = msg.raw
        if payload is not None:
            fingerprint: Any = sample.pv
            payload = _fingerprint(payload)
        else:
            payload = sample.data
            stamp = payload.get("timeStamp")
            if stamp.__class__ is dict:
                fingerprint = (sample.pv, stamp.get("secondsPastEpoch"), stamp.get("nanoseconds"))
            else:
                fingerprint = (sample.pv, None, None)
        seen = it.fingerprints
        if seen is None:
            it.fingerprints = {fingerprint: payload}
            return False
        previous = seen.get(fingerprint)
        if previous is None:
            seen[fingerprint] = payload
            return False
        cls = previous.__class__
        if cls is set:  # message bytes: looked up by hash, not compared with each one
            if payload in previous:
                return True
            previous.add(payload)
            return False
        if cls is list:  # decoded payloads (unhashable), few per PV and EPICS timestamp
            if payload in previous:
                return True
            previous.append(payload)
            return False
        if previous == payload:
            return True
        # a PV with many values in one iteration (timedbuffered: a fast PV in a long window)
        seen[fingerprint] = (
            {previous, payload} if isinstance(previous, bytes) else [previous, payload]
        )
        return False

    def _on_header(  # noqa: PLR0917
        self,
        state: _Topic,
        partition: int,
        offset: int,
        msg: Header,
        now: float,
        out: list[IterationEvent],
    ) -> None:
        if state.primed is not None and self._primed_mark(state, msg):
            return
        ts = msg.timestamp_ns
        newest = ts > state.max_ts
        if newest:
            state.max_ts = ts
        self._before_start.discard(state.name)
        idx = msg.iter_index
        it = state.open.get(idx)
        if it is not None and (it.header_seen or it.tail_seen) and newest and ts > it.last_ts:
            # same iter_index, newer than all we saw (a header is never newer than its own
            # tail): the snapshot was restarted meanwhile
            reason = (
                IncompleteReason.NO_TAIL if it.grace_deadline is None
                else self._grace_reason(it)
            )
            self._close(state, it, reason, out)
            self._restart(state)
            it = None
        if it is not None:
            if it.header_seen:
                self._duplicate(it, "duplicate.header")
                return
            # the header came after data (or the tail) that opened the iteration
            self.counters["header_after_data"] += 1
            if state.pending is not None and state.pending.iteration is not it:
                # a batch boundary as any message of another iteration: the header's offset
                # (in this iteration's, at its close) must not come out before the batch
                self._flush(state, out)
            it.header_seen = True
            it.header_ts = ts
            it.snapshot_name = msg.snapshot_name or it.snapshot_name
            self._read_up_to(it, partition, offset)
            if it.grace_deadline is not None:
                self._settle_after_tail(state, it, now, out)
            return
        if idx in state.closed or (state.max_index is not None and idx <= state.max_index):
            if not newest and not _after_its_successors(state.closed, idx, ts):
                self.counters["late.header"] += 1
                return
            self._restart(state)
        # a header is a batch boundary; a new iteration ends every one of its partition still
        # waiting for a tail (only a partition keeps the gateway's order T(n) before H(n+1):
        # one of another partition may still have its tail to be read there)
        if state.pending is not None:
            self._flush(state, out)
        for other in list(state.open.values()):
            if not other.tail_seen and other.partition == partition:
                self._close(state, other, IncompleteReason.NO_TAIL, out)
        if state.primed is not None:  # copies of earlier iterations' data came before it
            self._forget_primed(state, idx)
        self._open(state, idx, partition, offset, now, out, header=msg)

    def _on_tail(  # noqa: PLR0917
        self,
        state: _Topic,
        partition: int,
        offset: int,
        msg: Tail,
        now: float,
        out: list[IterationEvent],
        kafka_ms: int | None = None,
    ) -> None:
        if state.primed is not None and self._primed_mark(state, msg):
            return
        ts = msg.timestamp_ns
        it = self._iteration_of(state, partition, offset, msg, now, "tail", out)
        if it is None:
            return
        if it.tail_seen:
            self._duplicate(it, "duplicate.tail")
            return
        it.tail_seen = True
        it.tail_ts = ts
        it.tail_kafka_ms = kafka_ms
        it.last_ts = max(it.last_ts, ts)
        it.tail_partition = partition
        self._read_up_to(it, partition, offset)
        it.snapshot_name = msg.snapshot_name or it.snapshot_name
        it.error = msg.error
        it.error_message = msg.error_message
        if it.header_ts is None and msg.header_timestamp_ns is not None:
            it.header_ts = msg.header_timestamp_ns
        if state.pending is not None:
            self._flush(state, out)
        if msg.error != 0:
            self._close(state, it, IncompleteReason.GATEWAY_ERROR, out)
            return
        total = msg.total_messages
        if total is None and msg.msg_seq is not None and msg.msg_seq <= _INT64_MAX:
            total = msg.msg_seq  # the tail is message N of N (the official client needs no more)
        it.total_messages = total
        # total_messages counts the header too: a header reordered after the tail is waited for
        if total is not None and (self._missing_data(it) > 0 or not it.header_seen):
            self.counters["waiting_for_missing"] += 1
            it.grace_deadline = now + self.missing_grace_s
            if self.missing_grace_s <= 0:
                self._close(state, it, self._grace_reason(it), out)
            return
        self._close(state, it, None if it.header_seen else IncompleteReason.NO_HEADER, out)

    # ----------------------------------------------------------------------------- helpers
    @staticmethod
    def _read_up_to(it: _Iteration, partition: int, offset: int) -> None:
        """``it`` has a message at ``offset`` of ``partition``."""
        offsets = it.offsets
        if offset > offsets.get(partition, -1):
            offsets[partition] = offset

    def _duplicate(self, it: _Iteration, counter: str) -> None:
        self.counters[counter] += 1
        it.duplicates += 1

    @staticmethod
    def _missing_data(it: _Iteration) -> int:
        total = it.total_messages
        return 0 if total is None else max(0, total - 2 - it.n_data)

    def _settle_after_tail(
        self, state: _Topic, it: _Iteration, now: float, out: list[IterationEvent]
    ) -> None:
        """An iteration waiting for missing messages got one: close it once nothing is missing."""
        if it.header_seen and self._missing_data(it) == 0:
            self.counters["missing_recovered"] += 1
            self._close(state, it, None, out)

    def _grace_reason(self, it: _Iteration) -> IncompleteReason:
        """Why an iteration still missing messages at the end of its grace period is closed."""
        if self._missing_data(it) > 0:
            return IncompleteReason.MISSING_MESSAGES
        return IncompleteReason.NO_HEADER

    def _restart(self, state: _Topic) -> None:
        """The snapshot was restarted: its ``iter_index`` counter began again at 1."""
        self.counters["restart"] += 1
        state.closed.clear()
        state.max_index = None
        if state.primed is not None:  # of the snapshot's earlier life
            self._forget_primed(state)

    def _iteration_of(  # noqa: PLR0917
        self,
        state: _Topic,
        partition: int,
        offset: int,
        msg: Data | Tail,
        now: float,
        what: str,
        out: list[IterationEvent],
    ) -> _Iteration | None:
        """The open iteration data or a tail belongs to; opened if it is not open yet, None
        (counted ``late.<what>``) if it was closed already."""
        ts = msg.timestamp_ns
        newest = ts > state.max_ts
        if newest:
            state.max_ts = ts
        idx = msg.iter_index
        it = state.open.get(idx)
        if it is not None:
            return it
        if idx in state.closed:
            if not (newest and state.max_index is not None and idx < state.max_index):
                self.counters["late." + what] += 1
                return None
            self._restart(state)
        if self._before_start and state.name in self._before_start:
            self.counters["before_start." + what] += 1
            return None
        self.counters["no_header"] += 1
        return self._open(
            state, idx, partition, offset, now, out, header_ts=msg.header_timestamp_ns
        )

    def _open(  # noqa: PLR0917
        self,
        state: _Topic,
        idx: int,
        partition: int,
        offset: int,
        now: float,
        out: list[IterationEvent],
        *,
        header: Header | None = None,
        header_ts: int | None = None,
    ) -> _Iteration:
        while len(state.open) >= self.max_open_per_topic:
            self.counters["evicted"] += 1
            oldest = next(iter(state.open.values()))
            # one whose tail came is still waiting for announced messages, not for its tail
            reason = (
                IncompleteReason.NO_TAIL if oldest.grace_deadline is None
                else self._grace_reason(oldest)
            )
            self._close(state, oldest, reason, out)
        it = _Iteration(idx, partition, offset, now + state.timeout_s)
        if header is not None:
            it.header_seen = True
            it.header_ts = it.last_ts = header.timestamp_ns
            it.snapshot_name = header.snapshot_name
        else:
            it.header_ts = header_ts  # storage-node `header_timestamp`, or None
        state.open[idx] = it
        if state.max_index is None or idx > state.max_index:
            state.max_index = idx
        self.counters["iterations.opened"] += 1
        out.append(
            IterationOpened(state.name, it.snapshot_name, idx, it.header_ts, partition, offset)
        )
        return it

    def _flush(self, state: _Topic, out: list[IterationEvent]) -> None:
        batch = state.pending
        if batch is None:
            return
        state.pending = None
        it = batch.iteration
        samples = batch.samples
        if not batch.ordered:
            self.counters["reordered"] += 1
            seqs = batch.seqs
            order = sorted(range(len(samples)), key=seqs.__getitem__)
            samples = [samples[i] for i in order]
        it.n_batches += 1
        it.n_values += len(samples)
        self._read_up_to(it, batch.partition, batch.offset)
        it.last_ts = max(it.last_ts, batch.timestamp_ns)
        it.pvs.update(map(_pv_of, samples))
        it.emitted.add(batch.key)
        self.counters["batches"] += 1
        self.counters["values"] += len(samples)
        out.append(
            ValuesReceived(
                state.name,
                it.iter_index,
                it.n_batches,
                batch.timestamp_ns,
                tuple(samples),
                batch.submission_seq,
                batch.late,
                batch.partition,
                batch.offset,
                batch.nbytes,
            )
        )

    def _close(
        self,
        state: _Topic,
        it: _Iteration,
        reason: IncompleteReason | None,
        out: list[IterationEvent],
    ) -> None:
        pending = state.pending
        if pending is not None and pending.iteration is it:
            self._flush(state, out)
        del state.open[it.iter_index]
        primed = state.primed
        if primed is not None and primed.copies.pop(it.iter_index, None) is not None:
            self._end_priming(state)  # a copy read now would be late
        closed = state.closed
        closed[it.iter_index] = it.last_ts
        while len(closed) > self.max_closed_per_topic:
            del closed[next(iter(closed))]
        expected = it.total_messages
        missing: int | None = None
        if expected is not None:
            received = it.n_data + (1 if it.header_seen else 0) + (1 if it.tail_seen else 0)
            missing = max(0, expected - received)
        elif it.dropped:
            missing = it.dropped
        if reason is None and missing:
            reason = IncompleteReason.MISSING_MESSAGES
        if reason is None:
            self.counters["iterations.complete"] += 1
        else:
            self.counters["iterations.incomplete." + reason.value] += 1
        if missing:
            self.counters["missing_messages"] += missing
        # the tail's partition (where a stop looks for its final iteration), else the first one
        partition = it.partition if it.tail_partition is None else it.tail_partition
        out.append(
            IterationClosed(
                state.name,
                it.snapshot_name,
                it.iter_index,
                _COMPLETE if reason is None else _INCOMPLETE,
                reason,
                it.header_ts,
                it.tail_ts,
                it.error,
                it.error_message,
                it.n_values,
                len(it.pvs),
                it.n_batches,
                expected,
                missing,
                it.duplicates,
                partition,
                it.offsets[partition],
                it.tail_kafka_ms,
            )
        )


def _after_its_successors(closed: Mapping[int, int], idx: int, ts: int) -> bool:
    """Whether a header of ``idx`` timestamped ``ts`` is newer than an iteration it would have
    come before: ``idx`` itself or a later one, closed and remembered (``closed``: each one's
    newest timestamp). A header is never newer than its own iteration's messages, nor than a
    later iteration's, so it is no late header of the run those belong to: the snapshot was
    restarted, and the gateway's clock stepped back since (its timestamps older than the
    newest seen on the topic)."""
    later = [newest for j, newest in closed.items() if j >= idx and newest > 0]
    return bool(later) and ts > min(later)
