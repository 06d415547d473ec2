"""recorder.client.replies: reply correlation, one-shot snapshot streams, deadlines."""

from __future__ import annotations

from typing import Any

import msgpack
from k2eg_sequences import F32, MSGPACK_HEADERS, ntscalar, pack

from recorder.client.replies import ReplyTracker
from recorder.client.wire import Reply, decode_reply
from recorder.errors import GatewayError, GatewayTimeoutError


def reply(obj: dict[str, Any]) -> Reply:
    return decode_reply(pack(obj), MSGPACK_HEADERS)


def test_single_reply_ok_and_already_running() -> None:
    t = ReplyTracker()
    t.expect("r1", "repeating_snapshot", deadline=10.0)
    t.expect("r2", "repeating_snapshot", deadline=10.0)
    assert t.pending == 2 and "r1" in t
    [out] = t.feed(
        reply({"error": 0, "reply_id": "r1", "message": "started", "publishing_topic": "snap_1"})
    )
    assert out.ok and not out.timed_out and out.reply is not None
    assert out.reply.publishing_topic == "snap_1" and out.command == "repeating_snapshot"
    [out] = t.feed(
        reply({"error": 0, "reply_id": "r2", "message": "Snapshot Snap 1 is already running"})
    )
    assert out.ok and out.reply is not None and out.reply.publishing_topic is None
    assert t.pending == 0


def test_single_reply_error_becomes_gateway_error() -> None:
    t = ReplyTracker()
    t.expect("g", "get", deadline=1.0)
    [out] = t.feed(reply({"error": -3, "reply_id": "g", "message": "Timeout operation"}))
    assert isinstance(out.error, GatewayError)
    assert (out.error.code, out.error.message, out.error.reply_id) == (-3, "Timeout operation", "g")
    assert not out.ok


def test_get_reply_samples() -> None:
    t = ReplyTracker()
    t.expect("g", "get", deadline=1.0)
    [out] = t.feed(reply({"error": 0, "reply_id": "g", "a:b": ntscalar(F32(2.0))}))
    assert out.samples["a:b"].value == 2.0 and out.samples["a:b"].value.dtype.name == "float32"


def test_a_pv_named_like_a_reply_field_is_a_sample_of_its_reply() -> None:
    """A get of ``pva://message`` (or ``publishing_topic``, ``msg_seq``): the gateway's reply
    holds the PV's map under that key (its success reply has no such field of its own); it
    was taken for the field and the get failed with "holds no value for 'message'"."""
    for pv in ("message", "publishing_topic", "msg_seq"):
        got = reply({"error": 0, "reply_id": "g", pv: ntscalar(F32(2.0))})
        assert list(got.samples) == [pv], pv
        sample = got.samples[pv]
        assert sample.value == 2.0 and sample.value.dtype.name == "float32"
        assert got.message == "" and got.publishing_topic is None
    # with a one-shot snapshot's other PVs in one reply (the structural float32 walker)
    both = reply({"error": 0, "reply_id": "s", "message": ntscalar(F32(1.5)),
                  "a:b": ntscalar(2.5)})
    assert sorted(both.samples) == ["a:b", "message"]
    assert both.samples["message"].value.dtype.name == "float32"
    assert both.samples["a:b"].value.dtype.name == "float64"


def test_one_shot_stream_with_malformed_pv_in_the_middle() -> None:
    t = ReplyTracker()
    t.expect("s1", "snapshot", deadline=5.0, multi=True)
    assert t.feed(reply({"error": 0, "reply_id": "s1", "a:x": ntscalar(1.0)})) == []
    # the official client ends the snapshot here; we record it and keep going
    assert (
        t.feed(
            reply({"error": -1, "reply_id": "s1", "message": "PV 'pva://bad uri'name malformed"})
        )
        == []
    )
    assert t.feed(reply({"error": 0, "reply_id": "s1", "b:y": ntscalar(2)})) == []
    [out] = t.feed(reply({"error": 1, "reply_id": "s1"}))
    assert out.ok and not out.timed_out
    assert set(out.samples) == {"a:x", "b:y"}
    assert [f.message for f in out.failures] == ["PV 'pva://bad uri'name malformed"]
    assert len(out.replies) == 4
    assert t.counters["one_shot_error_reply"] == 1 and t.pending == 0


def test_one_shot_parse_failure_ends_it() -> None:
    t = ReplyTracker()
    t.expect("s2", "snapshot", deadline=5.0, multi=True)
    [out] = t.feed(reply({"error": -1, "reply_id": "s2"}))
    assert isinstance(out.error, GatewayError) and out.error.code == -1


def test_timeouts_single_and_partial_one_shot() -> None:
    t = ReplyTracker()
    t.expect("a", "repeating_snapshot_stop", deadline=2.0, timeout_s=2.0)
    t.expect("s", "snapshot", deadline=3.0, multi=True)
    t.feed(reply({"error": 0, "reply_id": "s", "a:x": ntscalar(1.0)}))
    assert t.expire(1.9) == []
    [out] = t.expire(2.0)
    assert out.timed_out and isinstance(out.error, GatewayTimeoutError)
    assert (out.error.command, out.error.reply_id, out.error.timeout_s) == (
        "repeating_snapshot_stop",
        "a",
        2.0,
    )
    [out] = t.expire(5.0)
    assert out.timed_out and list(out.samples) == ["a:x"]
    assert t.counters["timeout"] == 2 and t.pending == 0
    # a reply after the deadline is counted late, not delivered
    assert t.feed(reply({"error": 0, "reply_id": "a"})) == []
    assert t.feed(reply({"error": 0, "reply_id": "nobody"})) == []
    assert t.counters["late"] == 1 and t.counters["unmatched"] == 1


def test_cancel_and_duplicate_expect() -> None:
    t = ReplyTracker(remember_finished=2)
    t.expect("x", "get", deadline=1.0)
    t.cancel("x")
    t.cancel("unknown")
    assert t.pending == 0 and t.expire(10.0) == []
    assert t.feed(reply({"error": 0, "reply_id": "x"})) == []
    assert t.counters["late"] == 1
    t.expect("y", "get", deadline=1.0)
    try:
        t.expect("y", "get", deadline=1.0)
    except ValueError:
        pass
    else:
        raise AssertionError("duplicate reply_id accepted")
    # remembered ids are bounded
    for rid in ("p", "q", "r"):
        t.expect(rid, "get", deadline=1.0)
        t.cancel(rid)
    t.feed(reply({"error": 0, "reply_id": "x"}))
    assert t.counters["unmatched"] == 1


def test_decode_then_track_real_bytes() -> None:
    raw = msgpack.packb(
        {"error": 0, "reply_id": "t1", "message": "Snapshot 'trig_1' has been armed"}
    )
    t = ReplyTracker()
    t.expect("t1", "repeating_snapshot_trigger", deadline=1.0)
    [out] = t.feed(decode_reply(raw, [("k2eg-ser-type", b"Msgpack")]))
    assert out.ok and out.reply is not None and out.reply.message.endswith("armed")


def test_a_reply_with_a_latin1_string_in_its_pv_is_decoded() -> None:
    """A get / one-shot reply whose PV structure holds a string that is not UTF-8 (a Latin-1
    unit such as b"\\xb0C", common on CA IOCs) is the PV's value, as in snapshot data
    messages: it was dropped as not msgpack, so the get timed out and the one-shot snapshot
    lacked the PV."""
    raw = pack({"error": 0, "reply_id": "g1", "SIM:T": ntscalar(2.0)}).replace(
        b"\xa2mm", b"\xa2\xb0C"
    )
    r = decode_reply(raw, MSGPACK_HEADERS)
    assert r.error == 0 and r.reply_id == "g1"
    sample = r.samples["SIM:T"]
    assert sample.data["display"]["units"].encode("utf-8", "surrogateescape") == b"\xb0C"
    assert sample.value == 2.0
