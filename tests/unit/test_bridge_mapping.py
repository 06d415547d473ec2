"""The karabo-bridge container of one iteration (recorder.sinks.bridge.mapping) and the
bridge options; no sockets."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from recorder.client.events import IncompleteReason, IterationClosed, IterationStatus
from recorder.client.values import PVSample, ValueKind, typed_array
from recorder.sinks.bridge import (
    RECORDER_SOURCE,
    BridgeOptions,
    IterationInfo,
    build_train,
    flatten_sample,
    stacked_for,
)
from recorder.sinks.bridge.mapping import _flatten, _scalar, karabo_timestamp, plain
from recorder.sinks.options import OutputOptions

SEC = 1_700_000_000


def ts(k: int = 0, ns: int = 5) -> dict[str, int]:
    return {"secondsPastEpoch": SEC + k, "nanoseconds": ns, "userTag": 0}


def scalar(pv: str, value: Any, k: int = 0, f32: bool = False, **extra: Any) -> PVSample:
    data = {"value": value, "alarm": {"severity": 1, "status": 3, "message": "HIGH"},
            "timeStamp": ts(k), **extra}
    return PVSample(pv, data, frozenset({"value"}) if f32 else frozenset())


INFO = IterationInfo(iter_index=42, status="complete", header_timestamp_ns=SEC * 10**9 + 7,
                     tail_timestamp_ns=SEC * 10**9 + 9, n_values=3, n_pvs=2, n_batches=1)


# --- one sample -------------------------------------------------------------------------------
def test_ntscalar_fields_are_flattened_with_dots_and_typed() -> None:
    s = scalar("A", 0.5, f32=True, display={"limitLow": -1.0, "units": "mm", "precision": 3,
                                            "form": {"index": 0, "choices": ["D", "E"]}})
    flat = flatten_sample(s)
    assert type(flat["value"]) is np.float32 and flat["value"] == np.float32(0.5)
    assert flat["alarm.severity"] == 1 and type(flat["alarm.severity"]) is np.int64
    assert flat["alarm.message"] == "HIGH"
    assert flat["timeStamp.secondsPastEpoch"] == SEC and flat["timeStamp.nanoseconds"] == 5
    assert type(flat["display.limitLow"]) is np.float64  # only `value` paths carry float32
    assert flat["display.units"] == "mm"
    assert flat["display.form.choices"] == ["D", "E"]
    assert "display" not in flat and "alarm" not in flat


def test_integer_widths_and_booleans() -> None:
    assert type(flatten_sample(scalar("U", 2**64 - 1))["value"]) is np.uint64
    assert type(flatten_sample(scalar("I", -(2**40)))["value"]) is np.int64
    assert type(flatten_sample(scalar("B", True))["value"]) is np.bool_
    flat = flatten_sample(scalar("W", [True, False]))
    assert flat["value"].dtype == np.bool_ and flat["value"].tolist() == [True, False]


def test_arrays_enum_table_image_and_structures() -> None:
    wf32 = flatten_sample(scalar("W", [1.0, 2.5], f32=True))["value"]
    assert wf32.dtype == np.float32 and wf32.tolist() == [1.0, 2.5]
    assert flatten_sample(scalar("WI", [1, 2, 3]))["value"].dtype == np.int64
    empty = flatten_sample(scalar("E0", []))["value"]
    assert isinstance(empty, np.ndarray) and empty.size == 0
    assert flatten_sample(scalar("SA", ["a", "b"]))["value"] == ["a", "b"]
    enum = flatten_sample(scalar("EN", {"index": 2, "choices": ["a", "b", "c"]}))
    assert enum["value.index"] == 2 and enum["value.choices"] == ["a", "b", "c"]
    table = flatten_sample(PVSample(
        "T", {"labels": ["x", "n"], "value": {"x": [1.5, 2.5], "n": ["p", "q"]}},
        frozenset({"value.x"}),
    ))
    assert table["labels"] == ["x", "n"]
    assert table["value.x"].dtype == np.float32 and table["value.n"] == ["p", "q"]
    image = flatten_sample(PVSample("IMG", {
        "value": {"ushortValue": list(range(6))},
        "dimension": [{"size": 3, "offset": 0}, {"size": 2, "offset": 0}],
        "uniqueId": 9, "codec": {"name": "", "parameters": None},
    }))
    assert image["value"].dtype == np.uint16 and image["value"].shape == (2, 3)
    assert image["value"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert image["dimension"] == [{"size": 3, "offset": 0}, {"size": 2, "offset": 0}]
    assert image["uniqueId"] == 9 and image["codec.name"] == ""
    assert image["codec.parameters"] is None
    struct = flatten_sample(scalar("ST", {"a": 1, "b": {"c": [1.5]}, "e": {}}))
    assert struct["value.a"] == 1 and struct["value.b.c"].tolist() == [1.5]
    assert not any(k.startswith("value.e") for k in struct)  # empty structure vanishes


def _leaf_prefixes(flat: Mapping[str, Any]) -> list[str]:
    """Keys that are also the start of another key (``value`` next to ``value.index``): a
    container a tool mapping dots to groups (EuXFEL's file layout, a Karabo Hash) cannot hold."""
    return sorted(k for k in flat if any(o.startswith(k + ".") for o in flat))


def test_fields_are_a_tree_so_an_enum_has_no_plain_value() -> None:
    """docs/bridge.md: the fields are the PV structure's leaves, none also a node; an NTEnum
    serves ``value.index`` and ``value.choices`` and no ``value`` key (which would be both),
    an NTTable ``value.<column>``."""
    enum = flatten_sample(scalar("EN", {"index": 2, "choices": ["a", "b", "c"]}))
    assert "value" not in enum and enum["value.index"] == 2
    table = flatten_sample(PVSample("T", {"labels": ["x"], "value": {"x": [1.5]}}))
    assert "value" not in table and table["value.x"].tolist() == [1.5]
    for flat in (enum, table, flatten_sample(scalar("A", 0.5, display={"units": "mm"}))):
        assert _leaf_prefixes(flat) == [], flat


# --- one iteration ----------------------------------------------------------------------------
def test_normal_run_serves_single_values_with_epics_timestamps() -> None:
    samples = [scalar("A", 1.5, k=1), scalar("W", [1.0, 2.0], k=2), scalar("N", None)]
    samples[2].data = {"value": 3}  # no timeStamp at all
    data, meta = build_train(INFO, samples, stacked=False, run_name="r", snapshot_name="s")
    assert set(data) == {"A", "W", "N", RECORDER_SOURCE} == set(meta)
    assert data["A"]["value"] == 1.5 and data["W"]["value"].shape == (2,)
    assert meta["A"] == {
        "source": "A", "timestamp": (SEC + 1) + 5e-9, "timestamp.sec": str(SEC + 1),
        "timestamp.frac": "000000005000000000", "timestamp.tid": 42,
    }
    assert meta["W"]["timestamp.sec"] == str(SEC + 2)
    # no EPICS timestamp: the iteration header time
    assert meta["N"]["timestamp.sec"] == str(SEC) and meta["N"]["timestamp.frac"].startswith(
        "000000007")
    rec = data[RECORDER_SOURCE]
    assert rec["iter_index"] == 42 and rec["status"] == "complete" and rec["complete"] is True
    assert rec["header_timestamp"] == INFO.header_timestamp_ns
    assert rec["tail_timestamp"] == INFO.tail_timestamp_ns
    assert rec["n_sources"] == 3 and rec["stacked"] is False
    assert rec["run_name"] == "r" and rec["snapshot_name"] == "s"
    assert meta[RECORDER_SOURCE]["timestamp.tid"] == 42
    assert meta[RECORDER_SOURCE]["timestamp.frac"] == "000000007000000000"
    # plain Python only in the recorder source (msgpack-able as is)
    assert json.dumps(rec)


def test_timedbuffered_stacks_along_a_first_axis_even_for_one_value() -> None:
    samples = [scalar("P", float(k), k=k) for k in range(4)] + [scalar("Q", 7, k=9)]
    samples += [scalar("W", [1.0, 2.0, 3.0], k=k) for k in range(2)]
    data, meta = build_train(INFO, samples, stacked=True)
    assert data["P"]["value"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert data["P"]["timeStamp.secondsPastEpoch"].tolist() == [SEC + k for k in range(4)]
    assert data["P"]["alarm.message"] == ["HIGH"] * 4
    assert data["Q"]["value"].shape == (1,) and data["Q"]["value"].dtype == np.int64
    assert data["W"]["value"].shape == (2, 3)
    assert meta["P"]["timestamp.sec"] == str(SEC + 3)  # the last value's time
    assert data[RECORDER_SOURCE]["stacked"] is True


def test_stacking_falls_back_to_lists_for_ragged_changing_or_missing_fields() -> None:
    a = scalar("R", [1.0, 2.0], k=0)
    b = scalar("R", [1.0], k=1)
    c = PVSample("R", {"value": [3.0, 4.0]})  # no alarm, no timeStamp
    data, _ = build_train(INFO, [a, b, c], stacked=True)
    assert data["R"]["value"] == [[1.0, 2.0], [1.0], [3.0, 4.0]]
    assert data["R"]["alarm.severity"] == [1, 1, None]
    mixed, _ = build_train(INFO, [scalar("X", 1), scalar("X", 1.5)], stacked=True)
    assert mixed["X"]["value"] == [1, 1.5]
    assert all(type(v) in (int, float) for v in mixed["X"]["value"])


def test_normal_run_stacks_a_pv_sent_twice_rather_than_drop_a_value() -> None:
    data, meta = build_train(INFO, [scalar("A", 1.0, k=1), scalar("A", 2.0, k=2)],
                             stacked=False)
    assert data["A"]["value"].tolist() == [1.0, 2.0]
    assert meta["A"]["timestamp.sec"] == str(SEC + 2)


def test_empty_iteration_has_only_the_recorder_source() -> None:
    info = IterationInfo.stopped(7, None)
    data, meta = build_train(info, [], stacked=False)
    assert list(data) == [RECORDER_SOURCE]
    rec = data[RECORDER_SOURCE]
    assert rec["status"] == "incomplete" and rec["reason"] == "recording_stopped"
    assert rec["complete"] is False and rec["header_timestamp"] == 0
    assert meta[RECORDER_SOURCE]["timestamp"] == 0.0


def test_iteration_info_from_events_and_from_file_columns_agree() -> None:
    closed = IterationClosed("t", "s", 5, IterationStatus.INCOMPLETE,
                             IncompleteReason.GATEWAY_ERROR, None, 99, error_code=3,
                             error_message="boom", n_values=4, n_pvs=2, n_batches=2,
                             expected_messages=5, missing_messages=1, duplicates=1)
    info = IterationInfo.from_closed(closed, header_timestamp_ns=11)
    assert info.header_timestamp_ns == 11 and info.tail_timestamp_ns == 99
    assert info.reason == "gateway_error" and not info.complete
    columns = {
        "iter_index": np.array([5]), "header_timestamp": np.array([11]),
        "tail_timestamp": np.array([99]), "status": np.array(["incomplete"], dtype=object),
        "reason": np.array(["gateway_error"], dtype=object), "error_code": np.array([3]),
        "error_message": np.array(["boom"], dtype=object), "n_values": np.array([4]),
        "n_pvs": np.array([2]), "n_batches": np.array([2]),
        "expected_messages": np.array([5]), "missing_messages": np.array([1]),
        "duplicates": np.array([1]),
    }
    assert IterationInfo.from_columns(columns, 0) == info
    legacy = IterationClosed("t", None, 6, IterationStatus.COMPLETE, None, 1, 2)
    assert IterationInfo.from_closed(legacy, None).expected_messages == -1


def test_karabo_timestamp_and_helpers() -> None:
    assert karabo_timestamp(1_500_000_000_123_456_789) == {
        "timestamp": 1_500_000_000.123456789, "timestamp.sec": "1500000000",
        "timestamp.frac": "123456789000000000",
    }
    neg = karabo_timestamp(-1)
    assert neg["timestamp.sec"] == "-1" and neg["timestamp.frac"] == "999999999000000000"
    assert len(karabo_timestamp(0)["timestamp.frac"]) == 18
    assert stacked_for("timedbuffered") and stacked_for("TIMEDBUFFERED")
    assert not stacked_for("normal") and not stacked_for(None)
    assert plain({"a": [np.float32(1.5), np.arange(2)]}) == {"a": [1.5, [0, 1]]}


# --- over the wire, without sockets ---------------------------------------------------------
@pytest.mark.parametrize("version", ["2.2", "1.0"])
def test_container_survives_the_karabo_serializer(version: str) -> None:
    serializer = pytest.importorskip("karabo_bridge.serializer")
    from recorder.sinks.bridge.sink import wire_safe

    samples = [scalar("B", True), scalar("F", 0.25, f32=True), scalar("U", 2**64 - 1),
               scalar("W", [1.0, 2.0], f32=True), scalar("S", "txt"),
               PVSample("IMG", {"value": {"ubyteValue": [1, 2, 3, 4]},
                                "dimension": [{"size": 2}, {"size": 2}]})]
    data, meta = build_train(INFO, samples, stacked=False)
    frames = serializer.serialize(wire_safe(data) if version == "2.2" else data, meta,
                                  protocol_version=version)
    got, got_meta = serializer.deserialize(frames)
    if version == "1.0":  # 1.0 carries the metadata inside data
        for src in got:
            got[src].pop("metadata")
    assert set(got) == set(data)
    assert got["B"]["value"] is True or got["B"]["value"] == np.bool_(True)
    assert got["F"]["value"] == 0.25 and got["U"]["value"] == 2**64 - 1
    assert got["W"]["value"].dtype == np.float32
    assert got["IMG"]["value"].dtype == np.uint8 and got["IMG"]["value"].shape == (2, 2)
    assert got["S"]["value"] == "txt"
    assert got_meta["F"]["timestamp.tid"] == 42
    assert got[RECORDER_SOURCE] == data[RECORDER_SOURCE]


# --- options ----------------------------------------------------------------------------------
def test_bridge_options_endpoints() -> None:
    opts = BridgeOptions(rep=4545, pub="tcp://0.0.0.0:4546")  # type: ignore[arg-type]
    assert opts.rep == "tcp://127.0.0.1:4545" and opts.pub == "tcp://0.0.0.0:4546"
    assert opts.endpoints == {"rep": "tcp://127.0.0.1:4545", "pub": "tcp://0.0.0.0:4546"}
    assert BridgeOptions(pub="ipc:///tmp/x.sock").rep is None
    assert BridgeOptions(rep="tcp://*:5000").rep == "tcp://*:5000"
    assert opts.protocol_version == "2.2" and opts.queue_size == 2 and opts.serve_incomplete


def test_an_ipc_path_longer_than_a_unix_socket_takes_is_refused() -> None:
    """A Unix socket path holds at most 107 bytes: a longer ipc:// endpoint validated, and
    the bridge then failed at its bind ("cannot bind") and served nothing."""
    longest = "/tmp/" + "é" + "x" * 100  # 107 bytes
    assert BridgeOptions(pub=f"ipc://{longest}").pub == f"ipc://{longest}"
    with pytest.raises(ValidationError, match="at most 107 bytes"):
        BridgeOptions(pub=f"ipc://{longest}x")
    with pytest.raises(ValidationError, match="at most 107 bytes"):
        BridgeOptions(rep=f"ipc://{longest.replace('é', 'ü')}{'y' * 200}")


@pytest.mark.parametrize("bad", [
    {}, {"rep": 70000}, {"rep": "http://x:1"}, {"rep": "tcp://host"}, {"rep": 1, "pub": 1},
    {"rep": 1, "queue_size": 0}, {"rep": 1, "protocol_version": "3.0"}, {"rep": 1, "x": 1},
])
def test_bridge_options_rejected(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        BridgeOptions(**bad)


def test_output_options_bridge_block_from_yaml_like_json(tmp_path: Any) -> None:
    # YAML reads `protocol_version: 1.0` as a float; run definitions validate strictly
    raw = {"directory": str(tmp_path), "bridge": {"rep": 4545, "protocol_version": 1.0}}
    out = OutputOptions.model_validate_json(json.dumps(raw), strict=True)
    assert out.bridge is not None and out.bridge.protocol_version == "1.0"
    assert OutputOptions(directory=tmp_path).bridge is None


def test_create_bridge_sink_without_the_extra_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    from recorder.errors import SinkError
    from recorder.sinks.bridge import create_bridge_sink

    monkeypatch.setitem(sys.modules, "recorder.sinks.bridge.sink", None)  # import fails
    with pytest.raises(SinkError, match=r"k2eg-recorder\[bridge\]"):
        create_bridge_sink(BridgeOptions(rep=0), run_name="x")  # type: ignore[arg-type]


# --- the inline leaves of _flatten against the plain recursion ---------------------------------
def _flatten_reference(value: Any, path: str, f32: frozenset[str], out: dict[str, Any]) -> None:
    """_flatten before its leaves were inlined: recursion for every item."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten_reference(item, f"{path}.{key}", f32, out)
    elif isinstance(value, list):
        kind, typed = typed_array(value, path in f32)
        out[path] = (typed if kind is ValueKind.ARRAY else list(typed)
                     if kind is ValueKind.STRING_ARRAY else value)
    else:
        out[path] = _scalar(value, path, f32)


_LEAVES = st.one_of(
    st.floats(allow_nan=True), st.integers(min_value=-(2**65), max_value=2**65), st.booleans(),
    st.none(), st.text(max_size=5), st.lists(st.floats(allow_nan=False), max_size=3),
    st.lists(st.integers(-5, 5), max_size=3), st.lists(st.text(max_size=2), max_size=2),
)
_TREES = st.recursive(_LEAVES, lambda kids: st.dictionaries(st.sampled_from(
    ["value", "alarm", "a", "b", "severity", "x.y"]), kids, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(tree=st.dictionaries(st.sampled_from(["display", "alarm", "s"]), _TREES, max_size=3),
       f32=st.sets(st.sampled_from(["display.a", "alarm.value", "s", "display.value.b"])))
def test_flatten_inline_leaves_equal_the_recursion(tree: dict[str, Any], f32: set[str]) -> None:
    got: dict[str, Any] = {}
    want: dict[str, Any] = {}
    _flatten(tree, "p", frozenset(f32), got)
    _flatten_reference(tree, "p", frozenset(f32), want)
    assert list(got) == list(want)
    for k, b in want.items():
        a = got[k]
        assert type(a) is type(b), k
        if isinstance(b, np.ndarray):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b or (a != a and b != b), k  # noqa: PLR0124 - NaN


def test_flat_cache_reuses_shared_metadata_dicts_only() -> None:
    display = {"units": "mm", "limitLow": -1.5, "precision": 3}
    control = {"limits": [1.0, 2.0], "names": ["a", "b"]}  # copied from the cache
    samples = [PVSample("P", {"value": float(i), "timeStamp": ts(i), "display": display,
                              "control": control, "alarm": {"severity": i, "status": 0}})
               for i in range(3)]
    cache: dict[Any, Any] = {}
    for s in samples:
        got, want = flatten_sample(s, cache), flatten_sample(s)
        assert list(got) == list(want)
        for k, v in want.items():
            assert type(got[k]) is type(v) and np.array_equal(got[k], v), k
    assert [k[1] for k in cache] == ["display", "control"]  # alarm/timeStamp: per sample
    first, second = flatten_sample(samples[0], cache), flatten_sample(samples[1], cache)
    first["control.limits"][0] = 99.0  # the caller's copy
    first["control.names"].append("c")
    assert second["control.limits"][0] == 1.0 and second["control.names"] == ["a", "b"]
    assert flatten_sample(samples[2], cache)["control.names"] == ["a", "b"]
    other = {"units": "mm", "limitLow": -1.5, "precision": 3}  # equal, not the same dict
    assert flatten_sample(PVSample("P", {"display": other}), cache)["display.units"] == "mm"
    assert len(cache) == 3


def test_a_float_pvs_alarm_limits_are_float32_like_its_value() -> None:
    """The gateway sends a ``float`` NTScalar's valueAlarm limits as float32 (format 4.1
    records their width): the bridge serves them as float32, the double display limits as
    float64."""
    from recorder.sim.encoding import pack
    from recorder.sim.pvs import parse_pv, pv_structure

    structure = pv_structure(parse_pv("SIM:AI:FLOAT:2"), 3, 1_700_000_000_123_456_789)
    flat = flatten_sample(PVSample.from_raw("SIM:AI:FLOAT:2", pack(structure), 0))
    assert flat["value"].dtype == np.float32
    assert flat["valueAlarm.lowAlarmLimit"].dtype == np.float32
    assert flat["valueAlarm.hysteresis"].dtype == np.float32
    assert flat["display.limitLow"].dtype == np.float64
