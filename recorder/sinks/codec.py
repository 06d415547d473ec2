"""Lossless split of a PV sample into typed columns plus a "rest" structure (pure code).

Every :class:`~recorder.client.values.PVSample` is split into

* per-sample columns: EPICS time (ns), a nonzero ``timeStamp.userTag`` (EPICS 7's UTAG, e.g. a
  pulse id), alarm severity, alarm status, an NTNDArray frame's ``uniqueId`` and
  ``dataTimeStamp``, and the value, typed
  (inline ``ival``/``fval`` for scalars, enums and booleans; an element array for waveforms and
  NTNDArray pixels; UTF-8 bytes for strings),
* the *rest*: the decoded PV structure with ``None`` placeholders where a field was extracted
  (so key order is kept), plus the sample's ``float32_paths``. The rest holds the slowly
  changing metadata (display, control, valueAlarm, enum choices, NTNDArray dimensions, ...)
  and is stored only when it changes.

``flags`` says which fields were extracted, so :func:`rebuild_data` gives back the structure
the gateway sent, value for value (``==``, with float widths kept via ``float32_paths``).
Anything that does not fit a typed column (structures, string arrays, NTTable, a nil value,
an out-of-range timestamp) simply stays in the rest.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from recorder.client.values import NDARRAY_UNION_DTYPES, PVSample, ValueKind

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
NS_PER_S = 1_000_000_000

# which fields were extracted into columns (bit flags stored per sample)
F_TIME = 1
F_SEVERITY = 2
F_STATUS = 4
F_VALUE = 8
F_MESSAGE = 16
"""Final layout only (format 3.0): ``alarm.message`` taken out into the PV's
``alarm_message`` column (the live layout keeps the message in the rest)."""
F_USER_TAG = 32
"""Format 4.0: a nonzero int32 ``timeStamp.userTag`` taken out into the ``user_tag`` column (a
zero stays in the rest, so PVs that never set one store what they stored before; a tag
that changes every sample, such as a pulse id, no longer makes each sample's rest new)."""
F_FRAME = 64
"""Format 4.0: an NTNDArray's ``uniqueId`` (int32) and ``dataTimeStamp`` (as ns) taken out,
both or neither: they change with every frame (live layout: ``fval`` and ``ival`` of the row,
which an NTNDArray row does not use otherwise; final layout: ``unique_id`` and
``data_timestamp``, ``data_time`` before 5.0)."""

KIND_CODES: dict[ValueKind, int] = {
    ValueKind.NONE: 0,
    ValueKind.SCALAR: 1,
    ValueKind.BOOL: 2,
    ValueKind.STRING: 3,
    ValueKind.ENUM: 4,
    ValueKind.ARRAY: 5,
    ValueKind.STRING_ARRAY: 6,
    ValueKind.TABLE: 7,
    ValueKind.NDARRAY: 8,
    ValueKind.STRUCT: 9,
}
KINDS_BY_CODE: dict[int, ValueKind] = {v: k for k, v in KIND_CODES.items()}

# element dtypes of typed values; code 0 = no typed value
DTYPES: tuple[np.dtype[Any], ...] = (
    np.dtype(np.bool_),
    np.dtype(np.int8),
    np.dtype(np.uint8),
    np.dtype(np.int16),
    np.dtype(np.uint16),
    np.dtype(np.int32),
    np.dtype(np.uint32),
    np.dtype(np.int64),
    np.dtype(np.uint64),
    np.dtype(np.float32),
    np.dtype(np.float64),
)
DTYPE_CODES: dict[np.dtype[Any], int] = {dt: i + 1 for i, dt in enumerate(DTYPES)}
DTYPE_BY_CODE: dict[int, np.dtype[Any]] = {i + 1: dt for i, dt in enumerate(DTYPES)}
STRING_DTYPE_CODE = 12  # UTF-8 bytes in the byte pool
POOL_NAMES: dict[int, str] = {code: dt.name for code, dt in DTYPE_BY_CODE.items()}
ARRAY_KINDS = (ValueKind.ARRAY, ValueKind.NDARRAY)


@dataclass(slots=True)
class Split:
    """One sample split into columns; see the module docstring."""

    time_ns: int
    severity: int
    status: int
    flags: int
    kind: int
    dtype: int  # DTYPE_CODES / STRING_DTYPE_CODE / 0
    ival: int
    fval: float
    array: npt.NDArray[Any] | None  # waveform / NTNDArray pixels (flat), typed
    text: bytes | None  # STRING value, UTF-8
    rest: dict[str, Any]  # {"d": structure with placeholders, "f": float32 paths}
    user_tag: int = 0  # timeStamp.userTag when F_USER_TAG


def _int32(value: Any) -> bool:
    if value.__class__ is not int and (not isinstance(value, int) or isinstance(value, bool)):
        return False
    return bool(-(2**31) <= value < 2**31)


def _is_int(value: Any) -> bool:
    """An int, not a bool (exact-type check first: the common case, and cheap)."""
    return value.__class__ is int or (isinstance(value, int) and not isinstance(value, bool))


def _is_map(value: Any) -> bool:
    """A mapping (exact dict first: the ABC check costs ~0.4 µs)."""
    return value.__class__ is dict or isinstance(value, Mapping)


def split_sample(sample: PVSample) -> Split:
    """Split ``sample`` (never raises for any decoded structure)."""
    data = sample.data
    rest: dict[str, Any] = dict(data)
    flags = 0
    time_ns = 0
    severity = -1
    status = -1
    user_tag = 0
    ts = data.get("timeStamp")
    if ts is not None and _is_map(ts):
        ts_rest = None
        t = _epics_ns(ts)
        if t is not None:
            time_ns = t
            flags |= F_TIME
            ts_rest = dict(ts)
            ts_rest["secondsPastEpoch"] = None
            ts_rest["nanoseconds"] = None
        tag = ts.get("userTag")
        if tag and _int32(tag):
            user_tag = int(tag)
            flags |= F_USER_TAG
            ts_rest = ts_rest if ts_rest is not None else dict(ts)
            ts_rest["userTag"] = None
        if ts_rest is not None:
            rest["timeStamp"] = ts_rest
    alarm = data.get("alarm")
    if alarm is not None and _is_map(alarm):
        sev = alarm.get("severity")
        stat = alarm.get("status")
        alarm_rest = None
        if _int32(sev):
            severity = int(sev)
            flags |= F_SEVERITY
            alarm_rest = dict(alarm)
            alarm_rest["severity"] = None
        if _int32(stat):
            status = int(stat)
            flags |= F_STATUS
            alarm_rest = alarm_rest if alarm_rest is not None else dict(alarm)
            alarm_rest["status"] = None
        if alarm_rest is not None:
            rest["alarm"] = alarm_rest

    kind = sample.kind
    value = sample.value
    dtype = 0
    ival = 0
    fval = 0.0
    array: npt.NDArray[Any] | None = None
    text: bytes | None = None
    if kind is ValueKind.SCALAR:
        dt = value.dtype
        dtype = DTYPE_CODES[dt]
        if dt.kind == "f":
            fval = float(value)
        elif dt == np.uint64:
            ival = int(np.array(value, dtype=np.uint64).view(np.int64))
        else:
            ival = int(value)
        flags |= F_VALUE
        rest["value"] = None
    elif kind is ValueKind.BOOL:
        dtype = DTYPE_CODES[np.dtype(np.bool_)]
        ival = int(bool(value))
        flags |= F_VALUE
        rest["value"] = None
    elif kind is ValueKind.STRING:
        try:
            text = value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: leave it in the rest
            text = None
        if text is not None:
            dtype = STRING_DTYPE_CODE
            flags |= F_VALUE
            rest["value"] = None
    elif kind is ValueKind.ENUM:
        raw = data["value"]
        index = raw.get("index")
        if isinstance(index, int) and INT64_MIN <= index <= INT64_MAX:
            dtype = DTYPE_CODES[np.dtype(np.int64)]
            ival = index
            flags |= F_VALUE
            enum_rest = dict(raw)
            enum_rest["index"] = None
            rest["value"] = enum_rest
    elif kind is ValueKind.ARRAY:
        array = value
        dtype = DTYPE_CODES[value.dtype]
        flags |= F_VALUE
        rest["value"] = None
    elif kind is ValueKind.NDARRAY:
        array = value.data
        dtype = DTYPE_CODES[value.data.dtype]
        flags |= F_VALUE
        nd_rest = dict(data["value"])
        nd_rest[value.union_field] = None
        rest["value"] = nd_rest
        frame = _frame(data)
        if frame is not None:
            fval, ival = frame
            flags |= F_FRAME
            rest["uniqueId"] = None
            dts_rest = dict(data["dataTimeStamp"])
            dts_rest["secondsPastEpoch"] = None
            dts_rest["nanoseconds"] = None
            rest["dataTimeStamp"] = dts_rest
    return Split(
        time_ns=time_ns,
        severity=severity,
        status=status,
        flags=flags,
        kind=KIND_CODES[kind],
        dtype=dtype,
        ival=ival,
        fval=fval,
        array=array,
        text=text,
        rest={"d": rest, "f": sorted(f32) if (f32 := sample.float32_paths) else []},
        user_tag=user_tag,
    )


def _epics_ns(ts: Mapping[str, Any]) -> int | None:
    """An EPICS time stamp structure as int64 ns since the epoch, None when it is not one
    (seconds or nanoseconds not integers, nanoseconds outside 0..1e9, beyond int64)."""
    sec: Any = ts.get("secondsPastEpoch")
    nsec: Any = ts.get("nanoseconds")
    if not (_is_int(sec) and _is_int(nsec) and 0 <= nsec < NS_PER_S):
        return None
    t: int = sec * NS_PER_S + nsec
    return t if INT64_MIN <= t <= INT64_MAX else None


def _frame(data: Mapping[str, Any]) -> tuple[float, int] | None:
    """(uniqueId, dataTimeStamp in ns) of an NTNDArray structure, if both fit their columns."""
    uid = data.get("uniqueId")
    dts = data.get("dataTimeStamp")
    if uid is None or not _int32(uid) or dts is None or not _is_map(dts):
        return None
    t = _epics_ns(dts)
    return None if t is None else (float(uid), t)


def same_rest(a: Any, b: Any) -> bool:
    """``a == b`` as the stored JSON would tell: also telling ``0``, ``0.0`` and ``False``
    apart, ``0.0`` from ``-0.0``, and dict key order, which ``==`` ignores (a rest judged
    equal to the previous one is not stored again, so ``==`` alone would give a sample the
    previous sample's ``0`` for its ``False``)."""
    return bool(a == b) and _exactly(a, b)


def _exactly(a: Any, b: Any) -> bool:
    cls = a.__class__
    if cls is not b.__class__:
        return False
    if cls is dict:
        return len(a) == len(b) and all(
            ka.__class__ is kb.__class__ and ka == kb and _exactly(va, vb)
            for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True))
    if cls is list or cls is tuple:
        return len(a) == len(b) and all(map(_exactly, a, b))
    if cls is float:
        if a != b:
            return math.isnan(a) and math.isnan(b)
        return math.copysign(1.0, a) == math.copysign(1.0, b)
    return bool(a == b)


# --- JSON with tags for what JSON cannot say --------------------------------------------------
def _to_jsonable(obj: Any) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        if math.isnan(obj) and math.copysign(1.0, obj) < 0:
            return {"__float__": "-nan"}  # x86's default NaN; float("-nan") keeps the sign
        return {"__float__": repr(obj)}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") for k in obj):
            return {k: _to_jsonable(v) for k, v in obj.items()}
        return {"__map__": [[_to_jsonable(k), _to_jsonable(v)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"__bytes__": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, np.generic):
        return _to_jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return [_to_jsonable(v) for v in obj.tolist()]
    return {"__repr__": repr(obj)}


def _from_jsonable(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_from_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            ((key, val),) = obj.items()
            if key == "__float__":
                return float(val)
            if key == "__bytes__":
                return base64.b64decode(val)
            if key == "__map__":
                return {_hashable(_from_jsonable(k)): _from_jsonable(v) for k, v in val}
            if key == "__repr__":
                return val
        return {k: _from_jsonable(v) for k, v in obj.items()}
    return obj


def _hashable(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_hashable(v) for v in obj)
    if isinstance(obj, dict):
        return tuple((k, _hashable(v)) for k, v in obj.items())
    return obj


_JSON_SCALARS = frozenset({str, int, float, bool, type(None)})


def _plain(obj: Any) -> bool:
    """``obj`` is exact dicts with str keys not starting with ``__``, exact lists and
    str/int/float/bool/None only: what :func:`_to_jsonable` returns unchanged (non-finite
    floats aside, which the encoder refuses)."""
    cls = obj.__class__
    values: Any
    if cls is dict:
        for k in obj:
            if k.__class__ is not str or k.startswith("__"):
                return False
        values = obj.values()
    elif cls is list:
        values = obj
    else:
        return cls in _JSON_SCALARS
    for v in values:
        vc = v.__class__
        if vc is dict or vc is list:
            if not _plain(v):
                return False
        elif vc not in _JSON_SCALARS:
            return False
    return True


def encode_rest(rest: Mapping[str, Any]) -> bytes:
    """The rest as compact UTF-8 JSON (tagged for non-finite floats, bytes, non-str keys).

    Fast path: a structure of plain dicts (str keys), lists and JSON scalars (:func:`_plain`)
    is dumped as it is by json's C encoder, 3-5x faster; anything else (bytes, numpy values,
    tuples, other key types, subclasses) and non-finite floats (refused by the encoder) take
    the tagging path. Both give the same bytes for the same structure."""
    if _plain(rest):
        try:
            return _DUMPS(rest).encode()
        except (TypeError, ValueError):
            pass
    return _DUMPS(_to_jsonable(rest)).encode()


_DUMPS = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def decode_rest(raw: bytes) -> dict[str, Any]:
    result = json.loads(raw.decode("utf-8"))
    if b'"__' in raw:  # tags are keys starting with "__"; without any, as parsed
        result = _from_jsonable(result)
    if not isinstance(result, dict):
        raise ValueError("rest is not a JSON object")
    return result


def utf8_text(value: Any) -> bytes | None:
    """``value`` as UTF-8 when an HDF5 string can hold it (a str without NUL, where HDF5
    strings end, and without lone surrogates), else None."""
    if not isinstance(value, str) or "\x00" in value:
        return None
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        return None


MESSAGE_MAX_BYTES = 1024
"""Longest ``alarm.message`` (UTF-8) taken out into the final ``alarm_message`` column."""


def strip_message(raw: bytes) -> tuple[bytes, str] | None:
    """The rest JSON ``raw`` with ``alarm.message`` replaced by the ``null`` placeholder, and
    the message; None when there is no string message to take out (no alarm, a nil or
    non-string message, NUL or lone surrogates, which HDF5 strings cannot hold, or longer
    than :data:`MESSAGE_MAX_BYTES`)."""
    if b'"message"' not in raw:
        return None
    rest = decode_rest(raw)
    d = rest.get("d")
    if not isinstance(d, dict):
        return None
    alarm = d.get("alarm")
    if not isinstance(alarm, dict):
        return None
    message = alarm.get("message")
    encoded = utf8_text(message)
    if encoded is None or len(encoded) > MESSAGE_MAX_BYTES:
        return None
    stripped = dict(alarm)
    stripped["message"] = None
    d = dict(d)
    d["alarm"] = stripped
    return encode_rest({**rest, "d": d}), cast(str, message)  # a str: utf8_text said so


# --- the way back -----------------------------------------------------------------------------
def typed_scalar(dtype_code: int, ival: int, fval: float) -> Any:
    """The Python value of an inline scalar as msgpack would have decoded it."""
    dt = DTYPE_BY_CODE[dtype_code]
    if dt.kind == "f":
        return float(fval)
    if dt == np.bool_:
        return bool(ival)
    if dt == np.uint64:
        return int(np.array(ival, dtype=np.int64).view(np.uint64))
    return int(ival)


def rebuild_data(
    rest: Mapping[str, Any],
    *,
    flags: int,
    kind: int,
    time_ns: int,
    severity: int,
    status: int,
    value: Any,
    message: str | None = None,
    user_tag: int = 0,
    unique_id: int = 0,
    data_time_ns: int = 0,
) -> dict[str, Any]:
    """The PV structure as sent: the rest with the extracted fields put back.

    ``value`` is the Python value of the extracted value field (ignored without ``F_VALUE``):
    an int/float/bool/str, or a list (waveform / NTNDArray pixels); ``message`` the
    ``alarm.message`` (ignored without ``F_MESSAGE``); ``user_tag`` the
    ``timeStamp.userTag`` (ignored without ``F_USER_TAG``); ``unique_id`` and
    ``data_time_ns`` an NTNDArray's ``uniqueId`` and ``dataTimeStamp`` (without ``F_FRAME``:
    ignored).
    """
    data: dict[str, Any] = dict(rest["d"])
    if flags & (F_TIME | F_USER_TAG):
        ts = dict(data["timeStamp"])
        if flags & F_TIME:
            ts["secondsPastEpoch"], ts["nanoseconds"] = divmod(time_ns, NS_PER_S)
        if flags & F_USER_TAG:
            ts["userTag"] = user_tag
        data["timeStamp"] = ts
    if flags & F_FRAME:
        data["uniqueId"] = unique_id
        dts = dict(data["dataTimeStamp"])
        dts["secondsPastEpoch"], dts["nanoseconds"] = divmod(data_time_ns, NS_PER_S)
        data["dataTimeStamp"] = dts
    if flags & (F_SEVERITY | F_STATUS | F_MESSAGE):
        alarm = dict(data["alarm"])
        if flags & F_SEVERITY:
            alarm["severity"] = severity
        if flags & F_STATUS:
            alarm["status"] = status
        if flags & F_MESSAGE:
            alarm["message"] = message
        data["alarm"] = alarm
    if flags & F_VALUE:
        vkind = KINDS_BY_CODE[kind]
        if vkind is ValueKind.ENUM:
            enum_value = dict(data["value"])
            enum_value["index"] = value
            data["value"] = enum_value
        elif vkind is ValueKind.NDARRAY:
            nd = dict(data["value"])
            (field,) = [k for k, v in nd.items() if v is None and k in NDARRAY_UNION_DTYPES]
            nd[field] = value
            data["value"] = nd
        else:
            data["value"] = value
    return data


ROW_FIELDS = ("seconds", "nanoseconds", "user_tag", "unique_id", "data_seconds",
              "data_nanoseconds", "severity", "status", "message", "value")
"""The per-row columns :func:`rebuild_data` puts back (time and ``dataTimeStamp`` as their
``secondsPastEpoch`` and ``nanoseconds``), as :func:`row_field_paths` names them."""


def row_field_paths(rest: Mapping[str, Any], *, flags: int, kind: int
                    ) -> list[tuple[tuple[str, ...], str]]:
    """Where :func:`rebuild_data` puts each per-row field back for a row with ``flags`` and
    value ``kind`` under the metadata ``rest``: ``(path, field)`` pairs, ``path`` the keys
    from the structure's root, ``field`` one of :data:`ROW_FIELDS`. Whatever is not at
    these paths is the rest's, the same for every row sharing it and ``flags``."""
    out: list[tuple[tuple[str, ...], str]] = []
    if flags & F_TIME:
        out += [(("timeStamp", "secondsPastEpoch"), "seconds"),
                (("timeStamp", "nanoseconds"), "nanoseconds")]
    if flags & F_USER_TAG:
        out.append((("timeStamp", "userTag"), "user_tag"))
    if flags & F_FRAME:
        out += [(("uniqueId",), "unique_id"),
                (("dataTimeStamp", "secondsPastEpoch"), "data_seconds"),
                (("dataTimeStamp", "nanoseconds"), "data_nanoseconds")]
    for flag, key in ((F_SEVERITY, "severity"), (F_STATUS, "status"), (F_MESSAGE, "message")):
        if flags & flag:
            out.append((("alarm", key), key))
    if flags & F_VALUE:
        vkind = KINDS_BY_CODE[kind]
        if vkind is ValueKind.ENUM:
            out.append((("value", "index"), "value"))
        elif vkind is ValueKind.NDARRAY:
            (field,) = [k for k, v in rest["d"]["value"].items()
                        if v is None and k in NDARRAY_UNION_DTYPES]
            out.append((("value", field), "value"))
        else:
            out.append((("value",), "value"))
    return out


def rebuild_sample(pv: str, rest: Mapping[str, Any], **columns: Any) -> PVSample:
    """A :class:`PVSample` equal to the one that was split (``data`` and ``float32_paths``)."""
    return PVSample(pv, rebuild_data(rest, **columns), frozenset(rest.get("f", ())))


# --- HDF5 names -------------------------------------------------------------------------------
def escape_name(name: str) -> str:
    """An HDF5 link name for a PV: as is except '%', '/' and a leading '.' (percent-encoded)."""
    out = name.replace("%", "%25").replace("/", "%2F")
    if not out or out.startswith("."):
        out = "%2E" + out[1:] if out else "%00"
    return out


def unescape_name(name: str) -> str:
    if name == "%00":
        return ""
    if name.startswith("%2E"):
        name = "." + name[3:]
    return name.replace("%2F", "/").replace("%25", "%")
