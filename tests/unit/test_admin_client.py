"""The admin client (``k2eg-recorder start|stop|trigger|status|reload``) against a Kafka
that refuses its command (the adapter replaced: no broker needed)."""

from __future__ import annotations

import time
from concurrent.futures import Future

import pytest

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
