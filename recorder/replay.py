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
their own ``iter_index``, as they came. In the sequenced stream, messages that were missing
when recorded (``missing_messages``, a lost header among them) are missing again: their
``msg_seq`` numbers are skipped (data after a lost header from 2), so the tail's
``total_messages`` counts them.

This module reads files through :mod:`recorder.reader` and builds bytes; publishing them
(Kafka, pacing) is the CLI's job (:mod:`recorder.cli.replay`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from recorder.client.values import PVSample
from recorder.reader import RecordingFile, reporting_damage
from recorder.replay_pack import (
    PackedStructure,
    map_header,
    pack_tree,
    packb,
    packed_rows,
)
from recorder.sim.encoding import Float32, Float32Array, pack
from recorder.sim.messages import data_message, header_message, tail_message

NS_PER_MS = 1_000_000
WINDOW_BYTES = 64 * 1024 * 1024
"""About how many bytes of values are read from the file at a time (a window of iterations:
memory holds one window), counted packed plus :data:`VALUE_OVERHEAD` each. The first window
is :data:`FIRST_WINDOW` iterations, each next one sized by the bytes per iteration so far."""
WINDOW_VALUES = 1 << 20
"""At most this many values a window."""
VALUE_OVERHEAD = 100  # a packed value's objects (its bytes, a PackedStructure, a list slot)
FIRST_WINDOW = 8


@dataclass(slots=True)
class ReplayIteration:
    """One ``/iterations`` row and the values to publish with it."""

    iter_index: int
    header_ms: int | None  # None: no header was received
    tail_ms: int | None  # None: no tail was received (the iteration stays incomplete)
    error_code: int = 0
    error_message: str = ""
    missing_messages: int = 0  # sequenced: messages that never arrived (the header among them)
    samples: list[PVSample | PackedStructure] = field(default_factory=list)
    late: list[tuple[int, PVSample | PackedStructure]] = field(
        default_factory=list)  # (iter_index, sample)

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


def pack_message(msg: Mapping[str, Any],
                 sample: PVSample | PackedStructure | None = None) -> bytes:
    """The gateway's bytes for ``msg`` (carrying ``sample``'s structure under its PV name,
    float32 fields as float32; a :class:`PackedStructure` as it is); a structure the
    gateway's packer could not have made (a msgpack bin, an integer out of 64 bits) is
    packed by msgpack-python as it comes."""
    try:
        if sample is None:
            return packb(msg)
        parts = [map_header(len(msg))]
        for key, item in msg.items():
            parts.append(packb(key))
            if key != sample.pv:
                parts.append(packb(item))
            elif isinstance(sample, PackedStructure):
                parts.append(sample.packed)
            else:
                parts.append(pack_tree(item, sample.float32_paths))
        return b"".join(parts)
    except (TypeError, OverflowError, ValueError):
        if isinstance(sample, PackedStructure):
            raise
        data = gateway_structure(sample) if sample is not None else None
        try:
            return pack({k: data if sample is not None and k == sample.pv else v
                         for k, v in msg.items()})
        except (TypeError, OverflowError, ValueError):
            return bytes(msgpack.packb(msg, use_bin_type=True,
                                       unicode_errors="surrogateescape"))


def encode_iteration(it: ReplayIteration, snapshot: str, *, sequenced: bool,
                     sent: int = 0) -> list[bytes]:
    """The messages of ``it`` in publishing order: header, data, tail, then late values.

    ``sent``: how many ``msg_seq`` numbers of this iteration were already used, by its row
    in the previous segment (an iteration open at a rotation, or cut by a crash, has a row in
    both): its messages, and the number of a header it did not have; its header is not sent
    again and ``msg_seq`` counts on from them."""
    ts = it.timestamp_ms
    seq = sent
    out: list[bytes] = []

    def next_seq() -> int | None:
        nonlocal seq
        seq += 1
        return seq if sequenced else None

    if it.header_ms is not None and not sent:
        out.append(pack_message(header_message(snapshot, it.header_ms, it.iter_index,
                                               msg_seq=next_seq())))
    elif not seq:
        seq = 1  # the header's number, as when the gateway's header was lost
    n = len(it.samples)
    for i, sample in enumerate(it.samples):
        out.append(pack_message(data_message(sample.pv, _structure(sample), ts, it.iter_index,
                                             msg_seq=next_seq(),
                                             last_of_submission=i == n - 1), sample))
    if it.tail_ms is not None:
        # messages that were missing when it was recorded stay missing (a lost header's
        # number is skipped already)
        seq += max(0, it.missing_messages - (it.header_ms is None))
        out.append(pack_message(tail_message(snapshot, it.tail_ms, it.iter_index,
                                             error=it.error_code,
                                             error_message=it.error_message,
                                             msg_seq=next_seq())))
    for index, sample in it.late:
        out.append(pack_message(data_message(sample.pv, _structure(sample), ts, index,
                                             msg_seq=next_seq()), sample))
    return out


def continues(previous: ReplayIteration | None, it: ReplayIteration) -> bool:
    """Whether ``it`` (the first of a segment) is the rest of ``previous`` (the last of the
    segment before): the same iteration, left open by the rotation (no tail)."""
    return (previous is not None and previous.tail_ms is None
            and previous.iter_index == it.iter_index and previous.header_ms == it.header_ms)


def _structure(sample: PVSample | PackedStructure) -> Any:
    """What a data message carries for ``sample`` (a packed one's bytes go in at packing)."""
    return sample.data if isinstance(sample, PVSample) else None


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
    missing = (its["missing_messages"].tolist() if "missing_messages" in its
               else [0] * len(iter_index))

    # rows before the first iteration's first row: late values of an earlier iteration
    leading: list[tuple[int, PVSample | PackedStructure]] = []
    for pv, (first, _count, n_pv) in index.items():
        lo = int(first[0]) if n_rows else n_pv
        if lo > 0:
            leading.extend(_with_index(f, pv, 0, lo))
    leading = [(i, s) for i, s in leading if selection.wants(i)]
    if leading:
        yield ReplayIteration(iter_index=leading[0][0], header_ms=None, tail_ms=None,
                              late=leading)

    per_row = max(1, sum(int(c.sum()) for _f, c, _n in index.values()) // max(1, n_rows))
    most = max(1, WINDOW_VALUES // per_row)
    window = min(most, FIRST_WINDOW)
    read_bytes = read_rows = 0  # what the windows read so far held, packed
    k1 = 0
    while k1 < n_rows:
        k0, k1 = k1, min(n_rows, k1 + window)
        wanted = [k for k in range(k0, k1) if selection.wants(iter_index[k])]
        if not wanted:
            continue
        # per PV: its rows from the window's first iteration to the next window's (late
        # values of the window's last iteration included), read at once
        rows: dict[str, tuple[Sequence[PVSample | PackedStructure], list[int], int]] = {}
        for pv, (first, _count, n_pv) in index.items():
            lo = int(first[k0])
            hi = int(first[k1]) if k1 < n_rows else n_pv
            if hi > lo:
                samples = _samples(f, pv, lo, hi)
                read_bytes += sum(map(_packed_size, samples))
                rows[pv] = (samples, f.iterations_range(pv, lo, hi).tolist(), lo)
        read_rows += k1 - k0
        window = max(1, min(most, WINDOW_BYTES * read_rows // max(1, read_bytes)))
        for k in wanted:
            it = ReplayIteration(
                iter_index=iter_index[k],
                header_ms=_ms(int(header_ts[k])),
                tail_ms=_ms(int(tail_ts[k])),
                error_code=int(codes[k]),
                error_message=str(messages[k] or ""),
                missing_messages=int(missing[k]),
            )
            for pv, (samples, indexes, lo) in rows.items():
                first, count, n_pv = index[pv]
                a = int(first[k]) - lo
                b = a + int(count[k])
                end = (int(first[k + 1]) if k + 1 < n_rows else n_pv) - lo
                it.samples.extend(samples[a:b])
                it.late.extend(zip(indexes[b:end], samples[b:end], strict=True))
            yield it


def _with_index(f: RecordingFile, pv: str, lo: int, hi: int
                ) -> list[tuple[int, PVSample | PackedStructure]]:
    return list(zip(f.iterations_range(pv, lo, hi).tolist(), _samples(f, pv, lo, hi),
                    strict=True))


def _packed_size(sample: PVSample | PackedStructure) -> int:
    """``sample``'s bytes packed (a sample not packed yet: about what it holds in memory)."""
    if isinstance(sample, PackedStructure):
        return len(sample.packed) + VALUE_OVERHEAD
    value = sample.data.get("value") if isinstance(sample.data, Mapping) else None
    return 1024 + 32 * (len(value) if isinstance(value, list) else 1)


def _samples(f: RecordingFile, pv: str, lo: int, hi: int
             ) -> Sequence[PVSample | PackedStructure]:
    """The PV's rows ``lo:hi``: from a finalized file packed by template where one fits
    (:func:`~recorder.replay_pack.packed_rows`), from a live file as samples."""
    stored = f.stored_rows(pv, lo, hi)
    if stored is None:
        return f.samples_range(pv, lo, hi)
    with reporting_damage(f.path):  # a value rebuilt here that cannot be, as the reader says
        return packed_rows(stored, pv)


def snapshot_name_of(f: RecordingFile) -> str:
    return str(f.attrs.get("snapshot_name", "") or f.attrs.get("run_name", ""))


def recorded_topic_of(f: RecordingFile) -> str:
    return str(f.attrs.get("snapshot_topic", "") or "")
