"""KafkaAdapter and topics whose partitions change, with a stand-in Consumer (Tansu cannot add
partitions to a topic: CreatePartitions is not supported)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from test_kafka_resume import FakeMessage  # a consumed message's accessors

import recorder.client.kafka as kafka_module
from recorder.client.kafka import KafkaAdapter, StartAt
from recorder.client.wire import Record
from recorder.settings import KafkaSettings


class Broker:
    """What the stand-in consumers see: per (topic, partition), its messages' offsets and low
    watermark."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.logs: dict[tuple[str, int], list[int]] = {}
        self.low: dict[tuple[str, int], int] = {}

    def partitions(self, topic: str) -> list[int]:
        with self.lock:
            return sorted(p for t, p in self.logs if t == topic)


class FakeConsumer:
    broker = Broker()

    def __init__(self, conf: dict[str, Any]) -> None:
        self.assigned: dict[tuple[str, int], int] = {}  # next offset to read
        self.paused: set[tuple[str, int]] = set()

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        assert topic is not None
        parts = self.broker.partitions(topic)
        tmeta = SimpleNamespace(error=None, partitions={p: None for p in parts})
        return SimpleNamespace(topics={topic: tmeta} if parts else {})

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float = -1,
                              cached: bool = False) -> tuple[int, int]:
        key = (tp.topic, tp.partition)
        with self.broker.lock:
            log = self.broker.logs[key]
            low = self.broker.low.get(key, 0)
            return low, (log[-1] + 1 if log else low)

    def incremental_assign(self, tps: list[TopicPartition]) -> None:
        for tp in tps:
            offset = tp.offset
            if offset < 0:  # logical: the beginning (auto.offset.reset=earliest)
                offset = self.broker.low.get((tp.topic, tp.partition), 0)
            self.assigned[(tp.topic, tp.partition)] = offset

    def incremental_unassign(self, tps: list[TopicPartition]) -> None:
        for tp in tps:
            self.assigned.pop((tp.topic, tp.partition), None)

    def pause(self, tps: list[TopicPartition]) -> None:
        self.paused.update((tp.topic, tp.partition) for tp in tps)

    def resume(self, tps: list[TopicPartition]) -> None:
        self.paused.difference_update((tp.topic, tp.partition) for tp in tps)

    def seek(self, tp: TopicPartition) -> None:
        self.assigned[(tp.topic, tp.partition)] = tp.offset

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        out: list[FakeMessage] = []
        with self.broker.lock:
            for key, assigned in list(self.assigned.items()):
                if key in self.paused:
                    continue
                position = max(assigned, self.broker.low.get(key, 0))
                for offset in self.broker.logs.get(key, []):
                    if offset >= position:
                        out.append(FakeMessage(key[0], key[1], offset))
                        position = offset + 1
                self.assigned[key] = position
        if not out:
            time.sleep(min(timeout, 0.01))
        return out

    def poll(self, timeout: float = 0) -> None:
        return None

    def close(self) -> None:
        return None


class FakeAdmin:
    """The admin handle the adapter asks for watermarks (list_topics, list_offsets)."""

    broker = Broker()

    def __init__(self, conf: dict[str, Any]) -> None:
        pass

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        return FakeConsumer.list_topics(self, topic, timeout)  # type: ignore[arg-type]

    def list_offsets(self, specs: dict[TopicPartition, Any], request_timeout: float = -1
                     ) -> dict[TopicPartition, Future[Any]]:
        out: dict[TopicPartition, Future[Any]] = {}
        for tp, spec in specs.items():
            low, high = FakeConsumer.get_watermark_offsets(self, tp)  # type: ignore[arg-type]
            future: Future[Any] = Future()
            future.set_result(SimpleNamespace(
                offset=low if spec is kafka_module._EARLIEST else high))
            out[tp] = future
        return out


class Collector:
    def __init__(self) -> None:
        self.records: list[Record] = []
        self._cond = threading.Condition()

    def __call__(self, records: list[Record], drained: bool) -> None:
        with self._cond:
            self.records.extend(records)
            self._cond.notify_all()

    def wait_for(self, predicate: Any, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.records), timeout)


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[Broker]:
    fake = Broker()
    monkeypatch.setattr(FakeConsumer, "broker", fake)
    monkeypatch.setattr(kafka_module, "Consumer", FakeConsumer)
    monkeypatch.setattr(FakeAdmin, "broker", fake)
    monkeypatch.setattr(kafka_module, "AdminClient", FakeAdmin)
    monkeypatch.setattr(kafka_module, "_PARTITION_CHECK_S", 0.1, raising=False)
    yield fake


def test_a_partition_added_while_reading_is_read_from_its_beginning(broker: Broker) -> None:
    """An operator adds a partition to a snapshot (or the admin) topic while the recorder reads
    it: the producer's key now hashes to the new partition, and the gateway's messages go
    there. The adapter assigned the partitions the topic had when it was added and never
    looked again: everything written to the new partition was never read, without a word.
    New partitions are now found and read from their beginning (all they hold is newer than
    the assignment)."""
    broker.logs[("snap", 0)] = [0, 1]
    collector = Collector()
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:1", app_name="parts")
    adapter = KafkaAdapter(settings, collector, metadata_timeout_s=1.0).start()
    try:
        assert adapter.add_topic("snap", StartAt.at({0: 0})).result(5) == {0: 0}
        assert collector.wait_for(lambda rs: len(rs) == 2)
        with broker.lock:
            broker.logs[("snap", 1)] = [0, 1, 2]
        assert collector.wait_for(lambda rs: len(rs) == 5, timeout=5.0), collector.records
        assert sorted((r.partition, r.offset) for r in collector.records) == [
            (0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
        assert adapter.positions("snap") == {0: 2, 1: 3}
        assert adapter.counters["partitions_added"] == 1
    finally:
        adapter.close(1.0)


def test_an_admin_partition_unknown_to_the_saved_position_is_read_from_its_beginning(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
) -> None:
    """The daemon resumes the admin topic at its saved position (commands sent while it was
    down are carried out). A partition the saved position does not name (added while the daemon
    was down) started at its end: the commands sent to it meanwhile were never read, and their
    senders got no answer. Everything such a partition holds came after the position was
    saved: it is now read from its beginning."""
    from recorder.daemon.adminlink import AdminLink

    monkeypatch.setattr(KafkaAdapter, "ensure_topic", lambda self, topic, **kw: 1)
    broker.logs[("admin", 0)] = [0, 1, 2]
    broker.logs[("admin", 1)] = [0, 1]
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:1", app_name="adm")
    link = AdminLink(settings, "admin", start={0: 2}, timeout_s=2.0)
    try:
        assert link.start_offsets == {0: 2, 1: 0}
        got: list[Record] = []
        deadline = time.monotonic() + 5.0
        while len(got) < 3 and time.monotonic() < deadline:
            got.extend(link.take())
            time.sleep(0.01)
        assert sorted((r.partition, r.offset) for r in got) == [(0, 2), (1, 0), (1, 1)]
    finally:
        link.close(1.0)


def test_a_resume_whose_offsets_retention_deleted_reports_the_gap_without_waiting(
    broker: Broker,
) -> None:
    """A resume (explicit offsets) after the daemon was down longer than the topic keeps
    data: the gap was told only by the first message read, and only if it came within
    firstread.WATCH_S (120 s) of the start. A topic with nothing new for longer (a triggered
    run not triggered in those 2 minutes) lost the messages without a word, though the README
    says the daemon reports it. The low watermark above the offset shows the gap at once."""
    broker.low[("snap", 0)] = 10
    broker.logs[("snap", 0)] = []  # offsets 0..9 deleted, nothing new
    gaps: list[tuple[str, int, int, int]] = []
    collector = Collector()
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:1", app_name="gap")
    adapter = KafkaAdapter(settings, collector, metadata_timeout_s=1.0,
                           on_offset_gap=lambda *gap: gaps.append(gap)).start()
    try:
        assert adapter.add_topic("snap", StartAt.at({0: 5})).result(5) == {0: 5}
        deadline = time.monotonic() + 2.0
        while not gaps and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gaps == [("snap", 0, 5, 10)]
        assert adapter.counters["offsets_missing"] == 5
        # the first message then read is at the low watermark: no second report
        with broker.lock:
            broker.logs[("snap", 0)] = [10]
        assert collector.wait_for(lambda rs: len(rs) == 1)
        assert gaps == [("snap", 0, 5, 10)] and adapter.counters["offsets_missing"] == 5
    finally:
        adapter.close(1.0)


@pytest.mark.parametrize("raw", [False, True], ids=["records", "raw"])
def test_a_watched_partition_is_checked_at_its_first_message_while_its_neighbours_are_read(
    broker: Broker, raw: bool,
) -> None:
    """A resume of a 4-partition snapshot topic whose gateway writes to partition 0 only: the
    three empty partitions stay watched (firstread.WATCH_S) while partition 0 is drained. When
    one of them delivers, batches later and in the middle of a batch, its first message is
    the one compared with the resume offset (a gap is told once), in both delivery modes."""
    broker.logs.update({("snap", 0): list(range(10, 40)), ("snap", 1): [],
                        ("snap", 2): [], ("snap", 3): []})
    broker.low.update({("snap", 2): 6})  # retention deleted 4 and 5 meanwhile
    gaps: list[tuple[str, int, int, int]] = []
    collector = Collector()
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:1", app_name="watch")
    adapter = KafkaAdapter(settings, collector, metadata_timeout_s=1.0, raw_messages=raw,
                           on_offset_gap=lambda *gap: gaps.append(gap)).start()
    try:
        resume = {0: 10, 1: 0, 2: 6, 3: 3}
        assert adapter.add_topic("snap", StartAt.at(resume)).result(5) == resume
        assert collector.wait_for(lambda rs: len(rs) == 30)
        assert gaps == [] and "offsets_missing" not in adapter.counters
        with broker.lock:  # more for 0, and 2 starts at 8 (6 and 7 deleted too)
            broker.logs[("snap", 0)] += [40, 41]
            broker.logs[("snap", 2)] = [8, 9, 10]
            broker.low[("snap", 2)] = 8
        assert collector.wait_for(lambda rs: len(rs) == 35)
        assert gaps == [("snap", 2, 6, 8)] and adapter.counters["offsets_missing"] == 2
        with broker.lock:  # partition 3 from its offset on: nothing to tell
            broker.logs[("snap", 3)] = [3, 4]
        assert collector.wait_for(lambda rs: len(rs) == 37)
        assert gaps == [("snap", 2, 6, 8)] and adapter.counters["offsets_missing"] == 2
    finally:
        adapter.close(1.0)
