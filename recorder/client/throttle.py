"""Throttling of repeated log messages (pure code).

While Kafka is unreachable, librdkafka reports every failed connection attempt, both in its
own log and through the error callback: about 20 lines a second from one daemon, the same text
each time. :class:`RepeatThrottle` lets the first occurrence of a message through, holds back
its repeats for ``window_s``, and lets the next one through with the number held back, so an
outage of an hour costs a line a minute per distinct message, not tens of thousands.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Hashable

_DIGITS = re.compile(r"\d+")


def normalized(text: str) -> str:
    """``text`` with every run of digits replaced by ``#``. Messages that differ only in a
    number (``after 0ms`` / ``after 1ms``, ``producer-1`` / ``producer-2``) count as repeats."""
    return _DIGITS.sub("#", text)


class RepeatThrottle:
    """Admit the first occurrence of a key, then at most one per ``window_s`` (thread-safe).

    ``admit(key)`` returns None for a repeat to drop, else how many repeats of ``key`` were
    dropped since it was last admitted (0 the first time). At most ``max_keys`` keys are
    remembered; the least recently admitted one is forgotten first.
    """

    def __init__(
        self,
        window_s: float = 60.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 256,
    ) -> None:
        if window_s < 0 or max_keys < 1:
            raise ValueError("window_s must be >= 0 and max_keys >= 1")
        self.window_s = window_s
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[Hashable, list[float]] = {}  # key -> [admitted at, dropped since]

    def admit(self, key: Hashable) -> int | None:
        now = self._clock()
        with self._lock:
            entry = self._keys.get(key)
            if entry is not None and now - entry[0] < self.window_s:
                entry[1] += 1
                return None
            dropped = 0 if entry is None else int(entry[1])
            self._keys.pop(key, None)  # re-inserted last: the most recently admitted
            if len(self._keys) >= self.max_keys:
                del self._keys[next(iter(self._keys))]
            self._keys[key] = [now, 0]
            return dropped

    def log_fields(self, key: Hashable) -> dict[str, int] | None:
        """:meth:`admit` as the keyword arguments of the log line to write: None to drop it,
        else ``{}`` or, after held-back repeats, ``{"repeated": n}``."""
        dropped = self.admit(key)
        if dropped is None:
            return None
        return {"repeated": dropped} if dropped else {}
