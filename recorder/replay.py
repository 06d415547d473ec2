"""Replay a recorded file as the gateway's snapshot stream (the core of ``k2eg-recorder replay``).

What the file holds is turned back into the messages the gateway published: per ``/iterations``
row a header (when one was received), one data message per stored value of the iteration, and
a tail (when one was received, with its error code and message), in the sequenced stream
(``msg_seq``, ``submission_seq``, ``total_messages``: what the official client 0.3.2 needs) or
the legacy one. Each PV structure is rebuilt losslessly (:mod:`recorder.sinks.codec`) and packed
the way the gateway's msgpack-c packer does (:func:`recorder.sim.encoding.pack`), with the
float32 fields sent as float32 again, so a client decodes the same values, types and float
widths the recorder decoded when it recorded them. Uses: feeding an analysis pipeline or a test
recorder with real recorded data, reproducing a problem, moving a recording between sites.

Not reproduced (the file does not keep them): the arrival order of the values of different
PVs within an iteration (they are replayed PV by PV, in the file's PV order), the split of an
iteration into sub-push batches (one submission per iteration), and messages the recorder
received but could not decode (counted, never stored). Values that arrived after their
iteration closed (stored after it, uncounted) are replayed after that iteration's tail, with
their own ``iter_index``, as they came.

This module reads files through :mod:`recorder.reader` and builds bytes; publishing them
(Kafka, pacing) is the CLI's job (:mod:`recorder.cli.replay`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from recorder.client.values import PVSample
from recorder.reader import RecordingFile
from recorder.sim.encoding import Float32, Float32Array, pack
from recorder.sim.messages import data_message, header_message, tail_message

NS_PER_MS = 1_000_000
WINDOW_VALUES = 65_536
"""Values read from the file at a time (a window of iterations): memory holds one window."""


@dataclass(slots=True)
class ReplayIteration:
    """One ``/iterations`` row and the values to publish with it."""

    iter_index: int
    header_ms: int | None  # None: no header was received
    tail_ms: int | None  # None: no tail was received (the iteration stays incomplete)
    error_code: int = 0
    error_message: str = ""
    samples: list[PVSample] = field(default_factory=list)
    late: list[tuple[int, PVSample]] = field(default_factory=list)  # (iter_index, sample)

    @property
    def timestamp_ms(self) -> int:
        """The time the gateway stamped this iteration's messages with (header's, else
        tail's, else 0)."""
        if self.header_ms is not None:
            return self.header_ms
        return self.tail_ms if self.tail_ms is not None else 0


@dataclass(frozen=True, slots=True)
class Selection:
    """Which part of a file to replay: an inclusive ``iter_index`` range and a set of PVs
    (None: all)."""

    first: int | None = None
    last: int | None = None
    pvs: frozenset[str] | None = None

    def wants(self, iter_index: int) -> bool:
        return ((self.first is None or iter_index >= self.first)
                and (self.last is None or iter_index <= self.last))


def gateway_structure(sample: PVSample) -> Any:
    """``sample``'s structure ready for :func:`~recorder.sim.encoding.pack`: the fields the
    gateway sent as float32 (``float32_paths``: ``value`` or ``value.<field>``) wrapped so
    they are packed as float32 again. The sample's own structure is not modified."""
    data = sample.data
    paths = sample.float32_paths
    if not paths:
        return data
    out = dict(data)
    for path in sorted(paths):
        parts = path.split(".")
        node: Any = out
        for key in parts[:-1]:
            child = node.get(key) if isinstance(node, Mapping) else None
            if not isinstance(child, Mapping):
                node = None
                break
            child = dict(child)  # copied on the way down: the sample is not touched
            node[key] = child
            node = child
        if node is None:
            continue
        leaf = parts[-1]
        item = node.get(leaf)
        if isinstance(item, float) and not isinstance(item, Float32):
            node[leaf] = Float32(item)
        elif isinstance(item, list) and item and all(type(x) is float for x in item):
            node[leaf] = Float32Array(item)
    return out


_packb = msgpack.Packer(use_bin_type=True, unicode_errors="surrogateescape").pack


def _pack_tree(value: Any, paths: frozenset[str]) -> bytes:
    """``value`` packed as the gateway packs it, the float32 ``paths`` within it (relative,
    ``""`` = ``value`` itself) as float32. msgpack-python packs everything else exactly as
    msgpack-c does (smallest integers, str8, float64), in C; only float32 needs our packer."""
    if not paths:
        return bytes(_packb(value))
    if "" in paths:
        if isinstance(value, float):
            return pack(Float32(value))
        if isinstance(value, list) and value and all(type(x) is float for x in value):
            return pack(Float32Array(value))
        return bytes(_packb(value))
    if not isinstance(value, Mapping):
        return bytes(_packb(value))
    parts = [_map_header(len(value))]
    for key, item in value.items():
        parts.append(_packb(key))
        prefix = f"{key}."
        sub = frozenset("" if p == key else p[len(prefix):] for p in paths
                        if p == key or p.startswith(prefix))
        parts.append(_pack_tree(item, sub))
    return b"".join(parts)


def _map_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x80 | n,))
    if n < 0x10000:
        return b"\xde" + n.to_bytes(2, "big")
    return b"\xdf" + n.to_bytes(4, "big")


def pack_message(msg: Mapping[str, Any], sample: PVSample | None = None) -> bytes:
    """The gateway's bytes for ``msg`` (carrying ``sample``'s structure under its PV name,
    float32 fields as float32); a structure the gateway's packer could not have made (a
    msgpack bin, an integer out of 64 bits) is packed by msgpack-python as it comes."""
    try:
        if sample is None:
            return bytes(_packb(msg))
        paths = sample.float32_paths
        parts = [_map_header(len(msg))]
        for key, item in msg.items():
            parts.append(_packb(key))
            parts.append(_pack_tree(item, paths) if key == sample.pv else _packb(item))
        return b"".join(parts)
    except (TypeError, OverflowError, ValueError):
        data = gateway_structure(sample) if sample is not None else None
        try:
            return pack({k: data if sample is not None and k == sample.pv else v
                         for k, v in msg.items()})
        except (TypeError, OverflowError, ValueError):
            return bytes(msgpack.packb(msg, use_bin_type=True,
                                       unicode_errors="surrogateescape"))


def encode_iteration(it: ReplayIteration, snapshot: str, *, sequenced: bool) -> list[bytes]:
    """The messages of ``it`` in publishing order: header, data, tail, then late values."""
    ts = it.timestamp_ms
    seq = 0
    out: list[bytes] = []

    def next_seq() -> int | None:
        nonlocal seq
        seq += 1
        return seq if sequenced else None

    if it.header_ms is not None:
        out.append(pack_message(header_message(snapshot, it.header_ms, it.iter_index,
                                               msg_seq=next_seq())))
    n = len(it.samples)
    for i, sample in enumerate(it.samples):
        out.append(pack_message(data_message(sample.pv, sample.data, ts, it.iter_index,
                                             msg_seq=next_seq(),
                                             last_of_submission=i == n - 1), sample))
    if it.tail_ms is not None:
        out.append(pack_message(tail_message(snapshot, it.tail_ms, it.iter_index,
                                             error=it.error_code,
                                             error_message=it.error_message,
                                             msg_seq=next_seq())))
    for index, sample in it.late:
        out.append(pack_message(data_message(sample.pv, sample.data, ts, index,
                                             msg_seq=next_seq()), sample))
    return out


def _ms(ns: int) -> int | None:
    return None if ns == 0 else ns // NS_PER_MS


def iterations(f: RecordingFile, selection: Selection = Selection()) -> Iterator[ReplayIteration]:
    """The file's iterations in order, each with its values, read a window at a time.

    Values stored before the first iteration row (an iteration of an earlier segment) come
    as the late values of a first pseudo-iteration without header and tail."""
    its = f.iterations()
    pvs = [pv for pv in f.pv_names if selection.pvs is None or pv in selection.pvs]
    index: dict[str, tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int]] = {}
    for pv in pvs:
        first, count = f.first_count(pv)
        index[pv] = (first, count, f.row_count(pv))
    n_rows = len(its["iter_index"])
    iter_index = its["iter_index"].tolist()
    header_ts, tail_ts = its["header_timestamp"].tolist(), its["tail_timestamp"].tolist()
    codes, messages = its["error_code"].tolist(), its["error_message"].tolist()

    # rows before the first iteration's first row: late values of an earlier iteration
    leading: list[tuple[int, PVSample]] = []
    for pv, (first, _count, n_pv) in index.items():
        lo = int(first[0]) if n_rows else n_pv
        if lo > 0:
            leading.extend(_with_index(f, pv, 0, lo))
    leading = [(i, s) for i, s in leading if selection.wants(i)]
    if leading:
        yield ReplayIteration(iter_index=leading[0][0], header_ms=None, tail_ms=None,
                              late=leading)

    per_row = max(1, sum(int(c.sum()) for _f, c, _n in index.values()) // max(1, n_rows))
    window = max(1, WINDOW_VALUES // per_row)
    for k0 in range(0, n_rows, window):
        k1 = min(n_rows, k0 + window)
        wanted = [k for k in range(k0, k1) if selection.wants(iter_index[k])]
        if not wanted:
            continue
        # per PV: its rows from the window's first iteration to the next window's (late
        # values of the window's last iteration included), read at once
        rows: dict[str, tuple[list[PVSample], list[int], int]] = {}
        for pv, (first, _count, n_pv) in index.items():
            lo = int(first[k0])
            hi = int(first[k1]) if k1 < n_rows else n_pv
            if hi > lo:
                rows[pv] = (f.samples_range(pv, lo, hi),
                            f.iterations_range(pv, lo, hi).tolist(), lo)
        for k in wanted:
            it = ReplayIteration(
                iter_index=iter_index[k],
                header_ms=_ms(int(header_ts[k])),
                tail_ms=_ms(int(tail_ts[k])),
                error_code=int(codes[k]),
                error_message=str(messages[k] or ""),
            )
            for pv, (samples, indexes, lo) in rows.items():
                first, count, n_pv = index[pv]
                a = int(first[k]) - lo
                b = a + int(count[k])
                end = (int(first[k + 1]) if k + 1 < n_rows else n_pv) - lo
                it.samples.extend(samples[a:b])
                it.late.extend(zip(indexes[b:end], samples[b:end], strict=True))
            yield it


def _with_index(f: RecordingFile, pv: str, lo: int, hi: int) -> list[tuple[int, PVSample]]:
    return list(zip(f.iterations_range(pv, lo, hi).tolist(), f.samples_range(pv, lo, hi),
                    strict=True))


def snapshot_name_of(f: RecordingFile) -> str:
    return str(f.attrs.get("snapshot_name", "") or f.attrs.get("run_name", ""))


def recorded_topic_of(f: RecordingFile) -> str:
    return str(f.attrs.get("snapshot_topic", "") or "")
