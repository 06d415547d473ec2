"""The heartbeat: the status document on the status topic every few seconds."""

from __future__ import annotations

from collections.abc import Callable

from recorder.admin.status import StatusDocument


class Heartbeat:
    """Publishes ``build(seq)`` every ``interval_s`` (monotonic seconds, injected)."""

    def __init__(self, interval_s: float, publish: Callable[[bytes], object]) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.interval_s = interval_s
        self._publish = publish
        self._next: float | None = None
        self.seq = 0

    def due(self, now: float) -> bool:
        return self._next is None or now >= self._next

    def maybe_beat(self, now: float, build: Callable[[int], StatusDocument]) -> bool:
        """Publish when due; True when a heartbeat went out."""
        if not self.due(now):
            return False
        self.beat(now, build)
        return True

    def beat(self, now: float, build: Callable[[int], StatusDocument]) -> None:
        """Publish now (e.g. at a state change) and restart the interval."""
        self.seq += 1
        self._publish(build(self.seq).encode())
        self._next = now + self.interval_s
