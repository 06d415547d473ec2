"""KafkaAdapter's resume of a paused topic, driven as its consumer thread drives it, with a
stand-in Consumer: Tansu deletes nothing, so the retention case cannot be made on it."""

from __future__ import annotations

from typing import Any

from confluent_kafka import TopicPartition

from recorder.client.kafka import KafkaAdapter, _TopicState
from recorder.settings import KafkaSettings


class FakeConsumer:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, int, int]]]] = []

    def _note(self, name: str, tps: list[TopicPartition]) -> None:
        self.calls.append((name, [(tp.topic, tp.partition, tp.offset) for tp in tps]))

    def pause(self, tps: list[TopicPartition]) -> None:
        self._note("pause", tps)

    def resume(self, tps: list[TopicPartition]) -> None:
        self._note("resume", tps)

    def seek(self, tp: TopicPartition) -> None:
        self._note("seek", [tp])


class FakeMessage:
    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self._where = (topic, partition, offset)

    def topic(self) -> str:
        return self._where[0]

    def partition(self) -> int:
        return self._where[1]

    def offset(self) -> int:
        return self._where[2]

    def error(self) -> Any:
        return None

    def value(self) -> bytes:
        return b"m"

    def headers(self) -> Any:
        return None

    def timestamp(self) -> tuple[int, int]:
        return (0, 0)


def test_a_resume_that_finds_its_offset_deleted_reports_the_gap() -> None:
    """A topic paused for long (back-pressure: a slow sink) whose next messages the topic's
    retention deleted meanwhile: the resume seeks to the next offset to deliver, librdkafka
    starts at the oldest message kept instead (auto.offset.reset), and the messages between
    were lost without a word; the first message read after the resume is now checked against
    that offset, as after a start at explicit offsets (lost.retention)."""
    gaps: list[tuple[str, int, int, int]] = []
    settings = KafkaSettings(bootstrap_servers="127.0.0.1:1", app_name="resume")
    adapter = KafkaAdapter(settings, lambda records, drained: None,
                           on_offset_gap=lambda *gap: gaps.append(gap))
    try:
        consumer = FakeConsumer()
        adapter._topics["snap"] = _TopicState([0], positions={0: 5})
        adapter._do_pause(consumer, "snap", True)  # type: ignore[arg-type]
        adapter._do_pause(consumer, "snap", False)  # type: ignore[arg-type]
        assert consumer.calls[-1] == ("seek", [("snap", 0, 5)])
        adapter._to_records([FakeMessage("snap", 0, 9)])  # type: ignore[list-item]
        assert gaps == [("snap", 0, 5, 9)]
        assert adapter.counters["offsets_missing"] == 4
        # a resume that reads on from its offset reports nothing
        adapter._do_pause(consumer, "snap", True)  # type: ignore[arg-type]
        adapter._topics["snap"].positions[0] = 10
        adapter._do_pause(consumer, "snap", False)  # type: ignore[arg-type]
        adapter._to_records([FakeMessage("snap", 0, 10)])  # type: ignore[list-item]
        assert len(gaps) == 1
    finally:
        adapter.close(timeout_s=1.0)


class MetadataConsumer:
    """A stand-in Consumer whose metadata names ``topic`` with ``error`` (a KafkaError)."""

    def __init__(self, topic: str, error: Any) -> None:
        from types import SimpleNamespace

        self.meta = SimpleNamespace(topics={topic: SimpleNamespace(error=error, partitions={})})

    def list_topics(self, topic: str, timeout: float) -> Any:
        return self.meta


def test_a_topic_whose_metadata_is_in_error_for_now_is_not_taken_for_a_new_one() -> None:
    """A fresh start reads the snapshot topic from the end it had before the start command, or
    from its beginning when it does not exist yet. A topic whose metadata was in error for a
    moment (LEADER_NOT_AVAILABLE: a leader election, a broker restarting) gave no watermarks,
    as a topic that does not exist: the recording read the topic's whole history (earlier
    recordings' iterations) into the new file. Only a topic the broker does not know is
    absent; a transient error fails the query (the start is retried)."""
    import time

    import pytest
    from confluent_kafka import KafkaError

    from recorder.errors import TransportError

    settings = KafkaSettings(bootstrap_servers="127.0.0.1:1", app_name="meta")
    adapter = KafkaAdapter(settings, lambda records, drained: None)
    try:
        deadline = time.monotonic() + 1
        # the watermarks are asked through the admin handle (off the consumer thread)
        adapter._admin = MetadataConsumer(  # type: ignore[assignment]
            "snap", KafkaError(KafkaError.LEADER_NOT_AVAILABLE))
        with pytest.raises(TransportError, match="in error for now"):
            adapter._do_watermarks("snap", deadline)
        adapter._admin = MetadataConsumer(  # type: ignore[assignment]
            "snap", KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
        assert adapter._do_watermarks("snap", deadline) == {}
    finally:
        adapter.close(1.0)
