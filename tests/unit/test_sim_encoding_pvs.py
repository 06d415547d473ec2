"""The simulator's own msgpack encoder, PV catalogue and fault-spec parsing."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from recorder.errors import ConfigError
from recorder.sim.encoding import Float32, Float32Array, pack, serialize
from recorder.sim.faults import FaultConfig, FaultInjector, FaultRule
from recorder.sim.pvs import parse_pv, pv_structure

WALL_NS = 1_700_000_000_123_456_789


def test_float_widths_and_int_encodings() -> None:
    assert pack(Float32(1.5)) == b"\xca" + struct.pack(">f", 1.5)
    assert pack(1.5) == b"\xcb" + struct.pack(">d", 1.5)
    assert pack(1_700_000_000_000) == b"\xcf" + struct.pack(">Q", 1_700_000_000_000)
    assert pack(2**64 - 1) == b"\xcf" + b"\xff" * 8
    assert pack(-(2**63)) == b"\xd3" + struct.pack(">q", -(2**63))
    assert pack(200) == b"\xcc\xc8" and pack(-5) == b"\xfb" and pack(-100) == b"\xd0\x9c"
    assert pack(Float32Array([1.0, 2.0])) == b"\x92" + b"".join(
        b"\xca" + struct.pack(">f", v) for v in (1.0, 2.0))
    assert pack({"b": 1, "a": [Float32(0.5), 0.5]}) == (
        b"\x82\xa1b\x01\xa1a\x92\xca" + struct.pack(">f", 0.5) + b"\xcb" + struct.pack(">d", 0.5))


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False), st.text(max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=20) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=8),
    max_leaves=40,
)


@given(values)
def test_matches_msgpack_reference_for_plain_values(value: Any) -> None:
    """Without float32 the bytes are exactly msgpack's (smallest int forms, order kept)."""
    assert pack(value) == msgpack.packb(value)
    assert msgpack.unpackb(pack(value), strict_map_key=False) == value


def test_json_serialization() -> None:
    body, header = serialize({"error": 0, "x": float("nan")}, "json")
    assert header == "Json" and body == b'{"error":0,"x":"NaN"}'
    assert serialize({"a": 1}, "msgpack") == (b"\x81\xa1a\x01", "Msgpack")


def test_catalogue_parsing() -> None:
    spec = parse_pv("SIM:AI:FLOAT:2:P20")
    assert (spec.family, spec.type, spec.period_s) == ("AI", "FLOAT", 0.02)
    assert parse_pv("SIM:WF:INT:1:N5").length == 5
    img = parse_pv("SIM:IMG:USHORT:1:S4x3")
    assert (img.width, img.height) == (4, 3)
    for never in ("SIM:NEVER:1", "OTHER:PV", "SIM:BOGUS:1", "SIM:AI:STRING:1"):
        assert not parse_pv(never).connects
        assert parse_pv(never).update_index(5.0) == -1
    quiet = parse_pv("SIM:QUIET:INT:1:P100:Q250")
    assert [quiet.update_index(t) for t in (0.0, 0.1, 0.2, 0.3, 9.0)] == [0, 1, 2, 2, 2]
    assert parse_pv("SIM:AI:DOUBLE:1:P0").update_index(100.0) == 0


def test_nt_scalar_field_order_and_types() -> None:
    data = pv_structure(parse_pv("SIM:AI:FLOAT:1"), 7, WALL_NS)
    assert list(data) == ["value", "alarm", "timeStamp", "display", "control", "valueAlarm"]
    assert isinstance(data["value"], Float32)
    assert list(data["alarm"]) == ["severity", "status", "message"]
    assert data["timeStamp"] == {"secondsPastEpoch": 1_700_000_000, "nanoseconds": 123_456_789,
                                 "userTag": 0}
    assert list(data["display"]) == ["limitLow", "limitHigh", "description", "units",
                                      "precision", "form"]
    assert isinstance(data["valueAlarm"]["highAlarmLimit"], Float32)
    raw = pack(data)
    assert raw.startswith(b"\x86\xa5value\xca")


@pytest.mark.parametrize("typ", ["BYTE", "SHORT", "INT", "LONG", "UBYTE", "USHORT", "UINT",
                                 "ULONG"])
def test_integer_scalars_stay_in_range_and_change(typ: str) -> None:
    spec = parse_pv(f"SIM:AI:{typ}:1")
    vals = [pv_structure(spec, k, WALL_NS)["value"] for k in range(50)]
    assert all(type(v) is int for v in vals) and len(set(vals)) > 10
    low = {"BYTE": -128, "SHORT": -(2**15), "INT": -(2**31), "LONG": -(2**63)}.get(typ, 0)
    high = {"BYTE": 127, "SHORT": 2**15 - 1, "INT": 2**31 - 1, "LONG": 2**63 - 1,
            "UBYTE": 255, "USHORT": 2**16 - 1, "UINT": 2**32 - 1, "ULONG": 2**64 - 1}[typ]
    assert all(low <= v <= high for v in vals)


def test_other_kinds() -> None:
    assert isinstance(pv_structure(parse_pv("SIM:BI:BOOL:1"), 3, WALL_NS)["value"], bool)
    assert pv_structure(parse_pv("SIM:SI:STRING:1"), 3, WALL_NS)["value"] == "msg-3"
    enum = pv_structure(parse_pv("SIM:MBBI:ENUM:1"), 3, WALL_NS)["value"]
    assert list(enum) == ["index", "choices"] and 0 <= enum["index"] < 4
    wf = pv_structure(parse_pv("SIM:WF:FLOAT:1:N8"), 3, WALL_NS)["value"]
    assert isinstance(wf, Float32Array) and len(wf) == 8
    lengths = {len(pv_structure(parse_pv("SIM:WFVAR:DOUBLE:1:N4"), k, WALL_NS)["value"])
               for k in range(8)}
    assert lengths == {1, 2, 3, 4}
    table = pv_structure(parse_pv("SIM:TABLE:1"), 4, WALL_NS)
    assert list(table) == ["labels", "value", "descriptor", "alarm", "timeStamp"]
    assert list(table["value"]) == ["index", "position", "name"]
    assert len({len(c) for c in table["value"].values()}) == 1
    img = pv_structure(parse_pv("SIM:IMG:UBYTE:1:S4x3"), 2, WALL_NS)
    assert list(img)[:8] == ["value", "codec", "compressedSize", "uncompressedSize",
                             "dimension", "uniqueId", "dataTimeStamp", "attribute"]
    assert list(img["value"]) == ["ubyteValue"] and len(img["value"]["ubyteValue"]) == 12
    assert [d["size"] for d in img["dimension"]] == [4, 3]
    assert all(0 <= p <= 255 for p in img["value"]["ubyteValue"])
    with pytest.raises(ValueError, match="never connects"):
        pv_structure(parse_pv("SIM:NEVER:1"), 0, WALL_NS)


def test_fault_spec_parsing_and_firing() -> None:
    config = FaultConfig.parse(
        "drop-tail=every:3,duplicate-data=p:0.5,delay-data=2,delay-ms=300,stall=every:1000/200,"
        "seed=7"
    )
    assert config.drop_tail == FaultRule(every=3)
    assert config.duplicate_data == FaultRule(probability=0.5)
    assert config.delay_data == FaultRule(every=2)
    assert (config.delay_ms, config.stall_every_ms, config.stall_ms, config.seed) == (
        300, 1000, 200, 7)
    injector = FaultInjector(config)
    assert [injector.fires("drop_tail") for _ in range(6)] == [False, False, True] * 2
    assert not injector.fires("drop_header")
    assert injector.stalled(0.85) and not injector.stalled(0.75)
    assert injector.stall_end(0.85) == 1.0
    for bad in ("drop-tail", "nope=1", "drop-tail=p:2", "stall=every:100/200", "delay-ms=x"):
        with pytest.raises(ConfigError):
            FaultConfig.parse(bad)
    assert not FaultConfig.parse("").any_active
