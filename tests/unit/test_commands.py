"""recorder.client.commands: JSON command encoding and validation."""

from __future__ import annotations

import json

import pytest

from recorder.client.commands import (
    encode_command,
    get_command,
    new_reply_id,
    repeating_snapshot_command,
    snapshot_command,
    stop_command,
    trigger_command,
)
from recorder.client.properties import SnapshotProperties, SnapshotType
from recorder.errors import InvalidSnapshotPropertiesError

R = {"reply_topic": "app-reply", "reply_id": "r1"}
ENVELOPE = {"serialization": "msgpack", "reply_topic": "app-reply", "reply_id": "r1"}


def roundtrip(fields: dict[str, object]) -> dict[str, object]:
    raw = encode_command(fields)
    assert isinstance(raw, bytes) and b" " not in raw.replace(b"Snap A", b"")
    decoded = json.loads(raw.decode("utf-8"))
    assert decoded == fields
    return decoded  # type: ignore[no-any-return]


def test_new_reply_id_unique_hex() -> None:
    ids = {new_reply_id() for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_encode_is_compact_utf8_and_rejects_nan() -> None:
    assert encode_command({"command": "get", "x": "é"}) == '{"command":"get","x":"é"}'.encode()
    with pytest.raises(InvalidSnapshotPropertiesError):
        encode_command({"x": float("nan")})
    with pytest.raises(InvalidSnapshotPropertiesError):
        encode_command({"x": object()})


def test_snapshot_command() -> None:
    fields = snapshot_command(["pva://a:x", "ca://b:y.VAL"], **R)
    assert roundtrip(fields) == {
        "command": "snapshot",
        **ENVELOPE,
        "pv_name_list": ["pva://a:x", "ca://b:y.VAL"],
    }
    assert next(iter(fields)) == "command"
    fields = snapshot_command(["pva://a:x"], **R, time_window_msec=250)
    assert fields["time_window_msec"] == 250
    for bad in ([], ["a:x"], ["pva://a x"]):
        with pytest.raises(InvalidSnapshotPropertiesError):
            snapshot_command(bad, **R)
    for window in (-1, 1.5, True):
        with pytest.raises(InvalidSnapshotPropertiesError):
            snapshot_command(["pva://a"], **R, time_window_msec=window)  # type: ignore[arg-type]


def test_repeating_snapshot_command() -> None:
    props = SnapshotProperties(
        snapshot_name="Snap_A",
        pv_uri_list=["pva://a:x", "ca://b:y"],
        time_window=2000,
        sub_push_delay_msec=500,
        triggered=True,
        type=SnapshotType.TIMEDBUFFERED,
        pv_field_filter_list=["value", "timeStamp"],
    )
    fields = repeating_snapshot_command(props, **R)
    assert roundtrip(fields) == {
        "command": "repeating_snapshot",
        **ENVELOPE,
        "snapshot_name": "Snap_A",
        "pv_name_list": ["pva://a:x", "ca://b:y"],
        "time_window_msec": 2000,
        "repeat_delay_msec": 0,
        "sub_push_delay_msec": 500,
        "respect_push_order": True,
        "triggered": True,
        "type": "timedbuffered",
        "pv_field_filter_list": ["value", "timeStamp"],
    }
    sn = repeating_snapshot_command(props, **R, snapshot_type_key="snapshot_type")
    assert "type" not in sn and sn["snapshot_type"] == "timedbuffered"
    with pytest.raises(InvalidSnapshotPropertiesError):
        repeating_snapshot_command(props, **R, snapshot_type_key="kind")
    with pytest.raises(InvalidSnapshotPropertiesError):
        repeating_snapshot_command(SnapshotProperties("bad name", ("pva://a",)), **R)
    with pytest.raises(InvalidSnapshotPropertiesError):
        repeating_snapshot_command(SnapshotProperties("s", ("pva://a",), time_window=2**31), **R)
    # its topic (the normalized name) would be one Kafka refuses: longer than 249 characters
    assert SnapshotProperties("s" * 249, ("pva://a",)).problems() == []
    with pytest.raises(InvalidSnapshotPropertiesError, match="at most 249 characters"):
        repeating_snapshot_command(SnapshotProperties("s" * 250, ("pva://a",)), **R)
    # a PV named like a field of the data messages could not be read back: refused up front
    clashing = SnapshotProperties("s", ("pva://a", "pva://msg_seq", "ca://error.VAL"))
    assert clashing.problems() == [
        "pv_uri_list: 'pva://msg_seq': the PV name 'msg_seq' is also a field of the gateway's "
        "snapshot data messages, which carry both in one map: its values could not be told apart",
        "pv_uri_list: 'ca://error.VAL': the PV name 'error' is also a field of the gateway's "
        "snapshot data messages, which carry both in one map: its values could not be told apart",
    ]
    with pytest.raises(InvalidSnapshotPropertiesError, match="'msg_seq'"):
        repeating_snapshot_command(clashing, **R)


def test_trigger_stop_get() -> None:
    assert roundtrip(trigger_command("snap", **R)) == {
        "command": "repeating_snapshot_trigger",
        **ENVELOPE,
        "snapshot_name": "snap",
    }
    assert trigger_command("snap", **R, tags={"k": "v"})["tags"] == {"k": "v"}
    with pytest.raises(InvalidSnapshotPropertiesError):
        trigger_command("snap", **R, tags={"k": 1})  # type: ignore[dict-item]
    assert roundtrip(stop_command("snap", **R)) == {
        "command": "repeating_snapshot_stop",
        **ENVELOPE,
        "snapshot_name": "snap",
    }
    assert roundtrip(get_command("pva://a:b", **R)) == {
        "command": "get",
        **ENVELOPE,
        "pv_name": "pva://a:b",
    }
    for bad in ("", "a b"):
        with pytest.raises(InvalidSnapshotPropertiesError):
            stop_command(bad, **R)
        with pytest.raises(InvalidSnapshotPropertiesError):
            trigger_command(bad, **R)
    with pytest.raises(InvalidSnapshotPropertiesError):
        get_command("a:b", **R)
    with pytest.raises(InvalidSnapshotPropertiesError):
        get_command("pva://a", reply_topic="", reply_id="r")
    with pytest.raises(InvalidSnapshotPropertiesError):
        get_command("pva://a", reply_topic="t", reply_id="")
