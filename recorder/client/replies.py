"""Reply correlation (pure code): match reply-topic messages to commands by ``reply_id``.

Single-reply commands (``get``, ``repeating_snapshot``, ``..._trigger``, ``..._stop``) finish
with their first reply. A one-shot ``snapshot`` (``multi=True``) is a stream (protocol §3.1):
``{error: 0, reply_id, "<pv>": {...}}`` once per PV, then ``{error: 1, reply_id}``. In that
stream:

* ``{error: -1, reply_id, message: "PV '<uri>'name malformed"}`` (a malformed PV URI) is
  recorded and the snapshot goes on: the gateway still publishes the PVs collected before it
  and then ``{error: 1}``. The official client wrongly ends the snapshot there (§5.3 item 9).
* ``{error: < 0, reply_id}`` *without* a message is the gateway's command-parse failure
  (§2.1): nothing else will come, so it ends the request with a :class:`GatewayError`.
* Any other reply without a PV is recorded and the stream goes on.

Replies whose ``reply_id`` is unknown are counted: ``late`` (the request already timed out or
was cancelled) or ``unmatched`` (someone else's, or a duplicate after completion).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from recorder.client.values import PVSample
from recorder.client.wire import Reply
from recorder.errors import ClientError, GatewayError, GatewayTimeoutError

__all__ = ["Outcome", "ReplyTracker"]

ONE_SHOT_DONE = 1  # `error` of the one-shot snapshot's completion message


@dataclass(slots=True)
class Outcome:
    """A finished request: its replies and, when it failed, the error to raise."""

    reply_id: str
    command: str
    replies: list[Reply]
    timed_out: bool
    error: ClientError | None  # GatewayError / GatewayTimeoutError, None when ok

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def reply(self) -> Reply | None:
        """The (last) reply: the answer of a single-reply command."""
        return self.replies[-1] if self.replies else None

    @property
    def samples(self) -> dict[str, PVSample]:
        """Every PV value received, by base PV name (one-shot snapshot / get)."""
        out: dict[str, PVSample] = {}
        for reply in self.replies:
            out.update(reply.samples)
        return out

    @property
    def failures(self) -> list[Reply]:
        """Error replies recorded inside a one-shot snapshot (e.g. a malformed PV URI)."""
        return [r for r in self.replies if r.error not in (0, ONE_SHOT_DONE)]


@dataclass(slots=True)
class _Pending:
    command: str
    deadline: float
    multi: bool
    timeout_s: float
    replies: list[Reply] = field(default_factory=list)


class ReplyTracker:
    """Outstanding commands by ``reply_id``, with deadlines (``now`` is passed in)."""

    def __init__(self, *, remember_finished: int = 1024) -> None:
        self._pending: dict[str, _Pending] = {}
        self._finished: dict[str, None] = {}  # recently finished ids (bounded, ordered)
        self._remember = max(0, remember_finished)
        self.counters: Counter[str] = Counter()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def __contains__(self, reply_id: object) -> bool:
        return reply_id in self._pending

    def expect(
        self,
        reply_id: str,
        command: str,
        deadline: float,
        *,
        multi: bool = False,
        timeout_s: float | None = None,
    ) -> None:
        """Register a command sent with ``reply_id``; it fails after ``deadline`` (monotonic
        seconds). ``timeout_s`` only feeds the timeout error's message."""
        if reply_id in self._pending:
            raise ValueError(f"reply_id {reply_id!r} is already pending")
        self._pending[reply_id] = _Pending(
            command, deadline, multi, float(timeout_s) if timeout_s is not None else 0.0
        )

    def cancel(self, reply_id: str) -> None:
        if self._pending.pop(reply_id, None) is not None:
            self._remember_id(reply_id)

    def feed(self, reply: Reply) -> list[Outcome]:
        """Take one decoded reply; return the requests it finished (zero or one)."""
        pending = self._pending.get(reply.reply_id)
        if pending is None:
            self.counters["late" if reply.reply_id in self._finished else "unmatched"] += 1
            return []
        pending.replies.append(reply)
        if not pending.multi:
            error = (
                None
                if reply.error == 0
                else GatewayError(pending.command, reply.error, reply.message, reply.reply_id)
            )
            return [self._finish(reply.reply_id, pending, error)]
        if reply.error == ONE_SHOT_DONE:
            return [self._finish(reply.reply_id, pending, None)]
        if reply.error < 0 and not reply.message and not reply.samples:
            # command-parse failure: the gateway sends nothing after it
            error = GatewayError(pending.command, reply.error, reply.message, reply.reply_id)
            return [self._finish(reply.reply_id, pending, error)]
        if reply.error != 0:
            self.counters["one_shot_error_reply"] += 1
        return []

    def expire(self, now: float) -> list[Outcome]:
        """Requests whose deadline has passed, failed with :class:`GatewayTimeoutError`
        (a one-shot snapshot keeps the replies received so far)."""
        out: list[Outcome] = []
        for reply_id, pending in list(self._pending.items()):
            if now >= pending.deadline:
                self.counters["timeout"] += 1
                error = GatewayTimeoutError(pending.command, reply_id, pending.timeout_s)
                out.append(self._finish(reply_id, pending, error, timed_out=True))
        return out

    def _finish(
        self,
        reply_id: str,
        pending: _Pending,
        error: ClientError | None,
        *,
        timed_out: bool = False,
    ) -> Outcome:
        del self._pending[reply_id]
        self._remember_id(reply_id)
        return Outcome(reply_id, pending.command, pending.replies, timed_out, error)

    def _remember_id(self, reply_id: str) -> None:
        if not self._remember:
            return
        self._finished[reply_id] = None
        while len(self._finished) > self._remember:
            del self._finished[next(iter(self._finished))]
