"""Lazily-built samples (``PVSample.from_raw``, the wire decoder's fast path for data messages)
must be indistinguishable from eagerly-built ones, and malformed input must still be caught."""

from __future__ import annotations

import math
import threading
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from k2eg_sequences import (
    F32,
    MSGPACK_HEADERS,
    T0,
    data_msg,
    iteration,
    ntenum,
    ntndarray,
    ntscalar,
    nttable,
    pack,
    records,
)

from recorder.client.assembler import IterationAssembler
from recorder.client.events import ValuesReceived
from recorder.client.values import PVSample, ValueKind
from recorder.client.wire import (
    Data,
    DecodeError,
    decode_snapshot_message,
    float32_paths,
    payload_float32_paths,
    snapshot_message_from_map,
)

H = MSGPACK_HEADERS


# ------------------------------------------------------------------------------ helpers
def reference(raw: bytes) -> Data:
    """The full-decode path: unpackb, then the map-based builder (eager PVSample)."""
    msg = snapshot_message_from_map(msgpack.unpackb(raw), raw)
    assert isinstance(msg, Data)
    return msg


def lazy(raw: bytes) -> Data:
    msg = decode_snapshot_message(raw, H)
    assert isinstance(msg, Data)
    assert msg.sample.raw is not None, "the fast path was not taken"
    return msg


def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
        )
    if isinstance(a, np.generic) or isinstance(b, np.generic):
        if type(a) is not type(b):
            return False
        if isinstance(a, np.floating) and math.isnan(float(a)):
            return math.isnan(float(b))
        return bool(a == b)
    if hasattr(a, "columns"):  # TableValue
        return (
            a.labels == b.labels
            and a.columns.keys() == b.columns.keys()
            and all(same_value(a.columns[k], b.columns[k]) for k in a.columns)
        )
    if hasattr(a, "union_field"):  # NDArrayValue
        return (
            a.union_field == b.union_field
            and a.dimensions == b.dimensions
            and same_value(a.data, b.data)
        )
    if isinstance(a, dict | list) and type(a) is type(b):  # STRUCT: NaN-safe, bit for bit
        return bool(msgpack.packb(a) == msgpack.packb(b))
    return bool(a == b) or (a != a and b != b)  # noqa: PLR0124 (NaN)


def assert_same(raw: bytes) -> Data:
    got, ref = lazy(raw), reference(raw)
    for field in (
        "iter_index",
        "timestamp_ns",
        "msg_seq",
        "submission_seq",
        "last_submission_data",
        "header_timestamp_ns",
        "raw",
    ):
        assert getattr(got, field) == getattr(ref, field), field
    a, b = got.sample, ref.sample
    assert a.pv == b.pv
    # float32 paths first (read from the raw bytes, before data is decoded), then the rest
    assert a.float32_paths == b.float32_paths == float32_paths(raw, b.pv)
    assert msgpack.packb(a.data) == msgpack.packb(b.data)  # equal, NaN-safe
    assert a.kind == b.kind
    assert same_value(a.value, b.value), (a.value, b.value)
    assert a.timestamp_ns == b.timestamp_ns
    assert (a.severity, a.status, a.alarm_message) == (b.severity, b.status, b.alarm_message)
    assert a.raw is not None and raw.endswith(a.raw)
    assert msgpack.packb(msgpack.unpackb(a.raw)) == msgpack.packb(b.data)
    assert b.raw is None
    return got


STRUCTURES: list[tuple[str, dict[str, Any]]] = [
    ("f64", ntscalar(1.5)),
    ("f32", ntscalar(F32(1.5))),
    ("f32_nan", ntscalar(F32(float("nan")))),
    ("int", ntscalar(7)),
    ("big_uint", ntscalar(2**64 - 1)),
    ("neg", ntscalar(-5)),
    ("bool", ntscalar(True)),
    ("str", ntscalar("text")),
    ("none", ntscalar(None)),
    ("wave_f64", ntscalar([float(i) for i in range(100)])),
    ("wave_f32", ntscalar([F32(float(i)) for i in range(20)])),
    ("wave_f32_long", ntscalar([F32(float(i)) for i in range(70_000)])),
    ("wave_int", ntscalar(list(range(40)))),
    ("wave_empty", ntscalar([])),
    ("wave_bool", ntscalar([True, False])),
    ("wave_str", ntscalar(["a", "b"])),
    ("enum", ntenum(1, ["Off", "On"])),
    ("table", nttable({"x": [F32(1.0), F32(2.0)], "y": [1.0, 2.0], "n": [1, 2]})),
    ("ndarray_f32", ntndarray("floatValue", [F32(1.0), F32(2.0)], [2, 1])),
    ("ndarray_u8", ntndarray("ubyteValue", [1, 2, 3, 4], [2, 2])),
    ("struct", ntscalar({"a": F32(1.0), "b": "x"})),
    ("value_not_first", {"alarm": {"severity": 1}, "value": F32(2.0)}),
    ("no_value", {"alarm": {"severity": 2, "status": 3, "message": "HIHI"}}),
    ("map16", {"value": F32(1.0), **{f"f{i}": i for i in range(20)}}),
]
LAYOUTS: list[dict[str, Any]] = [
    {},  # legacy
    {"msg_seq": 2, "sub": 1},  # sequenced
    {"msg_seq": 300, "sub": 70_000, "last": True},
    {"msg_seq": 5},
    {"header_ts": T0 - 5},
    {"msg_seq": 2**40, "sub": 3, "last": True, "header_ts": T0 * 1_000_000},
]


@pytest.mark.parametrize(("name", "pv_struct"), STRUCTURES, ids=[s[0] for s in STRUCTURES])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: ",".join(layout) or "legacy")
def test_lazy_equals_eager(name: str, pv_struct: dict[str, Any], layout: dict[str, Any]) -> None:
    assert_same(data_msg(3, T0, f"PV:{name}", pv_struct, **layout))


@pytest.mark.parametrize("pv", ["a", "x" * 31, "L" * 32, "L" * 255, "U" * 256, "µ:é:PV"])
def test_pv_key_lengths_and_utf8(pv: str) -> None:
    assert lazy(data_msg(1, T0, pv, ntscalar(F32(2.0)))).sample.pv == pv
    assert_same(data_msg(1, T0, pv, ntscalar(F32(2.0)), msg_seq=2, sub=1))


def test_recorded_sequences_lazy_equals_eager() -> None:
    for sequenced in (False, True):
        batches = [
            (T0 + b, [(f"p{i}:{b}", s) for i, (_, s) in enumerate(STRUCTURES)]) for b in (0, 7)
        ]
        for m in iteration("s", 4, batches, sequenced=sequenced):
            if m.kind == "D":
                assert_same(m.raw)


def test_layouts_the_fast_path_leaves_to_the_full_decoder() -> None:
    """Other key orders, extra keys, nil/negative values: same result, eagerly built."""
    pv = ntscalar(F32(1.0))
    for obj in (
        {"timestamp": T0, "message_type": 1, "iter_index": 1, "p": pv},  # order
        {"message_type": 1, "timestamp": T0, "iter_index": 1, "note": "x", "p": pv},
        {"message_type": 1, "timestamp": T0, "iter_index": 1, "msg_seq": None, "p": pv},
        {"message_type": 1, "timestamp": T0, "iter_index": 1, "msg_seq": -3, "p": pv},
        {"message_type": 1, "timestamp": T0, "iter_index": -1, "p": pv},
        {"message_type": 1, "timestamp": T0, "iter_index": 1, "p": pv, "msg_seq": 4},
    ):
        raw = pack(obj)
        got = decode_snapshot_message(raw, H)
        ref = reference(raw)
        assert isinstance(got, Data)
        assert got.sample.raw is None  # full path
        assert (got.iter_index, got.msg_seq, got.sample.pv) == (ref.iter_index, ref.msg_seq, "p")
        assert got.sample.float32_paths == {"value", "valueAlarm.lowAlarmLimit"}


def reason(raw: bytes) -> str:
    with pytest.raises(DecodeError) as info:
        decode_snapshot_message(raw, H)
    return info.value.reason


def test_malformed_data_messages_are_still_rejected() -> None:
    good = data_msg(1, T0, "p", ntscalar(F32(1.0)), msg_seq=2, sub=1)
    legacy = data_msg(1, T0, "p", ntscalar([1.0, 2.0]))
    for raw in (good, legacy):
        assert reason(raw[:-1]) == "not_msgpack"  # truncated PV map
        assert reason(raw[:-9]) == "not_msgpack"
        assert reason(raw + b"\x00") == "not_msgpack"  # trailing bytes
        assert reason(raw + raw) == "not_msgpack"
        assert reason(bytes((raw[0] + 1,)) + raw[1:]) == "not_msgpack"  # count too high
        # after a rejected message this thread's skipping Unpacker is clean again
        assert_same(raw)
    # garbage inside the PV map (0xc1 is never used), and a too-deep nesting
    at = good.index(b"\xa5alarm")
    assert reason(good[:at] + b"\xc1" + good[at + 1 :]) == "not_msgpack"
    deep = b"\x81\xa1a" * 2000 + b"\xc0"
    assert reason(good[: good.index(b"\xa1p") + 2] + deep) == "not_msgpack"
    # a count too low leaves the PV unread: the full decoder finds trailing data
    assert reason(bytes((good[0] - 1,)) + good[1:]) == "not_msgpack"
    # PV value not a map, PV key not valid UTF-8, PV key a metadata name
    assert reason(pack({"message_type": 1, "timestamp": T0, "iter_index": 1, "p": 5})) == (
        "bad_type"
    )
    bad_key = good.replace(b"\xa1p", b"\xa1\xff")
    assert reason(bad_key) == "bad_type"  # msgpack, with a text that is not UTF-8
    raw = pack({"message_type": 1, "timestamp": T0, "iter_index": 1, "error": {"value": 1}})
    assert reason(raw) == "missing_key"
    assert_same(good)


def test_malformed_data_messages_are_counted() -> None:
    good = data_msg(1, T0, "p", ntscalar(F32(1.0)), msg_seq=2, sub=1)
    asm = IterationAssembler()
    for i, raw in enumerate((good[:-1], good + b"\x00", good[:30], good[:-1])):
        assert asm.feed(records("t", [raw], start_offset=i)[0], 0.0) == []
    assert asm.counters["malformed.not_msgpack"] == 4
    events = asm.feed(records("t", [good], start_offset=9)[0], 0.0)
    events += asm.idle(0.0)
    values = [e for e in events if isinstance(e, ValuesReceived)]
    assert [s.pv for v in values for s in v.samples] == ["p"]


def test_content_msgpack_python_refuses_is_decoded_leniently() -> None:
    """Structurally valid, but a string is not UTF-8 (e.g. a Latin-1 unit): the message is
    accepted (structure is what is checked eagerly) and ``data`` keeps the bytes."""
    raw = data_msg(1, T0, "p", ntscalar(2.0)).replace(b"\xa2mm", b"\xa2\xb0C")
    with pytest.raises(ValueError):
        msgpack.unpackb(raw)
    sample = lazy(raw).sample
    assert sample.data["display"]["units"] == "\udcb0C"
    assert sample.data["display"]["units"].encode("utf-8", "surrogateescape") == b"\xb0C"
    assert sample.kind == ValueKind.SCALAR and sample.value == np.float64(2.0)


def test_eager_constructor_unchanged() -> None:
    s = PVSample("a", {"value": 1.5}, frozenset({"value"}))
    assert s.raw is None and s.data == {"value": 1.5}
    assert s.value.dtype == np.float32
    s2 = PVSample("b", {"value": 1.5})
    assert s2.float32_paths == frozenset() and s2.value.dtype == np.float64
    s2.data = {"value": 3}
    assert s2.value == 3 and s2.kind == ValueKind.SCALAR
    s2.float32_paths = frozenset({"value"})
    assert s2.float32_paths == {"value"}


def test_from_raw_directly() -> None:
    body = pack(ntscalar([F32(1.0), F32(2.0)]))
    s = PVSample.from_raw("w", b"junk" + body, 4)
    assert s.raw == body and s.float32_paths == {"value", "valueAlarm.lowAlarmLimit"}
    assert s.value.dtype == np.float32 and list(s.value) == [1.0, 2.0]
    t = PVSample.from_raw("w", b"junk" + body + b"more", 4, 4 + len(body))
    assert t.raw == body and t.data == msgpack.unpackb(body)
    assert payload_float32_paths(b"junk" + body, 4) == {"value", "valueAlarm.lowAlarmLimit"}
    assert payload_float32_paths(b"\xc1", 0) == frozenset()


def test_legacy_duplicates_keyed_on_bytes() -> None:
    a = data_msg(1, T0, "p", ntscalar(1.0))
    b = data_msg(1, T0, "p", ntscalar(2.0))  # same PV, another value: not a duplicate
    asm = IterationAssembler()
    for i, raw in enumerate((a, b, a, b, a)):
        asm.feed(records("t", [raw], start_offset=i)[0], 0.0)
    assert asm.counters["duplicate"] == 3
    assert asm.counters.get("malformed.not_msgpack", 0) == 0


def test_decoding_from_several_threads() -> None:
    raws = [
        data_msg(1, T0, f"p{i}", ntscalar(F32(float(i))), msg_seq=i + 2, sub=1) for i in range(50)
    ]
    bad = raws[0][:-3]
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(40):
                for raw in raws:
                    assert lazy(raw).sample.pv.startswith("p")
                    with pytest.raises(DecodeError):
                        decode_snapshot_message(bad, H)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# ------------------------------------------------------------------------------ property
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.floats(width=32).map(F32),
    st.text(max_size=8),
    st.binary(max_size=8),
)
structures = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
values = st.one_of(
    scalars,
    st.lists(st.floats(width=32).map(F32), max_size=5),
    st.lists(st.floats(), max_size=5),
    st.lists(st.integers(0, 2**16), max_size=5),
    st.dictionaries(st.text(max_size=4), st.lists(st.floats(width=32).map(F32), max_size=3)),
    structures,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    value=values,
    fields=st.dictionaries(st.text(max_size=8), structures, max_size=4),
    value_first=st.booleans(),
    pv=st.text(min_size=1, max_size=40),
    idx=st.integers(0, 2**63 - 1),  # beyond: refused (test_iter_index_beyond_int64_is_refused)
    ts=st.integers(0, 2**64 - 1),
    seq=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    sub=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    last=st.booleans(),
    header_ts=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
def test_property_lazy_equals_eager(  # noqa: PLR0917
    value: Any,
    fields: dict[str, Any],
    value_first: bool,
    pv: str,
    idx: int,
    ts: int,
    seq: int | None,
    sub: int | None,
    last: bool,
    header_ts: int | None,
) -> None:
    from recorder.client.wire import SNAPSHOT_METADATA_KEYS

    if pv in SNAPSHOT_METADATA_KEYS or "\x00" in pv:  # not a PV name (NUL: refused)
        return
    fields.pop("value", None)
    pv_struct = {"value": value, **fields} if value_first else {**fields, "value": value}
    raw = data_msg(idx, ts, pv, pv_struct, msg_seq=seq, sub=sub, last=last, header_ts=header_ts)
    got = assert_same(raw)
    assert got.sample.pv == pv
