"""RecurringSnapshot: the handle of one recurring snapshot a
:class:`~recorder.client.client.K2egClient` reads: its events (handler or iterator mode), flow
control and stop.

Back-pressure
    Each subscription holds at most ``max_pending`` undelivered events and
    ``max_pending_bytes`` of their messages (:attr:`ValuesReceived.nbytes`; soft bounds: one
    Kafka batch may overshoot). At either bound the subscription's topic is paused in the
    consumer thread (nothing more is fetched for it, other topics keep flowing); once the
    handler or the iterator has taken both down to half, it is resumed exactly after the last
    delivered record.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import structlog

from recorder.client.events import IterationClosed, IterationEvent, ValuesReceived
from recorder.client.properties import SnapshotProperties
from recorder.client.results import Ack, StopResult
from recorder.client.throttle import RepeatThrottle
from recorder.errors import ClientError

if TYPE_CHECKING:
    from recorder.client.client import EventHandler, K2egClient

__all__ = ["RecurringSnapshot"]

_log = structlog.get_logger("recorder.client")

_END = object()  # iterator-mode end marker
DEFAULT_MAX_PENDING_BYTES = 64 * 1024 * 1024


def _bytes_of(event: object) -> int:
    """The message bytes an event holds (its samples'; headers and tails count nothing)."""
    return event.nbytes if event.__class__ is ValuesReceived else 0


class RecurringSnapshot:
    """A recurring snapshot this client reads: its events, flow control and stop.

    Two delivery modes, fixed at creation:

    * *handler*: ``handler(event)`` is called from the client's dispatcher thread, in order;
    * *iterator*: take events with :meth:`get`, :meth:`events` or ``for event in sub``.

    Events are :data:`~recorder.client.events.IterationEvent` objects, in Kafka order for the
    topic. The subscription ends after :meth:`K2egClient.snapshot_stop` (final iteration
    included) or :meth:`K2egClient.close` (open iterations closed ``CLOSED``).
    """

    def __init__(  # noqa: PLR0917
        self,
        client: K2egClient,
        properties: SnapshotProperties,
        topic: str,
        ack: Ack,
        already_running: bool,
        handler: EventHandler | None,
        max_pending: int,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
    ) -> None:
        self.properties = properties
        self.snapshot_name = properties.snapshot_name
        self.topic = topic
        self.ack = ack
        self.already_running = already_running
        self.start_offsets: dict[int, int] = {}
        self.stats: Counter[str] = Counter()
        self._client = client
        self._handler = handler
        self._max_pending = max(1, max_pending)
        self._low = self._max_pending // 2
        self._max_bytes = max(1, max_pending_bytes)
        self._low_bytes = self._max_bytes // 2
        self._cond = threading.Condition()
        self._items: deque[Any] = deque()
        self._pending = 0
        self._pending_bytes = 0
        self._bp_paused = False
        self._user_paused = False
        self._paused = False  # what the adapter was last asked for
        self._backpressure = True
        self._ended = False
        self._finished = threading.Event()
        self._tails: dict[int, IterationClosed] = {}  # partition -> newest tail-closed event
        self._incomplete_log_throttle = RepeatThrottle(60.0)  # "iteration incomplete"
        # with the context bound where it is made (the daemon's run=): its lines are logged
        # from the client's consumer and dispatcher threads, which do not have it
        self._log = _log.bind(**{**structlog.contextvars.get_contextvars(),
                                 "snapshot": self.snapshot_name, "topic": topic})

    # ---- public -----------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Events queued and not yet handled/taken."""
        with self._cond:
            return self._pending

    @property
    def pending_bytes(self) -> int:
        """Message bytes of the events queued and not yet handled/taken."""
        with self._cond:
            return self._pending_bytes

    @property
    def backpressure_paused(self) -> bool:
        """True while the topic is paused because the queue reached its bound (the handler or
        the iterator falls behind), whatever :meth:`pause` says."""
        with self._cond:
            return self._bp_paused and not self._ended

    @property
    def paused(self) -> bool:
        """True while the topic's consumption is paused (back-pressure or :meth:`pause`)."""
        with self._cond:
            return self._paused

    @property
    def ended(self) -> bool:
        return self._ended

    def wait_finished(self, timeout: float | None = None) -> bool:
        """Wait until the subscription ended and (handler mode) its last event was handled."""
        return self._finished.wait(timeout)

    def pause(self) -> None:
        """Stop reading the topic until :meth:`resume` (e.g. while a sink is unavailable)."""
        with self._cond:
            self._user_paused = True
            self._apply_pause_locked()

    def resume(self) -> None:
        with self._cond:
            self._user_paused = False
            self._apply_pause_locked()

    def get(self, timeout: float | None = None) -> IterationEvent | None:
        """Next event (iterator mode); None once the subscription has ended.

        Raises :class:`TimeoutError` when nothing arrives within ``timeout`` seconds.
        """
        if self._handler is not None:
            raise ClientError("this subscription delivers its events to a handler")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                if self._ended:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no event from {self.topic!r} within {timeout:g} s")
                self._cond.wait(remaining)
            item = self._items.popleft()
            if item is _END:
                self._items.appendleft(item)  # stays ended for later calls
                return None
            self._pending -= 1
            self._pending_bytes -= _bytes_of(item)
            self._after_take_locked()
            event: IterationEvent = item
            return event

    def events(self, idle_timeout: float | None = None) -> Iterator[IterationEvent]:
        """Iterate until the subscription ends (or ``idle_timeout`` passes with no event)."""
        while True:
            try:
                event = self.get(idle_timeout)
            except TimeoutError:
                return
            if event is None:
                return
            yield event

    def __iter__(self) -> Iterator[IterationEvent]:
        return self.events()

    def lag(self, timeout: float = 2.0) -> int | None:
        """Messages of the topic not yet read by the client (see :meth:`K2egClient.lag`);
        None once the subscription has ended or when it cannot be known in time."""
        if self._ended:
            return None
        return self._client.lag(self.topic, timeout)

    def skipped(self) -> dict[str, int]:
        """Messages of the topic not delivered, by reason (see :meth:`K2egClient.skipped`)."""
        return self._client.skipped(self.topic)

    def unsubscribe(self, timeout: float = 5.0) -> None:
        """Stop reading without stopping the gateway snapshot (see
        :meth:`K2egClient.unsubscribe`)."""
        self._client.unsubscribe(self, timeout)

    def trigger(self, timeout: float | None = None) -> Ack:
        return self._client.snapshot_trigger(self.snapshot_name, timeout)

    def resend_start(self, timeout: float | None = None) -> Ack:
        """Send this snapshot's ``repeating_snapshot`` command again, with the same
        properties, without touching the subscription (the topic is read on).

        For a snapshot the gateway may have lost (a gateway restart forgets running
        snapshots): an ack with a ``publishing_topic`` means the gateway started it anew (its
        ``iter_index`` begins again at 1); none means it was still running."""
        return self._client.snapshot_resend(self.properties, timeout)

    def stop(
        self, timeout: float | None = None, *, final_timeout_s: float | None = None,
        keep_backpressure: bool = False,
    ) -> StopResult:
        return self._client.snapshot_stop(
            self.snapshot_name, timeout, final_timeout_s=final_timeout_s,
            keep_backpressure=keep_backpressure,
        )

    def __repr__(self) -> str:
        return (
            f"RecurringSnapshot({self.snapshot_name!r}, topic={self.topic!r}, "
            f"pending={self._pending}, paused={self._paused}, ended={self._ended})"
        )

    # ---- consumer-thread side ---------------------------------------------------------------
    def _push(self, events: list[IterationEvent]) -> None:
        nbytes = 0
        for event in events:
            if event.__class__ is ValuesReceived:
                nbytes += event.nbytes
            elif isinstance(event, IterationClosed):
                self._on_closed(event)
        with self._cond:
            if self._ended:
                self._client._count("events.after_end", len(events))
                return
            self._pending += len(events)
            self._pending_bytes += nbytes
            self.stats["events"] += len(events)
            if self._handler is not None:
                self._client._dispatch(lambda: self._deliver(events, nbytes))
            else:
                self._items.extend(events)
                self._cond.notify_all()
            if (
                self._backpressure
                and not self._bp_paused
                and (self._pending >= self._max_pending or self._pending_bytes >= self._max_bytes)
            ):
                self._bp_paused = True
                self.stats["backpressure_pauses"] += 1
                self._apply_pause_locked()

    def _on_closed(self, event: IterationClosed) -> None:
        if event.complete:
            self.stats["iterations.complete"] += 1
        else:
            self.stats["iterations.incomplete"] += 1
            reason = event.reason.value if event.reason else None
            fields = self._incomplete_log_throttle.log_fields(reason)  # a line a minute
            if fields is not None:
                self._log.info(
                    "iteration incomplete",
                    iteration=event.iter_index,
                    reason=reason,
                    missing=event.missing_messages,
                    error=event.error_code or None,
                    **fields,
                )
        if event.tail_timestamp_ns is not None:
            with self._cond:
                previous = self._tails.get(event.partition)
                if previous is None or event.offset > previous.offset:
                    # re-inserted: the dict's order is the order the tails came in
                    self._tails.pop(event.partition, None)
                    self._tails[event.partition] = event

    def _end(self) -> None:
        with self._cond:
            if self._ended:
                return
            self._ended = True
            if self._handler is not None:
                self._client._dispatch(self._finished.set)
            else:
                self._items.append(_END)
                self._finished.set()
                self._cond.notify_all()

    # ---- dispatcher side ----------------------------------------------------------------------
    def _deliver(self, events: list[IterationEvent], nbytes: int) -> None:
        handler = self._handler
        assert handler is not None
        try:
            for event in events:
                try:
                    handler(event)
                except Exception:
                    self._client._count("handler_errors")
                    self._log.exception("snapshot handler raised", iteration=event.iter_index)
        finally:
            with self._cond:
                self._pending -= len(events)
                self._pending_bytes -= nbytes
                self._after_take_locked()

    # ---- flow control -----------------------------------------------------------------------
    def _after_take_locked(self) -> None:
        if (
            self._bp_paused
            and self._pending <= self._low
            and self._pending_bytes <= self._low_bytes
        ):
            self._bp_paused = False
            self._apply_pause_locked()

    def _apply_pause_locked(self) -> None:
        want = (self._bp_paused or self._user_paused) and not self._ended
        if want == self._paused:
            return
        self._paused = want
        adapter = self._client._adapter
        (adapter.pause if want else adapter.resume)(self.topic)

    def _begin_final(self, keep_backpressure: bool = False) -> None:
        """Stop in progress: the final tail must be read, whatever the consumer does; with
        ``keep_backpressure`` (the caller takes events meanwhile) only as fast as it does."""
        with self._cond:
            if not keep_backpressure:
                self._backpressure = False
                self._bp_paused = False
            self._user_paused = False
            self._apply_pause_locked()

    def _tail_after(self, offsets: Mapping[int, int]) -> IterationClosed | None:
        """The newest iteration closed by a tail at an offset >= ``offsets`` (per partition):
        of several partitions' (a keyed final iteration in another partition than a
        pre-filled topic's), the one whose tail came last."""
        with self._cond:
            for partition, event in reversed(self._tails.items()):
                if event.offset >= offsets.get(partition, 0):
                    return event
            return None
