"""KafkaAdapter against a real Kafka-protocol broker (Tansu, or RECORDER_TEST_BOOTSTRAP)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from recorder.broker import free_loopback_port
from recorder.client.kafka import KafkaAdapter, StartAt
from recorder.client.wire import Record
from recorder.errors import ClientClosedError, ConfigError, TransportError
from recorder.settings import KafkaSettings

pytestmark = pytest.mark.integration


class Collector:
    """The adapter's records callback: keeps every record, counts ticks, can raise on demand."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.ticks = 0
        self.threads: set[str] = set()
        self.raise_next = False
        self._cond = threading.Condition()

    def __call__(self, records: list[Record], drained: bool) -> None:
        self.threads.add(threading.current_thread().name)
        with self._cond:
            self.ticks += 1
            self.records.extend(records)
            self._cond.notify_all()
        if self.raise_next:
            self.raise_next = False
            raise RuntimeError("callback failure (test)")

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Record]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.records) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"got {len(self.records)} records, expected {n}")
                self._cond.wait(remaining)
            return list(self.records)

    def of(self, topic: str) -> list[Record]:
        with self._cond:
            return [r for r in self.records if r.topic == topic]


@pytest.fixture
def settings(kafka_bootstrap: str, unique_name: Callable[[str], str]) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=kafka_bootstrap, app_name=unique_name("app"))


@pytest.fixture
def collector() -> Collector:
    return Collector()


@pytest.fixture
def adapter(settings: KafkaSettings, collector: Collector) -> Iterator[KafkaAdapter]:
    ad = KafkaAdapter(settings, collector, batch_size=200).start()
    try:
        yield ad
    finally:
        ad.close()


def produce_raw(bootstrap: str, topic: str, n: int, partitions: int = 1, start: int = 0) -> None:
    """Produce ``m<start>``.. round-robin over partitions, one record batch per message.

    One batch per message because Tansu (v0.6.0) reports the high watermark as the *base*
    offset of the last record batch + 1: after one 5-record batch it says 1, not 5. Real Kafka
    counts records. With single-record batches both agree.
    """
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(start, start + n):
        producer.produce(
            topic, value=f"m{i}".encode(), partition=i % partitions,
            headers={"k2eg-ser-type": "Msgpack"},
        )
        assert producer.flush(10) == 0


def test_ensure_topic_creates_then_tolerates_existing(
    adapter: KafkaAdapter, unique_name: Callable[[str], str]
) -> None:
    topic = unique_name("t")
    assert adapter.topic_partitions(topic) is None
    assert adapter.ensure_topic(topic, partitions=3) == 3
    # exists: no error, and its own partition count is kept
    assert adapter.ensure_topic(topic, partitions=1) == 3
    assert adapter.wait_for_topic(topic, timeout_s=2) == 3


def test_assign_at_end_reads_every_partition_from_the_high_watermark(
    adapter: KafkaAdapter, collector: Collector, kafka_bootstrap: str,
    unique_name: Callable[[str], str],
) -> None:
    topic = unique_name("t")
    adapter.ensure_topic(topic, partitions=3)
    produce_raw(kafka_bootstrap, topic, 6, partitions=3)  # 2 old messages per partition
    offsets = adapter.add_topic(topic, StartAt.end()).result(10)
    assert offsets == {0: 2, 1: 2, 2: 2}
    produce_raw(kafka_bootstrap, topic, 9, partitions=3, start=100)
    got = collector.wait_for(9)
    assert sorted(r.value for r in got if r.value) == sorted(
        f"m{i}".encode() for i in range(100, 109)
    )
    assert {r.partition for r in got} == {0, 1, 2}
    assert all(r.offset >= 2 for r in got)
    first = got[0]
    assert first.topic == topic
    assert first.headers == [("k2eg-ser-type", b"Msgpack")]
    assert first.timestamp_ms is not None and abs(first.timestamp_ms / 1000 - time.time()) < 60
    assert adapter.positions(topic) == {0: 5, 1: 5, 2: 5}
    assert adapter.watermarks(topic).result(5) == {0: (0, 5), 1: (0, 5), 2: (0, 5)}
    # the Consumer was only ever called from the consumer thread
    assert collector.threads == {"k2eg-kafka-consumer"}


def test_assign_at_beginning_and_at_explicit_offsets(
    adapter: KafkaAdapter, collector: Collector, kafka_bootstrap: str,
    unique_name: Callable[[str], str],
) -> None:
    a, b, c = unique_name("a"), unique_name("b"), unique_name("c")
    for topic in (a, b, c):
        adapter.ensure_topic(topic, partitions=2)
        produce_raw(kafka_bootstrap, topic, 10, partitions=2)  # offsets 0..4 in both
    assert adapter.add_topic(a, StartAt.beginning()).result(10) == {0: 0, 1: 0}
    assert adapter.add_topic(b, StartAt.at(3)).result(10) == {0: 3, 1: 3}
    # a partition missing from the map starts at the end
    assert adapter.add_topic(c, StartAt.at({1: 4})).result(10) == {0: 5, 1: 4}
    collector.wait_for(10 + 4 + 1)
    time.sleep(0.2)
    assert len(collector.of(a)) == 10
    assert sorted((r.partition, r.offset) for r in collector.of(b)) == [
        (0, 3), (0, 4), (1, 3), (1, 4)
    ]
    assert [(r.partition, r.offset) for r in collector.of(c)] == [(1, 4)]


def test_starts_at_explicit_offsets_and_seeks_are_checked_without_false_gaps(
    settings: KafkaSettings, collector: Collector, kafka_bootstrap: str,
    unique_name: Callable[[str], str],
) -> None:
    """A resume reads exactly from its offset on a broker that still holds it: the first
    message of each partition is compared with it (recorder.client.firstread), and nothing is
    reported; the gap case itself (retention) cannot be made on Tansu, which deletes nothing."""
    gaps: list[tuple[str, int, int, int]] = []
    ad = KafkaAdapter(settings, collector, batch_size=200,
                      on_offset_gap=lambda *gap: gaps.append(gap)).start()
    try:
        topic = unique_name("t")
        ad.ensure_topic(topic, partitions=2)
        produce_raw(kafka_bootstrap, topic, 10, partitions=2)  # offsets 0..4 in both
        assert ad.add_topic(topic, StartAt.at({0: 2, 1: 4})).result(10) == {0: 2, 1: 4}
        got = collector.wait_for(3 + 1)
        assert sorted((r.partition, r.offset) for r in got) == [(0, 2), (0, 3), (0, 4), (1, 4)]
        ad.seek(topic, 0, 1).result(5)
        got = collector.wait_for(4 + 4)
        assert [r.offset for r in got[4:]] == [1, 2, 3, 4]
        time.sleep(0.2)
        assert gaps == []
        assert "offsets_missing" not in ad.counters and "offsets_reset" not in ad.counters
    finally:
        ad.close()


def test_assign_at_timestamp_uses_the_brokers_offsets_for_times(
    adapter: KafkaAdapter, kafka_bootstrap: str, unique_name: Callable[[str], str]
) -> None:
    topic = unique_name("t")
    adapter.ensure_topic(topic, partitions=1)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    base = int(time.time() * 1000) - 60_000
    for i in range(10):
        producer.produce(topic, value=b"x", partition=0, timestamp=base + 1000 * i)
    assert producer.flush(10) == 0
    probe = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": topic})
    try:
        for ts in (base + 4500, base + 60_000):
            (answer,) = probe.offsets_for_times([TopicPartition(topic, 0, ts)], timeout=10)
            expected = answer.offset if answer.offset >= 0 else 10  # -1: none -> the end
            got = adapter.add_topic(topic, StartAt.at_timestamp(ts)).result(10)
            assert got == {0: expected}
    finally:
        probe.close()


def test_add_topic_waits_for_a_topic_created_later_and_fails_after_its_timeout(
    adapter: KafkaAdapter, collector: Collector, kafka_bootstrap: str,
    unique_name: Callable[[str], str],
) -> None:
    late, never, other = unique_name("late"), unique_name("never"), unique_name("other")
    adapter.ensure_topic(other)
    adapter.add_topic(other).result(10)
    pending = adapter.add_topic(late, StartAt.beginning(), timeout_s=10)
    failing = adapter.add_topic(never, timeout_s=0.5)
    # the consumer thread is not blocked by the retries: the other topic keeps flowing
    produce_raw(kafka_bootstrap, other, 3)
    collector.wait_for(3, timeout=5)
    with pytest.raises(TransportError, match="does not exist"):
        failing.result(5)
    assert not pending.done()
    adapter.ensure_topic(late)
    assert pending.result(10) == {0: 0}
    produce_raw(kafka_bootstrap, late, 2)
    collector.wait_for(5)
    assert len(collector.of(late)) == 2


def test_raw_mode_hands_over_the_messages_and_tracks_positions(
    settings: KafkaSettings, kafka_bootstrap: str, unique_name: Callable[[str], str]
) -> None:
    got: list[Message] = []
    cond = threading.Condition()

    def on_records(messages: list[Message], drained: bool) -> None:
        with cond:
            got.extend(messages)
            cond.notify_all()

    topic, other = unique_name("t"), unique_name("o")
    with KafkaAdapter(settings, on_records, batch_size=50, raw_messages=True) as adapter:
        adapter.ensure_topic(topic, partitions=3)
        adapter.ensure_topic(other)
        adapter.add_topic(topic).result(10)
        adapter.add_topic(other).result(10)
        produce_raw(kafka_bootstrap, topic, 9, partitions=3)
        produce_raw(kafka_bootstrap, other, 2)
        with cond:
            assert cond.wait_for(lambda: len(got) >= 11, 10)
        assert all(isinstance(m, Message) and m.error() is None for m in got)
        assert sorted(m.value() for m in got if m.topic() == topic) == sorted(
            f"m{i}".encode() for i in range(9)
        )
        assert got[0].headers() == [("k2eg-ser-type", b"Msgpack")]
        assert adapter.positions(topic) == {0: 3, 1: 3, 2: 3}
        assert adapter.positions(other) == {0: 2}
        assert adapter.counters["consumed"] == 11
        # records of a topic removed meanwhile are left out (the slower filtering pass)
        adapter.remove_topic(other).result(10)
        produce_raw(kafka_bootstrap, other, 3, start=10)
        produce_raw(kafka_bootstrap, topic, 3, partitions=3, start=10)
        with cond:
            assert cond.wait_for(lambda: len(got) >= 14, 10)
        time.sleep(0.3)
        assert len(got) == 14 and {m.topic() for m in got[11:]} == {topic}
        assert adapter.positions(topic) == {0: 4, 1: 4, 2: 4}


def test_remove_topic_stops_delivery(
    adapter: KafkaAdapter, collector: Collector, kafka_bootstrap: str,
    unique_name: Callable[[str], str],
) -> None:
    keep, drop = unique_name("keep"), unique_name("drop")
    for topic in (keep, drop):
        adapter.ensure_topic(topic)
        adapter.add_topic(topic).result(10)
    produce_raw(kafka_bootstrap, drop, 2)
    collector.wait_for(2)
    adapter.remove_topic(drop).result(10)
    assert adapter.topics == frozenset({keep})
    assert adapter.positions(drop) == {}
    produce_raw(kafka_bootstrap, drop, 5, start=10)
    produce_raw(kafka_bootstrap, keep, 1)
    collector.wait_for(3)
    time.sleep(0.3)
    assert len(collector.of(drop)) == 2
    assert len(collector.of(keep)) == 1


@pytest.mark.parametrize("raw", [False, True], ids=["records", "raw_messages"])
def test_pause_resume_keeps_order_without_gaps_or_duplicates(
    settings: KafkaSettings, kafka_bootstrap: str, unique_name: Callable[[str], str], raw: bool
) -> None:
    topic = unique_name("t")
    n = 3000
    got: list[int] = []
    paused_at: list[int] = []
    adapter: KafkaAdapter

    def on_records(records: list[Any], drained: bool) -> None:
        got.extend(r.offset() if raw else r.offset for r in records)
        if records and not paused_at:
            paused_at.append(len(got))
            adapter.pause(topic)  # a request from the consumer thread itself

    adapter = KafkaAdapter(settings, on_records, batch_size=100, raw_messages=raw)
    with adapter:
        adapter.ensure_topic(topic)
        produce_raw(kafka_bootstrap, topic, n)
        adapter.add_topic(topic, StartAt.beginning()).result(10)
        deadline = time.monotonic() + 10
        while not adapter.is_paused(topic) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert adapter.is_paused(topic)
        time.sleep(0.5)
        assert len(got) == paused_at[0] < n  # nothing delivered while paused
        adapter.resume(topic).result(5)
        deadline = time.monotonic() + 20
        while len(got) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        # the resume's first read is checked against its offset: no false gap
        assert "offsets_missing" not in adapter.counters
        assert "offsets_reset" not in adapter.counters
    assert got == list(range(n))


def test_delivery_reports_are_counted_and_handed_to_the_callback(
    adapter: KafkaAdapter, collector: Collector, unique_name: Callable[[str], str]
) -> None:
    topic = unique_name("t")
    adapter.ensure_topic(topic)
    adapter.add_topic(topic).result(10)
    reports: list[TransportError | None] = []
    done = threading.Event()

    def on_delivery(err: TransportError | None) -> None:
        reports.append(err)
        if len(reports) == 5:
            done.set()

    for i in range(5):
        adapter.produce(topic, f"v{i}".encode(), key=b"k", headers={"h": b"1"},
                        on_delivery=on_delivery)
    assert done.wait(10)  # served by poll(0) after produce and by the consumer loop
    assert reports == [None] * 5
    assert adapter.counters["produced"] == 5
    records = collector.wait_for(5)
    assert [r.value for r in records] == [f"v{i}".encode() for i in range(5)]
    assert records[0].headers == [("h", b"1")]


def test_delivery_failure_is_reported_and_counted(unique_name: Callable[[str], str]) -> None:
    # nothing listens on this port: the message times out in the producer
    settings = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_loopback_port()}")
    failures: Future[TransportError | None] = Future()
    adapter = KafkaAdapter(
        settings, Collector(),
        producer_config={"message.timeout.ms": 300, "log_level": 0},
        consumer_config={"log_level": 0},
    ).start()
    try:
        adapter.produce(unique_name("t"), b"x", on_delivery=failures.set_result)
        err = failures.result(10)
        assert isinstance(err, TransportError)
        assert "timed out" in str(err).lower()
        assert adapter.counters["delivery_failed"] == 1
    finally:
        t0 = time.monotonic()
        adapter.close(timeout_s=5)
        assert time.monotonic() - t0 < 8


def test_librdkafka_options_from_settings_reach_librdkafka() -> None:
    bad = KafkaSettings(bootstrap_servers="127.0.0.1:1", kafka={"security.protocol": "bogus"})
    # a setting librdkafka refuses is one to fix, not a connection to retry
    with pytest.raises(ConfigError, match=r'Kafka settings: Invalid value "bogus" for '
                                          r'configuration property "security\.protocol"'):
        KafkaAdapter(bad, Collector())
    sasl = KafkaSettings(
        bootstrap_servers="127.0.0.1:1",
        kafka={"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN",
               "sasl.username": "u", "sasl.password": "p"},
    )
    adapter = KafkaAdapter(sasl, Collector(), consumer_config={"log_level": 0},
                           producer_config={"log_level": 0})
    assert adapter.consumer_config["sasl.mechanism"] == "PLAIN"
    assert adapter.producer_config["security.protocol"] == "SASL_PLAINTEXT"
    adapter.close(timeout_s=2)


def test_callback_errors_are_counted_and_the_thread_survives(
    adapter: KafkaAdapter, collector: Collector, kafka_bootstrap: str,
    unique_name: Callable[[str], str],
) -> None:
    topic = unique_name("t")
    adapter.ensure_topic(topic)
    adapter.add_topic(topic).result(10)
    collector.raise_next = True
    produce_raw(kafka_bootstrap, topic, 1)
    collector.wait_for(1)
    produce_raw(kafka_bootstrap, topic, 1, start=1)
    collector.wait_for(2)
    assert adapter.counters["callback_errors"] >= 1
    assert adapter.running
    assert adapter.call_soon(lambda: threading.current_thread().name).result(5) == (
        "k2eg-kafka-consumer"
    )


def test_close_while_polling_is_prompt_and_fails_later_requests(
    settings: KafkaSettings, kafka_bootstrap: str, unique_name: Callable[[str], str]
) -> None:
    topic = unique_name("t")
    collector = Collector()
    adapter = KafkaAdapter(settings, collector, poll_timeout_s=0.5).start()
    adapter.ensure_topic(topic)
    adapter.add_topic(topic).result(10)
    stuck = adapter.add_topic(unique_name("never"), timeout_s=60)  # retried in the thread
    time.sleep(0.3)
    t0 = time.monotonic()
    adapter.close(timeout_s=10)
    assert time.monotonic() - t0 < 3
    assert not adapter.running
    with pytest.raises(ClientClosedError):
        stuck.result(1)
    with pytest.raises(ClientClosedError):
        adapter.add_topic(topic).result(1)
    with pytest.raises(ClientClosedError):
        adapter.produce(topic, b"x")
    adapter.close()  # idempotent


def test_other_threads_never_hang_on_the_consumer(
    adapter: KafkaAdapter, collector: Collector, kafka_bootstrap: str,
    unique_name: Callable[[str], str],
) -> None:
    """confluent-kafka 2.16: a second thread calling the Consumer while another polls hangs.

    Here several threads add/remove/pause/resume topics and read watermarks while the consumer
    thread is busy with a continuous stream; every request must finish promptly.
    """
    busy = unique_name("busy")
    adapter.ensure_topic(busy)
    adapter.add_topic(busy).result(10)
    stop = threading.Event()

    def stream() -> None:
        producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 1})
        i = 0
        while not stop.is_set():
            producer.produce(busy, value=b"x")
            i += 1
            if i % 200 == 0:
                producer.poll(0)
                time.sleep(0.005)
        producer.flush(5)

    topics = [unique_name(f"w{i}") for i in range(4)]
    for topic in topics:
        adapter.ensure_topic(topic)
    durations: list[float] = []
    errors: list[BaseException] = []

    def worker(topic: str) -> None:
        try:
            for _ in range(5):
                t0 = time.monotonic()
                adapter.add_topic(topic, StartAt.beginning()).result(10)
                adapter.watermarks(topic).result(10)
                adapter.pause(topic).result(10)
                adapter.resume(topic).result(10)
                adapter.remove_topic(topic).result(10)
                durations.append(time.monotonic() - t0)
        except BaseException as exc:  # reported below
            errors.append(exc)

    producer_thread = threading.Thread(target=stream)
    producer_thread.start()
    try:
        collector.wait_for(200, timeout=10)
        workers = [threading.Thread(target=worker, args=(t,)) for t in topics]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        assert not any(w.is_alive() for w in workers), "a request hung"
    finally:
        stop.set()
        producer_thread.join(10)
    assert not errors
    assert len(durations) == 20
    assert max(durations) < 10
    assert adapter.topics == frozenset({busy})


def _librdkafka_threads() -> int:
    import contextlib
    from pathlib import Path

    n = 0
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            n += (task / "comm").read_text().startswith("rdk:")
    return n


def test_close_ends_every_librdkafka_thread_of_the_adapter(
    settings: KafkaSettings, unique_name: Callable[[str], str],
) -> None:
    """A closed adapter releases its librdkafka handles at once (consumer, producer, admin):
    an open handle keeps reconnecting, and logging it, once the broker is gone, until it is
    garbage-collected (seen at the end of ``k2eg-recorder demo``). The adapter object itself
    stays referenced here on purpose."""
    before = _librdkafka_threads()
    adapter = KafkaAdapter(settings, Collector(), batch_size=50).start()
    topic = unique_name("close")
    adapter.ensure_topic(topic)
    adapter.produce(topic, b"x")
    assert adapter.flush(10) == 0
    assert _librdkafka_threads() > before
    adapter.close()
    deadline = time.monotonic() + 10
    while _librdkafka_threads() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _librdkafka_threads() <= before
    with pytest.raises(ClientClosedError):
        adapter.produce(topic, b"y")
    with pytest.raises(ClientClosedError):
        adapter.topic_partitions(topic)
    assert adapter.flush(1) == 0
