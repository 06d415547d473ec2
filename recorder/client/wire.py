"""Gateway bytes -> typed messages (pure code: no Kafka, no I/O).

What this module knows about the wire (``/work/shared/research/k2eg-protocol*.md``):

* Every gateway message carries one Kafka header, ``k2eg-ser-type``: ``Msgpack``, ``Json`` or
  ``Msgpack-Compact``. It is compared case-insensitively and only msgpack is decoded.
* Snapshot topics carry three message types, told apart by ``message_type``:
  header (0) ``{message_type, snapshot_name, timestamp, iter_index}``, data (1)
  ``{message_type, timestamp, iter_index, "<pv>": {...}}`` and tail (2)
  ``{message_type, error, [error_message], iter_index, timestamp, snapshot_name}``.
  Newer gateways add ``msg_seq``, ``submission_seq``, ``last_submission_data`` and
  ``total_messages`` (the *sequenced* generation); the storage-node branch adds
  ``header_timestamp``. All of them are optional here, and unknown extra keys are tolerated:
  the PV of a data message is the one key that is not known metadata and holds a map.
* ``timestamp`` is wall-clock milliseconds on gateway main; a newer document says
  nanoseconds. :func:`to_ns` tells them apart by magnitude (> 1e15 means ns).
* PV values are msgpack maps mirroring the pvData structure. msgpack-python decodes float32
  and float64 to the same Python ``float``, so the float width is recovered from the raw bytes
  here (:func:`float32_paths`) and handed to :class:`~recorder.client.values.PVSample`.
* Known gateway bug, kept as sent: ``short[]`` arrays are packed through ``uint16``, so a
  negative short ``v`` arrives as ``65536 + v`` (a positive msgpack uint16); it cannot be
  detected in general because an ``ushort[]`` looks the same. Typing gives ``int64`` values.

Data messages without decoding the PV
-------------------------------------
Nearly all traffic is data messages, and the core needs only their metadata and the PV name.
``_fast_data`` matches the gateway's layout (metadata keys in its order, unsigned ints, then
the PV key) with one regex, checks with a C-level ``msgpack.Unpacker.skip`` that the PV map is
exactly one complete msgpack object running to the end of the message (so truncation,
garbage and trailing bytes are still rejected, as ``not_msgpack``), and builds the sample with
:meth:`PVSample.from_raw`: ``data`` is decoded and ``float32_paths`` read from the bytes on
first use. Anything else goes through the full decode below, the reference behaviour. Not
checked eagerly on the fast path: content that is structurally valid msgpack but that
msgpack-python refuses to build (a non-UTF-8 string inside the PV, a non-string map key);
such a PV is decoded leniently on access (see :class:`PVSample`) instead of being dropped.
The full decoding keeps text that is not UTF-8 too (as surrogate escapes: a tail's error
message, a PV map in another layout); a PV name that is not UTF-8 is refused (``bad_type``).
The iteration assembler's batched hot path (:meth:`IterationAssembler.feed_run
<recorder.client.assembler.IterationAssembler.feed_run>`) applies the same checks inline, with
``_match_sequenced``/``_match_legacy`` and the name cache of this module; anything it does not
take comes here.

Float32 detection
-----------------
Every float32 field of a PV's structure is named as a dotted path (``value``,
``value.<column>`` of an NTTable, ``valueAlarm.lowAlarmLimit`` of a float PV; decision 0010).
A PV map without a single ``0xca`` byte holds no float32 and is not walked at all (most
double PVs). Otherwise a small msgpack walker locates the PV map structurally and descends
into nested maps (up to 16 levels; maps inside arrays, such as NTNDArray attributes, are not
looked into). Long arrays are skipped without visiting each element in Python: a float
array's markers are checked with one strided numpy comparison, anything else is skipped by
``msgpack.Unpacker.skip``. When ``value`` is the first field (NTScalar, NTScalarArray) it is
read first, and the other fields only if a marker byte follows it. Malformed bytes give no
paths, never an exception.
"""

from __future__ import annotations

import contextlib
import enum
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

import msgpack
import numpy as np

from recorder.client.properties import SNAPSHOT_METADATA_KEYS
from recorder.client.values import PVSample, unpack_lenient
from recorder.errors import ProtocolError

__all__ = [
    "MAX_MESSAGE_BYTES",
    "REPLY_METADATA_KEYS",
    "SERIALIZATION_HEADER",
    "SNAPSHOT_METADATA_KEYS",
    "Data",
    "DecodeError",
    "Header",
    "MessageType",
    "RawMessage",
    "Record",
    "Reply",
    "SnapshotMessage",
    "Tail",
    "decode_reply",
    "decode_snapshot_message",
    "float32_paths",
    "payload_float32_paths",
    "serialization_of",
    "to_ns",
]

MAX_MESSAGE_BYTES: int = 64 * 1024 * 1024
"""Messages larger than this are rejected as ``too_large`` (each decode call can override)."""

SERIALIZATION_HEADER: Final = "k2eg-ser-type"
_MSGPACK: Final = "msgpack"
_NS_THRESHOLD: Final = 10**15  # a timestamp above this is already in nanoseconds
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1

REPLY_METADATA_KEYS: frozenset[str] = frozenset(
    {"error", "reply_id", "message", "publishing_topic", "msg_seq", "message-size"}
)
_ALL_METADATA_KEYS: Final = SNAPSHOT_METADATA_KEYS | REPLY_METADATA_KEYS
_NO_KEYS: Final[frozenset[str]] = frozenset()

_EMPTY: Final[frozenset[str]] = frozenset()


# --------------------------------------------------------------------------------------------
# data classes
# --------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Record:
    """What the Kafka adapter hands to the core, one per consumed message."""

    topic: str
    partition: int
    offset: int
    value: bytes | None
    headers: list[tuple[str, bytes]] | None
    timestamp_ms: int | None = None  # Kafka message timestamp, if any


class RawMessage(Protocol):
    """A consumed Kafka message as ``confluent_kafka.Message`` exposes it (the adapter's raw
    mode hands those to the core instead of :class:`Record`)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def value(self) -> bytes | None: ...
    def headers(self) -> Any: ...  # list[tuple[str, bytes]] | None from a consumer


def kafka_time_ms(message: Any) -> int | None:
    """The Kafka timestamp (ms) of a consumed ``confluent_kafka.Message``, None when it has
    none (``TIMESTAMP_NOT_AVAILABLE``) or the object offers none (a test's stand-in)."""
    timestamp = getattr(message, "timestamp", None)
    if timestamp is None:
        return None
    kind, value = timestamp()
    return int(value) if kind else None


class MessageType(enum.IntEnum):
    HEADER = 0
    DATA = 1
    TAIL = 2


@dataclass(slots=True)
class Header:
    snapshot_name: str | None
    iter_index: int
    timestamp_ns: int
    msg_seq: int | None
    submission_seq: int | None


@dataclass(slots=True)
class Data:
    iter_index: int
    timestamp_ns: int
    sample: PVSample
    msg_seq: int | None
    submission_seq: int | None
    last_submission_data: bool
    header_timestamp_ns: int | None
    raw: bytes | None = None  # the message bytes (legacy duplicate detection); added to contract


@dataclass(slots=True)
class Tail:
    iter_index: int
    timestamp_ns: int
    snapshot_name: str | None
    error: int
    error_message: str
    msg_seq: int | None
    total_messages: int | None
    submission_seq: int | None
    header_timestamp_ns: int | None


SnapshotMessage = Header | Data | Tail


@dataclass(slots=True)
class Reply:
    """A message on the reply topic."""

    reply_id: str
    error: int
    message: str
    publishing_topic: str | None
    samples: dict[str, PVSample]  # PV keys of get / one-shot snapshot replies
    fields: dict[str, Any]  # every other key, as decoded
    kafka_time_ms: int | None = None  # the message's Kafka timestamp, when known


class DecodeError(ProtocolError):
    """A message that cannot be decoded; :attr:`reason` is a short counter key.

    Reasons: ``empty`` (no value), ``no_header``, ``wrong_serialization``, ``too_large``,
    ``not_msgpack``, ``not_a_map``, ``missing_key``, ``bad_type``, ``unknown_message_type``,
    ``ambiguous_pv`` (a data message with several candidate PV maps).
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------------------
# envelope
# --------------------------------------------------------------------------------------------
Headers = Iterable[tuple[str, bytes | str | None]] | None


def serialization_of(headers: Headers) -> str | None:
    """The ``k2eg-ser-type`` header value, lower-cased; None when there is no such header."""
    if not headers:
        return None
    for key, value in headers:
        if key == SERIALIZATION_HEADER or (
            isinstance(key, str) and key.lower() == SERIALIZATION_HEADER
        ):
            if value is None:
                return ""
            if isinstance(value, bytes | bytearray):
                return bytes(value).decode("utf-8", "replace").strip().lower()
            return str(value).strip().lower()
    return None


_MSGPACK_HEADER_VALUES: Final = frozenset({b"Msgpack", b"msgpack", b"MSGPACK"})


def _check_envelope(value: Any, headers: Headers, max_bytes: int) -> None:
    # fast path: the one header the gateway sets, as the gateway spells it
    if headers.__class__ is list and len(headers) == 1:
        key, hv = headers[0]
        if key == SERIALIZATION_HEADER and hv.__class__ is bytes and hv in _MSGPACK_HEADER_VALUES:
            ser: str | None = _MSGPACK
        else:
            ser = serialization_of(headers)
    else:
        ser = serialization_of(headers)
    if ser is None:
        raise DecodeError("no_header", f"no {SERIALIZATION_HEADER} header")
    if ser != _MSGPACK:
        raise DecodeError("wrong_serialization", ser)
    if value is None:
        raise DecodeError("empty", "message has no value")
    if not isinstance(value, bytes | bytearray | memoryview):
        raise DecodeError("bad_type", f"value is {type(value).__name__}, not bytes")
    if len(value) > max_bytes:
        raise DecodeError("too_large", f"{len(value)} bytes > {max_bytes}")


def _unpack(value: bytes) -> Any:
    """A reply's map; content strict decoding refuses (a string that is not UTF-8, e.g. a
    Latin-1 unit) is kept as snapshot data keeps it (:func:`unpack_lenient`)."""
    try:
        return msgpack.unpackb(value)
    except Exception as exc:  # msgpack raises many types on garbage; all mean the same
        with contextlib.suppress(Exception):
            return unpack_lenient(value)
        raise DecodeError("not_msgpack", f"{type(exc).__name__}: {exc}") from None


def to_ns(timestamp: int) -> int:
    """Gateway timestamp -> ns since the Unix epoch: ms on gateway main, ns if > 1e15. A
    timestamp whose ns do not fit an int64 (a faulty clock: ms past the year 2262) is 0, not
    known, as the file writes a missing header or tail time."""
    ns = timestamp if timestamp > _NS_THRESHOLD else timestamp * 1_000_000
    return ns if _INT64_MIN <= ns <= _INT64_MAX else 0


def _opt_uint(obj: Mapping[str, Any], key: str) -> int | None:
    value = obj.get(key)
    if value.__class__ is int and value >= 0:
        return value
    return None


def _opt_count(obj: Mapping[str, Any], key: str) -> int | None:
    """An unsigned int a file keeps as an int64; None beyond it, as any bad optional field."""
    value = _opt_uint(obj, key)
    return value if value is None or value <= _INT64_MAX else None


def _opt_ts(obj: Mapping[str, Any], key: str) -> int | None:
    value = obj.get(key)
    if value.__class__ is int:
        return to_ns(value)
    return None


def _opt_str(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) else None


def _required_int(obj: Mapping[str, Any], key: str) -> int:
    value = obj.get(key)
    if value.__class__ is int:
        return value
    if value is None and key not in obj:
        raise DecodeError("missing_key", key)
    raise DecodeError("bad_type", f"{key} is {type(value).__name__}, not int")


# --------------------------------------------------------------------------------------------
# snapshot messages
# --------------------------------------------------------------------------------------------
def decode_snapshot_message(
    value: bytes | None, headers: Headers, *, max_bytes: int = MAX_MESSAGE_BYTES
) -> SnapshotMessage:
    """Decode one snapshot-topic message; raise :class:`DecodeError` for anything else."""
    # hot path, inlined: the gateway's one header as it spells it, a bytes value
    if (
        headers.__class__ is list
        and len(headers) == 1
        and headers[0][0] == SERIALIZATION_HEADER
        and headers[0][1].__class__ is bytes
        and headers[0][1] in _MSGPACK_HEADER_VALUES
        and value.__class__ is bytes
        and len(value) <= max_bytes
    ):
        raw: bytes = value
    else:
        _check_envelope(value, headers, max_bytes)
        raw = bytes(value)  # type: ignore[arg-type]
    # data messages (nearly all traffic): metadata parsed by hand, the PV map left undecoded
    if raw and 0x84 <= raw[0] <= 0x88:
        try:
            fast = _fast_data(raw)
        except (IndexError, ValueError, msgpack.UnpackException):  # truncated, garbage
            fast = None
            _reset_skipper()
        if fast is not None:
            return fast
    try:
        obj = _unpackb(raw)
    except UnicodeDecodeError:  # a string that is not UTF-8: kept, as in PV maps
        try:
            obj = _unpackb(raw, unicode_errors="surrogateescape")
        except Exception as exc:
            raise DecodeError("not_msgpack", f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:  # msgpack raises many types on garbage; all mean the same
        raise DecodeError("not_msgpack", f"{type(exc).__name__}: {exc}") from None
    if obj.__class__ is not dict:
        raise DecodeError("not_a_map", type(obj).__name__)
    if len(obj) == 4 and obj.get("message_type") == 1:
        # legacy data message: message_type, timestamp, iter_index and the PV (last)
        iter_index = obj.get("iter_index")
        timestamp = obj.get("timestamp")
        pv_key: Any = next(reversed(obj))
        pv_data = obj[pv_key]
        if (
            iter_index.__class__ is int
            and _INT64_MIN <= iter_index <= _INT64_MAX
            and timestamp.__class__ is int
            and pv_data.__class__ is dict
            and pv_key.__class__ is str
            and pv_key not in SNAPSHOT_METADATA_KEYS
            and "\x00" not in pv_key
            and _is_utf8(pv_key)
            and obj["message_type"].__class__ is int
        ):
            return Data(
                iter_index,
                to_ns(timestamp),
                PVSample(pv_key, pv_data, _pv_float32_paths(raw, pv_key)),
                None,
                None,
                False,
                None,
                raw,
            )
    return snapshot_message_from_map(obj, raw)


_unpackb = msgpack.unpackb

# ---- data messages without decoding the PV ------------------------------------------------
# The gateway's layout (protocol §3.2, sequenced addendum), after the fixmap header byte:
# message_type 1, timestamp, iter_index, [msg_seq], [submission_seq], [last_submission_data],
# [header_timestamp], then the PV key (str) whose map runs to the end. One C-level regex match
# checks that layout and captures each unsigned int (marker + payload bytes) and the PV key's
# str header; anything else takes the full decoding path.
_UINT: Final = rb"([\x00-\x7f]|\xcc.|\xcd..|\xce....|\xcf........)"
_DATA_LAYOUT: Final = re.compile(
    rb"\xacmessage_type\x01"
    rb"\xa9timestamp"
    + _UINT
    + rb"\xaaiter_index"
    + _UINT
    + rb"(?:\xa7msg_seq"
    + _UINT
    + rb")?"
    + rb"(?:\xaesubmission_seq"
    + _UINT
    + rb")?"
    + rb"(?:\xb4last_submission_data([\xc2\xc3]))?"
    + rb"(?:\xb0header_timestamp"
    + _UINT
    + rb")?"
    + rb"([\xa0-\xbf]|\xd9.|\xda..)",
    re.DOTALL,
)
_match_data: Final = _DATA_LAYOUT.match
# the two layouts nearly all traffic has, matched without optional groups or a count check:
# legacy (4 keys) and sequenced without last_submission_data (6 keys)
_KEY: Final = rb"([\xa0-\xbf]|\xd9.|\xda..)"
_match_legacy: Final = re.compile(
    rb"\xacmessage_type\x01\xa9timestamp" + _UINT + rb"\xaaiter_index" + _UINT + _KEY, re.DOTALL
).match
_match_sequenced: Final = re.compile(
    rb"\xacmessage_type\x01\xa9timestamp"
    + _UINT
    + rb"\xaaiter_index"
    + _UINT
    + rb"\xa7msg_seq"
    + _UINT
    + rb"\xaesubmission_seq"
    + _UINT
    + _KEY,
    re.DOTALL,
).match
_UINTS: dict[bytes, int] = {}  # encoded uint -> value (bounded cache: values repeat a lot)
_PV_NAMES: dict[bytes, str] = {}  # encoded PV key -> str (bounded cache; interns the names)
_CACHE_MAX: Final = 65536
_TRUE: Final = b"\xc3"
_tls = threading.local()


def index_fits(encoded: bytes) -> bool:
    """Whether an encoded uint (``_UINT``) is an iter_index files can keep (an int64)."""
    return encoded[0] != 0xCF or encoded[1] < 0x80


def _uint_of(encoded: bytes) -> int:
    value = encoded[0] if len(encoded) == 1 else int.from_bytes(encoded[1:], "big")
    if len(_UINTS) >= _CACHE_MAX:
        _UINTS.clear()
    _UINTS[encoded] = value
    return value


def _skipper() -> msgpack.Unpacker:
    """This thread's reusable Unpacker, used only to *skip* (validate) PV maps."""
    try:
        return _tls.unpacker  # type: ignore[no-any-return]
    except AttributeError:
        unpacker = _tls.unpacker = msgpack.Unpacker()
        return unpacker


def _reset_skipper() -> None:
    """Drop this thread's Unpacker (after an error it may hold unread bytes)."""
    _tls.__dict__.pop("unpacker", None)


def _fast_data(raw: bytes) -> Data | None:
    """A data message parsed without decoding its PV map, or None to take the full path.

    Accepted: the gateway's data layout (see ``_DATA_LAYOUT``: known metadata keys in the
    gateway's order, unsigned integer values, ``last_submission_data`` true/false), the map
    header's count matching, then the PV key (a str that is not metadata) holding a map that
    is exactly one complete msgpack object reaching the end of ``raw`` (checked by a C-level
    ``Unpacker.skip``). Anything else (other keys or order, nil/str/negative values, a non-map
    PV, truncation, trailing bytes, other message types) returns None and the caller decodes
    the whole message, which stays the reference behaviour and raises the right
    :class:`DecodeError`. The result equals the full path's, except that the sample is built
    with :meth:`PVSample.from_raw` (decoded on first use).

    May raise IndexError, ValueError or ``msgpack.UnpackException`` on malformed input (the
    caller drops this thread's skipping Unpacker and falls back).
    """
    n = raw[0]
    m = None
    if n == 0x86:
        m = _match_sequenced(raw, 1)
        if m is not None:
            ts_b, idx_b, seq_b, sub_b, key_b = m.groups()
            lsd_b = hts_b = None
    elif n == 0x84:
        m = _match_legacy(raw, 1)
        if m is not None:
            ts_b, idx_b, key_b = m.groups()
            seq_b = sub_b = lsd_b = hts_b = None
    if m is None:
        m = _match_data(raw, 1)
        if m is None:
            return None
        ts_b, idx_b, seq_b, sub_b, lsd_b, hts_b, key_b = m.groups()
        # the map header's count: message_type, timestamp, iter_index, the optionals, the PV
        if n - 0x80 != (
            4
            + (seq_b is not None)
            + (sub_b is not None)
            + (lsd_b is not None)
            + (hts_b is not None)
        ):
            return None
    if not index_fits(idx_b):  # an iter_index beyond int64: the full path refuses it
        return None
    kstart = m.end()
    b = key_b[0]
    kend = kstart + (b & 0x1F if b < 0xC0 else int.from_bytes(key_b[1:], "big"))  # fixstr, str8/16
    size = len(raw)
    if kend >= size:
        return None
    b = raw[kend]
    if b < 0x80 or (b > 0x8F and b != 0xDE and b != 0xDF):  # noqa: PLR1714 (hot path)
        return None  # the PV value is not a map
    kbytes = raw[kstart:kend]
    pv = _PV_NAMES.get(kbytes)
    if pv is None:
        pv = kbytes.decode("utf-8")  # UnicodeDecodeError is a ValueError: full path
        if pv in SNAPSHOT_METADATA_KEYS or "\x00" in pv:  # NUL: the full path refuses it
            return None
        if len(_PV_NAMES) >= _CACHE_MAX:
            _PV_NAMES.clear()
        _PV_NAMES[kbytes] = pv
    try:
        unpacker = _tls.unpacker
    except AttributeError:
        unpacker = _skipper()
    before = unpacker.tell()
    unpacker.feed(raw[kend:])
    unpacker.skip()  # FormatError/StackError (ValueError) on garbage, OutOfData if truncated
    if unpacker.tell() - before != size - kend:  # trailing bytes after the PV map
        _reset_skipper()
        return None
    uints = _UINTS
    ts = uints.get(ts_b)
    if ts is None:
        ts = _uint_of(ts_b)
    idx = uints.get(idx_b)
    if idx is None:
        idx = _uint_of(idx_b)
    seq: int | None = None
    if seq_b is not None:
        seq = uints.get(seq_b)
        if seq is None:
            seq = _uint_of(seq_b)
    sub: int | None = None
    if sub_b is not None:
        sub = uints.get(sub_b)
        if sub is None:
            sub = _uint_of(sub_b)
    hts: int | None = None
    if hts_b is not None:
        hts = to_ns(_uint_of(hts_b))
    ts = ts if ts > _NS_THRESHOLD else ts * 1_000_000
    return Data(
        idx,
        ts if ts <= _INT64_MAX else 0,  # to_ns, inline: a uint is never below int64
        PVSample.from_raw(pv, raw, kend),
        seq,
        sub,
        lsd_b == _TRUE,
        hts,
        raw,
    )


def payload_float32_paths(raw: bytes, start: int = 0, end: int | None = None) -> frozenset[str]:
    """float32 paths of the PV map encoded at ``raw[start:end]`` (see :func:`float32_paths`).

    Without a float32 marker byte in the map there is nothing to walk. When ``value`` is the
    first field (NTScalar, NTScalarArray) it is read first, and the other fields only if a
    marker byte follows it. Malformed bytes give an empty set.
    """
    if end is not None and end != len(raw):
        # a map inside a larger buffer (e.g. one blob of many samples): copy just the map
        raw = raw[start:end]
        start = 0
    try:
        kind, count, pos = _container(raw, start)
        if kind != 1:
            return _EMPTY
        if raw.find(b"\xca", pos) < 0:  # not a single float32 anywhere in the map
            return _EMPTY
        if raw.startswith(b"\xa5value", pos):
            # value first (NTScalar, NTScalarArray): look at it, then at the other fields only
            # if a float32 marker can be among them (a float PV's valueAlarm limits are)
            paths: set[str] = set()
            after = _fields_paths(raw, pos, 1, "", paths)
            if raw.find(b"\xca", after) >= 0:
                _fields_paths(raw, after, count - 1, "", paths)
            return frozenset(paths) if paths else _EMPTY
        found = _pv_map_paths(raw, start)
    except (_TruncatedError, IndexError, ValueError):
        return _EMPTY
    return found[0] if found is not None else _EMPTY


def snapshot_message_from_map(obj: dict[str, Any], raw: bytes | None = None) -> SnapshotMessage:
    """Build a message from a decoded map (``raw``: the bytes, for float32 detection)."""
    mtype = obj.get("message_type")
    if mtype.__class__ is not int:
        if mtype is None and "message_type" not in obj:
            raise DecodeError("missing_key", "message_type")
        raise DecodeError("bad_type", f"message_type is {type(mtype).__name__}")
    iter_index = _required_int(obj, "iter_index")
    if not _INT64_MIN <= iter_index <= _INT64_MAX:  # files keep it as an int64
        raise DecodeError("bad_type", f"iter_index {iter_index} is beyond int64")
    timestamp_ns = to_ns(_required_int(obj, "timestamp"))
    if mtype == 1:
        return _data_from_map(obj, raw, iter_index, timestamp_ns)
    if mtype == 0:
        return Header(
            _opt_str(obj, "snapshot_name"),
            iter_index,
            timestamp_ns,
            _opt_uint(obj, "msg_seq"),
            _opt_uint(obj, "submission_seq"),
        )
    if mtype == 2:
        error = obj.get("error", 0)
        if error.__class__ is not int:
            raise DecodeError("bad_type", f"error is {type(error).__name__}")
        if not _INT64_MIN <= error <= _INT64_MAX:  # files keep it as an int64
            raise DecodeError("bad_type", f"error {error} is beyond int64")
        message = obj.get("error_message", "")
        return Tail(
            iter_index,
            timestamp_ns,
            _opt_str(obj, "snapshot_name"),
            error,
            message if isinstance(message, str) else str(message),
            _opt_uint(obj, "msg_seq"),
            _opt_count(obj, "total_messages"),
            _opt_uint(obj, "submission_seq"),
            _opt_ts(obj, "header_timestamp"),
        )
    raise DecodeError("unknown_message_type", str(mtype))


def _data_from_map(
    obj: dict[str, Any], raw: bytes | None, iter_index: int, timestamp_ns: int
) -> Data:
    known = 3  # message_type, timestamp, iter_index: present (checked by the caller)
    msg_seq = obj.get("msg_seq")
    if msg_seq is not None:
        known += 1
        if msg_seq.__class__ is not int or msg_seq < 0:
            msg_seq = None
    submission_seq = obj.get("submission_seq")
    if submission_seq is not None:
        known += 1
        if submission_seq.__class__ is not int or submission_seq < 0:
            submission_seq = None
    lsd = obj.get("last_submission_data")
    if lsd is not None:
        known += 1
    last = lsd is True or (lsd.__class__ is int and lsd == 1)
    header_ts = obj.get("header_timestamp")
    header_timestamp_ns = None
    if header_ts is not None:
        known += 1
        if header_ts.__class__ is int:
            header_timestamp_ns = to_ns(header_ts)

    # the PV: gateways put it last and send no other key; check that first, else scan
    pv_key: Any = next(reversed(obj))
    pv_data = obj[pv_key]
    if len(obj) != known + 1 or pv_data.__class__ is not dict or pv_key in SNAPSHOT_METADATA_KEYS:
        pv_key, pv_data = _find_pv(obj)
    if pv_key.__class__ is not str:
        raise DecodeError("bad_type", "PV key is not a string")
    if "\x00" in pv_key:  # no EPICS name has one; HDF5 names and strings end at it
        raise DecodeError("bad_type", f"PV name {pv_key!r} contains NUL")
    if not _is_utf8(pv_key):
        raise DecodeError("bad_type", f"PV name {pv_key!r} is not UTF-8")
    paths = _pv_float32_paths(raw, pv_key) if raw else _EMPTY
    return Data(
        iter_index,
        timestamp_ns,
        PVSample(pv_key, pv_data, paths),
        msg_seq,
        submission_seq,
        last,
        header_timestamp_ns,
        raw,
    )


def _is_utf8(text: str) -> bool:
    """``text`` has no surrogate escape (a byte that was not UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _find_pv(obj: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    found: tuple[Any, dict[str, Any]] | None = None
    non_meta = 0
    for key, value in obj.items():
        if key in SNAPSHOT_METADATA_KEYS:
            continue
        non_meta += 1
        if value.__class__ is dict:
            if found is not None:
                raise DecodeError("ambiguous_pv", f"{found[0]!r} and {key!r}")
            found = (key, value)
    if found is None:
        if non_meta:
            raise DecodeError("bad_type", "the PV value is not a map")
        raise DecodeError("missing_key", "no PV key in data message")
    return found


# --------------------------------------------------------------------------------------------
# replies
# --------------------------------------------------------------------------------------------
def decode_reply(
    value: bytes | None, headers: Headers, *, max_bytes: int = MAX_MESSAGE_BYTES
) -> Reply:
    """Decode one reply-topic message; raise :class:`DecodeError` for anything else."""
    _check_envelope(value, headers, max_bytes)
    raw = bytes(value) if value.__class__ is not bytes else value  # type: ignore[arg-type]
    obj = _unpack(raw)
    if obj.__class__ is not dict:
        raise DecodeError("not_a_map", type(obj).__name__)
    reply_id = obj.get("reply_id")
    if not isinstance(reply_id, str):
        if reply_id is None and "reply_id" not in obj:
            raise DecodeError("missing_key", "reply_id")
        raise DecodeError("bad_type", f"reply_id is {type(reply_id).__name__}")
    error = obj.get("error")
    if error.__class__ is not int:
        if error is None and "error" not in obj:
            raise DecodeError("missing_key", "error")
        raise DecodeError("bad_type", f"error is {type(error).__name__}")
    # every map is a PV's: no field of a reply is one, and a PV may be named like one (a get
    # of pva://message is answered {error, reply_id, "message": {...}})
    pv_maps = {
        key: val for key, val in obj.items() if isinstance(key, str) and val.__class__ is dict
    }
    message = "" if "message" in pv_maps else obj.get("message", "")
    topic = obj.get("publishing_topic")
    samples: dict[str, PVSample] = {}
    if len(pv_maps) == 1:
        ((key, val),) = pv_maps.items()
        samples[key] = PVSample(key, val, _pv_float32_paths(raw, key))
    elif pv_maps:
        by_key = _walk_float32(raw, _NO_KEYS)
        for key, val in pv_maps.items():
            samples[key] = PVSample(key, val, by_key.get(key, _EMPTY))
    fields = {
        key: val
        for key, val in obj.items()
        if key not in ("reply_id", "error", "message", "publishing_topic") and key not in samples
    }
    return Reply(
        reply_id,
        error,
        message if isinstance(message, str) else str(message),
        topic if isinstance(topic, str) and topic else None,
        samples,
        fields,
    )


# --------------------------------------------------------------------------------------------
# float32 detection
# --------------------------------------------------------------------------------------------
def _pv_float32_paths(raw: bytes, key: str) -> frozenset[str]:
    """float32 paths of the PV ``key`` in ``raw``: none without a float32 marker
    byte anywhere (most double PVs), else the structural walker."""
    if raw.find(b"\xca") < 0:
        return _EMPTY
    return _walk_key(raw, key)


def float32_paths(raw: bytes, pv: str | None = None) -> frozenset[str]:
    """Which fields of a PV's structure were sent as msgpack float32, as dotted paths:
    ``"value"`` for a float scalar or array, ``"value.<column>"`` for NTTable columns (and an
    NTNDArray's ``value.floatValue``), ``"valueAlarm.lowAlarmLimit"`` etc. for a float PV's
    alarm limits; maps inside arrays (NTNDArray attributes) are not looked into.

    ``raw`` is a whole data or reply message; ``pv`` selects the PV key (default: the first
    top-level key that is not known metadata and holds a map). This is the structural walker:
    exact, but slower than the fast path the decoders use (which it is tested against).
    Malformed bytes give an empty set.
    """
    if pv is not None:
        return _walk_key(raw, pv)
    return next(iter(_walk_float32(raw).values()), _EMPTY)


# ---- a minimal msgpack walker (positions only; never builds Python objects for values) -----
class _TruncatedError(Exception):
    pass


_FIXED_SIZES: Final[dict[int, int]] = {
    0xC0: 0, 0xC2: 0, 0xC3: 0,  # nil, false, true
    0xCA: 4, 0xCB: 8,  # float32, float64
    0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,  # uint
    0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8,  # int
    0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17,  # fixext (type byte + data)
}  # fmt: skip


def _container(raw: bytes, pos: int) -> tuple[int, int, int]:
    """(kind, count, position after the header): kind 1 map, 2 array, 0 other."""
    b = raw[pos]
    if 0x80 <= b <= 0x8F:
        return 1, b & 0x0F, pos + 1
    if 0x90 <= b <= 0x9F:
        return 2, b & 0x0F, pos + 1
    if b == 0xDE:
        return 1, _uint(raw, pos + 1, 2), pos + 3
    if b == 0xDF:
        return 1, _uint(raw, pos + 1, 4), pos + 5
    if b == 0xDC:
        return 2, _uint(raw, pos + 1, 2), pos + 3
    if b == 0xDD:
        return 2, _uint(raw, pos + 1, 4), pos + 5
    return 0, 0, pos


def _uint(raw: bytes, pos: int, size: int) -> int:
    end = pos + size
    if end > len(raw):
        raise _TruncatedError
    return int.from_bytes(raw[pos:end], "big")


def _skip(raw: bytes, pos: int) -> int:
    """Position after the msgpack object at ``pos`` (iterative: no recursion limit)."""
    remaining = 1
    size = len(raw)
    while remaining:
        remaining -= 1
        if pos >= size:
            raise _TruncatedError
        b = raw[pos]
        if b <= 0x7F or b >= 0xE0:
            pos += 1
        elif b <= 0x8F:
            remaining += 2 * (b & 0x0F)
            pos += 1
        elif b <= 0x9F:
            remaining += b & 0x0F
            pos += 1
        elif b <= 0xBF:
            pos += 1 + (b & 0x1F)
        elif b in _FIXED_SIZES:
            pos += 1 + _FIXED_SIZES[b]
        elif b in (0xC4, 0xD9):
            pos += 2 + _uint(raw, pos + 1, 1)
        elif b in (0xC5, 0xDA):
            pos += 3 + _uint(raw, pos + 1, 2)
        elif b in (0xC6, 0xDB):
            pos += 5 + _uint(raw, pos + 1, 4)
        elif b == 0xC7:
            pos += 3 + _uint(raw, pos + 1, 1)
        elif b == 0xC8:
            pos += 4 + _uint(raw, pos + 1, 2)
        elif b == 0xC9:
            pos += 6 + _uint(raw, pos + 1, 4)
        elif b == 0xDC:
            remaining += _uint(raw, pos + 1, 2)
            pos += 3
        elif b == 0xDD:
            remaining += _uint(raw, pos + 1, 4)
            pos += 5
        elif b == 0xDE:
            remaining += 2 * _uint(raw, pos + 1, 2)
            pos += 3
        elif b == 0xDF:
            remaining += 2 * _uint(raw, pos + 1, 4)
            pos += 5
        else:  # 0xC1: never used
            raise _TruncatedError
    if pos > size:
        raise _TruncatedError
    return pos


def _read_str(raw: bytes, pos: int, errors: str = "replace") -> tuple[str | None, int]:
    """(the string at ``pos`` or None if it is not a string, position after the object);
    ``errors="strict"``: None also for invalid UTF-8."""
    b = raw[pos]
    if 0xA0 <= b <= 0xBF:
        start, length = pos + 1, b & 0x1F
    elif b == 0xD9:
        start, length = pos + 2, _uint(raw, pos + 1, 1)
    elif b == 0xDA:
        start, length = pos + 3, _uint(raw, pos + 1, 2)
    elif b == 0xDB:
        start, length = pos + 5, _uint(raw, pos + 1, 4)
    else:
        return None, _skip(raw, pos)
    end = start + length
    if end > len(raw):
        raise _TruncatedError
    try:
        return raw[start:end].decode("utf-8", errors), end
    except UnicodeDecodeError:
        return None, end


_FLOAT_WIDTHS: Final[dict[int, int]] = {0xCA: 5, 0xCB: 9}  # marker + payload bytes
_LONG_ARRAY: Final = 16  # arrays longer than this are skipped without a Python loop
_MAX_DEPTH: Final = 16  # nested maps looked into for float32 fields


def _skip_value(raw: bytes, pos: int) -> int:
    """Position after the object at ``pos``: like :func:`_skip`, but a long array is skipped
    in C (a waveform of same-width floats by one strided check of its markers, any other
    by msgpack's own skipper), not element by element."""
    kind, count, inner = _container(raw, pos)
    if kind != 2 or count <= _LONG_ARRAY:
        return _skip(raw, pos)
    width = _FLOAT_WIDTHS.get(raw[inner]) if inner < len(raw) else None
    if width is not None:
        end = inner + width * count
        if end <= len(raw):
            markers = np.frombuffer(raw, np.uint8, width * count, inner)[::width]
            if bool((markers == raw[inner]).all()):
                return end
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(raw) - pos, 1))
    unpacker.feed(memoryview(raw)[pos:])
    try:
        unpacker.skip()
    except (msgpack.OutOfData, ValueError) as exc:
        raise _TruncatedError from exc
    return pos + unpacker.tell()


def _fields_paths(raw: bytes, pos: int, count: int, prefix: str, paths: set[str], *,
                  depth: int = 0) -> int:
    """Add to ``paths`` the float32 fields of the ``count`` map entries at ``pos`` (a float32,
    or an array whose first element is one; nested maps are looked into, with dotted paths);
    returns the position after them."""
    for _ in range(count):
        name, pos = _read_str(raw, pos)
        if name is None:  # a key that is not a string: its value is not a field of ours
            pos = _skip_value(raw, pos)
            continue
        b = raw[pos]
        if b == 0xCA:
            pos += 5
            if pos > len(raw):
                raise _TruncatedError
            paths.add(prefix + name)
            continue
        kind, n, inner = _container(raw, pos)
        if kind == 2:
            if n and inner < len(raw) and raw[inner] == 0xCA:
                paths.add(prefix + name)
            pos = _skip_value(raw, pos)
        elif kind == 1 and depth < _MAX_DEPTH:
            pos = _fields_paths(raw, inner, n, f"{prefix}{name}.", paths, depth=depth + 1)
        else:
            pos = _skip_value(raw, pos)
    return pos


def _pv_map_paths(raw: bytes, pos: int) -> tuple[frozenset[str], int] | None:
    """(float32 paths, field count) of the PV map at ``pos``; None if it is not a map."""
    kind, count, pos = _container(raw, pos)
    if kind != 1:
        return None
    paths: set[str] = set()
    if raw.find(b"\xca", pos) >= 0:  # else there is no float32 to find
        _fields_paths(raw, pos, count, "", paths)
    return frozenset(paths) if paths else _EMPTY, count


def _walk_sized(
    raw: bytes, skip: frozenset[str] = _ALL_METADATA_KEYS, only: str | None = None
) -> dict[str, tuple[frozenset[str], int]]:
    """For every top-level key holding a map, except the ``skip`` keys (or for the key ``only``
    alone): (float32 paths, field count). A repeated key counts as msgpack decodes it: last."""
    out: dict[str, tuple[frozenset[str], int]] = {}
    try:
        kind, count, pos = _container(raw, 0)
        if kind != 1:
            return out
        for _ in range(count):
            key, pos = _read_str(raw, pos)
            if key is None or (key != only if only is not None else key in skip):
                pos = _skip(raw, pos)
                continue
            found = _pv_map_paths(raw, pos)
            if found is not None:
                out[key] = found
            pos = _skip(raw, pos)
    except (_TruncatedError, IndexError, ValueError):
        return out
    return out


def _walk_float32(
    raw: bytes, skip: frozenset[str] = _ALL_METADATA_KEYS
) -> dict[str, frozenset[str]]:
    return {key: paths for key, (paths, _) in _walk_sized(raw, skip).items()}


def _walk_key(raw: bytes, key: str) -> frozenset[str]:
    """float32 paths of the PV under ``key``: that key is the PV's whatever its name (a PV may
    be called ``message`` in a snapshot, or ``timestamp`` in a get reply)."""
    found = _walk_sized(raw, only=key).get(key)
    return found[0] if found is not None else _EMPTY


# the walker for other pure modules (the sink's payload templates): one implementation
MsgpackTruncatedError = _TruncatedError
skip_object = _skip
container_header = _container
read_str = _read_str
