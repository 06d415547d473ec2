"""Per-sample fields of format 4.0 in the sink's lossless split (``codec.split_sample`` /
``rebuild_data``): a nonzero int32 ``timeStamp.userTag`` (flag 32) and an NTNDArray's
``uniqueId`` + ``dataTimeStamp`` (flag 64) become columns, anything else stays in the rest,
and every variant comes back exactly as sent."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from recorder.client.values import PVSample
from recorder.sim.encoding import pack
from recorder.sim.pvs import parse_pv, pv_structure
from recorder.sinks.codec import (
    F_FRAME,
    F_TIME,
    F_USER_TAG,
    decode_rest,
    encode_rest,
    rebuild_data,
    same_rest,
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
    value: Any = smp.value
    if split.array is not None:
        value = split.array.tolist()
    elif hasattr(value, "item"):
        value = value.item()
    return rebuild_data(rest, flags=split.flags, kind=split.kind, time_ns=split.time_ns,
                        severity=split.severity, status=split.status, value=value,
                        user_tag=split.user_tag,
                        unique_id=int(split.fval) if split.flags & F_FRAME else 0,
                        data_time_ns=split.ival)


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


def image(unique_id: Any = 7, data_time: Any = "default") -> PVSample:
    s = pv_structure(parse_pv("SIM:IMG:USHORT:1:S4x3"), 3, T0)
    if unique_id is _GONE:
        del s["uniqueId"]
    else:
        s["uniqueId"] = unique_id
    if data_time is _GONE:
        del s["dataTimeStamp"]
    elif data_time != "default":
        s["dataTimeStamp"] = data_time
    return PVSample.from_raw("IMG", pack(s), 0)


_GONE = object()


def test_a_frame_id_and_time_are_taken_out() -> None:
    smp = image()
    split = split_sample(smp)
    assert split.flags & F_FRAME
    assert (split.fval, split.ival) == (7.0, T0)
    d = split.rest["d"]
    assert d["uniqueId"] is None
    assert d["dataTimeStamp"] == {"secondsPastEpoch": None, "nanoseconds": None, "userTag": 0}
    assert list(d) == list(msgpack.unpackb(smp.raw))  # field order kept
    assert round_trip(smp) == msgpack.unpackb(smp.raw)


@pytest.mark.parametrize(("unique_id", "data_time"), [
    (True, "default"), (None, "default"), (2**31, "default"), (1.5, "default"),
    (_GONE, "default"), (7, _GONE), (7, None), (7, {"secondsPastEpoch": 1, "nanoseconds": -1}),
    (7, {"secondsPastEpoch": 2**63, "nanoseconds": 0}), (7, {"nanoseconds": 5}), (7, [1, 2]),
])
def test_a_frame_that_does_not_fit_stays_in_the_rest(unique_id: Any, data_time: Any) -> None:
    smp = image(unique_id, data_time)
    split = split_sample(smp)
    assert not split.flags & F_FRAME and split.ival == 0 and split.fval == 0.0
    assert round_trip(smp) == msgpack.unpackb(smp.raw)


@pytest.mark.parametrize(("a", "b"), [
    (0, False), (1, True), (1, 1.0), (0.0, -0.0), ({"a": 1, "b": 2}, {"b": 2, "a": 1}),
    ([0], [False]), ({"t": {"userTag": 0}}, {"t": {"userTag": False}}),
    ({1: "x"}, {1.0: "x"}),
])
def test_rests_equal_for_python_but_not_as_stored_are_different(a: Any, b: Any) -> None:
    """A rest equal (``==``) to the previous one is not stored again: ``==`` alone would give
    a sample the previous sample's ``0`` for its ``False`` (found by the property test)."""
    assert a == b and not same_rest(a, b) and not same_rest(b, a)


@pytest.mark.parametrize("a", [
    {"x": [1, 2.5, "s", None, True, b"\x00", {"y": -0.0}]}, {}, [], -0.0, "é",
])
def test_equal_rests_are_the_same(a: Any) -> None:
    assert same_rest(a, a) and same_rest(a, msgpack.unpackb(msgpack.packb(a)))
    nan = {"y": float("nan")}
    assert same_rest(nan, nan)  # the same object (a new NaN only stores an equal rest again)
