"""Admin commands in, exactly one reply out (main thread).

Every record read from the admin topic gets one reply: decoded, authenticated and age-checked
by :mod:`recorder.admin.protocol` (malformed / unauthorized / expired are answered at once and
never acted on), replays inside the max age are answered ``duplicate``, then the command is
dispatched: ``status`` and ``reload`` are answered at once, ``start``/``stop``/``trigger`` are
queued to the run's controller and answered when it has acted (a stop after its files are
finalized). A bad command never touches another run.
"""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from recorder.admin.protocol import (
    AdminCommand,
    AdminReply,
    CommandKind,
    CommandPolicy,
    CommandRejectedError,
    ReplayGuard,
    ReplyCode,
    decode_command,
    reply_files,
)
from recorder.admin.status import StatusDocument
from recorder.client.throttle import RepeatThrottle, normalized
from recorder.client.wire import Record
from recorder.errors import AdminCommandError
from recorder.metrics import RecorderMetrics

_log = structlog.get_logger("recorder.daemon.admin")
_QUERY = logging.DEBUG  # log level of status queries and their ok replies

PENDING_TIMEOUT_S = 600.0  # a controller that has not answered by then gets an internal reply


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class RunHandle(Protocol):
    def start(self) -> Future[str]: ...

    def stop(self, reason: str = ...) -> Future[str]: ...

    def trigger(self, tags: Mapping[str, str] | None = None) -> Future[str]: ...

    def recording_files(self) -> list[str]: ...


class AdminTarget(Protocol):
    """What the daemon exposes to admin commands."""

    def run_handle(self, name: str) -> RunHandle | None: ...

    def status_document(self, kind: str = "status") -> StatusDocument: ...

    def reload(self, origin: str) -> tuple[bool, str, dict[str, Any]]: ...


@dataclass(slots=True)
class _Pending:
    command: AdminCommand
    future: Future[str]
    reply_topic: str
    deadline: float
    data: Callable[[], dict[str, Any]] | None = None
    partition: int = 0
    offset: int | None = None  # of its record: the admin position stays there until answered


class AdminHandler:
    """Decodes admin records, acts through an :class:`AdminTarget`, sends the replies."""

    def __init__(
        self,
        policy: CommandPolicy,
        default_reply_topic: str,
        send: Callable[[str, bytes], object],
        *,
        metrics: RecorderMetrics | None = None,
        clock_ms: Callable[[], int] = now_ms,
        protected_topics: Iterable[str] = (),
        instance: str | None = None,
    ) -> None:
        self.policy = policy
        self.instance = instance  # named in every reply: several daemons may read one topic
        self.default_reply_topic = default_reply_topic
        # topics others read for something else (the admin, status and files topics, the
        # gateway's commands): a command's reply_topic naming one gets its reply on the
        # default reply topic instead of corrupting that stream
        self.protected_topics = frozenset(protected_topics) - {default_reply_topic}
        self._send = send
        self._metrics = metrics
        self._clock_ms = clock_ms
        self._guard = ReplayGuard(policy.max_age_s + policy.max_future_skew_s)
        self._pending: list[_Pending] = []
        self._rejected_log = RepeatThrottle(60.0)
        self.replies_sent = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ records in
    def handle(self, record: Record, target: AdminTarget) -> None:
        now = self._clock_ms()
        try:
            command = decode_command(
                record.value or b"", self.policy, now_ms=now,
                message_timestamp_ms=record.timestamp_ms,
            )
            self._guard.check(command, now_ms=now)
        except CommandRejectedError as exc:
            # a producer that floods the admin topic: each record answered, logged once a
            # minute per kind of rejection
            fields = self._rejected_log.log_fields((exc.reply_code, normalized(exc.message)))
            if fields is not None:
                _log.warning("admin command rejected", code=exc.reply_code.value,
                             message=exc.message, request_id=exc.request_id,
                             command=exc.command, run=exc.run, offset=record.offset, **fields)
            self._reply(exc.reply_topic, exc.reply(now_ms=now, secret=self.policy.secret),
                        logged=fields is not None)
            return
        except Exception as exc:  # a codec bug: the main loop (and each restart) would die
            _log.exception("admin command not decoded", offset=record.offset)
            self._reply(None, CommandRejectedError(
                ReplyCode.INTERNAL, f"internal error decoding the command: {exc!r}",
            ).reply(now_ms=now, secret=self.policy.secret))
            return
        reply_topic = command.reply_topic or self.default_reply_topic
        log = _log.bind(request_id=command.request_id, command=command.command.value,
                        run=command.run)
        # status queries (dashboards poll them) at debug; commands that act, at info
        log.log(_QUERY if command.command is CommandKind.STATUS else logging.INFO,
                "admin command")
        try:
            self._dispatch(command, reply_topic, target, record)
        except AdminCommandError as exc:
            data = exc.data if isinstance(exc, _FailureError) else None
            self._reply(reply_topic, AdminReply.failure(command, exc, now_ms=self._clock_ms(),
                                                        data=data, secret=self.policy.secret))
        except Exception as exc:  # a bug must not cost the reply, nor the daemon
            log.exception("admin command failed")
            self._reply(reply_topic, AdminReply.failure(
                command, AdminCommandError(ReplyCode.INTERNAL.value, f"internal error: {exc!r}"),
                now_ms=self._clock_ms(), secret=self.policy.secret))

    def _dispatch(self, command: AdminCommand, reply_topic: str, target: AdminTarget,
                  record: Record) -> None:
        kind = command.command
        if kind is CommandKind.STATUS:
            doc = target.status_document("status")
            if command.run is not None:
                if doc.run(command.run) is None:
                    raise _unknown_run(command.run, doc)
                doc = doc.only(command.run)
            total = len(doc.runs)
            doc = doc.fitted()  # one Kafka message: else no reply would reach the operator
            message = f"{total} run(s), daemon {doc.state.value}"
            if doc.runs_left_out:
                message += (f"; {doc.runs_left_out} left out to fit one Kafka message "
                            "(k2eg-recorder status RUN shows one)")
            self._ok(command, reply_topic, message, doc.to_json_obj())
            return
        if kind is CommandKind.RELOAD:
            ok, message, data = target.reload("admin command")
            if not ok:
                raise _FailureError(ReplyCode.INVALID_CONFIG, message, data)
            self._ok(command, reply_topic, message, data)
            return
        assert command.run is not None  # the codec requires a run for start/stop/trigger
        handle = target.run_handle(command.run)
        if handle is None:
            raise _unknown_run(command.run, target.status_document("status"))
        if kind is CommandKind.START:
            future = handle.start()
        elif kind is CommandKind.STOP:
            future = handle.stop(f"stopped by admin command {command.request_id}")
        else:
            future = handle.trigger(command.tags)
        files: Callable[[], dict[str, Any]] | None = None
        if kind is CommandKind.STOP:
            def files() -> dict[str, Any]:
                return {"files": reply_files(handle.recording_files())}
        self._pending.append(_Pending(command, future, reply_topic,
                                      time.monotonic() + PENDING_TIMEOUT_S, files,
                                      record.partition, record.offset))
        self.poll()

    def answered_ids(self) -> dict[str, int]:
        """request_id -> ms it was read, of the commands answered inside the replay window:
        kept with the admin position (:class:`~recorder.daemon.adminlink.AdminCursor`), so
        that a command read again after a crash is answered ``duplicate``, not carried out a
        second time. A command still waiting for its run is left out: read again, it is
        carried out (and answered) then."""
        waiting = {p.command.request_id for p in self._pending}
        return {request_id: at
                for request_id, at in self._guard.remembered(self._clock_ms()).items()
                if request_id not in waiting}

    def remember(self, answered: Mapping[str, int]) -> None:
        """:meth:`answered_ids` of the previous daemon (at start, before any command)."""
        self._guard.restore(answered, now_ms=self._clock_ms())

    def unanswered(self) -> dict[int, int]:
        """Per partition, the offset of the first command still waiting for its run: the
        admin position to save stays there, so a crash before its reply has it read again."""
        out: dict[int, int] = {}
        for p in self._pending:
            if p.offset is not None and p.offset < out.get(p.partition, p.offset + 1):
                out[p.partition] = p.offset
        return out

    # ------------------------------------------------------------------ replies out
    def poll(self) -> None:
        """Answer the commands whose controller has acted (call from every loop pass)."""
        if not self._pending:
            return
        still: list[_Pending] = []
        now = time.monotonic()
        for p in self._pending:
            if p.future.done():
                self._finish(p)
            elif now >= p.deadline:
                self._reply(p.reply_topic, AdminReply.failure(
                    p.command, AdminCommandError(ReplyCode.INTERNAL.value,
                                                 "no answer from the run in time"),
                    now_ms=self._clock_ms(), secret=self.policy.secret))
            else:
                still.append(p)
        self._pending = still

    def _finish(self, p: _Pending) -> None:
        error = p.future.exception()
        if error is None:
            self._ok(p.command, p.reply_topic, p.future.result(), p.data() if p.data else None)
            return
        if not isinstance(error, AdminCommandError):
            error = AdminCommandError(ReplyCode.INTERNAL.value, f"internal error: {error!r}")
        self._reply(p.reply_topic, AdminReply.failure(p.command, error, now_ms=self._clock_ms(),
                                                      secret=self.policy.secret))

    def _ok(self, command: AdminCommand, reply_topic: str, message: str,
            data: Mapping[str, Any] | None) -> None:
        self._reply(reply_topic, AdminReply.success(command, message, now_ms=self._clock_ms(),
                                                    data=data, secret=self.policy.secret))

    def _reply(self, topic: str | None, reply: AdminReply, *, logged: bool = True) -> None:
        if topic in self.protected_topics:
            _log.warning("a command's reply_topic is one of the daemon's own topics: its reply "
                         "goes to the default reply topic", reply_topic=topic,
                         request_id=reply.request_id, default=self.default_reply_topic)
            topic = None
        topic = topic or self.default_reply_topic
        if self.instance is not None:
            reply = reply.from_instance(self.instance, self.policy.secret)
        if self._metrics is not None:
            self._metrics.admin_command(reply.command or "unknown", reply.code.value)
        quiet = reply.ok and reply.command == CommandKind.STATUS.value
        if logged:  # else a repeat of a rejection held back
            _log.log(_QUERY if quiet else logging.INFO, "admin reply",
                     request_id=reply.request_id, command=reply.command, run=reply.run,
                     code=reply.code.value, reply_message=reply.message, topic=topic)
        self._send(topic, reply.encode())
        self.replies_sent += 1

    def fail_pending(self, message: str) -> None:
        """At shutdown: answer what is still pending."""
        for p in self._pending:
            if p.future.done():
                self._finish(p)
            else:
                self._reply(p.reply_topic, AdminReply.failure(
                    p.command, AdminCommandError(ReplyCode.INTERNAL.value, message),
                    now_ms=self._clock_ms(), secret=self.policy.secret))
        self._pending = []


class _FailureError(AdminCommandError):
    """An error reply that carries data (a refused reload lists the problems)."""

    def __init__(self, code: ReplyCode, message: str, data: Mapping[str, Any]) -> None:
        super().__init__(code.value, message)
        self.data = data


def _unknown_run(name: str, doc: StatusDocument) -> AdminCommandError:
    """``unknown_run``, saying which runs there are (and the likely one when it is a typo)."""
    known = sorted(r.name for r in doc.runs)
    if name in known:  # in the status, not defined: a run a reload removed, still stopping
        return AdminCommandError(
            ReplyCode.UNKNOWN_RUN.value,
            f"run {name!r} was removed from the run definitions by a reload; its recording is "
            f"being finalized (k2eg-recorder status {name})")
    message = f"no run named {name!r}"
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    if not known:
        message += f"; the daemon has no runs (its run definitions: {doc.config_path})"
    else:
        shown = ", ".join(known[:20]) + (f", ... ({len(known)} in all)" if len(known) > 20 else "")
        message += f"; its runs: {shown}"
    return AdminCommandError(ReplyCode.UNKNOWN_RUN.value, message)
