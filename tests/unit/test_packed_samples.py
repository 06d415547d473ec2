"""PackedSamples: the samples of one event as a writer process gets them (one blob)."""

from __future__ import annotations

import msgpack
import pytest

from recorder.client.values import PVSample
from recorder.sinks.packed import PackedSamples


def test_packed_samples_look_like_a_tuple_of_samples_over_their_own_bytes() -> None:
    maps = [{"value": 1.5}, {"value": [1, 2, 3], "alarm": {"severity": 2}}, {}]
    parts = [b"\x93\x01\x02"]  # a message header before each map
    starts, ends = [], []
    for m in maps:
        parts.append(b"\xa2hd")
        starts.append(sum(map(len, parts)))
        parts.append(msgpack.packb(m))
        ends.append(sum(map(len, parts)))
    blob = b"".join(parts)
    p = PackedSamples(["A", "B", "C"], blob, starts, ends)
    assert len(p) == 3 and p._samples is None
    assert p.payload_bytes == sum(len(msgpack.packb(m)) for m in maps)
    got = list(p)
    assert all(type(s) is PVSample for s in got)
    assert [s.pv for s in got] == ["A", "B", "C"]
    assert [dict(s.data) for s in got] == maps
    # each over its own copy of its map, made once
    assert [s.raw for s in got] == [msgpack.packb(m) for m in maps]
    assert all(s.raw is not blob for s in got)
    assert p[1] is got[1] and p[-1] is got[2] and p[0:2] == (got[0], got[1])
    assert "3 samples" in repr(p)


def test_one_position_per_pv() -> None:
    with pytest.raises(ValueError, match="one"):
        PackedSamples(["A", "B"], b"\x80", [0], [1])
