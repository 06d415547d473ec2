"""Typed PV values: the gateway's msgpack PV structures turned into numpy/Python types.

Pure code. The gateway sends each PV as a msgpack map mirroring its pvData structure
(``value``, ``alarm``, ``timeStamp``, ``display``, ...). msgpack loses two things that matter to
a recorder, and this module restores them:

* float width: the gateway packs pvData ``float`` as msgpack float32 and ``double`` as float64,
  but msgpack-python decodes both to a Python ``float``. The wire decoder
  (:mod:`recorder.client.wire`) reports which fields were float32 (``float32_paths``) and the
  value is typed ``numpy.float32`` / ``float64`` accordingly.
* integer width: msgpack uses the smallest encoding, so the pvData type (byte, short, int,
  long) cannot be recovered. Integers become ``int64`` (``uint64`` only above int64's range).
  Known gateway bug: ``short[]`` is packed through uint16, so a negative short ``v`` arrives as
  ``65536 + v``; we keep what was sent (it is not detectable in general).

NTNDArray images carry their element type in the union's selected field (``ubyteValue`` ...)
so their dtype is exact.
"""

from __future__ import annotations

import enum
import functools
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

INT64_MAX = 2**63 - 1

# NTNDArray union field -> numpy dtype
NDARRAY_UNION_DTYPES: dict[str, np.dtype[Any]] = {
    "booleanValue": np.dtype(np.bool_),
    "byteValue": np.dtype(np.int8),
    "ubyteValue": np.dtype(np.uint8),
    "shortValue": np.dtype(np.int16),
    "ushortValue": np.dtype(np.uint16),
    "intValue": np.dtype(np.int32),
    "uintValue": np.dtype(np.uint32),
    "longValue": np.dtype(np.int64),
    "ulongValue": np.dtype(np.uint64),
    "floatValue": np.dtype(np.float32),
    "doubleValue": np.dtype(np.float64),
}


class ValueKind(enum.StrEnum):
    """What shape of data a PV's ``value`` holds."""

    NONE = "none"  # nil or no `value` field
    SCALAR = "scalar"  # numeric numpy scalar (int64, uint64, float32, float64)
    BOOL = "bool"  # numpy.bool_
    STRING = "string"  # str
    ENUM = "enum"  # EnumValue
    ARRAY = "array"  # 1-D numpy array, numeric or bool (waveforms)
    STRING_ARRAY = "string_array"  # tuple[str, ...]
    TABLE = "table"  # TableValue (NTTable)
    NDARRAY = "ndarray"  # NDArrayValue (NTNDArray)
    STRUCT = "struct"  # anything else: kept as the decoded structure


@dataclass(frozen=True, slots=True)
class EnumValue:
    """NTEnum value: the selected index and the choices at the time of the sample."""

    index: int
    choices: tuple[str, ...]

    @property
    def label(self) -> str | None:
        return self.choices[self.index] if 0 <= self.index < len(self.choices) else None


@dataclass(frozen=True, slots=True)
class TableValue:
    """NTTable value: ``labels`` and the columns (under ``value`` on the wire), typed."""

    labels: tuple[str, ...]
    columns: dict[str, Any]  # column name -> 1-D numpy array (or tuple[str, ...] for strings)


@dataclass(frozen=True, slots=True)
class Dimension:
    size: int
    offset: int = 0
    full_size: int = 0
    binning: int = 1
    reverse: bool = False


@dataclass(frozen=True, slots=True)
class NDArrayValue:
    """NTNDArray value: flat pixel data (dtype from the union field) and its dimensions.

    ``dimension[0]`` is the fastest-varying axis (x) as in areaDetector, so the numpy
    (C-order) shape is the reversed list of sizes: :attr:`shape`, :meth:`image`.
    """

    data: npt.NDArray[Any]
    union_field: str
    dimensions: tuple[Dimension, ...]
    codec: str = ""
    unique_id: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(d.size for d in reversed(self.dimensions)) or (self.data.size,)

    def image(self) -> npt.NDArray[Any]:
        """The pixels reshaped to :attr:`shape` (flat when sizes do not match the data)."""
        shape = self.shape
        if int(np.prod(shape)) == self.data.size:
            return self.data.reshape(shape)
        return self.data


def _int_scalar(value: int) -> np.generic:
    return np.uint64(value) if value > INT64_MAX else np.int64(value)


def _float_scalar(value: float, float32: bool) -> np.generic:
    return np.float32(value) if float32 else np.float64(value)


def typed_array(items: list[Any], float32: bool) -> tuple[ValueKind, Any]:
    """Type a msgpack array (scalar array / waveform)."""
    if not items:
        return ValueKind.ARRAY, np.empty(0, dtype=np.float32 if float32 else np.float64)
    first = items[0]
    if isinstance(first, bool):
        if all(isinstance(x, bool) for x in items):
            return ValueKind.ARRAY, np.array(items, dtype=np.bool_)
    elif isinstance(first, str):
        if all(isinstance(x, str) for x in items):
            return ValueKind.STRING_ARRAY, tuple(items)
    elif isinstance(first, float):
        try:
            return ValueKind.ARRAY, np.array(items, dtype=np.float32 if float32 else np.float64)
        except (TypeError, ValueError):
            pass
    elif isinstance(first, int):
        try:
            return ValueKind.ARRAY, np.array(items, dtype=np.int64)
        except OverflowError:
            try:
                return ValueKind.ARRAY, np.array(items, dtype=np.uint64)
            except (OverflowError, TypeError, ValueError):
                pass
        except (TypeError, ValueError):
            # a float among ints cannot happen in pvData; keep it as float64
            try:
                return ValueKind.ARRAY, np.array(items, dtype=np.float64)
            except (TypeError, ValueError):
                pass
    return ValueKind.STRUCT, items


def _typed_ndarray(data: Mapping[str, Any]) -> NDArrayValue | None:
    union = data.get("value")
    if not isinstance(union, Mapping) or len(union) != 1:
        return None
    (field_name, pixels), = union.items()
    dtype = NDARRAY_UNION_DTYPES.get(field_name)
    if dtype is None or not isinstance(pixels, list):
        return None
    try:
        array = np.array(pixels, dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        return None
    dims: list[Dimension] = []
    for dim in data.get("dimension") or ():
        if isinstance(dim, Mapping):
            dims.append(
                Dimension(
                    size=int(dim.get("size", 0) or 0),
                    offset=int(dim.get("offset", 0) or 0),
                    full_size=int(dim.get("fullSize", 0) or 0),
                    binning=int(dim.get("binning", 1) or 1),
                    reverse=bool(dim.get("reverse", False)),
                )
            )
    codec = data.get("codec")
    codec_name = codec.get("name", "") if isinstance(codec, Mapping) else ""
    unique_id = data.get("uniqueId", 0)
    return NDArrayValue(
        data=array,
        union_field=field_name,
        dimensions=tuple(dims),
        codec=codec_name if isinstance(codec_name, str) else "",
        unique_id=unique_id if isinstance(unique_id, int) else 0,
    )


def _typed_table(data: Mapping[str, Any], float32_paths: frozenset[str]) -> TableValue | None:
    columns_raw = data.get("value")
    labels = data.get("labels")
    if not isinstance(columns_raw, Mapping):
        return None
    columns: dict[str, Any] = {}
    for name, column in columns_raw.items():
        if not isinstance(name, str) or not isinstance(column, list):
            return None
        kind, typed = typed_array(column, f"value.{name}" in float32_paths)
        if kind not in (ValueKind.ARRAY, ValueKind.STRING_ARRAY):
            return None
        columns[name] = typed
    label_tuple = tuple(x for x in labels if isinstance(x, str)) if isinstance(labels, list) else ()
    return TableValue(labels=label_tuple, columns=columns)


def typed_value(data: Mapping[str, Any], float32_paths: frozenset[str]) -> tuple[ValueKind, Any]:
    """Type the ``value`` field of a PV structure; see the module docstring."""
    if "value" not in data:
        return ValueKind.NONE, None
    value = data["value"]
    if value is None:
        return ValueKind.NONE, None
    if isinstance(value, bool):
        return ValueKind.BOOL, np.bool_(value)
    if isinstance(value, int):
        return ValueKind.SCALAR, _int_scalar(value)
    if isinstance(value, float):
        return ValueKind.SCALAR, _float_scalar(value, "value" in float32_paths)
    if isinstance(value, str):
        return ValueKind.STRING, value
    if isinstance(value, list):
        return typed_array(value, "value" in float32_paths)
    if isinstance(value, Mapping):
        index = value.get("index")
        choices = value.get("choices")
        if (
            isinstance(index, int)
            and not isinstance(index, bool)
            and isinstance(choices, list)
            and all(isinstance(c, str) for c in choices)
        ):
            return ValueKind.ENUM, EnumValue(index, tuple(choices))
        if len(value) == 1 and next(iter(value)) in NDARRAY_UNION_DTYPES:
            nd = _typed_ndarray(data)
            if nd is not None:
                return ValueKind.NDARRAY, nd
        if "labels" in data or all(isinstance(c, list) for c in value.values()):
            table = _typed_table(data, float32_paths)
            if table is not None:
                return ValueKind.TABLE, table
    return ValueKind.STRUCT, value


def unpack_lenient(payload: bytes | memoryview) -> Any:
    """``msgpack.unpackb`` that keeps what strict decoding refuses inside a well-formed
    object: strings that are not UTF-8 as surrogate escapes, non-string map keys. Raises what
    msgpack raises on bytes that are not msgpack."""
    return msgpack.unpackb(payload, unicode_errors="surrogateescape", strict_map_key=False)


def replace_surrogates(text: str) -> str:
    """``text`` with the lone surrogates :func:`unpack_lenient` keeps for bytes that were not
    UTF-8 (a Latin-1 ``°C``) replaced by U+FFFD, for what must be valid UTF-8 (HDF5 strings,
    msgpack out)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
    return text


def _decode_lenient(payload: bytes | memoryview) -> dict[str, Any]:
    """Decode a lazily-kept PV map that strict ``msgpack.unpackb`` refused.

    The wire decoder checked the bytes are one complete msgpack map, so strict decoding fails
    only on content msgpack-python refuses inside it (invalid UTF-8 in a string, a non-string
    map key, a malformed timestamp extension). Rather than failing a sink that reads
    ``data``, strings keep their bytes as surrogate escapes and non-string keys are allowed;
    what cannot be decoded even so becomes ``{}``.
    """
    try:
        obj = unpack_lenient(payload)
    except Exception:  # msgpack raises many types; see the docstring
        return {}
    return obj if isinstance(obj, dict) else {}


@functools.cache
def _float32_reader() -> Callable[[bytes, int, int | None], frozenset[str]]:
    from recorder.client.wire import payload_float32_paths  # import cycle: wire imports us

    return payload_float32_paths


_unpackb = msgpack.unpackb


class PVSample:
    """One PV value as the gateway sent it, with typed accessors.

    ``data`` is the decoded PV structure (``value``, ``alarm``, ``timeStamp``, ``display`` ...)
    exactly as msgpack gave it, so nothing the gateway sent is lost. :attr:`value` and
    :attr:`kind` are computed on first use (the assembler never needs them; sinks do).

    Two ways to build one:

    * ``PVSample(pv, data, float32_paths)``: from the decoded structure (eager);
    * :meth:`from_raw`: from the message bytes and the position of the PV's msgpack map in
      them (lazy; what the wire decoder does). ``data`` is then decoded on first access and
      ``float32_paths`` read from the raw bytes on first access (both cached), and
      :attr:`raw` gives the PV's msgpack bytes (for lossless storage or hashing).

    Lazy decoding is not thread-safe in the sense that two threads reading ``data`` of the
    same fresh sample at once may both decode it (one result is kept; they are equal).
    """

    __slots__ = ("_data", "_end", "_f32", "_msg", "_start", "_typed", "pv")

    def __init__(
        self, pv: str, data: Mapping[str, Any], float32_paths: frozenset[str] = frozenset()
    ) -> None:
        self.pv = pv
        self._data: Mapping[str, Any] | None = data
        self._f32: frozenset[str] | None = float32_paths
        self._msg: bytes | None = None
        self._start = 0
        self._end: int | None = None
        self._typed: tuple[ValueKind, Any] | None = None

    @classmethod
    def from_raw(cls, pv: str, raw: bytes, start: int, end: int | None = None) -> PVSample:
        """A sample whose PV map is the msgpack object ``raw[start:end]`` (``end`` None: to
        the end of ``raw``), decoded lazily.

        The caller vouches that the slice holds exactly one complete msgpack map (the wire
        decoder checks it). ``raw`` is kept, not copied.
        """
        sample = cls.__new__(cls)
        sample.pv = pv
        sample._data = None
        sample._f32 = None
        sample._msg = raw
        sample._start = start
        sample._end = end
        sample._typed = None
        return sample

    @property
    def data(self) -> Mapping[str, Any]:
        data = self._data
        if data is None:
            payload = memoryview(self._msg)[self._start : self._end]  # type: ignore[arg-type]
            try:
                data = _unpackb(payload)
            except Exception:  # msgpack raises many types; see _decode_lenient
                data = _decode_lenient(payload)
            if data.__class__ is not dict:  # from_raw given something else than a map
                data = {}
            self._data = data
        return data

    @data.setter
    def data(self, value: Mapping[str, Any]) -> None:
        self._data = value
        self._typed = None

    @property
    def float32_paths(self) -> frozenset[str]:
        paths = self._f32
        if paths is None:
            paths = self._f32 = _float32_reader()(self._msg or b"", self._start, self._end)
        return paths

    @float32_paths.setter
    def float32_paths(self, value: frozenset[str]) -> None:
        self._f32 = value
        self._typed = None

    @property
    def raw(self) -> bytes | None:
        """The PV's msgpack bytes as received (lazily-built samples), else None."""
        msg = self._msg
        if msg is None:
            return None
        return msg[self._start : self._end]

    def raw_span(self) -> tuple[bytes, int, int] | None:
        """Zero-copy :attr:`raw`: (message bytes, start, end) with ``raw == msg[start:end]``;
        None for an eagerly-built sample. For many samples at once see :data:`RAW_MESSAGE`."""
        msg = self._msg
        if msg is None:
            return None
        end = self._end
        return msg, self._start, len(msg) if end is None else end

    def _typing(self) -> tuple[ValueKind, Any]:
        if self._typed is None:
            self._typed = typed_value(self.data, self.float32_paths)
        return self._typed

    @property
    def kind(self) -> ValueKind:
        return self._typing()[0]

    @property
    def value(self) -> Any:
        return self._typing()[1]

    @property
    def timestamp_ns(self) -> int | None:
        """The PV's EPICS ``timeStamp`` as ns since the Unix epoch (None if absent)."""
        ts = self.data.get("timeStamp")
        if not isinstance(ts, Mapping):
            return None
        seconds = ts.get("secondsPastEpoch")
        nanos = ts.get("nanoseconds", 0)
        if not isinstance(seconds, int) or not isinstance(nanos, int):
            return None
        return seconds * 1_000_000_000 + nanos

    def _alarm(self, key: str) -> Any:
        alarm = self.data.get("alarm")
        return alarm.get(key) if isinstance(alarm, Mapping) else None

    @property
    def severity(self) -> int | None:
        value = self._alarm("severity")
        return value if isinstance(value, int) else None

    @property
    def status(self) -> int | None:
        value = self._alarm("status")
        return value if isinstance(value, int) else None

    @property
    def alarm_message(self) -> str | None:
        value = self._alarm("message")
        return value if isinstance(value, str) else None

    def __repr__(self) -> str:
        return f"PVSample(pv={self.pv!r}, kind={self.kind.value}, value={self.value!r})"


# Bulk zero-copy access to lazily-built samples, for ``map()`` over many samples (C speed):
# the message bytes (None for an eagerly-built sample), the PV map's start in them, and its
# end (None: the end of the message). ``sample.raw == msg[start:end]``.
RAW_MESSAGE: Callable[[PVSample], bytes | None] = operator.attrgetter("_msg")
RAW_START: Callable[[PVSample], int] = operator.attrgetter("_start")
RAW_END: Callable[[PVSample], int | None] = operator.attrgetter("_end")
