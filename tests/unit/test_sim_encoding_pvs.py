"""The simulator's own msgpack encoder, PV catalogue and fault-spec parsing."""

from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from recorder.errors import ConfigError
from recorder.sim.encoding import Float32, Float32Array, pack, serialize
from recorder.sim.faults import FaultConfig, FaultInjector, FaultRule
from recorder.sim.pvs import (
    DOUBLE_AMPLITUDE,
    INT_RANGES,
    numeric_value,
    parse_pv,
    pv_structure,
)

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


finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
float_items = st.one_of(st.floats(), st.just(-0.0), st.just(math.nan), st.just(-math.nan))


@given(st.lists(float_items, max_size=40))
def test_double_arrays_pack_like_element_by_element(items: list[float]) -> None:
    """A list of floats (a double[] waveform) takes the numpy path: same bytes as packing each
    element (0xcb + big-endian double), NaN payloads and -0.0 included."""
    head = msgpack.packb([0] * len(items))[: -len(items) or None]
    assert pack(items) == head + b"".join(b"\xcb" + struct.pack(">d", x) for x in items)


@given(st.lists(st.one_of(finite32, st.floats(allow_nan=False, min_value=-3.4e38,
                                               max_value=3.4e38), st.just(math.nan),
                          st.just(math.inf)), max_size=40))
def test_float32_arrays_pack_like_element_by_element(items: list[float]) -> None:
    head = msgpack.packb([0] * len(items))[: -len(items) or None]
    assert pack(Float32Array(items)) == head + b"".join(
        b"\xca" + struct.pack(">f", x) for x in items)


def test_float_array_packing_at_header_boundaries_and_overflow() -> None:
    for n in (15, 16, 65535, 65536):
        items = [0.25 * i for i in range(n)]
        assert msgpack.unpackb(pack(items)) == items
        assert msgpack.unpackb(pack(Float32Array(items))) == items
    with pytest.raises(OverflowError):  # what struct.pack(">f", 1e39) raises
        pack(Float32Array([1.0, 1e39]))
    assert pack([1.0, 2]) == msgpack.packb([1.0, 2])  # mixed: element by element


@pytest.mark.parametrize("typ", ["DOUBLE", "FLOAT", *INT_RANGES])
@pytest.mark.parametrize("k", [0, 1, 39, 12_345, 10**12])
def test_waveforms_equal_their_elements_one_by_one(typ: str, k: int) -> None:
    """The waveform builder (per sine cycle, or numpy for integers) gives exactly the values
    numeric_value gives element by element, types included (the large k takes the Python-int
    path for every integer type)."""
    spec = parse_pv(f"SIM:WF:{typ}:3:N100")
    wf = pv_structure(spec, k, WALL_NS)["value"]
    expected = [numeric_value(typ, k, spec.phase, i) for i in range(100)]
    assert wf == expected
    assert [type(x) for x in wf] == [float if typ == "FLOAT" else type(x) for x in expected]
    assert isinstance(wf, Float32Array) == (typ == "FLOAT")
    if typ in INT_RANGES:
        low, high = INT_RANGES[typ]
        assert all(low <= x <= high for x in wf)
    else:  # a sine of period 40 (in k and in 3 i), rounded to 6 decimals
        assert all(
            abs(x - DOUBLE_AMPLITUDE * math.sin(2 * math.pi * ((k + spec.phase + 3 * i) % 40)
                                                / 40.0)) <= 5e-7
            for i, x in enumerate(wf))


@pytest.mark.parametrize("typ", ["UBYTE", "BYTE", "USHORT", "SHORT", "INT", "UINT", "FLOAT",
                                 "DOUBLE"])
def test_image_pixels_equal_their_definition(typ: str) -> None:
    w, h, k = 7, 5, 123
    pixels = pv_structure(parse_pv(f"SIM:IMG:{typ}:1:S{w}x{h}"), k, WALL_NS)["value"]
    (values,) = pixels.values()
    if typ in ("FLOAT", "DOUBLE"):
        expected = [round(math.sin((x + y + k) / 5.0) * 100.0, 4)
                    for y in range(h) for x in range(w)]
    else:
        low, high = INT_RANGES[typ]
        expected = [low + (x * 3 + y * 5 + k) % min(high - low + 1, 251)
                    for y in range(h) for x in range(w)]
    assert values == expected
    assert {type(v) for v in values} == {float if typ in ("FLOAT", "DOUBLE") else int}
    assert isinstance(values, Float32Array) == (typ == "FLOAT")


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
    for bad in ("drop-tail", "nope=1", "drop-tail=p:2", "stall=every:100/200", "delay-ms=x",
                "drop-tail=every:0", "duplicate-data=0"):  # every 0th: refused, not "never"
        with pytest.raises(ConfigError):
            FaultConfig.parse(bad)
    assert not FaultConfig.parse("").any_active


def test_user_tag_option_counts_updates() -> None:
    """``U<n>``: timeStamp.userTag = n + update number (an int32), on any family."""
    scalar = parse_pv("SIM:AI:DOUBLE:2:U1000")
    assert scalar.user_tag == 1000 and scalar.connects
    assert pv_structure(scalar, 5, 10**18)["timeStamp"]["userTag"] == 1005
    image = parse_pv("SIM:IMG:UBYTE:1:S4x3:U2147483647")
    assert pv_structure(image, 1, 10**18)["timeStamp"]["userTag"] == 0  # wraps as an int32
    assert pv_structure(parse_pv("SIM:AI:DOUBLE:2"), 5, 10**18)["timeStamp"]["userTag"] == 0
