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
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServiceError(
                    f"no reply to request {request_id} on {self.reply_topic!r} within "
                    f"{timeout_s:g} s (is the daemon running and reading {self.admin_topic!r}?"
                    " The command stays on the topic: a daemon that reads it while it is "
                    "younger than its RECORDER_COMMAND_MAX_AGE_S still carries it out)"
                )
            try:
                record = self._records.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                continue
            try:
                reply = decode_reply(record.value or b"", secret=self.secret)
            except AdminCommandError as exc:
                if exc.code == ReplyCode.UNAUTHORIZED.value and request_id is not None:
                    self._unverified(record.value or b"", request_id)
                continue
            if reply.request_id != request_id:
                continue
            if command is not None and self.secret is not None \
                    and not answers_command(reply, command):
                _log.warning("a reply to another command with this request_id was passed over",
                             request_id=request_id, code=reply.code.value,
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
        cmd = self.build(command, run, tags)
        self.send(cmd)
        return self.wait_reply(cmd.request_id, timeout_s, command=cmd)

    def close(self) -> None:
        self._adapter.close(5.0)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
