"""Retry delays for starting a run: exponential, capped, with optional jitter (pure code)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    """``initial_s * factor**n`` capped at ``max_s``, each delay spread by ``±jitter``.

    >>> b = Backoff(initial_s=1, factor=2, max_s=5, jitter=0)
    >>> [b.next_delay() for _ in range(5)]
    [1.0, 2.0, 4.0, 5.0, 5.0]
    """

    initial_s: float = 1.0
    factor: float = 2.0
    max_s: float = 60.0
    jitter: float = 0.1  # fraction of the delay, both ways
    attempts: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.max_s < self.initial_s or self.factor < 1:
            raise ValueError("need 0 < initial_s <= max_s and factor >= 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")

    def next_delay(self) -> float:
        """The delay before the next attempt (and count one more failure)."""
        base = min(self.max_s, self.initial_s * self.factor ** min(self.attempts, 64))
        self.attempts += 1
        if self.jitter:
            base *= 1 + self.rng.uniform(-self.jitter, self.jitter)
        return float(min(self.max_s, base))

    def reset(self) -> None:
        """After a success: the next failure waits ``initial_s`` again."""
        self.attempts = 0
