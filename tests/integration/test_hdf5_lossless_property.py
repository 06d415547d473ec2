"""Property test of the lossless promise: whatever sequence of structures the gateway sends for
a PV comes back from the live and the finalized file bit for bit (types, float widths,
NaN signs, -0.0, key order), through the sink's template fast paths and its general path."""

from __future__ import annotations

import contextlib
import functools
import math
import struct
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recorder.client.events import IterationClosed, IterationOpened, IterationStatus, ValuesReceived
from recorder.client.values import PVSample
from recorder.reader import open_file
from recorder.reader_values import values_of
from recorder.sim.encoding import Float32, Float32Array, pack
from recorder.sinks import buffer as buffer_module
from recorder.sinks import hdf5 as hdf5_module
from recorder.sinks.finalize import finalize
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions

INTS = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.integers(-40, 300),
    st.sampled_from([0, 127, 128, -32, -33, 255, 256, 65535, 65536, 2**31 - 1, -(2**31),
                     2**32, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]),
)
NANS = [float("nan"), -float("nan"), struct.unpack(">d", bytes.fromhex("7ff8000000000123"))[0]]
F64 = st.one_of(st.floats(), st.sampled_from([0.0, -0.0, math.inf, -math.inf, *NANS]))
F32 = st.floats(width=32).map(Float32)
TEXT = st.text(st.one_of(st.characters(codec="utf-8", exclude_categories=["Cs"]),
                         st.sampled_from(["\x00", "\udcff", "é"])), max_size=12)
CLEAN_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8)


def _waveform(kind: str, draw: st.DrawFn) -> Any:
    n = draw(st.integers(0, 6))
    if kind == "wf_f64":
        return [draw(F64) for _ in range(n)]
    if kind == "wf_f32":
        return Float32Array([draw(st.floats(width=32)) for _ in range(n)])
    if kind == "wf_int":
        return [draw(st.integers(-(2**31), 2**32)) for _ in range(n)]
    if kind == "wf_bool":
        return [draw(st.booleans()) for _ in range(n)]
    return [draw(CLEAN_TEXT) for _ in range(n)]  # wf_str


COLUMN_KINDS = ("int", "f64", "f32", "str", "bool")


def _column(kind: str, n: int, draw: st.DrawFn) -> Any:
    if kind == "int":
        return [draw(st.integers(-5, 2**33)) for _ in range(n)]
    if kind == "f64":
        return [draw(F64) for _ in range(n)]
    if kind == "f32":
        return Float32Array([draw(st.floats(width=32)) for _ in range(n)])
    if kind == "bool":
        return [draw(st.booleans()) for _ in range(n)]
    return [draw(TEXT) for _ in range(n)]


UNION = ("ubyteValue", "shortValue", "ushortValue", "intValue", "floatValue", "doubleValue")


def _value(kind: str, draw: st.DrawFn, state: dict[str, Any]) -> Any:
    if kind == "int":
        return draw(INTS)
    if kind == "f64":
        return draw(F64)
    if kind == "f32":
        return draw(F32)
    if kind == "bool":
        return draw(st.booleans())
    if kind == "str":
        return draw(TEXT)
    if kind == "enum":
        if draw(st.integers(0, 4)) == 0 or "choices" not in state:
            state["choices"] = draw(st.lists(CLEAN_TEXT, max_size=4))
        return {"index": draw(st.one_of(st.integers(-1, 5), st.integers(-(2**31), 2**31 - 1))),
                "choices": list(state["choices"])}
    if kind.startswith("wf_"):
        return _waveform(kind, draw)
    if kind == "nil":
        return None
    if kind == "struct":
        return {"a": draw(INTS), "b": [draw(F64)], "c": {"d": draw(TEXT)}}
    raise AssertionError(kind)


@st.composite
def structure(draw: st.DrawFn, family: str, k: int, state: dict[str, Any]) -> dict[str, Any]:
    if draw(st.integers(0, 9)) == 0:  # the type changes
        family = draw(st.sampled_from(FAMILIES))
    s: dict[str, Any] = {}
    if family == "table":
        if draw(st.integers(0, 4)) == 0 or "cols" not in state:
            state["cols"] = draw(st.lists(st.tuples(CLEAN_TEXT, st.sampled_from(COLUMN_KINDS)),
                                          min_size=1, max_size=3, unique_by=lambda c: c[0]))
        n = draw(st.integers(0, 4))
        ragged = draw(st.integers(0, 5)) == 0
        s["labels"] = [c for c, _ in state["cols"]]
        s["value"] = {c: _column(t, draw(st.integers(0, 4)) if ragged else n, draw)
                      for c, t in state["cols"]}
    elif family == "ndarray":
        if draw(st.integers(0, 3)) == 0 or "dims" not in state:
            state["dims"] = draw(st.lists(st.integers(0, 4), min_size=1, max_size=3))
            state["union"] = draw(st.sampled_from(UNION))
        dims = state["dims"]
        size = math.prod(dims)
        if draw(st.integers(0, 6)) == 0:
            size = draw(st.integers(0, 5))  # dims that do not match the data
        union = state["union"]
        if union in ("floatValue", "doubleValue"):
            pixels: Any = [float(draw(st.floats(width=32))) for _ in range(size)]
            if union == "floatValue":
                pixels = Float32Array(pixels)
        else:
            pixels = [draw(st.integers(0, 127)) for _ in range(size)]
        s["value"] = {union: pixels}
        s["codec"] = {"name": "", "parameters": {"": None}}
        s["dimension"] = [{"size": d, "offset": 0, "fullSize": d, "binning": 1,
                           "reverse": False} for d in dims]
        s["uniqueId"] = draw(st.one_of(st.integers(0, 2**31 - 1), st.just(k)))
        s["dataTimeStamp"] = {"secondsPastEpoch": 1_700_000_000 + k, "nanoseconds": 5,
                              "userTag": 0}
    else:
        s["value"] = _value(family, draw, state)
    if draw(st.booleans()):
        s["alarm"] = {"severity": draw(st.sampled_from([0, 1, 2, 3, 2**31, -1])),
                      "status": draw(st.integers(0, 3)),
                      "message": draw(st.sampled_from(["", "HIHI", "LOW", "a\x00b"]))}
    s["timeStamp"] = {"secondsPastEpoch": 1_700_000_000 + k * draw(st.sampled_from([1, 1000])),
                      "nanoseconds": draw(st.sampled_from([0, 5, 999_999_999, 123_456_789])),
                      "userTag": draw(st.sampled_from([0, 0, 7, k, -1, 2**31]))}
    if draw(st.integers(0, 3)):
        if draw(st.integers(0, 5)) == 0 or "display" not in state:
            state["display"] = {
                "limitLow": draw(st.one_of(F64, F32)), "limitHigh": draw(F64),
                "description": draw(CLEAN_TEXT), "units": draw(st.sampled_from(["mm", "", "µA"])),
                "precision": draw(st.integers(-1, 6))}
        s["display"] = dict(state["display"])
    return s


FAMILIES = ["int", "f64", "f32", "bool", "str", "enum", "wf_f64", "wf_f32", "wf_int",
            "wf_bool", "wf_str", "nil", "struct", "table", "ndarray"]


PVS = ("LOSSLESS:A", "LOSSLESS:B", "LOSSLESS:C")
DECODE_PATHS: dict[str, dict[str, int]] = {  # the sink's template decoding, each way
    "as_configured": {},
    "in_place": {"BIG_MESSAGE": 0, "RUN_MIN": 2, "RUN_MIN_BYTES": 0},
    "sorted_gathered": {"BIG_MESSAGE": 0, "RUN_MIN": 10**9, "RUN_MIN_BYTES": 10**18},
    "small_chunks": {"BIG_MESSAGE": 10**18, "CHUNK_BYTES": 100},
}


@st.composite
def streams(draw: st.DrawFn
            ) -> tuple[list[list[tuple[str, dict[str, Any]]]], set[int], int, str]:
    """Iterations of (PV, structure) of 1-3 PVs (their own families, or one family for all:
    PVs of the same shape share template layouts), the iterations flushed after, the
    finalization block size and the template decoding path."""
    n_pvs = draw(st.integers(1, 3))
    one = draw(st.sampled_from(FAMILIES))
    same_family = draw(st.booleans())
    families = {pv: one if same_family else draw(st.sampled_from(FAMILIES))
                for pv in PVS[:n_pvs]}
    states: dict[str, dict[str, Any]] = {pv: {} for pv in families}
    n_iter = draw(st.integers(1, 6))
    its = []
    k = 0
    for _ in range(n_iter):
        batch = []
        for _ in range(draw(st.integers(1, 4))):
            for pv, family in families.items():
                s = draw(structure(family, k, states[pv]))
                batch.append((pv, s))
                # a run of the same structure: only value and time change (templates)
                for j in range(draw(st.sampled_from([0, 0, 0, 3, 40]))):
                    again = dict(s)
                    if isinstance(s.get("value"), (int, float)) and not isinstance(
                            s["value"], bool):
                        v = s["value"] + j
                        again["value"] = type(s["value"])(v if -(2**63) <= v < 2**64 else j)
                    again["timeStamp"] = {**s["timeStamp"], "nanoseconds": j}
                    batch.append((pv, again))
                k += 1
        its.append(batch)
    flushes = set(draw(st.lists(st.integers(0, n_iter - 1), max_size=3)))
    block = draw(st.sampled_from([0, 0, 300, 2048]))
    paths = draw(st.sampled_from(list(DECODE_PATHS)))
    return its, flushes, block, paths


def _lazy(pv: str, struct_: dict[str, Any], k: int) -> PVSample:
    head = pack({"message_type": 1, "timestamp": 1_763_700_000_000 + k, "iter_index": k,
                 "msg_seq": k})
    head = bytes([0x85]) + head[1:] + pack(pv)  # the PV map last, as the gateway sends it
    body = pack(struct_)
    raw = head + body
    return PVSample.from_raw(pv, raw, len(head), None)


def exact(obj: Any) -> Any:
    """Comparable form telling int from float from bool, float bits, key order."""
    if isinstance(obj, dict):
        return ("dict", [(exact(k), exact(v)) for k, v in obj.items()])
    if isinstance(obj, (list, tuple)):
        return ("list", [exact(v) for v in obj])
    if isinstance(obj, float):
        if math.isnan(obj):  # NaN payloads are not kept in JSON; signs are
            return ("float", "nan", math.copysign(1.0, obj))
        return ("float", struct.pack(">d", obj).hex())
    return (type(obj).__name__, repr(obj))


def exact_array(a: Any) -> Any:
    """Comparable form of what ``values()`` returns: dtype, shape and bytes of numeric arrays
    (NaN bits told apart), each element of object arrays."""
    if isinstance(a, np.ndarray) and a.dtype != object:
        if a.dtype.kind == "f":  # NaN payloads are not kept in JSON; signs are
            a = np.where(np.isnan(a), np.copysign(np.array(np.nan, a.dtype), a), a)
        return ("array", a.dtype.str, a.shape, a.tobytes().hex())
    if isinstance(a, np.ndarray):
        return ("objects", a.shape, [exact_array(x) for x in a.tolist()])
    if isinstance(a, np.generic):
        return ("generic", a.dtype.str, exact_array(np.array([a]))[3])
    return exact(a)


def _check(got: list[PVSample], sent: list[PVSample], where: str) -> None:
    assert len(got) == len(sent), where
    for i, (g, s) in enumerate(zip(got, sent, strict=True)):
        assert exact(g.data) == exact(s.data), (where, i, g.data, s.data)
        assert g.float32_paths == s.float32_paths, (where, i)
        assert g.kind == s.kind, (where, i)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(streams())
def test_any_stream_comes_back_bit_for_bit(stream: Any) -> None:
    """1-3 PVs, each a sequence of structures as the gateway sends them (ints in msgpack's
    smallest encoding, float32/float64, NaN signs, -0.0, int64/uint64 extremes, strings with
    NUL or bytes that are not UTF-8, empty and resized waveforms, changing enum choices,
    tables with ragged columns, images whose dimensions change, type changes, metadata
    appearing and changing), flushed at random, finalized in blocks of random size, decoded
    by each template path: ``samples()`` and ``values()`` of the live and the final file
    give what the client decoded (NaN payloads aside: the metadata JSON keeps NaN signs)."""
    its, flushes, block, paths = stream
    fin = functools.partial(finalize, block_bytes=block) if block else finalize
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        stack.enter_context(mock.patch.object(hdf5_module, "finalize", fin))
        for name, value in DECODE_PATHS[paths].items():
            stack.enter_context(mock.patch.object(buffer_module, name, value))
        rec = HDF5Recording(OutputOptions(directory=Path(tmp)), run_name="lossless")
        sent: dict[str, list[PVSample]] = {}
        k = 0
        for i, batch in enumerate(its):
            rec.handle(IterationOpened("t", "s", i + 1, i + 1))
            samples = []
            for pv, s in batch:
                samples.append(_lazy(pv, s, k))
                sent.setdefault(pv, []).append(samples[-1])
                k += 1
            rec.handle(ValuesReceived("t", i + 1, 1, 1, tuple(samples)))
            rec.handle(IterationClosed("t", "s", i + 1, IterationStatus.COMPLETE, None,
                                       i + 1, i + 1))
            if i in flushes:
                rec.flush()
        rec.flush()
        live = rec.current_path
        assert live is not None
        with open_file(live) as f:
            for pv, samples in sent.items():
                want = exact_array(values_of(samples))
                assert exact_array(f.values(pv)) == want, f"live values {pv}"
                _check(f.samples(pv), samples, f"live {pv}")
        (final,) = rec.close()
        with open_file(final) as f:
            for pv, samples in sent.items():
                want = exact_array(values_of(samples))
                assert exact_array(f.values(pv)) == want, f"final values {pv}"
                _check(f.samples(pv), samples, f"final {pv}")
