"""The broker fixture is a real Kafka-protocol broker: produce, create topics, consume."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

pytestmark = pytest.mark.integration


def test_round_trip_through_real_broker(
    kafka_bootstrap: str, unique_name: Callable[[str], str]
) -> None:
    topic = unique_name("t")
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(10)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(10):
        producer.produce(topic, value=f"m{i}".encode(), headers={"k2eg-ser-type": "Msgpack"})
    assert producer.flush(10) == 0
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": topic})
    consumer.assign([TopicPartition(topic, 0, 0)])
    got: list[bytes] = []
    for _ in range(100):
        msg = consumer.poll(0.2)
        if msg is not None and msg.error() is None:
            got.append(msg.value())
        if len(got) == 10:
            break
    consumer.close()
    assert got == [f"m{i}".encode() for i in range(10)]
    assert dict(msg.headers() or [])["k2eg-ser-type"] == b"Msgpack"  # type: ignore[union-attr]
