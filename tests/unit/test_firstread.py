"""FirstReads: the first message read after an explicit start offset must be at it."""

from __future__ import annotations

from recorder.client.firstread import WATCH_S, FirstReads, OffsetGap


def test_a_resume_at_the_offset_read_first_has_no_gap() -> None:
    reads = FirstReads()
    reads.expect("t", 0, 100)
    assert reads
    assert reads.check([("t", 0, 100), ("t", 0, 101)]) == []
    assert not reads  # watched no more


def test_offsets_deleted_before_the_resume_read_them_are_a_gap() -> None:
    reads = FirstReads()
    reads.expect("t", 0, 100)
    (gap,) = reads.check([("t", 0, 140), ("t", 0, 141)])
    assert gap == OffsetGap("t", 0, 100, 140) and gap.missing == 40


def test_reading_from_below_the_offset_is_reported_but_loses_nothing() -> None:
    reads = FirstReads()
    reads.expect("t", 0, 100)
    (gap,) = reads.check([("t", 0, 0)])
    assert gap.read < gap.expected and gap.missing == 0


def test_only_the_first_message_of_each_watched_partition_is_compared() -> None:
    reads = FirstReads()
    reads.expect("t", 0, 10)
    reads.expect("t", 1, 20)
    reads.expect("u", 0, 5)
    gaps = reads.check([("t", 0, 10), ("t", 0, 15), ("x", 0, 3), ("t", 1, 22)])
    assert gaps == [OffsetGap("t", 1, 20, 22)]  # t[0] later skips are not watched
    assert reads  # u[0] has not delivered yet
    assert reads.check([("u", 0, 5)]) == [] and not reads


def test_logical_offsets_are_not_checked_and_a_removed_topic_is_forgotten() -> None:
    reads = FirstReads()
    reads.expect("t", 0, -1)  # OFFSET_END: whatever comes first is right
    assert not reads
    reads.expect("t", 0, 7)
    reads.expect("t", 0, -2)  # sought to a logical offset afterwards
    assert not reads
    reads.expect("t", 0, 7)
    reads.expect("t", 1, 7)
    reads.expect("u", 0, 7)
    reads.forget("t")
    assert reads.check([("t", 0, 99), ("u", 0, 7)]) == [] and not reads


def test_a_partition_that_delivers_nothing_for_a_while_is_watched_no_more() -> None:
    """A quiet topic (a triggered run's, started at its end) would otherwise have every batch
    of every other topic scanned for as long as it stays quiet."""
    reads = FirstReads()
    reads.expect("quiet", 0, 50, now=0.0)
    reads.expect("busy", 0, 7, now=10.0)
    reads.expect("busy", 3, 7, now=10.0)
    assert reads.partitions == {"quiet": {0}, "busy": {0, 3}}
    reads.expire(WATCH_S - 1)
    assert reads.partitions == {"quiet": {0}, "busy": {0, 3}}
    reads.expire(WATCH_S)
    assert reads.partitions == {"busy": {0, 3}}  # only these are looked for in a batch
    assert reads.check([("quiet", 0, 99), ("busy", 0, 9)]) == [OffsetGap("busy", 0, 7, 9)]
    assert reads.partitions == {"busy": {3}}
    reads.expire(WATCH_S + 10)
    assert not reads and reads.partitions == {}
