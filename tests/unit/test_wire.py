"""recorder.client.wire: envelope checks, message decoding, PV typing, float32 detection."""

from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from k2eg_sequences import (
    F32,
    MSGPACK_HEADERS,
    T0,
    data_msg,
    header_msg,
    ntenum,
    ntndarray,
    ntscalar,
    nttable,
    pack,
    tail_msg,
)

from recorder.client import wire
from recorder.client.values import EnumValue, NDArrayValue, TableValue, ValueKind
from recorder.client.wire import (
    SNAPSHOT_METADATA_KEYS,
    Data,
    DecodeError,
    Header,
    Tail,
    decode_reply,
    decode_snapshot_message,
    float32_paths,
    serialization_of,
    to_ns,
)

H = MSGPACK_HEADERS

# the test structures' valueAlarm.lowAlarmLimit is a float32 (k2eg_sequences.ntscalar)
META_F32 = frozenset({"valueAlarm.lowAlarmLimit"})


def decode_data(raw: bytes) -> Data:
    msg = decode_snapshot_message(raw, H)
    assert isinstance(msg, Data)
    return msg


def reason_of(value: Any, headers: Any = H) -> str:
    with pytest.raises(DecodeError) as info:
        decode_snapshot_message(value, headers)
    return info.value.reason


# ------------------------------------------------------------------------------- envelope
@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([("k2eg-ser-type", b"Msgpack")], "msgpack"),
        ([("k2eg-ser-type", b"MSGPACK")], "msgpack"),
        ([("K2EG-Ser-Type", b"msgPack ")], "msgpack"),
        ([("other", b"x"), ("k2eg-ser-type", "Msgpack")], "msgpack"),
        ([("k2eg-ser-type", b"Json")], "json"),
        ([("k2eg-ser-type", b"Msgpack-Compact")], "msgpack-compact"),
        ([("k2eg-ser-type", None)], ""),
        ([("other", b"Msgpack")], None),
        ([], None),
        (None, None),
    ],
)
def test_serialization_of(headers: Any, expected: str | None) -> None:
    assert serialization_of(headers) == expected


def test_header_value_compared_case_insensitively() -> None:
    raw = header_msg("s", 1, T0)
    for value in (b"Msgpack", b"msgpack", b"MsGpAcK"):
        assert isinstance(decode_snapshot_message(raw, [("k2eg-ser-type", value)]), Header)


def test_envelope_rejections() -> None:
    raw = header_msg("s", 1, T0)
    assert reason_of(raw, None) == "no_header"
    assert reason_of(raw, []) == "no_header"
    assert reason_of(raw, [("k2eg-ser-type", b"Json")]) == "wrong_serialization"
    assert reason_of(raw, [("k2eg-ser-type", b"Msgpack-Compact")]) == "wrong_serialization"
    assert reason_of(None) == "empty"
    assert reason_of("text") == "bad_type"
    with pytest.raises(DecodeError) as info:
        decode_snapshot_message(raw, H, max_bytes=len(raw) - 1)
    assert info.value.reason == "too_large"
    assert isinstance(decode_snapshot_message(raw, H, max_bytes=len(raw)), Header)


def test_decode_error_is_a_protocol_error() -> None:
    from recorder.errors import ClientError, ProtocolError

    err = DecodeError("bad_type", "x")
    assert isinstance(err, ProtocolError) and isinstance(err, ClientError)
    assert str(err) == "bad_type: x" and err.detail == "x"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xc1", "not_msgpack"),
        (b"\x93\x01", "not_msgpack"),  # truncated
        (b"\x01\x02", "not_msgpack"),  # extra data
        (b"\xa3ab", "not_msgpack"),
        (b"\x81\x01\x02", "not_msgpack"),  # int map key
        (msgpack.packb([1, 2]), "not_a_map"),
        (msgpack.packb("x"), "not_a_map"),
        (msgpack.packb({"timestamp": T0, "iter_index": 1}), "missing_key"),
        (msgpack.packb({"message_type": "1", "timestamp": T0, "iter_index": 1}), "bad_type"),
        (msgpack.packb({"message_type": True, "timestamp": T0, "iter_index": 1}), "bad_type"),
        (msgpack.packb({"message_type": 0, "timestamp": T0}), "missing_key"),
        (msgpack.packb({"message_type": 0, "timestamp": 1.5, "iter_index": 1}), "bad_type"),
        (msgpack.packb({"message_type": 0, "timestamp": T0, "iter_index": None}), "bad_type"),
        (
            msgpack.packb({"message_type": 7, "timestamp": T0, "iter_index": 1}),
            "unknown_message_type",
        ),
        (msgpack.packb({"message_type": 1, "timestamp": T0, "iter_index": 1}), "missing_key"),
        (msgpack.packb({"message_type": 1, "timestamp": T0, "iter_index": 1, "a": 5}), "bad_type"),
        (
            msgpack.packb({"message_type": 1, "timestamp": T0, "iter_index": 1, "a": {}, "b": {}}),
            "ambiguous_pv",
        ),
        (
            msgpack.packb({"message_type": 2, "timestamp": T0, "iter_index": 1, "error": "x"}),
            "bad_type",
        ),
    ],
)
def test_malformed_messages(payload: bytes, reason: str) -> None:
    assert reason_of(payload) == reason


# -------------------------------------------------------------------------------- messages
def test_legacy_header_data_tail() -> None:
    h = decode_snapshot_message(header_msg("snap_1", 3, T0), H)
    assert h == Header("snap_1", 3, T0 * 1_000_000, None, None)

    d = decode_data(data_msg(3, T0, "a:x", ntscalar(1.5)))
    assert (d.iter_index, d.timestamp_ns, d.msg_seq, d.submission_seq) == (
        3,
        T0 * 10**6,
        None,
        None,
    )
    assert d.last_submission_data is False and d.header_timestamp_ns is None
    assert d.sample.pv == "a:x" and d.sample.data["value"] == 1.5
    assert d.raw is not None

    t = decode_snapshot_message(tail_msg("snap_1", 3, T0 + 5), H)
    assert t == Tail(3, (T0 + 5) * 10**6, "snap_1", 0, "", None, None, None, None)


def test_sequenced_and_storage_node_keys() -> None:
    h = decode_snapshot_message(header_msg("s", 5, T0, msg_seq=1, sub=41), H)
    assert isinstance(h, Header) and (h.msg_seq, h.submission_seq) == (1, 41)
    d = decode_data(
        data_msg(5, T0, "c:z", ntscalar(2), msg_seq=4, sub=41, last=True, header_ts=T0 - 3)
    )
    assert (d.msg_seq, d.submission_seq, d.last_submission_data) == (4, 41, True)
    assert d.header_timestamp_ns == (T0 - 3) * 10**6
    t = decode_snapshot_message(
        tail_msg(
            "s", 5, T0, error=2, error_message="boom", msg_seq=5, total=5, sub=41, header_ts=T0 - 3
        ),
        H,
    )
    assert t == Tail(5, T0 * 10**6, "s", 2, "boom", 5, 5, 41, (T0 - 3) * 10**6)


def test_pv_key_found_anywhere_and_unknown_keys_tolerated() -> None:
    # PV first, then metadata, then an unknown scalar key and the official client's injected key
    m = {
        "x:y": ntscalar(F32(0.5)),
        "message_type": 1,
        "iter_index": 2,
        "timestamp": T0,
        "future_key": "abc",
        "message-size": 99,
        "error_message": "",
    }
    d = decode_data(pack(m))
    assert d.sample.pv == "x:y"
    assert d.sample.float32_paths == {"value", *META_F32}
    assert d.sample.value.dtype == np.float32


def test_bad_optional_fields_are_ignored_not_fatal() -> None:
    m = {
        "message_type": 1,
        "timestamp": T0,
        "iter_index": 1,
        "msg_seq": "2",
        "submission_seq": -4,
        "last_submission_data": "yes",
        "header_timestamp": "x",
        "a": ntscalar(1),
    }
    d = decode_data(pack(m))
    assert (d.msg_seq, d.submission_seq, d.last_submission_data, d.header_timestamp_ns) == (
        None,
        None,
        False,
        None,
    )
    assert d.sample.pv == "a"


def test_to_ns() -> None:
    assert to_ns(T0) == T0 * 1_000_000
    assert to_ns(T0 * 1_000_000) == T0 * 1_000_000  # already ns (> 1e15)
    assert to_ns(0) == 0
    ns = 1_763_700_000_123_456_789
    h = decode_snapshot_message(header_msg("s", 1, ns), H)
    assert h.timestamp_ns == ns


def test_uint64_timestamp_on_the_wire() -> None:
    raw = header_msg("s", 1, T0)
    assert b"\xcf" + T0.to_bytes(8, "big") in raw  # what msgpack-c emits too


# ------------------------------------------------------------------------------- PV typing
def typed(value_map: dict[str, Any]) -> tuple[ValueKind, Any, frozenset[str]]:
    d = decode_data(data_msg(1, T0, "p", value_map))
    return d.sample.kind, d.sample.value, d.sample.float32_paths


def test_ntscalar_float64_and_float32() -> None:
    kind, value, paths = typed(ntscalar(1.25))
    assert kind is ValueKind.SCALAR and value.dtype == np.float64 and value == 1.25
    assert paths == META_F32  # a float32 alarm limit does not make the value float32
    kind, value, paths = typed(ntscalar(F32(1.25)))
    assert kind is ValueKind.SCALAR and value.dtype == np.float32 and value == np.float32(1.25)
    assert paths == {"value", *META_F32}
    _kind, _value, paths = typed(ntscalar(F32(1.25), display=False))
    assert paths == {"value"}


def test_float32_special_values() -> None:
    for v in (math.nan, math.inf, -math.inf, -0.0):
        _kind, value, paths = typed(ntscalar(F32(v)))
        assert value.dtype == np.float32 and paths == {"value", *META_F32}
        assert (math.isnan(value) and math.isnan(v)) or value == v


def test_integer_bool_string_none_scalars() -> None:
    kind, value, _ = typed(ntscalar(-7))
    assert kind is ValueKind.SCALAR and value.dtype == np.int64 and value == -7
    kind, value, _ = typed(ntscalar(2**64 - 1))
    assert kind is ValueKind.SCALAR and value.dtype == np.uint64 and value == 2**64 - 1
    kind, value, _ = typed(ntscalar(True))
    assert kind is ValueKind.BOOL and value.dtype == np.bool_ and bool(value) is True
    kind, value, _ = typed(ntscalar("hello"))
    assert kind is ValueKind.STRING and value == "hello"
    kind, value, _ = typed(ntscalar(None))
    assert kind is ValueKind.NONE and value is None
    kind, value, _ = typed({"alarm": {"severity": 0}})
    assert kind is ValueKind.NONE


def test_sample_metadata() -> None:
    d = decode_data(data_msg(1, T0, "p", ntscalar(1.0, seconds=10, nanos=5, severity=2)))
    assert d.sample.timestamp_ns == 10 * 10**9 + 5
    assert d.sample.severity == 2 and d.sample.status == 0 and d.sample.alarm_message == "NO_ALARM"


def test_waveforms() -> None:
    kind, value, paths = typed(ntscalar([F32(x) for x in (1.0, 2.5, -3.0)]))
    assert kind is ValueKind.ARRAY and value.dtype == np.float32
    assert value.tolist() == [1.0, 2.5, -3.0] and paths == {"value", *META_F32}
    kind, value, paths = typed(ntscalar([1.0, 2.5]))
    assert value.dtype == np.float64 and paths == META_F32
    kind, value, _ = typed(ntscalar([1, -2, 3]))
    assert kind is ValueKind.ARRAY and value.dtype == np.int64
    kind, value, _ = typed(ntscalar([True, False]))
    assert kind is ValueKind.ARRAY and value.dtype == np.bool_
    kind, value, _ = typed(ntscalar(["a", "b"]))
    assert kind is ValueKind.STRING_ARRAY and value == ("a", "b")
    kind, value, _ = typed(ntscalar([]))
    assert kind is ValueKind.ARRAY and value.size == 0


def test_long_waveforms_array16_and_array32_headers() -> None:
    for n in (1000, 70_000):
        values = [F32(float(i)) for i in range(n)]
        raw = data_msg(1, T0, "w", ntscalar(values))
        assert (b"\xdc" if n < 65536 else b"\xdd") in raw
        d = decode_data(raw)
        assert d.sample.float32_paths == {"value", *META_F32}
        assert d.sample.value.dtype == np.float32 and d.sample.value.size == n
        assert float32_paths(raw) == {"value", *META_F32}
    raw = data_msg(1, T0, "w", ntscalar([float(i) for i in range(1000)]))
    assert decode_data(raw).sample.value.dtype == np.float64


def test_short_array_gateway_bug_kept_as_sent() -> None:
    """short[] is packed through uint16 by the gateway: -1 arrives as 65535 (documented)."""
    raw = pack(
        {
            "message_type": 1,
            "timestamp": T0,
            "iter_index": 1,
            "s": {"value": [0, 65535, 65534, 5], "alarm": {}},
        }
    )
    assert b"\xcd\xff\xff" in raw
    d = decode_data(raw)
    assert d.sample.value.dtype == np.int64
    assert d.sample.value.tolist() == [0, 65535, 65534, 5]


def test_ntenum() -> None:
    kind, value, paths = typed(ntenum(1, ["Off", "On"]))
    assert kind is ValueKind.ENUM and value == EnumValue(1, ("Off", "On")) and value.label == "On"
    assert paths == frozenset()


def test_nttable_columns_under_value_with_float_widths() -> None:
    table = nttable(
        {
            "x": [F32(1.0), F32(2.0)],
            "y": [1.5, 2.5],
            "name": ["a", "b"],
            "n": [1, 2],
        }
    )
    kind, value, paths = typed(table)
    assert kind is ValueKind.TABLE and isinstance(value, TableValue)
    assert paths == {"value.x"}
    assert value.labels == ("X", "Y", "NAME", "N")
    assert value.columns["x"].dtype == np.float32
    assert value.columns["y"].dtype == np.float64
    assert value.columns["name"] == ("a", "b")
    assert value.columns["n"].dtype == np.int64


def test_ntndarray() -> None:
    kind, value, _paths = typed(ntndarray("ubyteValue", list(range(6)), (3, 2)))
    assert kind is ValueKind.NDARRAY and isinstance(value, NDArrayValue)
    assert value.data.dtype == np.uint8 and value.shape == (2, 3)
    assert value.image().shape == (2, 3) and value.unique_id == 7
    kind, value, _ = typed(ntndarray("floatValue", [F32(0.5), F32(1.5)], (2,)))
    assert value.data.dtype == np.float32 and value.data.tolist() == [0.5, 1.5]


def test_struct_fallback() -> None:
    kind, value, _ = typed({"value": {"a": 1, "b": "x"}, "alarm": alarm_map()})
    assert kind is ValueKind.STRUCT and value == {"a": 1, "b": "x"}


def alarm_map() -> dict[str, Any]:
    return {"severity": 0, "status": 0, "message": ""}


def test_value_not_first_uses_walker() -> None:
    # pv_field_filter_list gives arbitrary field order: timeStamp before value
    raw = pack(
        {
            "message_type": 1,
            "timestamp": T0,
            "iter_index": 1,
            "p": {"timeStamp": {"secondsPastEpoch": 1, "nanoseconds": 0}, "value": F32(3.0)},
        }
    )
    d = decode_data(raw)
    assert d.sample.float32_paths == {"value"} and d.sample.value.dtype == np.float32


def test_pv_struct_with_many_fields_map16() -> None:
    pv = {"value": F32(1.0), **{f"f{i}": i for i in range(20)}}
    raw = data_msg(1, T0, "p", pv)
    assert b"\xde\x00\x15\xa5value" in raw
    assert decode_data(raw).sample.float32_paths == {"value"}


def test_fast_path_not_fooled_by_a_pv_named_value() -> None:
    raw = pack(
        {
            "message_type": 1,
            "timestamp": T0,
            "iter_index": 1,
            "value": {"value": F32(2.0), "alarm": alarm_map()},
        }
    )
    d = decode_data(raw)
    assert d.sample.pv == "value" and d.sample.float32_paths == {"value"}


def test_fast_path_not_fooled_by_coincidental_bytes() -> None:
    # an unknown bin field before the PV holds "map header + value + float64 marker" bytes
    fake = b"\x86\xa5value\xcb\x00\x00\x00\x00\x00\x00\x00\x00"
    pv = {"value": F32(2.0), "a": 1, "b": 2, "c": 3, "d": 4, "e": 5}
    raw = pack({"message_type": 1, "timestamp": T0, "iter_index": 1, "note": fake, "p": pv})
    assert raw.find(b"\x86\xa5value") < raw.find(b"\xa1p")  # the fake comes first
    assert decode_data(raw).sample.float32_paths == {"value"}
    # even with the PV key planted too, the decoded-type cross-check sends it to the walker
    fake = b"\xa1p\x86\xa5value\x93\xcb"
    pv_list = {"value": [F32(1.0), F32(2.0)], "a": 1, "b": 2, "c": 3, "d": 4, "e": 5}
    raw = pack({"message_type": 1, "timestamp": T0, "iter_index": 1, "note": fake, "p": pv_list})
    assert decode_data(raw).sample.float32_paths == {"value"}


def test_float32_paths_walker_on_garbage_is_empty() -> None:
    assert float32_paths(b"") == frozenset()
    assert float32_paths(b"\xc1\xc1") == frozenset()
    assert float32_paths(b"\x82\xa1a\x81\xa5value\xca\x00") == frozenset()  # truncated
    assert float32_paths(msgpack.packb([1, 2, 3])) == frozenset()
    raw = data_msg(1, T0, "p", ntscalar(F32(1.0)))
    assert float32_paths(raw, "p") == {"value", *META_F32}
    assert float32_paths(raw, "q") == frozenset()


def test_pv_named_like_a_field_of_the_other_message_kind_keeps_its_float32() -> None:
    # "message" is a reply field, not a snapshot one: in a snapshot it is a PV like any other
    # (here with "value" second, so the fast path hands over to the walker)
    raw = data_msg(1, T0, "message", {"alarm": {"severity": 0}, "value": [F32(1.5), F32(2.5)]})
    d = decode_data(raw)
    assert d.sample.pv == "message" and d.sample.float32_paths == {"value"}
    assert float32_paths(raw, "message") == {"value"}
    # and "timestamp" is a snapshot field, not a reply one: two PVs in a get reply
    raw = pack(
        {
            "error": 0,
            "reply_id": "g2",
            "timestamp": {"alarm": {}, "value": F32(3.0)},
            "message": "ok",
            "b": ntscalar(1.0),
        }
    )
    r = decode_reply(raw, H)
    assert set(r.samples) == {"timestamp", "b"}
    assert r.samples["timestamp"].float32_paths == {"value"}
    assert r.samples["b"].float32_paths == META_F32


# ------------------------------------------- fast path vs walker, on generated PV structures
leaf = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.floats(width=32, allow_nan=False).map(F32),
    st.booleans(),
    st.text(max_size=8),
    st.none(),
)
field_names = st.sampled_from(["alarm", "timeStamp", "display", "x", "value", "units", "é"])
value_strategy = st.one_of(
    st.floats(allow_nan=False),
    st.floats(width=32, allow_nan=False).map(F32),
    st.integers(-1000, 1000),
    st.lists(st.floats(width=32, allow_nan=False).map(F32), min_size=0, max_size=40),
    st.lists(st.floats(allow_nan=False), min_size=1, max_size=40),
    st.dictionaries(
        st.text(min_size=1, max_size=5),
        st.one_of(
            st.lists(st.floats(width=32, allow_nan=False).map(F32), min_size=1, max_size=4),
            st.lists(st.floats(allow_nan=False), min_size=1, max_size=4),
            st.lists(st.integers(0, 9), max_size=4),
        ),
        max_size=4,
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    value=value_strategy,
    others=st.dictionaries(
        field_names, st.one_of(leaf, st.dictionaries(field_names, leaf)), max_size=20
    ),
    value_first=st.booleans(),
    # a PV key equal to a header field would overwrite the header in the packed map; a NUL
    # is refused (test_pv_name_with_nul_is_refused)
    pv=st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1,
               max_size=12).filter(lambda name: name not in SNAPSHOT_METADATA_KEYS),
    sequenced=st.booleans(),
)
def test_fast_path_agrees_with_walker(
    value: Any, others: dict[str, Any], value_first: bool, pv: str, sequenced: bool
) -> None:
    others.pop("value", None)
    pv_map = {"value": value, **others} if value_first else {**others, "value": value}
    raw = data_msg(
        3, T0, pv, pv_map, msg_seq=2 if sequenced else None, sub=1 if sequenced else None
    )
    d = decode_data(raw)
    assert d.sample.pv == pv
    walker = float32_paths(raw, pv)
    assert d.sample.float32_paths == walker
    # and both agree with what was packed: every float32 field, maps looked into
    assert walker == f32_fields(pv_map)


def f32_fields(obj: dict[str, Any], prefix: str = "") -> set[str]:
    """The dotted paths of the float32 scalars and arrays (first element) in ``obj``."""
    out: set[str] = set()
    for key, item in obj.items():
        if isinstance(item, F32) or (isinstance(item, list) and item
                                     and isinstance(item[0], F32)):
            out.add(prefix + key)
        elif isinstance(item, dict):
            out |= f32_fields(item, f"{prefix}{key}.")
    return out


# ---------------------------------------------------------------------------------- replies
def test_decode_ack_replies() -> None:
    raw = msgpack.packb(
        {
            "error": 0,
            "reply_id": "r1",
            "message": "The snapshot 'snap_1' has been started",
            "publishing_topic": "snap_1",
        }
    )
    r = decode_reply(raw, H)
    assert (r.reply_id, r.error, r.publishing_topic, r.samples, r.fields) == (
        "r1",
        0,
        "snap_1",
        {},
        {},
    )
    assert r.message.endswith("started")
    running = decode_reply(
        msgpack.packb(
            {"error": 0, "reply_id": "r2", "message": "Snapshot My Snap is already running"}
        ),
        H,
    )
    assert running.error == 0 and running.publishing_topic is None
    parse_failure = decode_reply(msgpack.packb({"error": -1, "reply_id": "r3"}), H)
    assert parse_failure.error == -1 and parse_failure.message == ""


def test_decode_get_reply_and_one_shot_messages() -> None:
    raw = pack({"error": 0, "reply_id": "g1", "a:b": ntscalar(F32(4.5))})
    r = decode_reply(raw, H)
    assert list(r.samples) == ["a:b"]
    assert r.samples["a:b"].value.dtype == np.float32
    raw = pack(
        {
            "error": 0,
            "reply_id": "s1",
            "msg_seq": 3,
            "x": ntscalar([1.0, 2.0]),
            "y": ntscalar([F32(1.0)]),
        }
    )
    r = decode_reply(raw, H)
    assert r.samples["x"].value.dtype == np.float64 and r.samples["y"].value.dtype == np.float32
    assert r.fields == {"msg_seq": 3}
    done = decode_reply(msgpack.packb({"error": 1, "reply_id": "s1"}), H)
    assert done.error == 1 and not done.samples


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (msgpack.packb({"error": 0}), "missing_key"),
        (msgpack.packb({"reply_id": "x"}), "missing_key"),
        (msgpack.packb({"reply_id": 5, "error": 0}), "bad_type"),
        (msgpack.packb({"reply_id": "x", "error": "0"}), "bad_type"),
        (msgpack.packb([1]), "not_a_map"),
        (b"\xc1", "not_msgpack"),
    ],
)
def test_decode_reply_rejections(payload: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_reply(payload, H)
    assert info.value.reason == reason


def test_float32_marker_helper_matches_struct() -> None:
    assert pack(F32(1.0)) == struct.pack(">Bf", 0xCA, 1.0)
    assert wire.MAX_MESSAGE_BYTES == 64 * 1024 * 1024


def test_kafka_time_ms_of_a_consumed_message() -> None:
    from confluent_kafka import Message

    from recorder.client.wire import kafka_time_ms

    assert kafka_time_ms(Message(topic="t", value=b"", timestamp=(1, 1234))) == 1234  # create
    assert kafka_time_ms(Message(topic="t", value=b"", timestamp=(2, 99))) == 99  # log append
    assert kafka_time_ms(Message(topic="t", value=b"")) is None  # not available
    assert kafka_time_ms(object()) is None  # a stand-in without timestamps


# a faulty gateway clock: ms past year 2262, ns beyond int64, ms before 1678
@pytest.mark.parametrize("ts", [10**14, 9_223_372_036_855, 2**63, 2**64 - 1, -(10**14)])
def test_timestamps_beyond_int64_ns_are_not_known(ts: int) -> None:
    """Events carry int64 ns (recorder.client.events): a gateway timestamp whose ns do not fit
    one is taken as not known (0, as the file writes a missing header or tail) instead of
    handing the sinks an int that fails the recording when /iterations is written."""
    h = decode_snapshot_message(header_msg("s", 1, ts), H)
    t = decode_snapshot_message(tail_msg("s", 1, ts, header_ts=ts), H)
    assert isinstance(h, Header) and isinstance(t, Tail)
    assert (h.timestamp_ns, t.timestamp_ns, t.header_timestamp_ns) == (0, 0, 0)
    for raw in (data_msg(1, ts, "p", ntscalar(1.0)),  # legacy layout
                data_msg(1, ts, "p", ntscalar(1.0), msg_seq=1, sub=1, header_ts=ts),
                data_msg(1, ts, "p", ntscalar(1.0), extra={"x": 1})):  # full decoding
        d = decode_data(raw)
        assert d.timestamp_ns == 0
        assert d.header_timestamp_ns in (None, 0)
    assert to_ns(ts) == 0


def test_an_iteration_with_a_timestamp_beyond_int64_is_recorded(tmp_path: Any) -> None:
    """One header and tail from a gateway with a faulty clock (ms past year 2262) failed the
    recording at its next flush (OverflowError writing /iterations); the iteration is now
    recorded, its header and tail times 0 (not known), and the recording goes on."""
    from recorder.client.assembler import IterationAssembler
    from recorder.client.events import ValuesReceived
    from recorder.reader import open_file
    from recorder.sinks.hdf5 import HDF5Recording
    from recorder.sinks.options import OutputOptions

    asm = IterationAssembler()
    rec = HDF5Recording(OutputOptions(directory=tmp_path, isolate=False), run_name="r",
                        pv_uris=["pva://p"])
    bad = 10**14
    msgs = [header_msg("s", 1, bad), data_msg(1, bad, "p", ntscalar(1.5)), tail_msg("s", 1, bad),
            header_msg("s", 2, T0), data_msg(2, T0, "p", ntscalar(2.5)), tail_msg("s", 2, T0),
            # the PV known now: its data message takes the assembler's hot path
            header_msg("s", 3, bad), data_msg(3, bad, "p", ntscalar(3.5)), tail_msg("s", 3, bad)]
    for offset, raw in enumerate(msgs):
        for event in asm.feed(wire.Record("t", 0, offset, raw, H), 0.0):
            if isinstance(event, ValuesReceived):
                assert event.timestamp_ns == (T0 * 1_000_000 if event.iter_index == 2 else 0)
            rec.handle(event)
    rec.flush()
    assert rec.status == "recording", rec.reason
    (path,) = rec.close()
    with open_file(path) as f:
        assert list(f.values("p")) == [1.5, 2.5, 3.5]
        its = f.iterations()
        assert list(its["header_timestamp"].astype("int64")) == [0, T0 * 1_000_000, 0]


@pytest.mark.parametrize(
    "kw",
    [
        {},  # legacy (the 4-key shortcut and the fast path)
        {"msg_seq": 2, "sub": 1},  # sequenced (fast path)
        {"msg_seq": 2, "sub": 1, "last": True, "header_ts": T0},  # the general fast path
        {"extra": {"unknown": 1}},  # the full decoding
    ],
)
def test_pv_name_with_nul_is_refused(kw: dict[str, Any]) -> None:
    """No EPICS PV is named with a NUL, and HDF5 names and strings end at one: such a PV
    could not be finalized (the segment, and with it the run, failed). The message is
    refused (counted as malformed), every time, whatever the path that decodes it."""
    raw = data_msg(1, T0, "A\x00B", ntscalar(1.0), **kw)
    for _ in range(2):  # the second time from the fast path's name cache, if it took it
        assert reason_of(raw) == "bad_type"


BEYOND_INT64 = (2**63, 2**64 - 1)


@pytest.mark.parametrize("idx", BEYOND_INT64)
@pytest.mark.parametrize(
    "make",
    [
        lambda i: header_msg("s", i, T0, msg_seq=1, sub=1),
        lambda i: data_msg(i, T0, "A", ntscalar(1.0)),  # legacy
        lambda i: data_msg(i, T0, "A", ntscalar(1.0), msg_seq=2, sub=1),  # sequenced
        lambda i: data_msg(i, T0, "A", ntscalar(1.0), msg_seq=2, sub=1, last=True),
        lambda i: data_msg(i, T0, "A", ntscalar(1.0), extra={"unknown": 1}),  # full path
        lambda i: tail_msg("s", i, T0),
    ],
)
def test_iter_index_beyond_int64_is_refused(make: Any, idx: int) -> None:
    """Files keep iter_index as int64: a message with a larger one (a uint64 on the wire)
    made the writer's flush raise OverflowError, failing the recording at each restart."""
    decode_data(data_msg(1, T0, "A", ntscalar(1.0)))  # the PV name is cached
    assert reason_of(make(idx)) == "bad_type"


def test_tail_numbers_beyond_int64() -> None:
    """A tail's error code beyond int64 is refused like one that is not an int; a
    total_messages beyond it is not known (as any bad optional field)."""
    assert reason_of(tail_msg("s", 1, T0, error=2**63, error_message="e")) == "bad_type"
    tail = decode_snapshot_message(tail_msg("s", 1, T0, msg_seq=3, total=2**64 - 1), H)
    assert isinstance(tail, Tail) and tail.total_messages is None and tail.msg_seq == 3


def test_text_that_is_not_utf8_is_kept_on_the_full_path() -> None:
    """A string that is not UTF-8 (a Latin-1 '°C') made the full decoding path drop the
    whole message as not_msgpack: a tail's error message (tails always take that path:
    the iteration then lost its tail and error code), a data message in another layout
    (its value lost, where the fast path keeps it). Such text is kept as surrogate escapes,
    as in PV maps; a PV name that is not UTF-8 is still refused."""
    tail = tail_msg("s", 1, T0, error=3, error_message="XdegC").replace(b"XdegC", b"\xb0C...")
    msg = decode_snapshot_message(tail, H)
    assert isinstance(msg, Tail) and msg.error == 3 and msg.error_message == "\udcb0C..."
    s = ntscalar(1.0)
    s["display"] = {"units": "XdegC"}
    raw = data_msg(1, T0, "A", s, extra={"unknown": 1}).replace(b"XdegC", b"\xb0C...")
    data = decode_data(raw)
    assert data.sample.pv == "A" and data.sample.data["display"]["units"] == "\udcb0C..."
    raw = data_msg(1, T0, "Xa", ntscalar(1.0), extra={"unknown": 1}).replace(b"Xa", b"\xb0a")
    assert reason_of(raw) == "bad_type"
    raw = data_msg(1, T0, "Xa", ntscalar(1.0)).replace(b"Xa", b"\xb0a")  # the fast layout
    assert reason_of(raw) == "bad_type"
