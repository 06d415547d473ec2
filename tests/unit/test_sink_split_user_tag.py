"""``timeStamp.userTag`` in the sink's lossless split (``codec.split_sample`` /
``rebuild_data``): a nonzero int32 tag is a per-sample column (flag 32), anything else stays in
the rest, and every variant comes back exactly as sent."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from recorder.client.values import PVSample
from recorder.sim.encoding import pack
from recorder.sim.pvs import parse_pv, pv_structure
from recorder.sinks.codec import (
    F_TIME,
    F_USER_TAG,
    decode_rest,
    encode_rest,
    rebuild_data,
    split_sample,
)

T0 = 1_763_700_000 * 1_000_000_000


def sample(tag: Any, *, seconds: Any = 1_763_700_000) -> PVSample:
    s = pv_structure(parse_pv("SIM:AI:DOUBLE:1"), 3, T0)
    s["timeStamp"] = {"secondsPastEpoch": seconds, "nanoseconds": 5, "userTag": tag}
    return PVSample.from_raw("A", pack(s), 0)


def round_trip(smp: PVSample) -> dict[str, Any]:
    split = split_sample(smp)
    rest = decode_rest(encode_rest(split.rest))  # as stored
    return rebuild_data(rest, flags=split.flags, kind=split.kind, time_ns=split.time_ns,
                        severity=split.severity, status=split.status,
                        value=smp.value.item() if hasattr(smp.value, "item") else smp.value,
                        user_tag=split.user_tag)


@pytest.mark.parametrize("tag", [1, -1, 127, 128, 65_536, 2**31 - 1, -(2**31)])
def test_a_nonzero_int32_tag_is_taken_out(tag: int) -> None:
    smp = sample(tag)
    split = split_sample(smp)
    assert split.flags & F_USER_TAG and split.user_tag == tag
    assert split.rest["d"]["timeStamp"]["userTag"] is None
    assert round_trip(smp) == msgpack.unpackb(smp.raw)


@pytest.mark.parametrize("tag", [0, 2**31, -(2**31) - 1, 2**63, True, False, None, 1.5, "7"])
def test_any_other_tag_stays_in_the_rest(tag: Any) -> None:
    smp = sample(tag)
    split = split_sample(smp)
    assert not split.flags & F_USER_TAG and split.user_tag == 0
    got = split.rest["d"]["timeStamp"]["userTag"]
    assert got == tag and type(got) is type(msgpack.unpackb(smp.raw)["timeStamp"]["userTag"])
    assert round_trip(smp) == msgpack.unpackb(smp.raw)


def test_the_tag_is_taken_out_even_when_the_time_is_not() -> None:
    smp = sample(42, seconds=2**63)  # beyond int64 ns: the time stays in the rest
    split = split_sample(smp)
    assert split.flags & F_USER_TAG and not split.flags & F_TIME
    assert split.rest["d"]["timeStamp"] == {"secondsPastEpoch": 2**63, "nanoseconds": 5,
                                            "userTag": None}
    assert round_trip(smp) == msgpack.unpackb(smp.raw)
