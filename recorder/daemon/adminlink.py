"""The admin and status topics' Kafka side: one consumer thread, a queue, a producer.

The admin topic is read by a :class:`~recorder.client.KafkaAdapter` of its own (its consumer
thread owns its one ``Consumer``, the confluent-kafka >= 2.16 rule); records are handed to the
daemon's main loop through a queue, so every command is acted on in the main thread. Replies
and heartbeats go out through the same adapter's thread-safe producer.

Commands sent while the daemon is down are not lost: :class:`AdminCursor` keeps the admin
topic's next offset per partition in the state directory (``.admin-offsets.json``, rewritten
atomically after each pass of the main loop that handled a command), and the link resumes
reading there. Each command is then judged as usual: older than ``command_max_age_s`` is
answered ``expired`` (never acted on), a fresher one is acted on. Without a saved position (the
first start, another admin topic) reading starts at the topic's end; a saved position outside
the topic's retained range is clamped to it, and a partition it does not name (added since)
is read from its beginning. A crash between acting on a command and saving
the position replays that command at the next start (at-least-once, within the max age); so
does one before the reply to a command still waiting for its run (a stop finalizing its
files): the saved position stays at the first command not answered yet, so that command and
those after it are read again. Those after it were answered, and the request_ids of answered
commands are saved with the position (inside the replay window): read again, they are
answered ``duplicate`` and not carried out twice.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import structlog

from recorder.client import KafkaAdapter, StartAt
from recorder.client.kafka import answer_within
from recorder.client.wire import Record
from recorder.daemon.resume import write_json_atomic
from recorder.errors import ServiceError, TransportError
from recorder.settings import KafkaSettings

_log = structlog.get_logger("recorder.daemon.admin")

MAX_QUEUED = 10_000  # commands waiting for the main loop; beyond that the topic is paused


class AdminCursor:
    """The admin topic's next offset per partition, kept in ``state_dir`` (main thread)."""

    FILE_NAME = ".admin-offsets.json"  # run names cannot start with a dot: no clash

    def __init__(self, state_dir: Path, topic: str) -> None:
        self.path = state_dir / self.FILE_NAME
        self.topic = topic
        self.offsets: dict[int, int] = {}
        # request_id -> ms read, of the commands answered inside the replay window
        # (AdminHandler.answered_ids): one read again after a crash is not carried out twice
        self.answered: dict[str, int] = {}
        self._saved: tuple[dict[int, int], dict[str, int]] = ({}, {})

    def load(self) -> dict[int, int] | None:
        """The saved position for this topic; None (logged) when there is none to use."""
        try:
            obj = json.loads(self.path.read_text(encoding="utf-8"))
            topic = str(obj["topic"])
            offsets = {int(p): int(o) for p, o in dict(obj["offsets"]).items()}
            answered = {str(r): int(t) for r, t in dict(obj.get("answered", {})).items()}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            _log.error("unreadable admin offsets ignored: reading from the end", error=str(exc),
                       path=str(self.path))
            return None
        if topic != self.topic:
            _log.warning("saved admin offsets are for another topic: reading from the end",
                         saved_topic=topic, topic=self.topic)
            return None
        self.offsets = dict(offsets)
        self.answered = answered
        self._saved = (dict(offsets), dict(answered))
        return offsets

    def advance(self, partition: int, next_offset: int) -> None:
        if next_offset > self.offsets.get(partition, -1):
            self.offsets[partition] = next_offset

    def reset(self, offsets: Mapping[int, int]) -> None:
        """Where the link really starts (after clamping): saved at the next :meth:`save`."""
        self.offsets = dict(offsets)

    def save(self, hold: Mapping[int, int] | None = None,
             answered: Mapping[str, int] | None = None) -> bool:
        """Write the position if it moved, not past ``hold`` (partition -> offset of the
        first command not answered yet), with ``answered`` (else the last ones given or
        loaded); False (logged) when it cannot be written."""
        hold = hold or {}
        offsets = {p: min(o, hold.get(p, o)) for p, o in self.offsets.items()}
        if answered is not None:
            self.answered = dict(answered)
        if (offsets, self.answered) == self._saved:
            return True
        obj = {"topic": self.topic,
               "offsets": {str(p): o for p, o in sorted(offsets.items())},
               "answered": self.answered,
               "updated_at": time.time_ns() // 1_000_000}
        try:
            write_json_atomic(self.path, obj, what="admin offsets")
        except ServiceError as exc:
            _log.error("admin offsets not saved: commands sent while the daemon is down may "
                       "be missed", error=str(exc))
            return False
        self._saved = (offsets, dict(self.answered))
        return True


class AdminLink:
    """Consumes ``admin_topic`` from ``start`` (partition -> next offset, e.g. from an
    :class:`AdminCursor`; clamped to what the topic retains; partitions without a position:
    from their beginning, they were added since; ``start=None``: from the end) and produces
    replies/heartbeats. ``start_offsets`` says where reading really started."""

    def __init__(
        self,
        kafka: KafkaSettings,
        admin_topic: str,
        *,
        ensure_topics: Iterable[str] = (),
        start: Mapping[int, int] | None = None,
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
            start_at = self._start_at(start, timeout_s)
            offsets = answer_within(
                self._adapter.add_topic(admin_topic, start_at, timeout_s=timeout_s),
                timeout_s + 1, f"the assignment of {admin_topic!r}")
        except BaseException:
            self._adapter.close(timeout_s=5.0)
            raise
        self.start_offsets: dict[int, int] = dict(offsets)
        _log.info("admin topic assigned", topic=admin_topic, offsets=offsets,
                  resumed=start is not None)

    def _start_at(self, start: Mapping[int, int] | None, timeout_s: float) -> StartAt:
        if not start:
            return StartAt.end()
        marks = answer_within(self._adapter.watermarks(self.admin_topic), timeout_s + 1,
                              f"the offsets of {self.admin_topic!r}")
        offsets: dict[int, int] = {}
        for partition, (low, high) in marks.items():
            saved = start.get(partition)
            # a partition the saved position does not name was added since it was saved; one
            # that ends below it was created again since: every command it holds is unread
            # (those answered before are `duplicate` by their request_ids, or `expired`)
            offsets[partition] = low if saved is None or saved > high else max(saved, low)
            if saved is not None and saved != offsets[partition]:
                _log.warning("saved admin offset outside the topic (its beginning deleted, or "
                             "the topic created again): read from its oldest command",
                             partition=partition, saved=saved, low=low, high=high)
        waiting = sum(high - offsets[p] for p, (_low, high) in marks.items())
        _log.info("admin topic resumed from the saved offsets", offsets=offsets,
                  commands_waiting=waiting)
        return StartAt.at(offsets, others="beginning")

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

    @property
    def running(self) -> bool:
        """Whether its Kafka consumer thread is alive (it reads commands)."""
        return self._adapter.running

    def take(self, limit: int = 100) -> list[Record]:
        """Up to ``limit`` queued records (main thread)."""
        out: list[Record] = []
        while len(out) < limit:
            try:
                out.append(self.records.get_nowait())
            except queue.Empty:
                break
        return out

    def produce(self, topic: str, payload: bytes, *, key: str | None = None,
                on_delivery: Callable[[TransportError | None], None] | None = None) -> bool:
        """Queue a message; False (logged) when the producer cannot take it.
        ``on_delivery(None | TransportError)`` is told whether Kafka took it in the end."""
        try:
            self._adapter.produce(topic, payload, key=key, timeout_s=1.0,
                                  on_delivery=on_delivery)
        except TransportError as exc:
            _log.warning("produce failed", topic=topic, error=str(exc))
            return False
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop reading; replies and heartbeats still queued get up to ``timeout_s`` to be
        delivered (the adapter's close flushes, then drops what is left)."""
        self._adapter.close(timeout_s)
