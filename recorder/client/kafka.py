"""Kafka adapter of the embedded k2eg client: the only client module that imports confluent-kafka.

Threading (confluent-kafka >= 2.16 serializes calls on one ``Consumer`` through a gate, and a
thread that polls in a tight loop starves every other caller, which then hangs): one *consumer
thread* owns the one :class:`confluent_kafka.Consumer`, creates it, and makes every call on it
(``incremental_assign``/``incremental_unassign``/``seek``/``pause``/``resume``/``consume``/
``get_watermark_offsets``/``offsets_for_times``/``close``). Other threads never touch it: they
enqueue a request (:meth:`KafkaAdapter.add_topic`, :meth:`~KafkaAdapter.remove_topic`, ...) and
get a :class:`concurrent.futures.Future` that the consumer thread completes between two polls.

Topics are read with ``assign()`` at explicit offsets (all partitions of a topic), obtained from
``get_watermark_offsets(cached=False)`` or ``offsets_for_times``: no consumer-group join, no
rebalance, no lazily-resolved ``OFFSET_END`` race, and nothing is ever committed. A partition
added to an assigned topic is found within ``_PARTITION_CHECK_S`` and read from its beginning.

Each loop pass hands the records of one ``consume()`` batch to the ``on_records`` callback *in
the consumer thread* (possibly an empty list: a tick, so the caller can run its timers), with
``drained=True`` when the batch was not full (input caught up). With ``raw_messages=True`` the
callback gets the ``confluent_kafka.Message`` objects themselves instead of :class:`Record`
(consumer errors and records of topics no longer assigned left out; read positions tracked the
same): no per-message object is built, for a consumer that reads the fields it needs (the
iteration assembler's hot path does). The callback must be quick and
must not call blocking adapter methods (it may enqueue requests: they run before the next poll).

The producer is thread-safe: any thread may :meth:`~KafkaAdapter.produce`; delivery reports are
served by ``poll(0)`` right after each produce and on every consumer-loop pass. Failures are
counted and handed to the per-message callback. AdminClient helpers create topics
(``TOPIC_ALREADY_EXISTS`` is fine) and wait for their metadata.
"""

from __future__ import annotations

import contextlib
import math
import queue
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Literal, TypeVar

import structlog
from confluent_kafka import (
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    OffsetSpec,
)
from confluent_kafka.cimpl import NewTopic

from recorder.client.firstread import FirstReads, OffsetGap
from recorder.client.throttle import RepeatThrottle, normalized
from recorder.client.wire import Record
from recorder.errors import ClientClosedError, ConfigError, RecorderError, TransportError
from recorder.settings import KafkaSettings

T = TypeVar("T")
RecordsCallback = Callable[[list[Record], bool], None]
MessagesCallback = Callable[[list[Message], bool], None]  # raw mode (``raw_messages=True``)
#: ``(topic, partition, expected, read)``: the first message read from a partition started at
#: an explicit offset was not at that offset (see :meth:`KafkaAdapter.add_topic`)
OffsetGapCallback = Callable[[str, int, int, int], None]
DeliveryCallback = Callable[[TransportError | None], None]

_log = structlog.get_logger("recorder.client.kafka")


def answer_within(future: Future[T], timeout_s: float, what: str) -> T:
    """The result of an adapter request (:meth:`KafkaAdapter.add_topic`, ``watermarks``...);
    one that takes longer than ``timeout_s`` (the consumer thread busy with a slow broker) is
    cancelled if not begun and is a :class:`TransportError`, as Kafka failing to answer is
    (callers retry those), not a bare ``TimeoutError``."""
    try:
        return future.result(timeout_s)
    except FutureTimeoutError:
        future.cancel()
        raise TransportError(f"Kafka did not answer {what} within {timeout_s:g} s") from None


LOG_REPEAT_WINDOW_S = 60.0
_THROTTLE = RepeatThrottle(LOG_REPEAT_WINDOW_S)  # shared by every KafkaAdapter


def librdkafka_logger(log: Any) -> LibrdkafkaLog:
    """A ``logger`` for any confluent-kafka handle: its lines through ``log`` (structlog),
    repeats throttled together with every adapter's."""
    return LibrdkafkaLog(log, _THROTTLE)


_EARLIEST = OffsetSpec.earliest()  # type: ignore[no-untyped-call]
_LATEST = OffsetSpec.latest()  # type: ignore[no-untyped-call]

SERVE_BUDGET_S: Final = 0.05
"""How long the consumer thread serves queued requests (assignments, seeks, ...) in a row
before it reads again: requests that keep coming held it off the topics (the gateway's replies
among them) for as long as they came."""

#: How every consumer of ours fetches (the benchmarks' plain-consumer baselines use it too, so
#: they are compared like for like).
FETCH_TUNING: Final[dict[str, int]] = {
    # the official client's is 5 ms; what 10 ms costs the broker idle: bench_fetch_wait.py
    "fetch.wait.max.ms": 10,
    # bound librdkafka's prefetch (defaults: 100,000 messages or 64 MiB per partition): the
    # records a slow sink has not taken stay in Kafka, not in memory, so memory does not grow
    # with the length of the topic behind us
    "queued.min.messages": 20_000,
    "queued.max.messages.kbytes": 16_384,
    # once a partition's local queue is above those bounds librdkafka postpones its next fetch
    # by fetch.queue.backoff.ms (default 1000 ms): a consumer that decodes what it reads then
    # drains the queue in a fraction of that second and idles the rest (a plain consume +
    # msgpack decode of 150k messages of 128-float waveforms on Tansu, 2026-11-24: 94-96k
    # messages/s with the default, 201-215k with 10 ms). Re-check the queue every 10 ms.
    "fetch.queue.backoff.ms": 10,
}


class LibrdkafkaLog:
    """confluent-kafka's ``logger``: librdkafka's log lines through structlog instead of its
    own stderr output (raw ``%3|...`` lines in the journal), repeats throttled.

    confluent-kafka calls ``log(level, fmt, *args)`` with a :mod:`logging` level and the
    text ``"<FACILITY> [<handle>] <message>"``; it becomes the event ``librdkafka`` with
    ``facility``, ``message`` and, after held-back repeats, ``repeated``.
    """

    def __init__(self, log: Any, throttle: RepeatThrottle) -> None:
        self._log = log
        self._throttle = throttle

    def log(self, level: int, fmt: str, *args: Any) -> None:
        try:
            text = fmt % args if args else fmt
            facility, _, rest = text.partition(" ")
            if rest.startswith("[") and "] " in rest:  # the handle: rdkafka#producer-1
                rest = rest.split("] ", 1)[1]
            fields = self._throttle.log_fields(("log", facility, normalized(rest)))
            if fields is not None:
                self._log.log(level, "librdkafka", facility=facility, message=rest, **fields)
        except Exception:  # a log line must never break a poll
            return


@dataclass(frozen=True, slots=True)
class StartAt:
    """Where to start reading a topic (resolved to explicit offsets by the consumer thread).

    * :meth:`end`: the high watermark at the moment the request is served (what is produced
      after that point is read);
    * :meth:`beginning`: the low watermark;
    * :meth:`at`: explicit offsets (one for every partition, or a partition -> offset map;
      partitions missing from the map start at the end, or with ``others="beginning"`` at
      their beginning: for a map saved earlier, whose missing partitions were added since);
    * :meth:`at_timestamp`: the first message with a timestamp >= ``ms`` (Kafka
      ``offsets_for_times``); the end when there is none.
    """

    kind: Literal["end", "beginning", "offsets", "timestamp"]
    offsets: Mapping[int, int] | None = None
    offset: int | None = None
    timestamp_ms: int | None = None
    others: Literal["end", "beginning"] = "end"  # of :meth:`at`: partitions not in its map

    @classmethod
    def end(cls) -> StartAt:
        return cls("end")

    @classmethod
    def beginning(cls) -> StartAt:
        return cls("beginning")

    @classmethod
    def at(cls, offsets: int | Mapping[int, int], *,
           others: Literal["end", "beginning"] = "end") -> StartAt:
        if isinstance(offsets, int):
            return cls("offsets", offset=offsets)
        return cls("offsets", offsets=dict(offsets), others=others)

    @classmethod
    def at_timestamp(cls, timestamp_ms: int) -> StartAt:
        return cls("timestamp", timestamp_ms=int(timestamp_ms))


@dataclass(slots=True)
class _Request:
    kind: str
    future: Future[Any]
    topic: str = ""
    start: StartAt | None = None
    partition: int = 0
    offset: int = 0
    deadline: float = 0.0
    fn: Callable[[], Any] | None = None
    retry_at: float = 0.0


@dataclass(slots=True)
class _TopicState:
    partitions: list[int]
    paused: bool = False
    positions: dict[int, int] = field(default_factory=dict)  # next offset to deliver


def close_producer(producer: Producer) -> None:
    """End a producer's librdkafka threads now (``Producer.close()``, confluent-kafka >= 2.x;
    best effort): an open handle keeps reconnecting, and logging it, until it is
    garbage-collected. Flush first; it is unusable afterwards."""
    close = getattr(producer, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            close()


def _transport_error(action: str, exc: BaseException) -> TransportError:
    """``Kafka <action> failed: <reason>``; a KafkaException gives its error's text and
    name (``Failed to get metadata: Local: Broker transport failure (_TRANSPORT)``), not
    the repr of the KafkaError."""
    reason = str(exc)
    err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    if isinstance(err, KafkaError):
        reason = f"{err.str()} ({err.name()})"
    return TransportError(f"Kafka {action} failed: {reason}")


def _creation_error(action: str, exc: BaseException) -> RecorderError:
    """A librdkafka handle that cannot be created: a setting it refuses (an unknown property,
    an invalid value) is a :class:`ConfigError`, which no retry mends; else as
    :func:`_transport_error`."""
    err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    if isinstance(err, KafkaError) and err.code() == KafkaError._INVALID_ARG:
        return ConfigError(f"Kafka settings: {err.str()} (set by RECORDER_KAFKA__* in the "
                           "environment, e.g. RECORDER_KAFKA__SECURITY__PROTOCOL for "
                           "security.protocol)")
    return _transport_error(action, exc)


_DOWN_CODES = frozenset({KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN})
_PURGED = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})
_PROBE_EVERY_S = 1.0  # metadata requests while Kafka counts as down (see _probe)
_PROBE_TIMEOUT_S = 0.5
# nothing read for this long: ask a broker for metadata (see _probe), at most this often. A
# Kafka that went silent (its host powered off, a network partition) closes no connection,
# so librdkafka reports nothing before its own timeouts (socket.timeout.ms, 60 s)
_IDLE_PROBE_S = 0.5
# a fetch response over receive.message.max.bytes (a message larger than the consumer may
# receive): librdkafka drops the connection and fetches the same message again, for ever
_RESPONSE_TOO_LARGE = re.compile(r"Invalid response size (\d+) \(0\.\.(\d+)\)")
# it counts as going on while it came back within this (librdkafka retries within seconds)
_RECEIVE_LIMIT_RECENT_S = 30.0
# how often the assigned topics' partitions are looked up again: a partition an operator adds
# is read from its beginning (a keyed producer, as the gateway, may move its messages there)
_PARTITION_CHECK_S = 10.0


class KafkaAdapter:
    """One consumer thread (owning the Consumer), one thread-safe Producer, an AdminClient."""

    def __init__(
        self,
        settings: KafkaSettings,
        on_records: RecordsCallback | MessagesCallback,
        *,
        raw_messages: bool = False,
        batch_size: int = 1000,
        poll_timeout_s: float = 0.05,
        metadata_timeout_s: float = 5.0,
        consumer_config: Mapping[str, Any] | None = None,
        producer_config: Mapping[str, Any] | None = None,
        name: str = "k2eg-kafka",
        on_offset_gap: OffsetGapCallback | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.settings = settings
        self._on_records: Callable[[list[Any], bool], None] = on_records
        self._on_offset_gap = on_offset_gap
        self._first_reads = FirstReads()  # consumer thread only
        self._raw_messages = raw_messages
        self._batch_size = batch_size
        self._kafka_down = False
        self._reading_stalled = False
        # (response bytes, receive.message.max.bytes, when): see receive_limit_exceeded
        self._receive_limit: tuple[int, int, float] | None = None
        self._next_probe = 0.0
        self._next_partition_check = 0.0
        self._alive_at = time.monotonic()  # Kafka last answered the consumer (see alive_at)
        self._poll_timeout_s = poll_timeout_s
        self._metadata_timeout_s = metadata_timeout_s
        self._name = name
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._retries: list[_Request] = []
        self._topics: dict[str, _TopicState] = {}  # consumer thread writes; others read copies
        self._topics_lock = threading.Lock()
        self._counters: Counter[str] = Counter()
        self._counters_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready: Future[None] = Future()
        self._stopping = threading.Event()
        self._closed = False
        self._log = _log.bind(adapter=name)
        # librdkafka's errors and log lines: a line per distinct message per minute at most,
        # across every adapter of the process (a daemon retrying to connect creates new ones)
        librdkafka_log = librdkafka_logger(self._log)

        base = settings.librdkafka_config()
        consumer_conf: dict[str, Any] = {
            "group.id": f"{settings.app_name}-{uuid.uuid4().hex[:12]}",  # never joined
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",  # an explicit offset below retention: oldest kept
            "enable.partition.eof": False,
            **FETCH_TUNING,
            "error_cb": self._error_cb,
            "logger": librdkafka_log,  # served by consume(), in the consumer thread
        }
        consumer_conf.update(base)
        consumer_conf.update(consumer_config or {})
        self._consumer_conf = consumer_conf

        producer_conf: dict[str, Any] = {
            "message.timeout.ms": 30_000,
            "linger.ms": 2,
            "error_cb": self._error_cb,
            "logger": librdkafka_log,  # served by poll(), as delivery reports are
        }
        producer_conf.update(base)
        producer_conf.update(producer_config or {})
        self._producer_conf = producer_conf
        try:
            self._producer = Producer(producer_conf)
            # metadata look-ups must never auto-create a topic (a producer-type handle would)
            admin_conf: dict[str, str | int | float | bool] = {
                # nothing polls this handle between requests, so it gets no logger (its log
                # lines would queue up) and logs nothing: librdkafka would print every failed
                # connection attempt to stderr, ~20 a second while Kafka is unreachable. Its
                # failures reach us as the exceptions of the requests (TransportError). An
                # operator's RECORDER_KAFKA__LOG_LEVEL (with __DEBUG) still applies.
                "log_level": 0,
                **base,
                "allow.auto.create.topics": False,
            }
            self._admin: AdminClient | None = AdminClient(admin_conf)
        except KafkaException as exc:
            raise _creation_error("client creation", exc) from exc
        # offset queries (watermarks) off the consumer thread: see watermarks()
        self._queries = ThreadPoolExecutor(max_workers=4,
                                           thread_name_prefix=f"{self._name}-query")

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout_s: float = 10.0) -> KafkaAdapter:
        """Start the consumer thread; return once it has created its Consumer."""
        if self._closed:
            raise ClientClosedError("the Kafka adapter is closed")
        if self._thread is not None:
            return self
        self._thread = threading.Thread(
            target=self._run, name=f"{self._name}-consumer", daemon=True
        )
        self._thread.start()
        try:
            self._ready.result(timeout_s)
        except FutureTimeoutError as exc:
            self.close()
            raise TransportError("the Kafka consumer thread did not start") from exc
        return self

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the consumer thread (closing the Consumer in it) and flush the producer."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        thread = self._thread
        if thread is not None:
            fut: Future[None] = Future()
            self._requests.put(_Request("stop", fut))
            thread.join(timeout_s)
            if thread.is_alive():
                self._log.error("consumer thread did not stop", timeout_s=timeout_s)
        remaining = self._producer.flush(max(0.0, min(timeout_s, 5.0)))
        if remaining:
            self._count("delivery_failed", remaining)
            self._log.warning("producer closed with undelivered messages", undelivered=remaining)
            # dropped now: librdkafka would otherwise hold the process until each of them
            # timed out (message.timeout.ms), e.g. heartbeats queued while Kafka is down
            with contextlib.suppress(Exception):
                self._producer.purge(in_queue=True, in_flight=True, blocking=False)
                self._producer.flush(0)  # their (failed) delivery reports
        # fail whatever was still queued
        self._fail_pending(ClientClosedError("the Kafka adapter is closed"))
        if thread is None or not thread.is_alive():
            close_producer(self._producer)
            self._admin = None  # the admin handle has no close(): released here
        # its threads end with the queries under way (each bounded by its timeout)
        self._queries.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> KafkaAdapter:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def consumer_config(self) -> dict[str, Any]:
        """The librdkafka configuration of the consumer (callbacks left out)."""
        return {k: v for k, v in self._consumer_conf.items() if not callable(v)}

    @property
    def producer_config(self) -> dict[str, Any]:
        """The librdkafka configuration of the producer (callbacks left out)."""
        return {k: v for k, v in self._producer_conf.items() if not callable(v)}

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def in_consumer_thread(self) -> bool:
        return threading.current_thread() is self._thread

    # ------------------------------------------------------------------ requests (any thread)
    def _submit(self, request: _Request) -> Future[Any]:
        if self._closed or self._stopping.is_set():
            request.future.set_exception(ClientClosedError("the Kafka adapter is closed"))
            return request.future
        self._requests.put(request)
        return request.future

    def add_topic(
        self, topic: str, start: StartAt | None = None, *, timeout_s: float | None = None
    ) -> Future[dict[int, int]]:
        """Assign every partition of ``topic`` at explicit offsets; the future gives them.

        If the topic does not exist yet, the consumer thread keeps retrying (without blocking
        other topics) until ``timeout_s`` (default: the adapter's metadata timeout), then fails
        the future with :class:`TransportError`. Adding a topic that is already assigned
        re-positions it. Started at explicit offsets (:meth:`StartAt.at`), an offset below
        the partition's oldest message (deleted by retention) is a gap at once, and the first
        message read from each partition is checked to be at its offset (see
        ``on_offset_gap``).
        """
        deadline = time.monotonic() + (timeout_s or self._metadata_timeout_s)
        return self._submit(
            _Request("add", Future(), topic=topic, start=start or StartAt.end(), deadline=deadline)
        )

    def remove_topic(self, topic: str) -> Future[None]:
        """Unassign every partition of ``topic``; no record of it is delivered afterwards."""
        return self._submit(_Request("remove", Future(), topic=topic))

    def pause(self, topic: str) -> Future[None]:
        """Stop fetching ``topic`` (back-pressure); reading resumes after the last delivered."""
        return self._submit(_Request("pause", Future(), topic=topic))

    def resume(self, topic: str) -> Future[None]:
        return self._submit(_Request("resume", Future(), topic=topic))

    def seek(self, topic: str, partition: int, offset: int) -> Future[None]:
        """Move an assigned partition to ``offset`` (the next record delivered)."""
        return self._submit(
            _Request("seek", Future(), topic=topic, partition=partition, offset=offset)
        )

    def watermarks(
        self, topic: str, *, timeout_s: float | None = None
    ) -> Future[dict[int, tuple[int, int]]]:
        """``{partition: (low, high)}`` queried from the broker; ``{}`` if the topic is unknown.

        Asked through the admin handle in a thread of a small pool, not by the consumer thread:
        each is a metadata and two ListOffsets round trips, and a hundred runs stopping at
        once (each asks for its topic's) held the consumer thread off reading the gateway's
        replies to those stops, until every one timed out."""
        if self._closed:
            future: Future[dict[int, tuple[int, int]]] = Future()
            future.set_exception(ClientClosedError("the Kafka adapter is closed"))
            return future
        deadline = time.monotonic() + (timeout_s or self._metadata_timeout_s)
        return self._queries.submit(self._do_watermarks, topic, deadline)

    def call_soon(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` in the consumer thread before its next poll."""
        return self._submit(_Request("call", Future(), fn=fn))

    def positions(self, topic: str) -> dict[int, int]:
        """Next offset to be delivered, per partition of an assigned topic (``{}`` otherwise)."""
        with self._topics_lock:
            state = self._topics.get(topic)
            return dict(state.positions) if state else {}

    @property
    def topics(self) -> frozenset[str]:
        with self._topics_lock:
            return frozenset(self._topics)

    @property
    def paused_topics(self) -> frozenset[str]:
        """The assigned topics whose fetching is paused now (back-pressure, a user's pause)."""
        with self._topics_lock:
            return frozenset(t for t, state in self._topics.items() if state.paused)

    def is_paused(self, topic: str) -> bool:
        with self._topics_lock:
            state = self._topics.get(topic)
            return bool(state and state.paused)

    # ------------------------------------------------------------------ producer (any thread)
    def produce(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | str | None = None,
        headers: Mapping[str, bytes | str] | None = None,
        on_delivery: DeliveryCallback | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        """Queue a message; ``on_delivery(None | TransportError)`` runs from a producer poll.

        Raises :class:`TransportError` if the local queue stays full for ``timeout_s``.
        """
        if self._closed:
            raise ClientClosedError("the Kafka adapter is closed")

        def delivered(err: KafkaError | None, msg: Message) -> None:
            if err is None:
                self._count("produced")
                failure: TransportError | None = None
            elif err.code() in _PURGED:  # dropped at close: counted and logged there
                failure = TransportError(f"delivery to {topic!r} failed: dropped at exit, "
                                         "before Kafka took it")
            else:
                failure = TransportError(f"delivery to {topic!r} failed: {err.str()}")
                self._count("delivery_failed")
                # while Kafka is down every heartbeat times out: a line a minute per text
                fields = _THROTTLE.log_fields(("delivery", topic, normalized(err.str())))
                if fields is not None:
                    self._log.warning("delivery failed", topic=topic, error=err.str(),
                                      **fields)
            if on_delivery is not None:
                try:
                    on_delivery(failure)
                except Exception:
                    self._count("callback_errors")
                    self._log.exception("delivery callback raised", topic=topic)

        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    self._producer.produce(
                        topic,
                        value=value,
                        key=key,
                        headers=dict(headers) if headers else None,
                        on_delivery=delivered,
                    )
                    break
                except BufferError as exc:
                    self._count("produce_queue_full")
                    if time.monotonic() >= deadline:
                        raise TransportError(f"producer queue full for {timeout_s:g} s") from exc
                    self._producer.poll(0.05)
                except KafkaException as exc:
                    raise _transport_error(f"produce to {topic!r}", exc) from exc
            self._producer.poll(0)
        except RuntimeError as exc:  # the producer was closed meanwhile (close())
            raise ClientClosedError("the Kafka adapter is closed") from exc

    def flush(self, timeout_s: float = 5.0) -> int:
        """Wait for outstanding deliveries; returns how many are still undelivered."""
        try:
            return int(self._producer.flush(timeout_s))
        except RuntimeError:  # closed: close() flushed what it could
            return 0

    # ------------------------------------------------------------------ admin (any thread)
    def _admin_handle(self) -> AdminClient:
        admin = self._admin
        if admin is None:
            raise ClientClosedError("the Kafka adapter is closed")
        return admin

    def topic_partitions(self, topic: str, *, timeout_s: float | None = None) -> int | None:
        """Number of partitions of ``topic``, or None if the broker does not know it."""
        try:
            meta = self._admin_handle().list_topics(
                topic, timeout=timeout_s or self._metadata_timeout_s)
        except KafkaException as exc:
            raise _transport_error(f"metadata request for {topic!r}", exc) from exc
        tmeta = meta.topics.get(topic)
        if tmeta is None or tmeta.error is not None or not tmeta.partitions:
            return None
        return len(tmeta.partitions)

    def wait_for_topic(self, topic: str, *, timeout_s: float = 10.0) -> int:
        """Wait until the broker reports ``topic`` with partitions; returns their number."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            n = self.topic_partitions(topic, timeout_s=max(0.1, min(remaining, 2.0)))
            if n:
                return n
            if time.monotonic() >= deadline:
                raise TransportError(f"topic {topic!r} did not appear within {timeout_s:g} s")
            time.sleep(0.05)

    def ensure_topic(
        self,
        topic: str,
        *,
        partitions: int = 1,
        replication_factor: int = -1,
        config: Mapping[str, str] | None = None,
        timeout_s: float = 10.0,
    ) -> int:
        """Create ``topic`` unless it exists (TOPIC_ALREADY_EXISTS is fine); wait for metadata.

        ``replication_factor=-1`` lets the broker apply its default. Returns the partition
        count the broker reports (an existing topic keeps its own).
        """
        existing = self.topic_partitions(topic, timeout_s=min(timeout_s, self._metadata_timeout_s))
        if existing:
            return existing
        new = NewTopic(
            topic,
            num_partitions=partitions,
            replication_factor=replication_factor,
            config=dict(config or {}),
        )
        futures = self._admin_handle().create_topics([new], request_timeout=timeout_s)
        try:
            futures[topic].result(timeout_s)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if not (isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS):
                raise _transport_error(f"creating topic {topic!r}", exc) from exc
        except FutureTimeoutError as exc:
            raise TransportError(f"creating topic {topic!r} timed out") from exc
        self._log.info("topic ensured", topic=topic, partitions=partitions)
        return self.wait_for_topic(topic, timeout_s=timeout_s)

    # ------------------------------------------------------------------ counters
    def _count(self, key: str, n: int = 1) -> None:
        with self._counters_lock:
            self._counters[key] += n

    @property
    def counters(self) -> dict[str, int]:
        """``consumed``, ``produced``, ``delivery_failed``, ``consumer_errors``, ..."""
        with self._counters_lock:
            return dict(self._counters)

    @property
    def kafka_down(self) -> bool:
        """Kafka unreachable: set by a transport failure (``_TRANSPORT``,
        ``_ALL_BROKERS_DOWN``) or by a metadata probe not answered (Kafka silent, see
        :attr:`alive_at`), cleared by the next record consumed or broker round trip that
        succeeds (a watermark query, or the consumer thread's own metadata probe, made once a
        second while nothing arrives)."""
        return self._kafka_down

    @property
    def alive_at(self) -> float:
        """When (``time.monotonic()``) Kafka last answered the consumer: a record read, a
        metadata probe or a watermark query answered. While records flow it is the last
        batch's time; while nothing arrives the consumer thread probes every
        ``_IDLE_PROBE_S``, so a Kafka that answers keeps it within about that of now, and one
        that went silent leaves it behind (a probe it does not answer marks it down)."""
        return self._alive_at

    @property
    def reading_stalled(self) -> bool:
        """Set with :attr:`kafka_down`, cleared only by the next record consumed: a broker
        that answers again does not mean the consumer fetches again yet (its reconnect backs
        off up to ``reconnect.backoff.max.ms``)."""
        return self._reading_stalled

    @property
    def receive_limit_exceeded(self) -> tuple[int, int] | None:
        """``(response bytes, receive.message.max.bytes)`` while the consumer fails to
        receive a fetch response larger than it may (a message over that limit: reading the
        partitions fetched with it is stuck there until the limit is raised), last seen
        within ``_RECEIVE_LIMIT_RECENT_S``; else None."""
        hit = self._receive_limit
        if hit is None or time.monotonic() - hit[2] > _RECEIVE_LIMIT_RECENT_S:
            return None
        return hit[0], hit[1]

    def _error_cb(self, err: KafkaError) -> None:
        self._count("kafka_errors")
        if err.code() == KafkaError._BAD_MSG and (
                match := _RESPONSE_TOO_LARGE.search(err.str())) is not None:
            self._receive_limit_hit(int(match[1]), int(match[2]))
            return
        if err.code() in _DOWN_CODES:
            self._kafka_down = self._reading_stalled = True
        if err.fatal():
            self._log.error("fatal Kafka error", error=err.str())
            return
        fields = _THROTTLE.log_fields(("error", err.code(), normalized(err.str())))
        if fields is not None:
            self._log.warning("Kafka error", error=err.str(), code=err.name(), **fields)

    def _receive_limit_hit(self, size: int, limit: int) -> None:
        self._count("receive_limit_exceeded")
        self._receive_limit = (size, limit, time.monotonic())
        fields = _THROTTLE.log_fields(("receive_limit", self._name))
        if fields is not None:
            self._log.error(
                "a Kafka message is too large for the consumer to receive: reading stops at "
                "it (and at what follows it) until RECORDER_KAFKA__RECEIVE__MESSAGE__MAX__BYTES "
                "is raised above the response size", response_bytes=size,
                receive_message_max_bytes=limit, **fields)

    # ------------------------------------------------------------------ the consumer thread
    def _run(self) -> None:
        try:
            consumer = Consumer(self._consumer_conf)
        except Exception as exc:
            self._ready.set_exception(_creation_error("consumer creation", exc))
            return
        self._ready.set_result(None)
        try:
            self._loop(consumer)
        except Exception:
            self._log.exception("consumer thread crashed")
            self._count("consumer_thread_crashed")
        finally:
            self._stopping.set()
            with contextlib.suppress(Exception):
                consumer.close()
            with self._topics_lock:
                self._topics.clear()
            self._fail_pending(ClientClosedError("the Kafka adapter is closed"))
            self._log.debug("consumer thread stopped")

    def _loop(self, consumer: Consumer) -> None:
        batch_size = self._batch_size
        poll_timeout = self._poll_timeout_s
        while True:
            if not self._serve_requests(consumer, wait=not self._has_active_topics()):
                return
            if self._has_active_topics():
                messages = consumer.consume(batch_size, poll_timeout)
            else:
                messages = []
                if not self._topics:  # nothing assigned: no record can come, but the
                    consumer.poll(0)  # error and log callbacks are served only by polls
            now = time.monotonic()
            if messages and messages[-1].error() is None:  # a record, not an error event
                self._kafka_down = self._reading_stalled = False
                self._alive_at = now
            elif self._kafka_down or (now - self._alive_at >= _IDLE_PROBE_S
                                      and self._has_active_topics()):
                self._probe(consumer, now)
            if now >= self._next_partition_check:
                self._next_partition_check = now + _PARTITION_CHECK_S
                if self._topics and not self._kafka_down:  # else the probe's business
                    self._add_new_partitions(consumer)
            if messages and self._first_reads:
                self._first_reads.expire(now)
            if not messages:
                records: list[Any] = []
            elif self._raw_messages:
                records = self._deliverable(messages)
            else:
                records = self._to_records(messages)
            self._producer.poll(0)
            try:
                self._on_records(records, len(messages) < batch_size)
            except Exception:
                self._count("callback_errors")
                self._log.exception("records callback raised")

    def _has_active_topics(self) -> bool:
        return any(not s.paused for s in self._topics.values())

    def _to_records(self, messages: list[Message]) -> list[Record]:
        # the hot loop: one pass, no helper calls (Message getters return Optional types,
        # but a message without error always has topic/partition/offset)
        records: list[Record] = []
        append = records.append
        topics = self._topics
        watched = self._first_reads.partitions
        first_reads: list[tuple[str, int, int]] = []
        state: _TopicState | None = None
        last_topic: str | None = None
        positions: dict[int, int] = {}
        unread: frozenset[int] | None = None
        for msg in messages:
            if msg.error() is not None:
                self._consumer_error(msg)
                continue
            topic: str = msg.topic()  # type: ignore[assignment]
            if topic != last_topic:
                state = topics.get(topic)
                last_topic = topic
                unread = watched.get(topic)
                if state is not None:
                    positions = state.positions
            if state is None:  # unassigned meanwhile: drop
                continue
            partition: int = msg.partition()  # type: ignore[assignment]
            offset: int = msg.offset()  # type: ignore[assignment]
            ts_type, ts = msg.timestamp()
            positions[partition] = offset + 1
            if unread is not None and partition in unread:
                first_reads.append((topic, partition, offset))
            append(
                Record(
                    topic,
                    partition,
                    offset,
                    msg.value(),
                    msg.headers(),  # type: ignore[arg-type]
                    ts if ts_type else None,  # 0: TIMESTAMP_NOT_AVAILABLE
                )
            )
        if first_reads:
            self._check_first_reads(first_reads)
        if records:
            self._count("consumed", len(records))
        return records

    def _deliverable(self, messages: list[Message]) -> list[Message]:
        """Raw mode: the consumed messages themselves, read positions tracked, no Record
        built (the hot loop: one pass; errors and unassigned topics, rare, take a second)."""
        topics = self._topics
        watched = self._first_reads.partitions
        first_reads: list[tuple[str, int, int]] = []
        last_topic: str | None = None
        positions: dict[int, int] = {}
        unread: frozenset[int] | None = None
        for msg in messages:
            if msg.error() is not None:
                return self._filtered(messages)
            topic: str = msg.topic()  # type: ignore[assignment]
            if topic != last_topic:
                state = topics.get(topic)
                if state is None:  # unassigned meanwhile: dropped
                    return self._filtered(messages)
                last_topic = topic
                positions = state.positions
                unread = watched.get(topic)
            if unread is None:
                positions[msg.partition()] = msg.offset() + 1  # type: ignore[index,operator]
                continue
            partition: int = msg.partition()  # type: ignore[assignment]
            offset: int = msg.offset()  # type: ignore[assignment]
            positions[partition] = offset + 1
            if partition in unread:
                first_reads.append((topic, partition, offset))
        if first_reads:
            self._check_first_reads(first_reads)
        self._count("consumed", len(messages))
        return messages

    def _check_first_reads(self, reads: list[tuple[str, int, int]]) -> None:
        """The first message read from a partition started at an explicit offset (a resume,
        the admin link's saved position, a seek) must be at that offset
        (:mod:`recorder.client.firstread`): a mismatch is logged, counted and told to
        ``on_offset_gap``. ``reads``: (topic, partition, offset) of the batch's messages of
        watched partitions, in the order read (the pass over the batch collects them)."""
        for gap in self._first_reads.check(reads):
            self._report_gap(gap)

    def _report_gap(self, gap: OffsetGap) -> None:
        """A partition started at an explicit offset does not read from it: logged, counted
        and told to ``on_offset_gap``."""
        if gap.missing:
            self._count("offsets_missing", gap.missing)
            self._log.warning(
                "messages missing from Kafka: the topic no longer holds them (its "
                "retention deleted them before they were read)", topic=gap.topic,
                partition=gap.partition, expected_offset=gap.expected,
                first_offset_read=gap.read, missing=gap.missing)
        else:
            self._count("offsets_reset")
            self._log.warning(
                "the topic no longer reaches the offset to read from (deleted and created "
                "again?): reading from its oldest message", topic=gap.topic,
                partition=gap.partition, expected_offset=gap.expected,
                first_offset_read=gap.read)
        if self._on_offset_gap is not None:
            try:
                self._on_offset_gap(gap.topic, gap.partition, gap.expected, gap.read)
            except Exception:
                self._count("callback_errors")
                self._log.exception("offset gap callback raised")

    def _filtered(self, messages: list[Message]) -> list[Message]:
        """:meth:`_deliverable` with consumer errors or unassigned topics in the batch."""
        topics = self._topics
        watched = self._first_reads.partitions
        first_reads: list[tuple[str, int, int]] = []
        kept: list[Message] = []
        for msg in messages:
            if msg.error() is not None:
                self._consumer_error(msg)
                continue
            topic: str = msg.topic()  # type: ignore[assignment]
            state = topics.get(topic)
            if state is None:
                continue
            partition: int = msg.partition()  # type: ignore[assignment]
            offset: int = msg.offset()  # type: ignore[assignment]
            state.positions[partition] = offset + 1
            kept.append(msg)
            unread = watched.get(topic)
            if unread is not None and partition in unread:
                first_reads.append((topic, partition, offset))
        if first_reads:
            self._check_first_reads(first_reads)
        if kept:
            self._count("consumed", len(kept))
        return kept

    def _consumer_error(self, msg: Message) -> None:
        err = msg.error()
        if err is None or err.code() == KafkaError._PARTITION_EOF:
            return
        self._count("consumer_errors")
        # an error that comes back with every consume (a deleted topic): a line a minute
        fields = _THROTTLE.log_fields(("consumer", msg.topic(), msg.partition(), err.code(),
                                       normalized(err.str())))
        if fields is not None:
            self._log.warning("consumer error", topic=msg.topic(), partition=msg.partition(),
                              error=err.str(), **fields)

    def _probe(self, consumer: Consumer, now: float) -> None:
        """Ask a broker for metadata: while Kafka counts as down and nothing arrives, once a
        second (an answer shows Kafka is back: an idle client would otherwise wait for its
        next record, and a single transport error would leave it "down"); while it counts as
        up and nothing was read for ``_IDLE_PROBE_S``, every ``_IDLE_PROBE_S`` (no answer
        within ``_PROBE_TIMEOUT_S``: Kafka went silent, which librdkafka would only report
        after its own timeouts; it is then down and reading stalled, as after a transport
        error)."""
        if now < self._next_probe:
            return
        self._next_probe = now + (_PROBE_EVERY_S if self._kafka_down else _IDLE_PROBE_S)
        with self._topics_lock:
            topic = next(iter(self._topics), None)
        try:
            consumer.list_topics(topic, timeout=_PROBE_TIMEOUT_S)
        except KafkaException as exc:
            if not self._kafka_down:
                self._count("probes_unanswered")
                self._log.warning("Kafka does not answer", error=str(exc),
                                  silent_s=round(time.monotonic() - self._alive_at, 1))
                self._kafka_down = self._reading_stalled = True
                self._next_probe = time.monotonic() + _PROBE_EVERY_S
            return
        self._kafka_down = False
        self._alive_at = time.monotonic()

    def _serve_requests(self, consumer: Consumer, *, wait: bool) -> bool:
        """Serve queued requests; False once a stop was requested."""
        now = time.monotonic()
        if self._retries:
            due = [r for r in self._retries if r.retry_at <= now]
            if due:
                self._retries = [r for r in self._retries if r.retry_at > now]
                for request in due:
                    self._serve(consumer, request)
        timeout = self._poll_timeout_s if wait else 0.0
        if self._retries and wait:
            timeout = min(timeout, max(0.0, min(r.retry_at for r in self._retries) - now))
        budget_end = math.inf
        while True:
            try:
                if timeout > 0:
                    request = self._requests.get(timeout=timeout)
                else:
                    request = self._requests.get_nowait()
            except queue.Empty:
                return True
            timeout = 0.0
            if request.kind == "stop":
                request.future.set_result(None)
                return False
            self._serve(consumer, request)
            if budget_end == math.inf:
                budget_end = time.monotonic() + SERVE_BUDGET_S
            elif time.monotonic() >= budget_end:  # read (the replies among it) before more:
                return True  # callers that keep asking do not starve the topics

    def _serve(self, consumer: Consumer, request: _Request) -> None:
        future = request.future
        if future.done():  # cancelled by the caller
            return
        # claimed before it is served (an add retried later already is): a caller that gives
        # up waiting (answer_within) cancels it only until then; an answer set into a future
        # cancelled meanwhile raised InvalidStateError here, which ended the consumer thread
        if not future.running() and not future.set_running_or_notify_cancel():
            return
        try:
            if request.kind == "add":
                result: Any = self._do_add(consumer, request)
                if result is None:  # topic unknown yet: retry later
                    return
            elif request.kind == "remove":
                self._do_remove(consumer, request.topic)
                result = None
            elif request.kind in ("pause", "resume"):
                self._do_pause(consumer, request.topic, request.kind == "pause")
                result = None
            elif request.kind == "seek":
                self._do_seek(consumer, request)
                result = None
            elif request.kind == "call":
                assert request.fn is not None
                result = request.fn()
            else:  # pragma: no cover - programming error
                raise ValueError(f"unknown request {request.kind!r}")
        except Exception as exc:
            if isinstance(exc, KafkaException):
                exc = _transport_error(f"{request.kind} {request.topic!r}", exc)
            request.future.set_exception(exc)
        else:
            request.future.set_result(result)

    def _partitions(self, consumer: Consumer | AdminClient, topic: str, timeout_s: float, *,
                    transient_raises: bool = False) -> list[int] | None:
        """The topic's partitions (the metadata asked of ``consumer``, or of the admin handle
        off the consumer thread), None when the broker has none for it. With
        ``transient_raises`` only a topic the broker does not know is None: one whose metadata
        is in error for now (a leader election, a broker restarting) raises
        :class:`TransportError`, so it is not taken for a topic that does not exist yet
        (whose reading starts at its beginning: a topic's whole history read again)."""
        meta = consumer.list_topics(topic, timeout=timeout_s)
        tmeta = meta.topics.get(topic)
        if transient_raises and tmeta is not None and tmeta.error is not None \
                and tmeta.error.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
            raise TransportError(f"the metadata of topic {topic!r} is in error for now: "
                                 f"{tmeta.error.str()}")
        if tmeta is None or tmeta.error is not None or not tmeta.partitions:
            return None
        return sorted(tmeta.partitions)

    def _do_add(self, consumer: Consumer, request: _Request) -> dict[int, int] | None:
        topic = request.topic
        start = request.start or StartAt.end()
        remaining = request.deadline - time.monotonic()
        partitions = self._partitions(consumer, topic, max(0.05, min(remaining, 1.0)))
        if partitions is None:
            if time.monotonic() >= request.deadline:
                raise TransportError(f"topic {topic!r} does not exist")
            request.retry_at = time.monotonic() + 0.1
            self._retries.append(request)
            return None
        offsets = self._resolve(consumer, topic, partitions, start, max(0.5, remaining))
        state = _TopicState(partitions=partitions, positions=dict(offsets))
        gaps: list[OffsetGap] = []
        if start.kind == "offsets":  # already deleted: told now, not when a message comes
            for p, off in offsets.items():
                low = consumer.get_watermark_offsets(
                    TopicPartition(topic, p), timeout=max(0.5, remaining), cached=False)[0]
                if 0 <= off < low:
                    gaps.append(OffsetGap(topic, p, off, low))
                    state.positions[p] = low  # where librdkafka reads from (checked there)
        tps = [TopicPartition(topic, p, offsets[p]) for p in partitions]
        with self._topics_lock:
            existing = self._topics.get(topic)
        if existing is not None:
            consumer.incremental_unassign([TopicPartition(topic, p) for p in existing.partitions])
        consumer.incremental_assign(tps)
        self._first_reads.forget(topic)
        if start.kind == "offsets":
            now = time.monotonic()
            for p, off in state.positions.items():
                self._first_reads.expect(topic, p, off, now)
        with self._topics_lock:
            self._topics[topic] = state
        for gap in gaps:
            self._report_gap(gap)
        self._log.debug("topic assigned", topic=topic, offsets=offsets, start=start.kind)
        return dict(offsets)

    def _resolve(
        self,
        consumer: Consumer,
        topic: str,
        partitions: list[int],
        start: StartAt,
        timeout_s: float,
    ) -> dict[int, int]:
        offsets: dict[int, int] = {}
        if start.kind == "timestamp":
            assert start.timestamp_ms is not None
            found = consumer.offsets_for_times(
                [TopicPartition(topic, p, start.timestamp_ms) for p in partitions],
                timeout=timeout_s,
            )
            for tp in found:
                if tp.error is not None:
                    raise TransportError(f"offsets_for_times({topic!r}) failed: {tp.error}")
                if tp.offset >= 0:
                    offsets[tp.partition] = tp.offset
        elif start.kind == "offsets":
            for p in partitions:
                if start.offsets is not None:
                    if p in start.offsets:
                        offsets[p] = int(start.offsets[p])
                elif start.offset is not None:
                    offsets[p] = int(start.offset)
        for p in partitions:
            if p in offsets:
                continue
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, p), timeout=timeout_s, cached=False
            )
            beginning = start.kind == "beginning" or (
                start.kind == "offsets" and start.others == "beginning")
            offsets[p] = low if beginning else high
        for p, off in offsets.items():
            if off < 0 and off != OFFSET_END:
                raise TransportError(f"invalid start offset {off} for {topic}[{p}]")
        return offsets

    def _add_new_partitions(self, consumer: Consumer) -> None:
        """Assign, from their beginning, the partitions an assigned topic gained since it was
        assigned (everything they hold was written after that); paused with their topic.
        Kafka not answering now is left to the next check."""
        for topic, state in list(self._topics.items()):
            try:
                partitions = self._partitions(consumer, topic, _PROBE_TIMEOUT_S)
                new = [p for p in partitions or () if p not in state.partitions]
                if not new:
                    continue
                offsets = {p: consumer.get_watermark_offsets(
                    TopicPartition(topic, p), timeout=_PROBE_TIMEOUT_S, cached=False)[0]
                    for p in new}
                tps = [TopicPartition(topic, p, off) for p, off in offsets.items()]
                consumer.incremental_assign(tps)
                if state.paused:
                    consumer.pause(tps)
            except KafkaException:
                return
            with self._topics_lock:
                state.partitions = sorted([*state.partitions, *new])
                state.positions.update(offsets)
            now = time.monotonic()
            for p, off in offsets.items():
                self._first_reads.expect(topic, p, off, now)
            self._count("partitions_added", len(new))
            self._log.warning("partitions added to a topic being read: read from their "
                              "beginning", topic=topic, offsets=offsets)

    def _do_remove(self, consumer: Consumer, topic: str) -> None:
        with self._topics_lock:
            state = self._topics.pop(topic, None)
        self._first_reads.forget(topic)
        if state is not None:
            consumer.incremental_unassign([TopicPartition(topic, p) for p in state.partitions])
            self._log.debug("topic unassigned", topic=topic)
        # a pending add for this topic must not resurrect it
        for request in self._retries:
            if request.topic == topic and not request.future.done():
                request.future.set_exception(TransportError(f"topic {topic!r} was removed"))
        self._retries = [r for r in self._retries if r.topic != topic]

    def _do_pause(self, consumer: Consumer, topic: str, pause: bool) -> None:
        with self._topics_lock:
            state = self._topics.get(topic)
        if state is None or state.paused == pause:
            return
        tps = [TopicPartition(topic, p) for p in state.partitions]
        if pause:
            consumer.pause(tps)
            self._count("paused")
        else:
            # continue exactly after the last delivered record (drops anything prefetched)
            consumer.resume(tps)
            now = time.monotonic()
            for p in state.partitions:
                if p in state.positions and state.positions[p] >= 0:
                    with contextlib.suppress(KafkaException):
                        consumer.seek(TopicPartition(topic, p, state.positions[p]))
                    # a long pause may outlast the topic's retention: a gap is reported
                    self._first_reads.expect(topic, p, state.positions[p], now)
        with self._topics_lock:
            state.paused = pause

    def _do_seek(self, consumer: Consumer, request: _Request) -> None:
        with self._topics_lock:
            state = self._topics.get(request.topic)
        if state is None or request.partition not in state.partitions:
            raise TransportError(f"{request.topic}[{request.partition}] is not assigned")
        consumer.seek(TopicPartition(request.topic, request.partition, request.offset))
        with self._topics_lock:
            state.positions[request.partition] = request.offset
        self._first_reads.expect(request.topic, request.partition, request.offset,
                                 time.monotonic())

    def _do_watermarks(self, topic: str, deadline: float) -> dict[int, tuple[int, int]]:
        """:meth:`watermarks`, in a thread of the query pool (the admin handle is
        thread-safe)."""
        admin = self._admin_handle()
        remaining = max(0.05, deadline - time.monotonic())
        try:
            partitions = self._partitions(admin, topic, min(remaining, 2.0),
                                          transient_raises=True)
            if partitions is None:
                return {}
            tps = [TopicPartition(topic, p) for p in partitions]
            remaining = max(0.05, deadline - time.monotonic())
            lows = admin.list_offsets({tp: _EARLIEST for tp in tps}, request_timeout=remaining)
            highs = admin.list_offsets({tp: _LATEST for tp in tps}, request_timeout=remaining)
            low_at = {tp.partition: f for tp, f in lows.items()}
            high_at = {tp.partition: f for tp, f in highs.items()}
            out: dict[int, tuple[int, int]] = {}
            for tp in tps:
                wait = max(0.05, deadline - time.monotonic())
                low = low_at[tp.partition].result(wait).offset
                high = high_at[tp.partition].result(wait).offset
                out[tp.partition] = (int(low), int(high))
        except KafkaException as exc:
            raise _transport_error(f"watermarks {topic!r}", exc) from exc
        except FutureTimeoutError:
            raise TransportError(f"Kafka did not answer the offsets of {topic!r} in time") \
                from None
        return out

    def _fail_pending(self, exc: BaseException) -> None:
        pending = list(self._retries)
        self._retries = []
        while True:
            try:
                pending.append(self._requests.get_nowait())
            except queue.Empty:
                break
        for request in pending:
            if not request.future.done():
                if request.kind == "stop":
                    request.future.set_result(None)
                else:
                    request.future.set_exception(exc)
