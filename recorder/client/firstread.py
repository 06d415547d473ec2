"""Is the first message read from a partition the one its explicit start offset names?
(pure code, no Kafka).

A recording resumes at the offset after the last one its file holds durably; the admin link
at the command after the last one it answered. If the daemon was down for longer than the
topic keeps data, Kafka deleted the messages between: librdkafka then starts at the oldest one
it still has (``auto.offset.reset``), and without this check the gap would pass silently. A
first message below the offset means the topic no longer reaches it (deleted and created
again); reading from its start then loses nothing.

Only the first message per partition after a start or a seek is compared: later offsets may
skip legitimately (transaction markers, compaction) and are not watched. A partition that
delivers nothing for :data:`WATCH_S` after its start is watched no more: its topic had nothing
after the offset then (a quiet topic, e.g. a triggered run's). The consumer looks for a watched
partition's messages in the pass it makes over every batch anyway (:attr:`FirstReads.partitions`,
one set lookup per message of a topic with a watched partition), so an empty partition watched
for two minutes costs next to nothing while its busy neighbours are drained.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["WATCH_S", "FirstReads", "OffsetGap"]

WATCH_S = 120.0
"""How long a partition's first message is waited for (monotonic seconds)."""


@dataclass(frozen=True, slots=True)
class OffsetGap:
    """The first message read from ``topic[partition]`` was at ``read``, not ``expected``."""

    topic: str
    partition: int
    expected: int
    read: int

    @property
    def missing(self) -> int:
        """Offsets skipped (0 when reading went back below the expected offset)."""
        return max(0, self.read - self.expected)


class FirstReads:
    """The partitions started at an explicit offset whose first message is still to come."""

    def __init__(self) -> None:
        # (topic, partition) -> (expected offset, watched until: monotonic)
        self._watched: dict[tuple[str, int], tuple[int, float]] = {}
        # per topic, its watched partitions (only topics with one)
        self.partitions: dict[str, frozenset[int]] = {}

    def __bool__(self) -> bool:
        return bool(self._watched)

    def expect(self, topic: str, partition: int, offset: int, now: float = 0.0) -> None:
        """``topic[partition]`` was started (or sought) at ``offset`` at ``now``; negative
        (logical offsets: end, beginning) are not checked."""
        if offset >= 0:
            self._watched[(topic, partition)] = (offset, now + WATCH_S)
        else:
            self._watched.pop((topic, partition), None)
        self._changed()

    def forget(self, topic: str) -> None:
        """``topic`` is no longer read (or is started again)."""
        for key in [k for k in self._watched if k[0] == topic]:
            del self._watched[key]
        self._changed()

    def expire(self, now: float) -> None:
        """Stop watching the partitions that delivered nothing for :data:`WATCH_S`."""
        for key in [k for k, (_, until) in self._watched.items() if now >= until]:
            del self._watched[key]
        self._changed()

    def check(self, reads: Iterable[tuple[str, int, int]]) -> list[OffsetGap]:
        """Compare the first of ``reads`` ((topic, partition, offset), in the order read) for
        each watched partition with its expected offset; those partitions are watched no more.
        Returns the mismatches."""
        gaps: list[OffsetGap] = []
        watched = self._watched
        for topic, partition, offset in reads:
            entry = watched.pop((topic, partition), None)
            if entry is None:
                continue
            if offset != entry[0]:
                gaps.append(OffsetGap(topic, partition, entry[0], offset))
            if not watched:
                break
        self._changed()
        return gaps

    def _changed(self) -> None:
        by_topic: dict[str, set[int]] = {}
        for topic, partition in self._watched:
            by_topic.setdefault(topic, set()).add(partition)
        self.partitions = {topic: frozenset(ps) for topic, ps in by_topic.items()}
