"""The broker fixture is a real Kafka-protocol broker: produce, create topics, consume."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

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


_OWNER = """
import sys, time
from recorder.broker import EmbeddedBroker
broker = EmbeddedBroker().start()
print(broker.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs util-linux's setpriv")
def test_the_broker_dies_with_an_owner_killed_by_sigkill() -> None:
    owner = subprocess.Popen([sys.executable, "-c", _OWNER], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[2])
    broker_pid = 0
    try:
        assert owner.stdout is not None
        broker_pid = int(owner.stdout.readline())
        assert _alive(broker_pid)
        assert Path(f"/proc/{broker_pid}/exe").resolve().name != "setpriv"  # exec'd: same PID
        owner.kill()
        owner.wait(10)
        deadline = time.monotonic() + 10
        while _alive(broker_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(broker_pid), "the broker outlived its SIGKILLed owner"
    finally:
        owner.kill()
        owner.wait(10)
        if broker_pid and _alive(broker_pid):
            os.kill(broker_pid, signal.SIGKILL)


def test_a_broker_started_from_another_thread_is_not_tied_to_that_thread() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from recorder.broker import parent_death_prefix

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(parent_death_prefix).result() == []
    if shutil.which("setpriv"):
        assert parent_death_prefix()[-3:] == ["--pdeathsig", "KILL", "--"]
