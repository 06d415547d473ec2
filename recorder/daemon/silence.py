"""When a periodic run has heard nothing from its snapshot for too long (pure code).

A non-triggered k2eg snapshot publishes an iteration every ``time_window`` ms whether or not
its PVs change (a PV that disconnects is re-published with its last value), so a periodic run
whose topic stays silent for many windows has lost its snapshot: most often the gateway was
restarted (the main branch keeps running snapshots in memory only), or it is down. The run
controller then re-sends the snapshot's start command: a restarted gateway starts the
snapshot anew (its ``iter_index`` begins again at 1, which the assembler recognizes as a
restart), a gateway that still runs it answers "already running", one that is down does not
answer. While the silence lasts the re-sends back off; the silence is reported in the run's
status and logs until the first message arrives.

:class:`SilenceWatch` holds the timing only; the controller does the sending.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from recorder.daemon.backoff import Backoff

WINDOWS = 5  # silence of this many time windows (at least the daemon's minimum) is reported


def silence_limit_s(time_window_ms: int, minimum_s: float) -> float:
    """Silence after which a periodic snapshot counts as lost: ``WINDOWS`` time windows, and
    never less than ``minimum_s`` (0 disables the watch: the limit is infinite)."""
    if minimum_s <= 0:
        return float("inf")
    return max(minimum_s, WINDOWS * time_window_ms / 1000.0)


@dataclass(slots=True)
class SilenceWatch:
    """``heard(now)`` on every message, ``due(now)`` to ask whether to re-send the start.

    >>> w = SilenceWatch(limit_s=30, last_heard=0.0, backoff=Backoff(30, 2, 300, jitter=0))
    >>> w.due(29.0), w.due(30.0), w.silent, w.due(45.0), w.due(60.0)
    (False, True, True, False, True)
    >>> w.heard(61.0)  # the silence ended after 61 s
    61.0
    >>> w.silent, w.due(80.0)
    (False, False)
    """

    limit_s: float
    last_heard: float  # monotonic seconds
    backoff: Backoff = field(default_factory=lambda: Backoff(30.0, 2.0, 300.0))  # re-sends
    silent: bool = False  # the limit was reached and nothing was heard since
    next_resend: float = 0.0
    resends: int = 0  # start commands re-sent during the current silence

    def heard(self, now: float) -> float | None:
        """A message arrived; returns how long the silence lasted if it had been reported."""
        lasted = now - self.last_heard if self.silent else None
        self.last_heard = now
        if self.silent:
            self.silent = False
            self.resends = 0
            self.backoff.reset()
        return lasted

    def silent_for(self, now: float) -> float:
        return max(0.0, now - self.last_heard)

    def due(self, now: float) -> bool:
        """True when the start command should be (re-)sent now; the next one is then
        scheduled after the backoff delay."""
        if now - self.last_heard < self.limit_s:
            return False
        if self.silent and now < self.next_resend:
            return False
        self.silent = True
        self.resends += 1
        self.next_resend = now + self.backoff.next_delay()
        return True
