"""The heartbeat: the status document on the status topic every few seconds."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from recorder.admin.status import STATUS_MAX_BYTES, StatusDocument
from recorder.client.throttle import RepeatThrottle

_log = structlog.get_logger("recorder.daemon.heartbeat")


class Heartbeat:
    """Publishes ``build(seq)`` every ``interval_s`` (monotonic seconds, injected)."""

    def __init__(self, interval_s: float, publish: Callable[[bytes], object]) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.interval_s = interval_s
        self._publish = publish
        self._next: float | None = None
        self.seq = 0
        self._left_out_log = RepeatThrottle(600.0)

    def due(self, now: float) -> bool:
        return self._next is None or now >= self._next

    def maybe_beat(self, now: float, build: Callable[[int], StatusDocument]) -> bool:
        """Publish when due; True when a heartbeat went out."""
        if not self.due(now):
            return False
        self.beat(now, build)
        return True

    def beat(self, now: float, build: Callable[[int], StatusDocument]) -> None:
        """Publish now (e.g. at a state change) and restart the interval. A document over
        :data:`~recorder.admin.status.STATUS_MAX_BYTES` goes out with fewer runs' details
        (logged every 10 minutes while it lasts): Kafka would refuse it whole."""
        self.seq += 1
        doc = build(self.seq)
        payload = doc.encode()
        if len(payload) <= STATUS_MAX_BYTES:  # as nearly always: encoded once, not again
            self._publish(payload)
            self._next = now + self.interval_s
            return
        fitted = doc.fitted()
        if fitted.runs_left_out:
            fields = self._left_out_log.log_fields("left out")
            if fields is not None:
                _log.warning("status heartbeat too large for one Kafka message: the details "
                             "of some runs are left out (k2eg-recorder status RUN shows one)",
                             runs=len(doc.runs), left_out=fitted.runs_left_out,
                             needing_a_look=fitted.runs_left_out_needing_a_look,
                             max_bytes=STATUS_MAX_BYTES, **fields)
        self._publish(fitted.encode())
        self._next = now + self.interval_s
