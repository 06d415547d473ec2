"""Replay's pure core: iterations in, the gateway's message bytes out (decoded by our wire)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from recorder.cli.replay import pace_warning, parse_range
from recorder.client.values import PVSample
from recorder.client.wire import Data, Header, Tail, decode_snapshot_message
from recorder.replay import ReplayIteration, Selection, encode_iteration, gateway_structure
from recorder.sim.encoding import SER_HEADER, SER_MSGPACK, pack
from recorder.sim.messages import data_message
from recorder.sim.pvs import parse_pv, pv_structure

HEADERS = [(SER_HEADER, SER_MSGPACK.encode())]
T_MS = 1_700_000_000_123


def decode(raw: bytes) -> Header | Data | Tail:
    return decode_snapshot_message(raw, HEADERS)


def sample(pv: str, value: object, f32: frozenset[str] = frozenset()) -> PVSample:
    return PVSample(pv, {"value": value, "alarm": {"severity": 0, "status": 0, "message": ""},
                         "timeStamp": {"secondsPastEpoch": 1_700_000_000, "nanoseconds": 5,
                                       "userTag": 0}}, f32)


def test_sequenced_iteration_numbers_its_messages_as_the_gateway() -> None:
    it = ReplayIteration(7, T_MS, T_MS + 100, samples=[sample("a", 1.5), sample("b", 2)])
    msgs = [decode(m) for m in encode_iteration(it, "snap", sequenced=True)]
    header, d1, d2, tail = msgs
    assert isinstance(header, Header) and header.snapshot_name == "snap"
    assert (header.iter_index, header.msg_seq, header.timestamp_ns) == (7, 1, T_MS * 10**6)
    assert isinstance(d1, Data) and isinstance(d2, Data)
    assert [d.sample.pv for d in (d1, d2)] == ["a", "b"]
    assert [(d.msg_seq, d.submission_seq, d.last_submission_data) for d in (d1, d2)] == [
        (2, 1, False), (3, 1, True)]
    assert d1.timestamp_ns == T_MS * 10**6
    assert isinstance(tail, Tail)
    assert (tail.msg_seq, tail.total_messages, tail.error, tail.error_message) == (4, 4, 0, "")
    assert tail.timestamp_ns == (T_MS + 100) * 10**6


def test_legacy_stream_has_no_sequence_keys() -> None:
    it = ReplayIteration(3, T_MS, T_MS, samples=[sample("a", 1.5)])
    for msg in map(decode, encode_iteration(it, "snap", sequenced=False)):
        assert msg.msg_seq is None and msg.submission_seq is None


def test_a_gateway_error_and_a_missing_header_or_tail_are_replayed_as_recorded() -> None:
    errored = ReplayIteration(4, T_MS, T_MS, error_code=3, error_message="IOC down",
                              samples=[sample("a", 1.0)])
    *_, tail = map(decode, encode_iteration(errored, "s", sequenced=True))
    assert isinstance(tail, Tail) and (tail.error, tail.error_message) == (3, "IOC down")
    no_tail = ReplayIteration(5, T_MS, None, samples=[sample("a", 1.0)])
    assert [type(m) for m in map(decode, encode_iteration(no_tail, "s", sequenced=True))] == [
        Header, Data]
    no_header = ReplayIteration(6, None, T_MS + 5, samples=[sample("a", 1.0)])
    data, tail = map(decode, encode_iteration(no_header, "s", sequenced=True))
    assert isinstance(data, Data) and data.timestamp_ns == (T_MS + 5) * 10**6  # the tail's time
    assert isinstance(tail, Tail)


def test_late_values_follow_the_tail_with_their_own_iteration() -> None:
    it = ReplayIteration(8, T_MS, T_MS, samples=[sample("a", 1.0)],
                         late=[(7, sample("b", 2.0))])
    kinds = [(type(m).__name__, m.iter_index) for m in
             map(decode, encode_iteration(it, "s", sequenced=True))]
    assert kinds == [("Header", 8), ("Data", 8), ("Tail", 8), ("Data", 7)]


def test_float32_fields_are_sent_as_float32_again() -> None:
    table = PVSample("t", {"labels": ["x", "n"], "value": {"x": [1.5, 2.5], "n": [1, 2]}},
                     frozenset({"value.x"}))
    samples = [sample("f", 0.5, frozenset({"value"})),
               sample("w", [0.25, 1.0], frozenset({"value"})),
               sample("d", 0.5), table]
    before = [dict(s.data) for s in samples]
    it = ReplayIteration(1, T_MS, T_MS, samples=samples)
    got = [m.sample for m in map(decode, encode_iteration(it, "s", sequenced=True))
           if isinstance(m, Data)]
    for sent, back in zip(samples, got, strict=True):
        assert back.float32_paths == sent.float32_paths
        assert back.data == sent.data
    assert str(got[0].value.dtype) == "float32" and str(got[2].value.dtype) == "float64"
    assert [dict(s.data) for s in samples] == before  # wrapping copies, never mutates
    assert type(gateway_structure(samples[0])["value"]).__name__ == "Float32"


@pytest.mark.parametrize("name", [
    "SIM:AI:DOUBLE:1", "SIM:AI:FLOAT:2", "SIM:AI:INT:3", "SIM:AI:DOUBLE:4:U1000", "SIM:WF:FLOAT:1",
    "SIM:WF:DOUBLE:1:N32", "SIM:WFVAR:DOUBLE:1:N32", "SIM:IMG:UBYTE:1:S8x4",
    "SIM:IMG:FLOAT:1:S8x4", "SIM:TABLE:1", "SIM:SI:STRING:1", "SIM:BI:1", "SIM:MBBI:1",
])
def test_a_decoded_gateway_message_is_replayed_byte_for_byte(name: str) -> None:
    """Every float32 field, a float PV's valueAlarm limits too, goes back as float32."""
    structure = pv_structure(parse_pv(name), 3, 1_700_000_000_123_456_789)
    raw = pack(data_message(name, structure, T_MS, 7, msg_seq=2, last_of_submission=True))
    received = decode(raw)
    assert isinstance(received, Data)
    it = ReplayIteration(7, T_MS, None, samples=[received.sample])
    assert encode_iteration(it, "s", sequenced=True)[1] == raw


def test_invalid_utf8_the_client_kept_goes_back_as_the_same_bytes() -> None:
    raw = pack(data_message("p", {"value": 2.0, "display": {"units": "mm"}}, T_MS, 1,
                            msg_seq=2, last_of_submission=True)).replace(b"\xa2mm", b"\xa2\xb0C")
    received = decode(raw)
    assert isinstance(received, Data)
    assert received.sample.data["display"]["units"] == "\udcb0C"
    it = ReplayIteration(1, T_MS, None, samples=[received.sample])
    assert encode_iteration(it, "s", sequenced=True)[1] == raw


def test_selection_and_iteration_ranges() -> None:
    assert parse_range(None) == (None, None)
    assert parse_range("100:199") == (100, 199)
    assert parse_range("100:") == (100, None)
    assert parse_range(":5") == (None, 5)
    assert parse_range("7") == (7, 7)
    for bad in ("a:b", "5:2", "1:2:3"):
        with pytest.raises(ValueError, match="--iterations"):
            parse_range(bad)
    sel = Selection(3, 5)
    assert [i for i in range(1, 8) if sel.wants(i)] == [3, 4, 5]
    assert Selection().wants(-1)


def test_falling_behind_the_pace_is_told() -> None:
    assert pace_warning(0.2, 10.0, 1.0) is None  # within 0.5 s
    assert pace_warning(0.9, 20.0, 1.0) is None  # within 10 % of the replay
    warning = pace_warning(3.0, 20.0, 2.0)
    assert warning is not None and "--speed 2" in warning and "3.0 s" in warning
    assert pace_warning(100.0, 1.0, 0.0) is None  # --speed 0 has no pace


@pytest.mark.parametrize("kind", ["scalar", "enum", "ndarray"])
def test_row_field_paths_are_where_rebuild_data_puts_each_field(kind: str) -> None:
    """The replay templates pack everything but these paths once per metadata entry: for
    every combination of flags, each per-row field is found at its path, and only there."""
    from recorder.client.values import ValueKind
    from recorder.sinks.codec import (
        KIND_CODES,
        NS_PER_S,
        ROW_FIELDS,
        rebuild_data,
        row_field_paths,
    )

    value: object = {"index": None, "choices": ["a"]} if kind == "enum" else (
        {"ushortValue": None, "intValue": 0} if kind == "ndarray" else None)
    rest = {"d": {"value": value,
                  "alarm": {"severity": None, "status": None, "message": None},
                  "timeStamp": {"secondsPastEpoch": None, "nanoseconds": None,
                                "userTag": None},
                  "uniqueId": None,
                  "dataTimeStamp": {"secondsPastEpoch": None, "nanoseconds": None}},
            "f": []}
    marks = {"seconds": 1001, "nanoseconds": 1002, "user_tag": 1003, "unique_id": 1004,
             "data_seconds": 1005, "data_nanoseconds": 1006, "severity": 1007,
             "status": 1008, "message": "m1009", "value": 1010}
    assert set(marks) == set(ROW_FIELDS)
    code = KIND_CODES[{"scalar": ValueKind.SCALAR, "enum": ValueKind.ENUM,
                       "ndarray": ValueKind.NDARRAY}[kind]]
    for flags in range(128):
        data = rebuild_data(rest, flags=flags, kind=code,
                            time_ns=1001 * NS_PER_S + 1002, severity=1007, status=1008,
                            value=1010, message="m1009", user_tag=1003, unique_id=1004,
                            data_time_ns=1005 * NS_PER_S + 1006)
        paths = row_field_paths(rest, flags=flags, kind=code)
        found = dict(_leaves_among(data, (), list(marks.values())))
        assert found == {path: marks[name] for path, name in paths}, (kind, flags)


def _leaves_among(node: object, path: tuple[str, ...], wanted: list[object]
                  ) -> Iterator[tuple[tuple[str, ...], object]]:
    """(path, leaf) of the leaves of ``node`` that are in ``wanted``."""
    if isinstance(node, dict):
        for key, item in node.items():
            yield from _leaves_among(item, (*path, key), wanted)
    elif node in wanted:
        yield path, node
