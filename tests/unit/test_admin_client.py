"""The admin client (``k2eg-recorder start|stop|trigger|status|reload``) against a Kafka
that refuses its command (the adapter replaced: no broker needed)."""

from __future__ import annotations

import time
from concurrent.futures import Future

import pytest

from recorder.admin.status import DaemonState, StatusDocument
from recorder.daemon import adminclient
from recorder.errors import ServiceError, TransportError
from recorder.settings import KafkaSettings


class RefusingAdapter:
    """Topics there, the reply topic read, and every produce refused by the broker."""

    def __init__(self, *_args: object, **_kwargs: object) -> None:
        pass

    def ensure_topic(self, *_args: object, **_kwargs: object) -> int:
        return 1

    def start(self, *_args: object) -> None:
        pass

    def add_topic(self, *_args: object, **_kwargs: object) -> Future[dict[int, int]]:
        done: Future[dict[int, int]] = Future()
        done.set_result({0: 0})
        return done

    def produce(self, topic: str, _value: bytes, *, on_delivery: object = None,
                **_kwargs: object) -> None:
        if callable(on_delivery):  # as KafkaAdapter.produce reports it, from flush()
            on_delivery(TransportError(
                f"delivery to {topic!r} failed: Broker: Topic authorization failed"))

    def flush(self, *_args: object) -> int:
        return 0

    def close(self, *_args: object) -> None:
        pass


def test_a_command_kafka_refused_is_said_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command Kafka refused (an ACL without write access to the admin topic) never
    reaches a daemon: the CLI says so at once, with Kafka's reason (exit 3), instead of
    waiting out --timeout to say "no reply ... the command stays on the topic"."""
    monkeypatch.setattr(adminclient, "KafkaAdapter", RefusingAdapter)
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:9")
    with adminclient.AdminClient(kafka, "admin", "replies") as client:
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="Topic authorization failed") as info:
            client.request("status", timeout_s=3.0)
    assert not isinstance(info.value, ServiceError)
    assert time.monotonic() - t0 < 2


class ForgingAdapter(RefusingAdapter):
    """The admin topic as a daemon with a secret reads it: someone who saw the operator's
    command sends a copy without its signature (same request_id) first; the daemon answers
    both, and the replies reach the client (its reply topic)."""

    client: adminclient.AdminClient | None = None

    def produce(self, topic: str, value: bytes, *, on_delivery: object = None,
                **_kwargs: object) -> None:
        import json

        from recorder.admin.protocol import CommandPolicy
        from recorder.client.wire import Record
        from recorder.daemon.admin import AdminHandler

        replies: list[bytes] = []
        handler = AdminHandler(CommandPolicy(max_age_s=30, secret=SECRET), "replies",
                               lambda _topic, payload: replies.append(payload))
        forged = {k: v for k, v in json.loads(value).items() if k != "signature"}

        class Target:
            def status_document(self, kind: str = "status") -> StatusDocument:
                return StatusDocument("i", DaemonState.RUNNING, 1, 0, kind=kind)

        for payload in (json.dumps(forged).encode(), value):
            handler.handle(Record(topic, 0, 0, payload, None, None), Target())  # type: ignore[arg-type]
        if callable(on_delivery):
            on_delivery(None)
        assert self.client is not None
        self.client._on_records([Record("replies", 0, i, r, None, None)
                                 for i, r in enumerate(replies)], True)


SECRET = b"0123456789abcdef0123"


def test_a_reply_caused_by_a_forged_copy_of_the_command_is_passed_over(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With a secret, a forged unsigned copy of the operator's command (same request_id)
    made the daemon send a signed ``unauthorized`` reply with that request_id, and the CLI
    took it for the answer to its own command (it said "unauthorized" while the real command
    was carried out). Signed replies now name the command they answer."""
    monkeypatch.setattr(adminclient, "KafkaAdapter", ForgingAdapter)
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:9")
    with adminclient.AdminClient(kafka, "admin", "replies", secret=SECRET) as client:
        ForgingAdapter.client = client
        reply = client.request("status", timeout_s=3.0)
    assert reply.ok and reply.code.value == "ok"
