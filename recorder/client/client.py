"""K2egClient: the embedded k2eg client's public API (snapshots over Kafka).

It covers what the official Python client (PyPI ``k2eg``) offers for snapshots, with the same
:class:`~recorder.client.properties.SnapshotProperties` field names, and fixes its known
failure modes (protocol notes §5.3, sequenced §1.5): iterations never stall on a lost message,
events are delivered in order from one thread, "already running" still finds the topic,
``snapshot_stop`` delivers the final iteration, and it works on confluent-kafka >= 2.16.

Threads
    * the Kafka adapter's consumer thread (:mod:`recorder.client.kafka`) reads the reply topic
      and every snapshot topic, decodes replies, runs the :class:`IterationAssembler` and the
      :class:`ReplyTracker` (under one lock), and queues events per subscription;
    * one dispatcher thread calls every user callback: recurring-snapshot handlers (in order
      per topic) and one-shot snapshot handlers. Callbacks must not call blocking client
      methods for the *same* subscription (``snapshot_stop`` from a handler does not wait for
      the handler's own events);
    * the caller's thread sends commands and waits for replies (bounded by timeouts).

Back-pressure
    Each subscription holds a bounded number of undelivered events (its topic is paused
    above it): see :mod:`recorder.client.subscription`.

Example::

    from recorder.client import K2egClient, SnapshotProperties, IterationClosed
    from recorder.settings import KafkaSettings

    with K2egClient(KafkaSettings(bootstrap_servers="kafka:9092", app_name="rec")) as client:
        print(client.get("pva://SIM:AI:DOUBLE:1").value)
        values = client.snapshot_sync(["pva://A:X", "pva://B:Y"])     # {pv: [PVSample]}
        props = SnapshotProperties("my_snap", ["pva://A:X"], time_window=1000)
        sub = client.snapshot_recurring(props)                        # iterator mode
        for event in sub.events(idle_timeout=5):
            if isinstance(event, IterationClosed):
                print(event.iter_index, event.status)
                break
        result = client.snapshot_stop("my_snap")    # waits for the final iteration
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import structlog

from recorder.client.assembler import IterationAssembler
from recorder.client.commands import (
    GET,
    REPEATING_SNAPSHOT,
    REPEATING_SNAPSHOT_STOP,
    REPEATING_SNAPSHOT_TRIGGER,
    SNAPSHOT,
    encode_command,
    get_command,
    new_reply_id,
    repeating_snapshot_command,
    snapshot_command,
    stop_command,
    trigger_command,
)
from recorder.client.events import IterationClosed, IterationEvent
from recorder.client.kafka import KafkaAdapter, StartAt, answer_within
from recorder.client.properties import (
    SnapshotProperties,
    normalize_snapshot_name,
    pv_base_name,
)
from recorder.client.replies import Outcome, ReplyTracker
from recorder.client.results import ALREADY_STOPPED, Ack, StopResult
from recorder.client.subscription import DEFAULT_MAX_PENDING_BYTES, RecurringSnapshot
from recorder.client.values import PVSample
from recorder.client.wire import DecodeError, RawMessage, decode_reply, kafka_time_ms
from recorder.errors import (
    ClientClosedError,
    ClientError,
    GatewayTimeoutError,
    TransportError,
)
from recorder.settings import KafkaSettings

__all__ = [
    "Ack",
    "EventHandler",
    "K2egClient",
    "OneShotHandler",
    "RecurringSnapshot",
    "StopResult",
    "iteration_timeout_s",
]

EventHandler = Callable[[IterationEvent], None]
OneShotHandler = Callable[[str, dict[str, list[PVSample]]], None]
ErrorHandler = Callable[[str, ClientError], None]

_log = structlog.get_logger("recorder.client")

DEFAULT_SLACK_S = 2.0
_DOWN_REPORT_S = 2.0  # Kafka unreachable this long is logged (once per outage)
_EXPIRE_EVERY_S = 0.05
# assembler counters of snapshot messages read but not delivered (K2egClient.skipped)
SKIP_PREFIXES = ("malformed.", "late.", "duplicate", "before_start.")
# the gateway produces its final tail, releases the PVs' monitors, then produces the stop's
# ack: a tail produced longer than this before the ack is not the final one
FINAL_BEFORE_ACK_MS = 250
# the gateway answers a `get` of a PV that does not connect with -3 after this (protocol §2.2)
GATEWAY_GET_TIMEOUT_S = 10.0


def before_ack_ms(final: IterationClosed, ack_time_ms: int | None) -> int | None:
    """How long (ms, Kafka timestamps) before the stop's ack ``final``'s tail was produced;
    None when either time is unknown."""
    tail_ms = final.tail_kafka_time_ms
    if ack_time_ms is None or tail_ms is None:
        return None
    return ack_time_ms - tail_ms


def produced_before(final: IterationClosed, ack_time_ms: int | None) -> bool:
    """Was ``final``'s tail produced more than :data:`FINAL_BEFORE_ACK_MS` before the stop's
    ack (both Kafka timestamps)? False when either is unknown."""
    gap = before_ack_ms(final, ack_time_ms)
    return gap is not None and gap > FINAL_BEFORE_ACK_MS


MARKS_EVERY_S = 0.1
"""How often a stop waiting for its final iteration asks Kafka for the topic's watermarks (it
looks at what was read every 20 ms): a hundred runs stopping at once asked every 20 ms each,
and the consumer thread serving the asks no longer read the gateway's replies to the stops."""


def iteration_timeout_s(props: SnapshotProperties, slack_s: float = DEFAULT_SLACK_S) -> float:
    """How long an iteration of ``props`` may stay open without its tail (counted from its
    opening, and again from each of its data messages: one still being read is not cut).

    Periodic snapshots publish an iteration within one window (normal: header, data and tail
    in one submission per period; timedbuffered: header at the first sub-push tick, tail at
    the window's end), so ``2 * time_window + slack``. A triggered snapshot publishes each
    iteration in one submission right after the trigger: ``slack``.
    """
    if props.triggered:
        return slack_s
    return 2.0 * props.time_window / 1000.0 + slack_s


def _primed_start(
    start: StartAt, resume: Mapping[int, int], watermarks: Mapping[int, tuple[int, int]]
) -> tuple[StartAt, dict[int, int]]:
    """``start`` (explicit offsets) with each partition read from no lower than its oldest
    message, and the resume offsets of the partitions that still start below them (see
    :meth:`K2egClient.snapshot_recurring`'s ``prime_until``)."""
    assert start.offsets is not None
    offsets = dict(start.offsets)
    primed: dict[int, int] = {}
    for partition, asked in start.offsets.items():
        until = resume.get(partition)
        if until is None or asked >= until:
            continue
        marks = watermarks.get(partition)
        if marks is None:  # no such partition (the topic was deleted): nothing was recorded
            offsets[partition] = until  # of what it will hold; read as without priming
            continue
        offsets[partition] = at = min(max(asked, marks[0]), until)
        if at < until:
            primed[partition] = until
    return StartAt.at(offsets, others=start.others), primed


def command_producer_config(settings: KafkaSettings) -> dict[str, Any]:
    """This client's producer sends gateway commands only: one that Kafka did not take within
    the command timeout is dropped (its caller got an error by then), never delivered later
    for the gateway to act on late (a trigger repeated by an operator must not fire twice
    once Kafka is back). An operator's own ``message.timeout.ms`` (or its alias) wins."""
    if {"message.timeout.ms", "delivery.timeout.ms"} & set(settings.kafka):
        return {}
    return {"message.timeout.ms": max(1, round(settings.command_timeout_s * 1000))}


# ------------------------------------------------------------------------------ dispatcher
class _Dispatcher:
    """One thread that runs every user callback, in submission order."""

    def __init__(self, name: str, on_error: Callable[[], None]) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._on_error = on_error
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def in_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, fn: Callable[[], None]) -> None:
        self._queue.put(fn)

    def _run(self) -> None:
        while True:
            fn = self._queue.get()
            if fn is None:
                return
            try:
                fn()
            except Exception:
                self._on_error()
                _log.exception("client callback raised")

    def close(self, timeout_s: float) -> None:
        self._queue.put(None)
        if not self.in_thread:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                _log.error("dispatcher thread did not stop (a callback is blocked)")


# ------------------------------------------------------------------------------ the client
@dataclass(slots=True)
class _Waiter:
    command: str
    future: Future[Outcome]
    on_done: Callable[[Outcome], None] | None = None
    log_context: dict[str, Any] = field(default_factory=dict)


class K2egClient:
    """A k2eg client for snapshots: one-shot, recurring (with handle), trigger, stop, get.

    ``settings``: how to reach Kafka and the gateway (bootstrap, command topic, reply topic,
    ``command_timeout_s``, librdkafka pass-through such as SASL/TLS).
    ``iteration_slack_s``: added to the per-iteration timeout (:func:`iteration_timeout_s`).
    ``max_pending`` / ``max_pending_bytes``: default bounds of undelivered events, and of
    their message bytes, per subscription (back-pressure).
    ``batch_size`` / ``poll_timeout_s``: the consumer thread's ``consume()`` batch and wait.
    """

    def __init__(
        self,
        settings: KafkaSettings | None = None,
        *,
        iteration_slack_s: float = DEFAULT_SLACK_S,
        max_pending: int = 10_000,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        batch_size: int = 1000,
        poll_timeout_s: float = 0.05,
        missing_grace_s: float = 1.0,
        start_timeout_s: float = 15.0,
    ) -> None:
        self.settings = settings or KafkaSettings.from_env()
        self.reply_topic = self.settings.effective_reply_topic
        self.cmd_topic = self.settings.cmd_topic
        self.iteration_slack_s = iteration_slack_s
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self._log = _log.bind(app=self.settings.app_name)
        self._core_lock = threading.Lock()  # assembler + tracker + waiters
        self._assembler = IterationAssembler(
            iteration_timeout_s=2.0 + iteration_slack_s, missing_grace_s=missing_grace_s
        )
        self._tracker = ReplyTracker()
        self._waiters: dict[str, _Waiter] = {}
        self._subs: dict[str, RecurringSnapshot] = {}  # copy-on-write: read lock-free
        self._subs_lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        self._skips: dict[str, Counter[str]] = {}  # topic -> skip reason -> count (core lock)
        # topic -> Kafka time (ms) of the last "has been stopped" ack this client read for it:
        # all the snapshot published before is of that life (core lock)
        self._stopped_at: dict[str, int] = {}
        self._next_expire = 0.0
        self._down_since: float | None = None  # Kafka unreachable since (consumer thread)
        self._stalled_since: float | None = None  # reading stalled since (consumer thread)
        self._paused_since: dict[str, float] = {}  # topic -> paused since (consumer thread)
        self._down_wall: float | None = None  # unix time, once the outage is reported
        self._closed = False
        self._adapter = KafkaAdapter(
            self.settings,
            self._on_records,
            raw_messages=True,  # the assembler reads the messages themselves
            batch_size=batch_size,
            poll_timeout_s=poll_timeout_s,
            producer_config=command_producer_config(self.settings),
            name=f"k2eg-{self.settings.app_name}",
            on_offset_gap=self._on_offset_gap,
        )
        self._dispatcher = _Dispatcher(
            f"k2eg-dispatch-{self.settings.app_name}", lambda: self._count("handler_errors")
        )
        try:
            if self.settings.create_reply_topic:
                self._adapter.ensure_topic(
                    self.reply_topic, partitions=1, timeout_s=start_timeout_s
                )
            self._adapter.start(start_timeout_s)
            offsets = answer_within(
                self._adapter.add_topic(self.reply_topic, StartAt.end(),
                                        timeout_s=start_timeout_s),
                start_timeout_s + 1.0, f"the assignment of {self.reply_topic!r}",
            )
        except BaseException:
            self._adapter.close(timeout_s=5.0)
            self._dispatcher.close(5.0)
            raise
        self._log.info("client started", reply_topic=self.reply_topic, offsets=offsets,
                       cmd_topic=self.cmd_topic)

    # ------------------------------------------------------------------ lifecycle
    def close(self, timeout_s: float = 10.0) -> None:
        """End every subscription (open iterations close ``CLOSED``), fail pending commands,
        stop the consumer thread, flush the producer, stop the dispatcher. Idempotent.

        Running gateway snapshots are *not* stopped (call :meth:`snapshot_stop` first)."""
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subs.values()):
            try:
                self._finish_subscription(sub, remove_timeout_s=min(timeout_s, 5.0))
            except Exception:
                self._log.exception("closing subscription failed", topic=sub.topic)
        with self._core_lock:
            waiters, self._waiters = self._waiters, {}
            for reply_id in waiters:
                self._tracker.cancel(reply_id)
        for reply_id, waiter in waiters.items():
            # through _complete: an asynchronous one-shot's on_error runs too (dispatched
            # before the dispatcher stops), a waiting caller gets ClientClosedError
            error = ClientClosedError("the client was closed")
            self._complete(waiter, Outcome(reply_id, waiter.command, [], False, error))
        self._adapter.close(timeout_s)
        self._dispatcher.close(timeout_s)
        self._log.info("client closed")

    def __enter__(self) -> K2egClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def running(self) -> bool:
        """Whether its Kafka consumer thread is alive (it reads snapshot topics and replies;
        it only ends on :meth:`close`, or when it crashed)."""
        return self._adapter.running

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError("the client is closed")

    # ------------------------------------------------------------------ counters
    def _count(self, key: str, n: int = 1) -> None:
        with self._counts_lock:
            self._counts[key] += n

    def counters(self) -> dict[str, int]:
        """Every counter: ``assembler.*`` (iterations, duplicates, malformed.<reason> ...),
        ``replies.*``, ``kafka.*`` (consumed, produced, delivery_failed ...), client-level
        (``handler_errors``, ``events.unrouted`` ...)."""
        with self._core_lock:
            out = {f"assembler.{k}": v for k, v in self._assembler.counters.items()}
            out.update({f"replies.{k}": v for k, v in self._tracker.counters.items()})
        out.update({f"kafka.{k}": v for k, v in self._adapter.counters.items()})
        with self._counts_lock:
            out.update(self._counts)
        return out

    @property
    def receive_limit_exceeded(self) -> tuple[int, int] | None:
        """``(response bytes, receive.message.max.bytes)`` while a message too large for the
        consumer to receive holds up reading (see
        :attr:`~recorder.client.kafka.KafkaAdapter.receive_limit_exceeded`), else None."""
        return self._adapter.receive_limit_exceeded

    @property
    def offsets_reset(self) -> int:
        """Partitions read from their beginning instead of at the offset asked for, since this
        client started: the topic was deleted and created again (``kafka.offsets_reset`` of
        :meth:`counters`, without the core lock)."""
        return self._adapter.counters.get("offsets_reset", 0)

    @property
    def kafka_unreachable_since(self) -> float | None:
        """Unix time since which this client cannot reach Kafka (transport failures, nothing
        read since), once that has lasted 2 s; None while it reads normally."""
        return self._down_wall

    @property
    def subscriptions(self) -> dict[str, RecurringSnapshot]:
        """Active recurring-snapshot subscriptions by topic."""
        return dict(self._subs)

    def skipped(self, topic: str) -> dict[str, int]:
        """Snapshot messages of ``topic`` read but not delivered, by reason, since this client
        started: ``malformed.<why>`` (not decodable), ``late.<what>`` (for an iteration
        already closed), ``duplicate`` / ``duplicate.header`` / ``duplicate.tail``,
        ``before_start.data`` / ``before_start.tail`` (the rest of an iteration already under
        way when a fresh subscription began reading), ``lost.retention`` (never read: a resume
        found them deleted by the topic's retention). The client-wide totals are in
        :meth:`counters` (``assembler.*``; ``kafka.offsets_missing``)."""
        with self._core_lock:
            return dict(self._skips.get(topic, {}))

    def lag(self, topic: str, timeout: float = 2.0) -> int | None:
        """Messages of ``topic`` between this client's read position and the end of the
        topic, summed over its partitions (records already read but not yet taken from a
        subscription's queue are not counted: see :attr:`RecurringSnapshot.pending`).

        Computed in the consumer thread: the high watermarks are queried from the broker and
        the read positions taken right after, with no poll in between, so the two agree.
        None when the client does not read ``topic``, the topic is unknown, or the answer
        does not come within ``timeout`` seconds. Never raises for Kafka problems.
        """
        if self._closed or topic not in self._adapter.topics:
            return None
        adapter = self._adapter
        marks_f = adapter.watermarks(topic, timeout_s=timeout)
        positions_f = adapter.call_soon(lambda: adapter.positions(topic))
        try:
            marks = marks_f.result(timeout + 1.0)
            positions = positions_f.result(timeout + 1.0)
        except (FutureTimeoutError, ClientError) as exc:
            self._log.debug("lag unavailable", topic=topic, error=str(exc))
            return None
        if not marks or not positions:
            return None
        lag = 0
        for partition, (_low, high) in marks.items():
            position = positions.get(partition, high)
            lag += max(0, high - (position if position >= 0 else high))
        return lag

    def unsubscribe(self, sub: RecurringSnapshot, timeout: float = 5.0) -> None:
        """Stop reading a recurring snapshot's topic *without* stopping the gateway snapshot
        (for that, :meth:`snapshot_stop`): iterations still open close ``CLOSED`` and the
        handle ends (:meth:`RecurringSnapshot.get` returns None after the queued events).
        For when the gateway cannot be told (its stop failed) or should keep publishing.
        Idempotent; does nothing for a handle of another client."""
        if sub._client is not self or sub.ended:
            return
        self._finish_subscription(sub, remove_timeout_s=timeout)
        sub._log.info("recurring snapshot unsubscribed")

    # ------------------------------------------------------------------ consumer thread
    def _on_records(self, records: Sequence[RawMessage], drained: bool) -> None:
        now = time.monotonic()
        reply_topic = self.reply_topic
        events: list[IterationEvent] = []
        outcomes: list[Outcome] = []
        with self._core_lock:
            feed_run = self._assembler.feed_run
            i, n = 0, len(records)
            while i < n:  # one pass per run of records of one topic
                msg = records[i]
                topic: str = msg.topic()  # type: ignore[assignment]
                if topic == reply_topic:
                    outcomes.extend(
                        self._feed_reply(msg.value(), msg.headers(), kafka_time_ms(msg))
                    )
                    i += 1
                    continue
                skip_base = self._skip_counts()
                i = feed_run(records, i, now, events)
                self._attribute_skips(topic, skip_base)
            if drained:
                events.extend(self._assembler.idle(now))
            self._note_kafka_state(now)
            if now >= self._next_expire:
                self._next_expire = now + _EXPIRE_EVERY_S
                paused = self._note_paused_topics(now)  # every 50 ms, not every batch
                if self._stalled_since is None:
                    # deadlines passed while Kafka was known to answer, not later: silence
                    # is told from a silent Kafka only by the adapter's probe
                    alive_at = min(now, self._adapter.alive_at)
                    events.extend(self._assembler.expire(alive_at, frozen=paused))
                outcomes.extend(self._tracker.expire(now))
            waiters = [(o, self._waiters.pop(o.reply_id, None)) for o in outcomes]
            if events:  # routed under the lock: events reach each handle in assembly order
                self._route(events)
        for outcome, waiter in waiters:
            if waiter is not None:
                self._complete(waiter, outcome)

    def _note_paused_topics(self, now: float) -> frozenset[str]:
        """Consumer thread, core lock held. A paused topic (back-pressure: its sink is slow;
        or a user's pause) is not read, so its open iterations wait as while Kafka is
        unreachable: their messages are in Kafka, and the paused time does not count against
        their deadlines (another topic's reading kept expiring them: an iteration open when
        its topic paused for longer than its timeout was cut, its later messages skipped as
        late). Returns the paused topics."""
        paused = self._adapter.paused_topics
        since = self._paused_since
        for topic in paused:
            since.setdefault(topic, now)
        if len(since) > len(paused):  # some were resumed (or removed)
            for topic in [t for t in since if t not in paused]:
                self._assembler.defer(now - since.pop(topic), topic)
        return paused

    def _note_kafka_state(self, now: float) -> None:
        """Consumer thread, core lock held. While reading is stalled (Kafka unreachable, no
        record since) open iterations wait: their messages may be in Kafka, and the time does
        not count against their deadlines, from the last time Kafka answered (a Kafka gone
        silent is found out by a probe, later). Kafka unreachable for 2 s is reported (log,
        :attr:`kafka_unreachable_since`), once per outage: a broker of a cluster failing while
        records flow is not."""
        adapter = self._adapter
        if adapter.reading_stalled:
            if self._stalled_since is None:
                self._stalled_since = min(now, adapter.alive_at)
        elif self._stalled_since is not None:
            self._assembler.defer(now - self._stalled_since)
            self._stalled_since = None
        if adapter.kafka_down:
            if self._down_since is None:
                self._down_since = now
            elif self._down_wall is None and now - self._down_since >= _DOWN_REPORT_S:
                self._down_wall = time.time() - (now - self._down_since)
                self._log.warning("Kafka unreachable: open iterations wait for it")
        elif self._down_since is not None:
            if self._down_wall is not None:
                self._log.info("Kafka reachable again", down_s=round(now - self._down_since, 1))
            self._down_since = None
            self._down_wall = None

    def _on_offset_gap(self, topic: str, partition: int, expected: int, read: int) -> None:
        """Consumer thread: a topic resumed at ``expected`` began at ``read``; the messages
        between are gone from Kafka (its retention), charged to the topic as ``lost.retention``
        (:meth:`skipped`). Reading from below the offset loses nothing (the adapter logs it):
        the topic was created again, so nothing it holds was recorded before a resume."""
        with self._core_lock:
            if read > expected:
                # a resume read from below its resume offset: what lies below it was recorded
                expected = max(expected, self._assembler.priming_until(topic, partition))
                if read > expected:
                    self._skips.setdefault(topic, Counter())["lost.retention"] += read - expected
            else:
                self._assembler.unprime(topic, partition)

    def _skip_counts(self) -> dict[str, int]:
        """The assembler's skip counters (core lock held)."""
        return {k: v for k, v in self._assembler.counters.items() if k.startswith(SKIP_PREFIXES)}

    def _attribute_skips(self, topic: str, before: dict[str, int]) -> None:
        """Charge the skip counters' growth since ``before`` to ``topic`` (core lock held)."""
        counters = self._assembler.counters
        grown = {k: counters[k] - before.get(k, 0) for k in counters
                 if k.startswith(SKIP_PREFIXES) and counters[k] != before.get(k, 0)}
        if grown:
            self._skips.setdefault(topic, Counter()).update(grown)

    def _feed_reply(
        self, value: bytes | None, headers: Any, kafka_ms: int | None = None
    ) -> list[Outcome]:
        try:
            reply = decode_reply(value, headers)
        except DecodeError as exc:
            self._count("replies.malformed." + exc.reason)
            return []
        reply.kafka_time_ms = kafka_ms
        return self._tracker.feed(reply)

    def _route(self, events: list[IterationEvent]) -> None:
        subs = self._subs
        first_topic = events[0].topic
        if all(e.topic == first_topic for e in events):
            groups = {first_topic: events}
        else:
            groups = {}
            for event in events:
                groups.setdefault(event.topic, []).append(event)
        for topic, group in groups.items():
            sub = subs.get(topic)
            if sub is None:
                self._count("events.unrouted", len(group))
                continue
            sub._push(group)

    def _dispatch(self, fn: Callable[[], None]) -> None:
        self._dispatcher.submit(fn)

    # ------------------------------------------------------------------ commands
    def _complete(self, waiter: _Waiter, outcome: Outcome) -> None:
        if waiter.on_done is not None:
            on_done = waiter.on_done
            self._dispatch(lambda: on_done(outcome))
        if not waiter.future.done():
            waiter.future.set_result(outcome)

    def _fail_command(self, reply_id: str, error: ClientError) -> None:
        with self._core_lock:
            self._tracker.cancel(reply_id)
            waiter = self._waiters.pop(reply_id, None)
        if waiter is not None:
            self._log.warning("command failed", command=waiter.command, reply_id=reply_id,
                              error=str(error))
            self._complete(waiter, Outcome(reply_id, waiter.command, [], False, error))

    def _send(
        self,
        fields: dict[str, Any],
        command: str,
        timeout_s: float,
        *,
        multi: bool = False,
        on_done: Callable[[Outcome], None] | None = None,
    ) -> Future[Outcome]:
        self._check_open()
        reply_id = str(fields["reply_id"])
        payload = encode_command(fields)
        future: Future[Outcome] = Future()
        with self._core_lock:
            if reply_id in self._waiters or reply_id in self._tracker:
                # the reply could not be told apart: the pending command keeps its waiter
                raise ClientError(f"reply_id {reply_id!r} is already used by a pending command")
            self._waiters[reply_id] = _Waiter(command, future, on_done)
            self._tracker.expect(
                reply_id, command, time.monotonic() + timeout_s, multi=multi, timeout_s=timeout_s
            )

        def delivered(error: TransportError | None) -> None:
            if error is not None:
                self._fail_command(reply_id, error)

        try:
            self._adapter.produce(self.cmd_topic, payload, on_delivery=delivered)
        except ClientError as exc:
            self._fail_command(reply_id, exc)
        self._log.debug("command sent", command=command, reply_id=reply_id)
        return future

    def _wait(self, future: Future[Outcome], command: str, reply_id: str,
              timeout_s: float) -> Outcome:
        try:
            # the tracker expires the request at timeout_s; the margin only guards a dead thread
            outcome = future.result(timeout_s + 5.0)
        except FutureTimeoutError:
            with self._core_lock:
                self._tracker.cancel(reply_id)
                self._waiters.pop(reply_id, None)
            raise GatewayTimeoutError(command, reply_id, timeout_s) from None
        if outcome.error is not None:
            raise self._explained(outcome.error)
        return outcome

    def _explained(self, error: ClientError) -> ClientError:
        """A command that got no reply, or that Kafka did not take: when the command topic
        does not exist, that is the reason (no gateway can read the command), not a gateway
        that does not answer or a slow Kafka."""
        if not isinstance(error, GatewayTimeoutError | TransportError) or self._adapter.kafka_down:
            return error
        try:
            if self._adapter.topic_partitions(self.cmd_topic, timeout_s=2.0) is not None:
                return error
        except ClientError:  # Kafka does not answer either: the error stands
            return error
        missing = TransportError(
            f"the command topic {self.cmd_topic!r} does not exist, so no gateway receives "
            "commands (RECORDER_CMD_TOPIC must name the gateway's cmd-input-topic)")
        missing.__cause__ = error
        return missing

    def _request(self, fields: dict[str, Any], command: str, timeout: float | None,
                 *, multi: bool = False) -> Outcome:
        timeout_s = self.settings.command_timeout_s if timeout is None else timeout
        future = self._send(fields, command, timeout_s, multi=multi)
        return self._wait(future, command, str(fields["reply_id"]), timeout_s)

    def command(
        self, fields: Mapping[str, Any], timeout: float | None = None, *, multi: bool = False
    ) -> Outcome:
        """Send a raw k2eg command and wait for its reply (``reply_topic``, ``reply_id`` and
        ``serialization`` are filled in when missing). For commands this client does not wrap
        (``put``, ``monitor``) and for gateway generations with other fields. Raises
        :class:`GatewayError` for a non-zero error, :class:`GatewayTimeoutError`."""
        body = dict(fields)
        body.setdefault("serialization", "msgpack")
        body.setdefault("reply_topic", self.reply_topic)
        body.setdefault("reply_id", new_reply_id())
        return self._request(body, str(body.get("command", "?")), timeout, multi=multi)

    @staticmethod
    def _ack(outcome: Outcome) -> Ack:
        reply = outcome.reply
        return Ack(
            outcome.command,
            outcome.reply_id,
            reply.message if reply else "",
            reply.publishing_topic if reply else None,
        )

    # ------------------------------------------------------------------ get
    def get(self, pv_uri: str, timeout: float | None = None) -> PVSample:
        """The current value of one PV (``get``). Raises :class:`GatewayError` (e.g. -3 when
        the PV does not connect) or :class:`GatewayTimeoutError`. Without ``timeout`` it waits
        the gateway's own get timeout plus the command timeout, so that -3 can arrive."""
        if timeout is None:
            timeout = GATEWAY_GET_TIMEOUT_S + self.settings.command_timeout_s
        fields = get_command(pv_uri, reply_topic=self.reply_topic, reply_id=new_reply_id())
        outcome = self._request(fields, GET, timeout)
        samples = outcome.samples
        base = pv_base_name(pv_uri)
        if base in samples:
            return samples[base]
        if len(samples) == 1:
            return next(iter(samples.values()))
        raise ClientError(f"the reply to get {pv_uri!r} holds no value for {base!r}")

    # ------------------------------------------------------------------ one-shot snapshot
    def _one_shot_timeout(self, time_window_msec: int | None, timeout: float | None) -> float:
        if timeout is not None:
            return timeout
        window = (1000 if time_window_msec is None else time_window_msec) / 1000.0
        return window + self.settings.command_timeout_s

    @staticmethod
    def _one_shot_values(outcome: Outcome) -> dict[str, list[PVSample]]:
        values: dict[str, list[PVSample]] = {}
        for reply in outcome.replies:
            for pv, sample in reply.samples.items():
                values.setdefault(pv, []).append(sample)
        return values

    def snapshot(
        self,
        pv_uri_list: Iterable[str],
        handler: OneShotHandler,
        *,
        time_window_msec: int | None = None,
        timeout: float | None = None,
        on_error: ErrorHandler | None = None,
    ) -> str:
        """One-shot snapshot, asynchronous: returns the reply id at once; later, from the
        dispatcher thread, ``handler(reply_id, {pv: [PVSample]})`` (PVs that sent nothing are
        absent, as from the gateway) or ``on_error(reply_id, error)``."""
        uris = list(pv_uri_list)
        reply_id = new_reply_id()
        fields = snapshot_command(
            uris, reply_topic=self.reply_topic, reply_id=reply_id,
            time_window_msec=time_window_msec,
        )
        log = self._log.bind(reply_id=reply_id)

        def done(outcome: Outcome) -> None:
            for failure in outcome.failures:
                log.warning("one-shot snapshot error reply", code=failure.error,
                            message=failure.message)
            if outcome.error is not None:
                if on_error is not None:
                    on_error(reply_id, outcome.error)
                else:
                    log.warning("one-shot snapshot failed", error=str(outcome.error))
                return
            handler(reply_id, self._one_shot_values(outcome))

        self._send(fields, SNAPSHOT, self._one_shot_timeout(time_window_msec, timeout),
                   multi=True, on_done=done)
        return reply_id

    def snapshot_sync(
        self,
        pv_uri_list: Iterable[str],
        timeout: float | None = None,
        *,
        time_window_msec: int | None = None,
    ) -> dict[str, list[PVSample]]:
        """One-shot snapshot, blocking: ``{pv: [PVSample]}`` (base PV names)."""
        reply_id = new_reply_id()
        fields = snapshot_command(
            list(pv_uri_list), reply_topic=self.reply_topic, reply_id=reply_id,
            time_window_msec=time_window_msec,
        )
        timeout_s = self._one_shot_timeout(time_window_msec, timeout)
        future = self._send(fields, SNAPSHOT, timeout_s, multi=True)
        outcome = self._wait(future, SNAPSHOT, reply_id, timeout_s)
        for failure in outcome.failures:
            self._log.warning("one-shot snapshot error reply", reply_id=reply_id,
                              code=failure.error, message=failure.message)
        return self._one_shot_values(outcome)

    # ------------------------------------------------------------------ recurring snapshots
    def snapshot_recurring(
        self,
        properties: SnapshotProperties,
        handler: EventHandler | None = None,
        timeout: float | None = None,
        *,
        start: StartAt | None = None,
        max_pending: int | None = None,
        max_pending_bytes: int | None = None,
        prime_until: Mapping[int, int] | None = None,
    ) -> RecurringSnapshot:
        """Start a recurring snapshot and read its topic; returns its handle.

        ``handler``: called with each event from the dispatcher thread (else iterate the
        handle). ``start``: where to read the topic (default: from the topic's end just
        before the command, or its beginning if the gateway creates it now; give explicit
        offsets to resume after a restart). Read from "now" (the default, or
        ``StartAt.end()``), the subscription begins with the first iteration whose header it
        reads: the rest of one already under way is skipped (``before_start.*`` in
        :meth:`skipped`). If the gateway answers "already running" (same
        normalized name), the parameters of the running snapshot apply; the handle says
        ``already_running`` and reads the normalized topic anyway.

        ``prime_until``: with ``start`` at explicit offsets below these (partition -> offset;
        a resume after a crash read from the oldest iteration then open), what a partition
        holds below its offset here was recorded already: it only primes the duplicate
        check, so a producer's copy of such a message read after it is dropped (see
        :meth:`IterationAssembler.prime_until`); a start below a partition's oldest message
        moves up to it (deleted by retention: nothing to prime with, and nothing lost).
        """
        self._check_open()
        properties.validate()
        topic = properties.topic
        if topic in self._subs:
            raise ClientError(f"this client already reads snapshot topic {topic!r}")
        log = self._log.bind(snapshot=properties.snapshot_name, topic=topic)
        timeout_s = self.settings.command_timeout_s if timeout is None else timeout
        before = answer_within(self._adapter.watermarks(topic), timeout_s + 1.0,
                               f"the offsets of {topic!r}")
        reply_id = new_reply_id()
        fields = repeating_snapshot_command(
            properties, reply_topic=self.reply_topic, reply_id=reply_id
        )
        outcome = self._wait(
            self._send(fields, REPEATING_SNAPSHOT, timeout_s), REPEATING_SNAPSHOT, reply_id,
            timeout_s,
        )
        ack = self._ack(outcome)
        already_running = ack.publishing_topic is None
        if ack.publishing_topic and ack.publishing_topic != topic:
            log.warning("gateway publishes to another topic", publishing_topic=ack.publishing_topic)
            topic = ack.publishing_topic
            log = log.bind(topic=topic)
            if start is None:  # `before` holds another topic's offsets: read this one's end
                # (the gateway creates the topic before its ack, and publishes after it)
                before = answer_within(self._adapter.watermarks(topic), timeout_s + 1.0,
                                       f"the offsets of {topic!r}")
        if already_running:
            log.warning("snapshot already running: its own parameters apply", message=ack.message)
        # read from "now" (not resumed, not history): begin at the first whole iteration
        fresh = start is None or start.kind == "end"
        if start is None:
            # a partition added since the offsets were taken holds only newer messages
            start = StartAt.at({p: high for p, (_, high) in before.items()},
                               others="beginning") if before else StartAt.beginning()
        primed: dict[int, int] = {}
        if prime_until and start.kind == "offsets" and start.offsets is not None:
            if topic != properties.topic:  # `before` is another topic's: no priming (each
                # partition starts at its resume offset, as if that were its oldest message)
                before = {p: (o, o) for p, o in prime_until.items()}
            start, primed = _primed_start(start, prime_until, before)
        sub = RecurringSnapshot(
            self, properties, topic, ack, already_running, handler,
            self.max_pending if max_pending is None else max_pending,
            self.max_pending_bytes if max_pending_bytes is None else max_pending_bytes,
        )
        with self._core_lock:
            self._assembler.set_topic_timeout(
                topic, iteration_timeout_s(properties, self.iteration_slack_s)
            )
            if fresh:
                self._assembler.start_at_header(topic)
            if primed:
                self._assembler.prime_until(topic, primed)
            stopped_at = self._stopped_at.pop(topic, None)
            if fresh and not already_running and stopped_at is not None:
                # started anew after a stop this client saw acknowledged: what the gateway
                # produced up to that ack (its final iteration, read late) is not of this life
                self._assembler.skip_until(topic, stopped_at * 1_000_000 + 999_999)
        with self._subs_lock:
            if topic in self._subs:
                raise ClientError(f"this client already reads snapshot topic {topic!r}")
            self._subs = {**self._subs, topic: sub}
        try:
            sub.start_offsets = answer_within(
                self._adapter.add_topic(topic, start, timeout_s=timeout_s), timeout_s + 1.0,
                f"the assignment of {topic!r}",
            )
        except BaseException:
            with self._subs_lock:
                self._subs = {k: v for k, v in self._subs.items() if k != topic}
            self._adapter.remove_topic(topic)  # an assignment still under way is undone
            raise
        log.info("recurring snapshot subscribed", offsets=sub.start_offsets,
                 already_running=already_running, type=properties.type.value,
                 triggered=properties.triggered, time_window=properties.time_window)
        return sub

    def snapshot_resend(
        self, properties: SnapshotProperties, timeout: float | None = None
    ) -> Ack:
        """Send ``repeating_snapshot`` for ``properties`` and return the gateway's ack, and
        nothing else: no topic is subscribed (see :meth:`RecurringSnapshot.resend_start`)."""
        self._check_open()
        properties.validate()
        fields = repeating_snapshot_command(
            properties, reply_topic=self.reply_topic, reply_id=new_reply_id()
        )
        return self._ack(self._request(fields, REPEATING_SNAPSHOT, timeout))

    def snapshot_trigger(
        self, snapshot_name: str, timeout: float | None = None,
        *, tags: Mapping[str, str] | None = None,
    ) -> Ack:
        """Trigger one iteration of a triggered snapshot (a periodic one ignores it)."""
        fields = trigger_command(
            snapshot_name, reply_topic=self.reply_topic, reply_id=new_reply_id(), tags=tags
        )
        return self._ack(self._request(fields, REPEATING_SNAPSHOT_TRIGGER, timeout))

    snapshost_trigger = snapshot_trigger  # the official client's spelling

    def snapshot_stop(
        self,
        snapshot_name: str,
        timeout: float | None = None,
        *,
        final_timeout_s: float | None = None,
        keep_backpressure: bool = False,
    ) -> StopResult:
        """Stop a recurring snapshot; if this client reads it, deliver its final iteration.

        The gateway publishes a final iteration, then acks. Unlike the official client (which
        unsubscribes first), the topic is read until that iteration's tail is seen and the
        topic is quiet, or ``final_timeout_s`` passes (default: the iteration timeout; it
        counts again from each step of reading a backlog, see :meth:`_drain_final`); then
        the subscription ends. In handler mode this returns after the handler saw the last
        event (unless called from a handler).

        The subscription is read regardless of back-pressure meanwhile, so that the final
        iteration comes even when nobody takes events (a stop called from the thread that
        reads them): a subscription far behind then has its whole backlog in memory. With
        ``keep_backpressure`` (the caller's events are taken by another thread during the
        stop) back-pressure goes on pausing the topic: memory stays bounded.
        """
        self._check_open()
        topic = normalize_snapshot_name(snapshot_name)
        sub = self._subs.get(topic)
        if sub is None:  # a gateway that acked another publishing topic: read there
            sub = next((s for s in self._subs.values() if s.properties.topic == topic), None)
        if sub is not None:
            topic = sub.topic
        timeout_s = self.settings.command_timeout_s if timeout is None else timeout
        before: dict[int, int] = {}
        if sub is not None:
            marks = answer_within(self._adapter.watermarks(topic), timeout_s + 1.0,
                                  f"the offsets of {topic!r}")
            before = {p: high for p, (_, high) in marks.items()}
            # after the offsets: a failure to get them leaves it as it was
            sub._begin_final(keep_backpressure)
        reply_id = new_reply_id()
        fields = stop_command(snapshot_name, reply_topic=self.reply_topic, reply_id=reply_id)
        try:
            outcome = self._wait(
                self._send(fields, REPEATING_SNAPSHOT_STOP, timeout_s), REPEATING_SNAPSHOT_STOP,
                reply_id, timeout_s,
            )
        except ClientError:
            if sub is not None:
                sub._backpressure = True
            raise
        ack = self._ack(outcome)
        reply = outcome.reply
        if reply is not None and reply.kafka_time_ms is not None:
            with self._core_lock:
                self._stopped_at[topic] = reply.kafka_time_ms
        if sub is None:
            return StopResult(snapshot_name, topic, ack.message, False)
        if final_timeout_s is None:
            final_timeout_s = iteration_timeout_s(sub.properties, self.iteration_slack_s)
        # "already stopped": the gateway did not run it (restarted, or stopped by another
        # client) and publishes no final iteration for this stop: read what the topic holds
        tail_expected = ALREADY_STOPPED not in ack.message
        final = self._drain_final(sub, before, final_timeout_s, tail_expected=tail_expected,
                                  ack_time_ms=reply.kafka_time_ms if reply else None)
        final_seen = final is not None
        self._finish_subscription(sub)
        if not self._dispatcher.in_thread:
            sub.wait_finished(final_timeout_s + 5.0)
        sub._log.info("recurring snapshot stopped", final_seen=final_seen,
                      final_iteration=final.iter_index if final else None)
        return StopResult(snapshot_name, topic, ack.message, final_seen, final)

    def _drain_final(
        self,
        sub: RecurringSnapshot,
        before: dict[int, int],
        final_timeout_s: float,
        quiet_s: float = 0.2,
        *,
        tail_expected: bool = True,
        ack_time_ms: int | None = None,
    ) -> IterationClosed | None:
        """Wait for the final iteration: closed by a tail at an offset >= ``before`` (so
        published after the stop command), no newer iteration open, everything up to the high
        watermark delivered and the watermark unchanged for ``quiet_s``. Older iterations
        still open then lost their tail for good (T(n) precedes H(n+1)); they close CLOSED.
        Without ``tail_expected`` (no final iteration will come) only the last condition.

        The gateway produces its final tail just before its ack (same producer, same
        clock), but the ack can be read first. With ``ack_time_ms`` (the ack's Kafka
        timestamp), a tail produced more than :data:`FINAL_BEFORE_ACK_MS` before it is a
        regular iteration that came between the stop and the final one, so the wait goes
        on for the final one until ``final_timeout_s``; then that tail is taken (a warning
        says so). See ``docs/decisions/0015-the-final-iteration-of-a-stop.md``.

        ``final_timeout_s`` counts from the ack, and again from each step the reading makes
        while it is behind where the topic ended once the ack was in: a subscription that
        fell behind (paused by back-pressure) reads its whole backlog, whose end holds the
        final iteration, however long that takes while it goes on.
        """
        deadline = time.monotonic() + final_timeout_s
        quiet_since: float | None = None
        quiet_marks: dict[int, tuple[int, int]] | None = None
        early: IterationClosed | None = None  # quiet, but produced long before the ack
        ended_at: dict[int, int] | None = None  # the topic's end once the ack was in
        read_to: dict[int, int] | None = None
        marks: dict[int, tuple[int, int]] = {}
        marks_at = -math.inf  # asked of the broker at most every MARKS_EVERY_S: each ask is
        # served by the one consumer thread, which also reads the replies of other stops
        while time.monotonic() < deadline:
            positions = self._adapter.positions(sub.topic)
            if ended_at is None:
                asked = self._watermarks_or_none(sub.topic)
                if asked is not None:
                    ended_at = {p: hi for p, (_, hi) in asked.items()}
                    marks, marks_at = asked, time.monotonic()  # the quiet check's first
            elif positions != read_to and any(positions.get(p, 0) < hi
                                              for p, hi in ended_at.items()):
                deadline = max(deadline, time.monotonic() + final_timeout_s)  # still reading
            read_to = positions
            final = sub._tail_after(before)
            if final is not None or not tail_expected:
                newer: list[int] = []
                if final is not None:
                    with self._core_lock:
                        newer = [i for i in self._assembler.open_iterations(sub.topic)
                                 if i >= final.iter_index]
                if newer:
                    quiet_since = None
                else:
                    if time.monotonic() - marks_at >= MARKS_EVERY_S:
                        marks = self._watermarks_or_none(sub.topic) or {}
                        marks_at = time.monotonic()
                    positions = self._adapter.positions(sub.topic)
                    caught_up = all(positions.get(p, 0) >= hi for p, (_, hi) in marks.items())
                    if not caught_up:
                        quiet_since = None
                    elif quiet_since is None or marks != quiet_marks:
                        quiet_since, quiet_marks = time.monotonic(), marks
                    elif time.monotonic() - quiet_since >= quiet_s:
                        final = sub._tail_after(before)
                        if final is None or not produced_before(final, ack_time_ms):
                            return final
                        if early is not final:
                            early = final
                            sub._log.info(
                                "stop: the newest tail came before the final one; waiting",
                                iteration=final.iter_index,
                                before_ack_ms=before_ack_ms(final, ack_time_ms),
                            )
            time.sleep(0.02)
        if early is not None and sub._tail_after(before) is early:
            sub._log.warning(
                "stop: no tail close to the gateway's ack was read; the newest is taken as"
                " the final iteration", iteration=early.iter_index,
                before_ack_ms=before_ack_ms(early, ack_time_ms),
            )
            return early
        return None

    def _watermarks_or_none(self, topic: str, timeout_s: float = 2.0
                            ) -> dict[int, tuple[int, int]] | None:
        """The topic's watermarks, or None when Kafka does not answer within ``timeout_s``
        (the request is then withdrawn: the consumer thread does not serve it later)."""
        future = self._adapter.watermarks(topic)
        try:
            return future.result(timeout_s)
        except FutureTimeoutError:
            future.cancel()
            return None
        except ClientError:
            return None

    def _finish_subscription(self, sub: RecurringSnapshot, remove_timeout_s: float = 5.0) -> None:
        """Stop reading the topic, close what is still open (``CLOSED``), end the handle."""
        with contextlib.suppress(ClientError, FutureTimeoutError):
            self._adapter.remove_topic(sub.topic).result(remove_timeout_s)
        with self._core_lock:
            events = self._assembler.close(sub.topic)
            if events:
                sub._push(events)
            sub._end()
        with self._subs_lock:
            self._subs = {k: v for k, v in self._subs.items() if k != sub.topic}
