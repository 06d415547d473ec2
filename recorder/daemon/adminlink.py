"""The admin and status topics' Kafka side: one consumer thread, a queue, a producer.

The admin topic is read by a :class:`~recorder.client.KafkaAdapter` of its own (its consumer
thread owns its one ``Consumer``, the confluent-kafka >= 2.16 rule); records are handed to the
daemon's main loop through a queue, so every command is acted on in the main thread. Replies
and heartbeats go out through the same adapter's thread-safe producer.
"""

from __future__ import annotations

import queue
from collections.abc import Iterable

import structlog

from recorder.client import KafkaAdapter, StartAt
from recorder.client.wire import Record
from recorder.errors import TransportError
from recorder.settings import KafkaSettings

_log = structlog.get_logger("recorder.daemon.admin")

MAX_QUEUED = 10_000  # commands waiting for the main loop; beyond that the topic is paused


class AdminLink:
    """Consumes ``admin_topic`` from its end (commands issued while the daemon is down are
    not replayed: they would be answered "expired" anyway) and produces replies/heartbeats."""

    def __init__(
        self,
        kafka: KafkaSettings,
        admin_topic: str,
        *,
        ensure_topics: Iterable[str] = (),
        timeout_s: float = 15.0,
    ) -> None:
        self.admin_topic = admin_topic
        self.records: queue.Queue[Record] = queue.Queue()
        self._paused = False
        settings = kafka.model_copy(update={"app_name": f"{kafka.app_name}-admin"})
        self._adapter = KafkaAdapter(settings, self._on_records, name="k2eg-recorder-admin",
                                     poll_timeout_s=0.1)
        try:
            for topic in (admin_topic, *ensure_topics):
                self._adapter.ensure_topic(topic, partitions=1, timeout_s=timeout_s)
            self._adapter.start(timeout_s)
            offsets = self._adapter.add_topic(admin_topic, StartAt.end(),
                                              timeout_s=timeout_s).result(timeout_s + 1)
        except BaseException:
            self._adapter.close(timeout_s=5.0)
            raise
        _log.info("admin topic assigned", topic=admin_topic, offsets=offsets)

    def _on_records(self, records: list[Record], drained: bool) -> None:  # consumer thread
        for record in records:
            if record.topic == self.admin_topic:
                self.records.put(record)
        if not self._paused and self.records.qsize() >= MAX_QUEUED:
            self._paused = True
            self._adapter.pause(self.admin_topic)
        elif self._paused and self.records.qsize() <= MAX_QUEUED // 2:
            self._paused = False
            self._adapter.resume(self.admin_topic)

    def take(self, limit: int = 100) -> list[Record]:
        """Up to ``limit`` queued records (main thread)."""
        out: list[Record] = []
        while len(out) < limit:
            try:
                out.append(self.records.get_nowait())
            except queue.Empty:
                break
        return out

    def produce(self, topic: str, payload: bytes, *, key: str | None = None) -> bool:
        """Queue a message; False (logged) when the producer cannot take it."""
        try:
            self._adapter.produce(topic, payload, key=key, timeout_s=1.0)
        except TransportError as exc:
            _log.warning("produce failed", topic=topic, error=str(exc))
            return False
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        try:
            self._adapter.flush(timeout_s)
        finally:
            self._adapter.close(timeout_s)
