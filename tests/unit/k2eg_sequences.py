"""Recorded k2eg message sequences for the client-core unit tests, as real msgpack bytes.

The builders mirror the gateway's encoding (protocol §3.2, §4.1; sequenced addendum §3.1):
maps in the gateway's key order, float32 for pvData ``float`` (msgpack-python cannot emit it,
so :func:`pack` does, through ``struct.pack(">Bf", 0xCA, v)``), uint64 timestamps in ms.
``sequenced=True`` adds ``msg_seq`` / ``submission_seq`` / ``last_submission_data`` /
``total_messages`` the way the newer gateway does.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from recorder.client.wire import Record

T0 = 1_763_700_000_000  # ms since the epoch (uint64 on the wire: > 2**32)
MSGPACK_HEADERS: list[tuple[str, bytes]] = [("k2eg-ser-type", b"Msgpack")]


@dataclass(frozen=True)
class F32:
    """A float the gateway packs as msgpack float32 (pvData ``float``)."""

    value: float


def pack(obj: Any) -> bytes:
    """msgpack bytes of ``obj``; :class:`F32` (also inside lists/maps) becomes float32."""
    out = bytearray()
    _pack_into(obj, out)
    return bytes(out)


def _pack_into(obj: Any, out: bytearray) -> None:
    if isinstance(obj, F32):
        out += struct.pack(">Bf", 0xCA, obj.value)
    elif isinstance(obj, dict):
        n = len(obj)
        out += bytes((0x80 | n,)) if n < 16 else b"\xde" + n.to_bytes(2, "big")
        for key, value in obj.items():
            _pack_into(key, out)
            _pack_into(value, out)
    elif isinstance(obj, list | tuple):
        n = len(obj)
        if n < 16:
            out += bytes((0x90 | n,))
        elif n < 0x10000:
            out += b"\xdc" + n.to_bytes(2, "big")
        else:
            out += b"\xdd" + n.to_bytes(4, "big")
        for value in obj:
            _pack_into(value, out)
    else:
        out += msgpack.packb(obj)


def unpack_equal(raw: bytes) -> Any:
    return msgpack.unpackb(raw)


# ------------------------------------------------------------------------------ PV structures
def alarm(severity: int = 0, status: int = 0, message: str = "NO_ALARM") -> dict[str, Any]:
    return {"severity": severity, "status": status, "message": message}


def stamp(seconds: int = 1_763_700_000, nanos: int = 123_456_789) -> dict[str, Any]:
    return {"secondsPastEpoch": seconds, "nanoseconds": nanos, "userTag": 0}


def ntscalar(
    value: Any,
    *,
    seconds: int = 1_763_700_000,
    nanos: int = 0,
    severity: int = 0,
    display: bool = True,
) -> dict[str, Any]:
    """NTScalar / NTScalarArray via PVA: value, alarm, timeStamp, display, control, valueAlarm."""
    pv: dict[str, Any] = {
        "value": value,
        "alarm": alarm(severity),
        "timeStamp": stamp(seconds, nanos),
    }
    if display:
        pv["display"] = {
            "limitLow": 0.0, "limitHigh": 10.0, "description": "a PV", "units": "mm",
            "precision": 3, "form": {"index": 0, "choices": ["Default", "String"]},
        }  # fmt: skip
        pv["control"] = {"limitLow": 0.0, "limitHigh": 10.0, "minStep": 0.0}
        pv["valueAlarm"] = {"active": False, "lowAlarmLimit": F32(1.0), "hysteresis": 0}
    return pv


def ntenum(index: int, choices: list[str]) -> dict[str, Any]:
    return {"value": {"index": index, "choices": choices}, "alarm": alarm(), "timeStamp": stamp()}


def nttable(columns: dict[str, list[Any]]) -> dict[str, Any]:
    return {
        "labels": [name.upper() for name in columns],
        "value": columns,
        "descriptor": "",
        "alarm": alarm(),
        "timeStamp": stamp(),
    }


def ntndarray(union_field: str, pixels: list[Any], dims: Sequence[int]) -> dict[str, Any]:
    return {
        "value": {union_field: pixels},
        "codec": {"name": "", "parameters": {"": None}},
        "compressedSize": len(pixels),
        "uncompressedSize": len(pixels),
        "dimension": [
            {"size": d, "offset": 0, "fullSize": d, "binning": 1, "reverse": False} for d in dims
        ],
        "uniqueId": 7,
        "dataTimeStamp": stamp(),
        "attribute": [{"name": "ColorMode", "value": {"": 0}, "descriptor": "", "source": ""}],
        "alarm": alarm(),
        "timeStamp": stamp(),
    }


# ------------------------------------------------------------------ snapshot topic messages
def header_msg(
    name: str, idx: int, ts: int, *, msg_seq: int | None = None, sub: int | None = None
) -> bytes:
    m: dict[str, Any] = {
        "message_type": 0,
        "snapshot_name": name,
        "timestamp": ts,
        "iter_index": idx,
    }
    if msg_seq is not None:
        m["msg_seq"] = msg_seq
    if sub is not None:
        m["submission_seq"] = sub
    return pack(m)


def data_msg(
    idx: int,
    ts: int,
    pv: str,
    value: dict[str, Any],
    *,
    msg_seq: int | None = None,
    sub: int | None = None,
    last: bool = False,
    header_ts: int | None = None,
    extra: dict[str, Any] | None = None,
) -> bytes:
    m: dict[str, Any] = {"message_type": 1, "timestamp": ts, "iter_index": idx}
    if msg_seq is not None:
        m["msg_seq"] = msg_seq
    if sub is not None:
        m["submission_seq"] = sub
    if last:
        m["last_submission_data"] = True
    if header_ts is not None:
        m["header_timestamp"] = header_ts
    m.update(extra or {})
    m[pv] = value
    return pack(m)


def tail_msg(
    name: str,
    idx: int,
    ts: int,
    *,
    error: int = 0,
    error_message: str = "",
    msg_seq: int | None = None,
    total: int | None = None,
    sub: int | None = None,
    header_ts: int | None = None,
) -> bytes:
    m: dict[str, Any] = {"message_type": 2, "error": error}
    if error_message:
        m["error_message"] = error_message
    m.update({"iter_index": idx, "timestamp": ts, "snapshot_name": name})
    if header_ts is not None:
        m["header_timestamp"] = header_ts
    if msg_seq is not None:
        m["msg_seq"] = msg_seq
    if total is not None:
        m["total_messages"] = total
    if sub is not None:
        m["submission_seq"] = sub
    return pack(m)


# ---------------------------------------------------------------------------- whole streams
@dataclass
class Msg:
    """One recorded message: its bytes plus what it is (for building faulty variants)."""

    kind: str  # "H", "D", "T"
    iter_index: int
    raw: bytes
    pv: str | None = None
    msg_seq: int | None = None


def iteration(
    name: str,
    idx: int,
    batches: Sequence[tuple[int, Sequence[tuple[str, Any]]]],
    *,
    sequenced: bool,
    error: int = 0,
    error_message: str = "",
    header_with_first: bool = True,
    sub_base: int = 1,
) -> list[Msg]:
    """One iteration: header, data batches ``[(timestamp, [(pv, value_map), ...]), ...]``, tail.

    The header goes with the first batch (its timestamp), the tail with the last. Sequenced:
    ``msg_seq`` 1..N across the iteration, ``submission_seq`` per batch from ``sub_base``,
    ``last_submission_data`` on each batch's last data message, ``total_messages`` N.
    """
    msgs: list[Msg] = []
    first_ts = batches[0][0]
    n_data = sum(len(values) for _, values in batches)
    total = n_data + 2
    seq = 1
    if header_with_first:
        msgs.append(
            Msg(
                "H",
                idx,
                header_msg(
                    name,
                    idx,
                    first_ts,
                    msg_seq=seq if sequenced else None,
                    sub=sub_base if sequenced else None,
                ),
            )
        )
    seq += 1
    for b, (ts, values) in enumerate(batches):
        for i, (pv, value) in enumerate(values):
            raw = data_msg(
                idx,
                ts,
                pv,
                value,
                msg_seq=seq if sequenced else None,
                sub=sub_base + b if sequenced else None,
                last=sequenced and i == len(values) - 1,
            )
            msgs.append(Msg("D", idx, raw, pv, seq if sequenced else None))
            seq += 1
    last_ts = batches[-1][0]
    msgs.append(
        Msg(
            "T",
            idx,
            tail_msg(
                name,
                idx,
                last_ts,
                error=error,
                error_message=error_message,
                msg_seq=seq if sequenced else None,
                total=total if sequenced else None,
                sub=sub_base + len(batches) - 1 if sequenced else None,
            ),
        )
    )
    return msgs


def records(
    topic: str, msgs: Iterable[Msg | bytes], *, start_offset: int = 0, partition: int = 0
) -> list[Record]:
    out = []
    for i, m in enumerate(msgs):
        raw = m.raw if isinstance(m, Msg) else m
        out.append(Record(topic, partition, start_offset + i, raw, list(MSGPACK_HEADERS)))
    return out


def scalar_pvs(n: int, *, base: float = 0.0, prefix: str = "PV") -> list[tuple[str, Any]]:
    return [(f"{prefix}:{i}", ntscalar(base + i, nanos=i)) for i in range(n)]
