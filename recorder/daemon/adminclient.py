"""Client side of the admin topic: publish a command, wait for its one reply.

Used by ``k2eg-recorder start|stop|trigger|status|reload``, by ``k2eg-recorder demo`` and by
the tests. The reply topic is read (from its end) *before* the command is produced, so the
reply cannot be missed; replies to other request ids are ignored.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Mapping
from types import TracebackType

import structlog

from recorder.admin.protocol import (
    AdminCommand,
    AdminReply,
    CommandKind,
    ReplyCode,
    answers_command,
    build_command,
    decode_reply,
    encode_command,
)
from recorder.client import KafkaAdapter, StartAt
from recorder.client.wire import Record
from recorder.errors import (
    AdminCommandError,
    ServiceError,
    TransportError,
    UnverifiedReplyError,
)
from recorder.settings import KafkaSettings

_log = structlog.get_logger("recorder.admin.client")


class AdminClient:
    """Sends admin commands to a daemon and waits for the replies."""

    def __init__(
        self,
        kafka: KafkaSettings,
        admin_topic: str,
        reply_topic: str,
        *,
        secret: bytes | None = None,
        timeout_s: float = 15.0,
    ) -> None:
        self.admin_topic = admin_topic
        self.reply_topic = reply_topic
        self.secret = secret
        self._records: queue.Queue[Record] = queue.Queue()
        # request_id -> when (this host's wall clock, ms) its reply was read: a reply's
        # replied_at is the daemon's clock, so the two tell how far the clocks are apart
        self.received_at: dict[str, int] = {}
        settings = kafka.model_copy(update={"app_name": f"{kafka.app_name}-admin-cli"})
        self._adapter = KafkaAdapter(settings, self._on_records, name="k2eg-recorder-admin-cli")
        try:
            self._adapter.ensure_topic(reply_topic, partitions=1, timeout_s=timeout_s)
            self._adapter.ensure_topic(admin_topic, partitions=1, timeout_s=timeout_s)
            self._adapter.start(timeout_s)
            self._adapter.add_topic(reply_topic, StartAt.end(), timeout_s=timeout_s).result(
                timeout_s + 1
            )
        except BaseException:
            self._adapter.close(5.0)
            raise

    def _on_records(self, records: list[Record], drained: bool) -> None:
        for record in records:
            self._records.put(record)

    def build(
        self, command: CommandKind | str, run: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> AdminCommand:
        return build_command(command, run=run, tags=tags, reply_topic=self.reply_topic,
                             secret=self.secret)

    def send_raw(self, payload: bytes) -> None:
        """Produce anything on the admin topic (tests of malformed commands). Raises
        :class:`TransportError` when Kafka refused it (no daemon can read it then)."""
        failures: list[TransportError] = []

        def delivered(error: TransportError | None) -> None:
            if error is not None:
                failures.append(error)

        self._adapter.produce(self.admin_topic, payload, on_delivery=delivered)
        self._adapter.flush(5.0)
        if failures:
            raise failures[0]

    def send(self, command: AdminCommand) -> None:
        self.send_raw(encode_command(command))

    def wait_reply(self, request_id: str | None, timeout_s: float = 30.0, *,
                   command: AdminCommand | None = None) -> AdminReply:
        """The reply with ``request_id`` (None: the next reply without a request id). With
        ``command`` (signed), a signed reply must answer that very command
        (:func:`~recorder.admin.protocol.answers_command`): one caused by someone else's
        command with the same request_id is passed over."""
        deadline = time.monotonic() + timeout_s
        expired: dict[str | None, AdminReply] = {}
        reply = self._next_reply({request_id: command}, deadline, expired=expired)
        if reply is None and request_id in expired:
            # signed, and expired by its date: the daemon names no command in the reply of
            # one it rejected, so it was waited for as the reply to a forged copy would
            # be. None other came: the command's own, said as the daemon said it
            return expired[request_id]
        if reply is None:
            raise ServiceError(
                f"no reply to request {request_id} on {self.reply_topic!r} within "
                f"{timeout_s:g} s (is the daemon running and reading {self.admin_topic!r}?"
                " The command stays on the topic: a daemon that reads it while it is "
                "younger than its RECORDER_COMMAND_MAX_AGE_S still carries it out)"
            )
        return reply

    def _next_reply(self, wanted: Mapping[str | None, AdminCommand | None], deadline: float,
                    *, unverified_raises: bool = True,
                    expired: dict[str | None, AdminReply] | None = None,
                    ) -> AdminReply | None:
        """The next reply to one of the ``wanted`` request ids (each with its command, or
        None) read before ``deadline`` (None: none came). A signed ``expired`` reply that
        names no command is passed over into ``expired``, by request id."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                record = self._records.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                continue
            try:
                reply = decode_reply(record.value or b"", secret=self.secret)
            except AdminCommandError as exc:
                if exc.code == ReplyCode.UNAUTHORIZED.value and unverified_raises:
                    for request_id in wanted:
                        if request_id is not None:
                            self._unverified(record.value or b"", request_id)
                continue
            if reply.request_id not in wanted:
                continue
            if reply.request_id is not None:
                self.received_at[reply.request_id] = time.time_ns() // 1_000_000
            command = wanted[reply.request_id]
            if command is not None and self.secret is not None \
                    and not answers_command(reply, command):
                if expired is not None and reply.code is ReplyCode.EXPIRED:
                    expired.setdefault(reply.request_id, reply)
                _log.warning("a reply to another command with this request_id was passed over",
                             request_id=reply.request_id, code=reply.code.value,
                             message=reply.message)
                continue
            return reply

    @staticmethod
    def _unverified(payload: bytes, request_id: str) -> None:
        """A reply whose signature failed: if it answers our request, say so (raises
        :class:`UnverifiedReplyError`) instead of waiting for a reply that cannot come."""
        try:
            reply = decode_reply(payload)
        except AdminCommandError:
            return
        if reply.request_id == request_id:
            raise UnverifiedReplyError(request_id, f"{reply.code.value}: {reply.message}")

    def request(
        self, command: CommandKind | str, run: str | None = None,
        tags: Mapping[str, str] | None = None, timeout_s: float = 30.0,
    ) -> AdminReply:
        """Send a command and return its reply."""
        return self.request_all(command, run, tags, timeout_s)[0]

    def request_all(
        self, command: CommandKind | str, run: str | None = None,
        tags: Mapping[str, str] | None = None, timeout_s: float = 30.0,
        grace_s: float = 0.0,
    ) -> list[AdminReply]:
        """Send a command; its first reply, then those of other daemons that read the same
        admin topic (each answers every command; ``instance`` names them), read for
        ``grace_s`` after the first. When the first is ``unknown_run``, a daemon
        that has the run may answer much later (a start waits for the gateway, a stop for
        its files): a ``status`` of the run asks who has it, and the reply of each daemon
        that has it is waited for (within ``timeout_s``)."""
        started = time.monotonic()
        cmd = self.build(command, run, tags)
        self.send(cmd)
        first = self.wait_reply(cmd.request_id, timeout_s, command=cmd)
        if grace_s <= 0:
            return [first]
        wanted: dict[str | None, AdminCommand | None] = {cmd.request_id: cmd}
        probe: AdminCommand | None = None
        if first.code is ReplyCode.UNKNOWN_RUN and cmd.run is not None \
                and cmd.command is not CommandKind.STATUS:
            probe = self.build(CommandKind.STATUS, cmd.run)
            try:
                self.send(probe)
                wanted[probe.request_id] = probe
            except TransportError:  # the first reply stands
                probe = None
        replies = [first]
        owners: set[str] = set()  # daemons that have the run (their status of it is ok)
        grace_end = time.monotonic() + grace_s
        while True:
            waiting = owners - {r.instance for r in replies}
            deadline = started + timeout_s if waiting else grace_end
            reply = self._next_reply(wanted, deadline, unverified_raises=False)
            if reply is None and waiting:
                raise ServiceError(
                    f"no reply to request {cmd.request_id} within {timeout_s:g} s from "
                    f"{', '.join(sorted(waiting))}, which has run {cmd.run!r} (another daemon "
                    f"reading {self.admin_topic!r} answered {first.code.value}: "
                    f"{first.message})")
            if reply is None:
                return replies
            if probe is not None and reply.request_id == probe.request_id:
                if reply.ok and reply.instance is not None:
                    owners.add(reply.instance)
            elif reply not in replies:  # not a producer's retry of one already read
                replies.append(reply)

    def close(self) -> None:
        self._adapter.close(5.0)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
