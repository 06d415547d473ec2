"""Gateway-faithful serialization of simulator messages (msgpack and JSON).

The simulator has its own encoder, independent of the client's decoder, so that it checks the
client rather than mirroring it. It reproduces what the gateway's msgpack-c packer does:

* map keys keep insertion order (``message_type`` first, the PV key last);
* integers use the smallest encoding: non-negative values the unsigned forms (so a ms
  timestamp >= 2**32 is ``0xcf`` uint64), negative values the signed forms;
* pvData ``float`` is packed as float32 (``0xca``) and ``double`` as float64 (``0xcb``). A
  Python ``float`` is a double; wrap a value in :class:`Float32` (or a waveform in
  :class:`Float32Array`) to get float32 on the wire;
* strings are ``str`` (never ``bin``); arrays are msgpack arrays, never blobs.

JSON (``"serialization": "json"``) keeps the same shape; NaN becomes the string ``"NaN"`` as in
the gateway's JSON serializer.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np

SER_HEADER = "k2eg-ser-type"
SER_MSGPACK = "Msgpack"
SER_JSON = "Json"


class Float32(float):
    """A pvData ``float`` scalar: packed as msgpack float32."""

    __slots__ = ()


class Float32Array(list[float]):
    """A pvData ``float[]`` waveform: every element packed as msgpack float32."""

    __slots__ = ()


_PLAIN_SCALARS = (int, str, bool, type(None))


def _pack_int(value: int, out: bytearray) -> None:
    if value >= 0:
        if value < 0x80:
            out.append(value)
        elif value <= 0xFF:
            out += b"\xcc" + struct.pack(">B", value)
        elif value <= 0xFFFF:
            out += b"\xcd" + struct.pack(">H", value)
        elif value <= 0xFFFFFFFF:
            out += b"\xce" + struct.pack(">I", value)
        else:
            out += b"\xcf" + struct.pack(">Q", value)
    elif value >= -32:
        out += struct.pack(">b", value)
    elif value >= -0x80:
        out += b"\xd0" + struct.pack(">b", value)
    elif value >= -0x8000:
        out += b"\xd1" + struct.pack(">h", value)
    elif value >= -0x80000000:
        out += b"\xd2" + struct.pack(">i", value)
    else:
        out += b"\xd3" + struct.pack(">q", value)


def _pack_str(value: str, out: bytearray) -> None:
    # lone surrogates: the bytes of invalid UTF-8 the client decoded with surrogateescape
    raw = value.encode("utf-8", "surrogateescape")
    n = len(raw)
    if n < 32:
        out.append(0xA0 | n)
    elif n <= 0xFF:
        out += b"\xd9" + struct.pack(">B", n)
    elif n <= 0xFFFF:
        out += b"\xda" + struct.pack(">H", n)
    else:
        out += b"\xdb" + struct.pack(">I", n)
    out += raw


def _pack_container_header(n: int, out: bytearray, fix: int, c16: bytes, c32: bytes) -> None:
    if n < 16:
        out.append(fix | n)
    elif n <= 0xFFFF:
        out += c16 + struct.pack(">H", n)
    else:
        out += c32 + struct.pack(">I", n)


# an array element as msgpack-c packs it: the float32 (0xca) or float64 (0xcb) marker byte and
# the big-endian value; a numpy record array of these is the packed elements, back to back
_FLOAT32_ITEMS = (np.dtype([("marker", "u1"), ("value", ">f4")]), 0xCA)
_FLOAT64_ITEMS = (np.dtype([("marker", "u1"), ("value", ">f8")]), 0xCB)


def _pack_floats(items: Sequence[float], layout: tuple[np.dtype[Any], int],
                 out: bytearray) -> None:
    """The elements of a float array (no header), each packed as its own msgpack float."""
    dtype, marker = layout
    values = np.array(items, dtype=np.float64)
    with np.errstate(over="ignore"):
        packed = values.astype(dtype["value"])
    if np.any(np.isinf(packed) & np.isfinite(values)):  # as struct.pack(">f") refuses it
        raise OverflowError("float too large to pack with f format")
    records = np.empty(len(items), dtype)
    records["marker"] = marker
    records["value"] = packed
    out += records.tobytes()


def _pack(value: Any, out: bytearray) -> None:
    if value is None:
        out.append(0xC0)
    elif value is True:
        out.append(0xC3)
    elif value is False:
        out.append(0xC2)
    elif isinstance(value, int):
        _pack_int(value, out)
    elif isinstance(value, Float32):
        out += b"\xca" + struct.pack(">f", value)
    elif isinstance(value, float):
        out += b"\xcb" + struct.pack(">d", value)
    elif isinstance(value, str):
        _pack_str(value, out)
    elif isinstance(value, Mapping):
        _pack_container_header(len(value), out, 0x80, b"\xde", b"\xdf")
        for key, item in value.items():
            _pack(key, out)
            _pack(item, out)
    elif isinstance(value, Float32Array):
        _pack_container_header(len(value), out, 0x90, b"\xdc", b"\xdd")
        _pack_floats(value, _FLOAT32_ITEMS, out)
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        if all(type(item) in _PLAIN_SCALARS for item in value):
            # fast path: msgpack-python packs ints/str/bool/None exactly like msgpack-c
            out += msgpack.packb(list(value), unicode_errors="surrogateescape")
            return
        if all(type(item) is float for item in value):  # a double[] waveform
            _pack_container_header(len(value), out, 0x90, b"\xdc", b"\xdd")
            _pack_floats(value, _FLOAT64_ITEMS, out)
            return
        _pack_container_header(len(value), out, 0x90, b"\xdc", b"\xdd")
        for item in value:
            _pack(item, out)
    else:
        raise TypeError(f"cannot pack {type(value).__name__} as a gateway value")


def pack(value: Any) -> bytes:
    """Serialize ``value`` the way the gateway's msgpack-c packer would."""
    out = bytearray()
    _pack(value, out)
    return bytes(out)


def _json_ready(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def serialize(value: Mapping[str, Any], serialization: str) -> tuple[bytes, str]:
    """Bytes and the ``k2eg-ser-type`` header value for ``serialization`` (msgpack|json)."""
    if serialization == "json":
        return json.dumps(_json_ready(value), separators=(",", ":")).encode(), SER_JSON
    return pack(value), SER_MSGPACK
