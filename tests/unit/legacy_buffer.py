"""The RecordingBuffer as it was before template decoding: the reference of test_sink_template.

:class:`RecordingBuffer` consumes iteration events and keeps everything that is not yet in
the file as column lists. :meth:`RecordingBuffer.take` hands the HDF5 adapter one
:class:`FlushBatch` of numpy arrays to append, so the cost of a flush depends on the number
of values, not on the number of messages or PVs.

Iteration rows. Each iteration gets a row number in ``/iterations`` when it becomes *active*:
the oldest open iteration is active; samples of younger open iterations (the gateway may
overlap them) wait in memory until every older one is closed. So the rows of a PV that belong
to one iteration are always contiguous in the file, which is what makes the XFEL-style
``first``/``count`` index exact. Sub-push partial batches of the active iteration are
buffered at once and reach the file at the next flush, before the iteration's tail.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from recorder.client.events import (
    IncompleteReason,
    IterationClosed,
    IterationEvent,
    IterationOpened,
    IterationStatus,
    ValuesReceived,
)
from recorder.sinks.codec import DTYPE_BY_CODE, Split, encode_rest, same_rest, split_sample

# /iterations columns: name -> numpy dtype
ITERATION_COLUMNS: dict[str, np.dtype[Any]] = {
    "iter_index": np.dtype(np.int64),
    "header_timestamp": np.dtype(np.int64),  # ns since epoch, 0 = no header
    "tail_timestamp": np.dtype(np.int64),  # ns since epoch, 0 = no tail
    "status": np.dtype(np.uint8),  # ITERATION_STATUS
    "reason": np.dtype(np.uint8),  # ITERATION_REASONS
    "error_code": np.dtype(np.int64),
    "error_message": np.dtype(np.int64),  # byte-pool offset of the UTF-8 message, -1 = none
    "error_message_size": np.dtype(np.int64),
    "n_values": np.dtype(np.int64),  # as counted by the client
    "n_pvs": np.dtype(np.int64),
    "n_batches": np.dtype(np.int64),
    "n_written": np.dtype(np.int64),  # values of this iteration stored in this file
    "expected_messages": np.dtype(np.int64),  # -1 = not a sequenced stream
    "missing_messages": np.dtype(np.int64),
    "duplicates": np.dtype(np.int64),
    "partition": np.dtype(np.int32),
    "offset": np.dtype(np.int64),  # highest Kafka offset the iteration was built from
}
ITERATION_STATUS: dict[str, int] = {"complete": 0, "incomplete": 1}
ITERATION_REASONS: dict[str, int] = {
    "": 0,
    **{r.value: i + 1 for i, r in enumerate(IncompleteReason)},
    "recording_stopped": 100,  # the recording ended before the iteration closed
    "writer_crashed": 101,  # set by `recover` for iterations open when the writer died
}
REASON_NAMES: dict[int, str] = {v: k for k, v in ITERATION_REASONS.items()}
STATUS_NAMES: dict[int, str] = {v: k for k, v in ITERATION_STATUS.items()}

# /live/samples columns: one row per PV value, in arrival order (per PV: row order)
SAMPLE_COLUMNS: dict[str, np.dtype[Any]] = {
    "pv": np.dtype(np.int32),  # column in /pvs (pv_names attribute order)
    "iter_row": np.dtype(np.int64),  # row in /iterations, -1 = arrived after its iteration closed
    "iteration": np.dtype(np.int64),  # k2eg iter_index
    "time": np.dtype(np.int64),  # EPICS timeStamp, ns since epoch
    "severity": np.dtype(np.int32),
    "status": np.dtype(np.int32),
    "user_tag": np.dtype(np.int32),  # format 4.0
    "flags": np.dtype(np.uint8),  # codec.F_*
    "kind": np.dtype(np.uint8),  # codec.KIND_CODES
    "dtype": np.dtype(np.uint8),  # codec.DTYPE_CODES / STRING_DTYPE_CODE
    "ival": np.dtype(np.int64),
    "fval": np.dtype(np.float64),
    "offset": np.dtype(np.int64),  # into /live/pool_<dtype> or /live/bytes
    "size": np.dtype(np.int64),  # elements (bytes for strings)
}
# /live/meta: the rest of a PV's structure, stored when it changes
META_COLUMNS: dict[str, np.dtype[Any]] = {
    "pv": np.dtype(np.int32),
    "row": np.dtype(np.int64),  # the PV's row from which this rest applies
    "offset": np.dtype(np.int64),  # into /live/bytes
    "size": np.dtype(np.int64),
}
# /live/tags: trigger tags (JSON object in /live/bytes) for the iteration ``iter_index``
TAG_COLUMNS: dict[str, np.dtype[Any]] = {
    "iter_index": np.dtype(np.int64),
    "offset": np.dtype(np.int64),  # into /live/bytes
    "size": np.dtype(np.int64),
}
_ROW_DTYPE = np.dtype(list(SAMPLE_COLUMNS.items()))
SAMPLE_ROW_BYTES = sum(dt.itemsize for dt in SAMPLE_COLUMNS.values())


@dataclass(slots=True)
class FlushBatch:
    samples: dict[str, npt.NDArray[Any]]
    pools: dict[int, npt.NDArray[Any]]  # dtype code -> elements to append
    byte_pool: npt.NDArray[np.uint8]
    meta: dict[str, npt.NDArray[Any]]
    iterations: dict[str, npt.NDArray[Any]]
    new_pvs: list[str]  # PV names that got a column since the previous batch
    pvs: dict[str, npt.NDArray[np.int64]]  # their names in the byte pool: offset, size
    offsets: dict[tuple[str, int], int]  # (topic, partition) -> highest durable offset
    tags: dict[str, npt.NDArray[np.int64]] = field(
        default_factory=lambda: {k: np.zeros(0, dt) for k, dt in TAG_COLUMNS.items()}
    )

    @property
    def empty(self) -> bool:
        return (
            not len(self.tags["iter_index"])
            and not len(self.samples["pv"])
            and not len(self.iterations["iter_index"])
            and not self.new_pvs
            and not len(self.byte_pool)
        )


@dataclass(slots=True)
class _Open:
    iter_index: int
    header_timestamp_ns: int | None
    row: int | None = None  # assigned on activation
    pending: list[tuple[int, Split, int]] = field(default_factory=list)  # (pv col, split, offset)
    closed: IterationClosed | None = None
    n_written: int = 0
    held_from: int = -1  # closed while an older one is open: lowest offset it may hold


class RecordingBuffer:
    """Everything of one recording segment that is not yet in the file."""

    def __init__(self, pv_names: Iterable[str] = ()) -> None:
        self.pv_names: list[str] = []
        self.pv_columns: dict[str, int] = {}
        self._new_pvs: list[str] = []
        self._pv_entries: list[tuple[int, int]] = []  # (byte offset, size) of new PV names
        self.pv_rows: list[int] = []  # rows per PV column (written + buffered)
        self._bytes: list[bytes] = []
        self.bytes_len = 0
        self.buffered_bytes = 0
        for name in pv_names:
            self.column(name)
        self._rows: list[tuple[Any, ...]] = []  # SAMPLE_COLUMNS order
        self._pools: dict[int, list[npt.NDArray[Any]]] = collections.defaultdict(list)
        self.pool_len: dict[int, int] = collections.defaultdict(int)
        self._meta: dict[str, list[int]] = {k: [] for k in META_COLUMNS}
        self._iters: dict[str, list[Any]] = {k: [] for k in ITERATION_COLUMNS}
        self._tags: dict[str, list[int]] = {k: [] for k in TAG_COLUMNS}
        # tags of iterations not closed in this segment (moved to the next one on rotation)
        self.tags_pending: dict[int, dict[str, str]] = {}
        self._prev_rest: dict[int, Any] = {}
        self._prev_rest_json: dict[int, bytes] = {}
        self.open: collections.OrderedDict[int, _Open] = collections.OrderedDict()
        self._recently_closed: collections.deque[int] = collections.deque(maxlen=256)
        self.next_row = 0
        self._offsets: dict[tuple[str, int], int] = {}
        self._held_from = -1
        self._durable: dict[tuple[str, int], int] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self.iterations_closed = 0
        self.values_total = 0

    # --- PVs ----------------------------------------------------------------------------------
    def column(self, pv: str) -> int:
        col = self.pv_columns.get(pv)
        if col is None:
            col = len(self.pv_names)
            self.pv_columns[pv] = col
            self.pv_names.append(pv)
            self._new_pvs.append(pv)
            raw = pv.encode("utf-8", "surrogatepass")
            self._pv_entries.append((self._add_bytes(raw), len(raw)))
            self.pv_rows.append(0)
        return col

    # --- trigger tags -------------------------------------------------------------------------
    def tag(self, iter_index: int, tags: Mapping[str, str]) -> None:
        """Record trigger ``tags`` for iteration ``iter_index`` (before it opens, while it is
        open, or after it closed): one /live/tags row; joined with /iterations at finalize."""
        clean = {str(k): str(v) for k, v in tags.items()}
        raw = tags_json(clean).encode("utf-8")
        t = self._tags
        t["iter_index"].append(int(iter_index))
        t["size"].append(len(raw))
        t["offset"].append(self._add_bytes(raw))
        if iter_index not in self._recently_closed:
            self.tags_pending.setdefault(int(iter_index), {}).update(clean)

    # --- events -------------------------------------------------------------------------------
    def handle(self, event: IterationEvent) -> list[int]:
        """Buffer one event; returns the /iterations rows closed by it (possibly several)."""
        key = (event.topic, event.partition)
        # (as the current buffer: an opening's offset is not taken as handled; what is held
        # in memory holds messages after the offsets handled before it)
        before = self._offsets.get(key, -1)
        self._held_from = -1 if event.offset < 0 or isinstance(event, IterationOpened) else (
            min(before + 1, event.offset))
        if self._held_from >= 0 and event.offset > before:
            self._offsets[key] = event.offset
        if isinstance(event, IterationOpened):
            it = self.open.get(event.iter_index)
            if it is None:
                self._open(event.iter_index, event.header_timestamp_ns)
            elif it.header_timestamp_ns is None:
                it.header_timestamp_ns = event.header_timestamp_ns
            return []
        if isinstance(event, ValuesReceived):
            self._values(event)
            return []
        return self._closed(event)

    def _open(self, iter_index: int, header_ts: int | None) -> _Open:
        it = _Open(iter_index, header_ts)
        self.open[iter_index] = it
        if len(self.open) == 1:
            self._activate(it)
        return it

    def _activate(self, it: _Open) -> None:
        it.row = self.next_row
        self.next_row += 1
        for col, split, _offset in it.pending:
            self._append(col, split, it.row, it.iter_index)
        it.n_written += len(it.pending)
        it.pending = []

    def _values(self, event: ValuesReceived) -> None:
        it = self.open.get(event.iter_index)
        if it is None:
            if event.iter_index in self._recently_closed:
                self.counters["values_after_close"] += len(event.samples)
                for sample in event.samples:
                    self._append(self.column(sample.pv), split_sample(sample), -1, event.iter_index)
                return
            self.counters["values_without_open"] += 1
            it = self._open(event.iter_index, None)
        if event.late:
            self.counters["late_batches"] += 1
        if it.row is None and next(iter(self.open)) == event.iter_index:
            self._activate(it)
        self.values_total += len(event.samples)
        if it.row is not None:
            for sample in event.samples:
                self._append(self.column(sample.pv), split_sample(sample), it.row, it.iter_index)
            it.n_written += len(event.samples)
        else:
            for sample in event.samples:
                split = split_sample(sample)
                it.pending.append((self.column(sample.pv), split, self._held_from))
                self.buffered_bytes += _split_bytes(split)

    def _closed(self, event: IterationClosed) -> list[int]:
        it = self.open.get(event.iter_index)
        if it is None:
            it = self._open(event.iter_index, event.header_timestamp_ns)
        it.closed = event
        it.held_from = self._held_from
        rows: list[int] = []
        # close from the oldest while the oldest is closed (rows stay in activation order);
        # the next open iteration is activated by activate_oldest() (after a segment rotation)
        while self.open:
            oldest = next(iter(self.open.values()))
            if oldest.closed is None:
                break
            if oldest.row is None:
                self._activate(oldest)
            self.open.popitem(last=False)
            self._recently_closed.append(oldest.iter_index)
            self._iteration_row(oldest, oldest.closed, None)
            rows.append(oldest.row or 0)
        return rows

    def activate_oldest(self) -> None:
        if self.open:
            oldest = next(iter(self.open.values()))
            if oldest.row is None:
                self._activate(oldest)

    def close_open(self, reason: str) -> list[int]:
        """Close every open iteration as incomplete (the recording stops)."""
        rows: list[int] = []
        while self.open:
            _, it = self.open.popitem(last=False)
            if it.row is None:
                self._activate(it)
            self._iteration_row(it, it.closed, reason)
            rows.append(it.row or 0)
        return rows

    def _iteration_row(self, it: _Open, ev: IterationClosed | None, reason: str | None) -> None:
        self.iterations_closed += 1
        self.tags_pending.pop(it.iter_index, None)
        c = self._iters
        if ev is not None:
            msg = ev.error_message.encode("utf-8", "surrogatepass") if ev.error_message else b""
            c["iter_index"].append(ev.iter_index)
            c["header_timestamp"].append(ev.header_timestamp_ns or it.header_timestamp_ns or 0)
            c["tail_timestamp"].append(ev.tail_timestamp_ns or 0)
            complete = ev.status is IterationStatus.COMPLETE
            c["status"].append(ITERATION_STATUS["complete" if complete else "incomplete"])
            c["reason"].append(ITERATION_REASONS[ev.reason.value] if ev.reason else 0)
            c["error_code"].append(ev.error_code)
            if msg:
                c["error_message"].append(self._add_bytes(msg))
            else:
                c["error_message"].append(-1)
            c["error_message_size"].append(len(msg))
            c["n_values"].append(ev.n_values)
            c["n_pvs"].append(ev.n_pvs)
            c["n_batches"].append(ev.n_batches)
            c["expected_messages"].append(
                -1 if ev.expected_messages is None else ev.expected_messages
            )
            c["missing_messages"].append(-1 if ev.missing_messages is None else ev.missing_messages)
            c["duplicates"].append(ev.duplicates)
            c["partition"].append(ev.partition)
            c["offset"].append(ev.offset)
        else:
            c["iter_index"].append(it.iter_index)
            c["header_timestamp"].append(it.header_timestamp_ns or 0)
            c["tail_timestamp"].append(0)
            c["status"].append(ITERATION_STATUS["incomplete"])
            c["reason"].append(ITERATION_REASONS[reason or "recording_stopped"])
            for name in ("error_code", "n_values", "n_pvs", "n_batches", "duplicates"):
                c[name].append(0)
            c["error_message"].append(-1)
            c["error_message_size"].append(0)
            c["expected_messages"].append(-1)
            c["missing_messages"].append(-1)
            c["partition"].append(-1)
            c["offset"].append(-1)
        c["n_written"].append(it.n_written)

    # --- column buffers -----------------------------------------------------------------------
    def _add_bytes(self, raw: bytes) -> int:
        offset = self.bytes_len
        self._bytes.append(raw)
        self.bytes_len += len(raw)
        self.buffered_bytes += len(raw)
        return offset

    def _append(self, col: int, s: Split, iter_row: int, iteration: int) -> None:
        row = self.pv_rows[col]
        self.pv_rows[col] = row + 1
        # the rest is stored when it changes (compare dicts first, JSON only when they differ)
        prev = self._prev_rest.get(col)
        if prev is None or not same_rest(prev, s.rest):
            raw = encode_rest(s.rest)
            if raw != self._prev_rest_json.get(col):
                m = self._meta
                m["pv"].append(col)
                m["row"].append(row)
                m["size"].append(len(raw))
                m["offset"].append(self._add_bytes(raw))
                self._prev_rest_json[col] = raw
            self._prev_rest[col] = s.rest
        if s.array is not None:
            pool_offset = self.pool_len[s.dtype]
            size = int(s.array.size)
            self._pools[s.dtype].append(s.array.reshape(-1))
            self.pool_len[s.dtype] = pool_offset + size
            self.buffered_bytes += s.array.nbytes
        elif s.text is not None:
            size = len(s.text)
            pool_offset = self._add_bytes(s.text)
        else:
            pool_offset = -1
            size = 0
        # one tuple per row (columns are made by numpy in take(): cheaper than 13 appends)
        self._rows.append((col, iter_row, iteration, s.time_ns, s.severity, s.status,
                           s.user_tag, s.flags, s.kind, s.dtype, s.ival, s.fval, pool_offset,
                           size))
        self.buffered_bytes += SAMPLE_ROW_BYTES

    # --- flushing -----------------------------------------------------------------------------
    def durable_offsets(self) -> dict[tuple[str, int], int]:
        """Highest offsets whose data is in the batches taken so far (pending data excluded)."""
        return dict(self._durable)

    def take(self) -> FlushBatch:
        """Everything buffered (except samples of not-yet-active iterations), as arrays."""
        table = np.array(self._rows, dtype=_ROW_DTYPE)
        samples = {k: np.ascontiguousarray(table[k]) for k in SAMPLE_COLUMNS}
        pools = {}
        for code, arrays in self._pools.items():
            if arrays:
                pools[code] = np.concatenate(arrays).astype(DTYPE_BY_CODE[code], copy=False)
        byte_pool = np.frombuffer(b"".join(self._bytes), dtype=np.uint8)
        meta = {k: np.array(v, dtype=META_COLUMNS[k]) for k, v in self._meta.items()}
        iterations = {k: np.array(v, dtype=ITERATION_COLUMNS[k]) for k, v in self._iters.items()}
        # offsets are durable up to the first event whose data still waits in memory
        offsets = dict(self._offsets)
        for it in self.open.values():
            held = [offset for _col, _split, offset in it.pending]
            if it.closed is not None:
                held.append(it.held_from)
            for offset in held:
                for key in list(offsets):
                    if offset >= 0 and offsets[key] >= offset:
                        offsets[key] = offset - 1
        self._durable.update(offsets)
        batch = FlushBatch(
            samples=samples,
            pools=pools,
            byte_pool=byte_pool,
            meta=meta,
            iterations=iterations,
            new_pvs=self._new_pvs,
            pvs={
                "offset": np.array([o for o, _ in self._pv_entries], dtype=np.int64),
                "size": np.array([n for _, n in self._pv_entries], dtype=np.int64),
            },
            offsets=offsets,
            tags={k: np.array(v, dtype=TAG_COLUMNS[k]) for k, v in self._tags.items()},
        )
        self._tags = {k: [] for k in TAG_COLUMNS}
        self._rows = []
        self._pools = collections.defaultdict(list)
        self._bytes = []
        self._meta = {k: [] for k in META_COLUMNS}
        self._iters = {k: [] for k in ITERATION_COLUMNS}
        self._new_pvs = []
        self._pv_entries = []
        self.buffered_bytes = sum(
            _split_bytes(s) for it in self.open.values() for _c, s, _o in it.pending
        )
        return batch

    def carry_over(self) -> RecordingBuffer:
        """A fresh buffer for the next segment: same PV columns, the open iterations moved."""
        nxt = RecordingBuffer(self.pv_names)
        nxt._offsets = dict(self._offsets)
        nxt._durable = dict(self._durable)
        for iter_index, it in self.open.items():
            moved = nxt._open(iter_index, it.header_timestamp_ns)
            moved.closed = it.closed
            moved.held_from = it.held_from
            if moved.row is None:
                moved.pending = it.pending
            else:
                for col, split, _offset in it.pending:
                    nxt._append(col, split, moved.row, iter_index)
                moved.n_written += len(it.pending)
        self.open.clear()
        for iter_index, tags in self.tags_pending.items():  # not (yet) in this segment
            nxt.tag(iter_index, tags)
        return nxt


def tags_json(tags: Mapping[str, str]) -> str:
    """Trigger tags as stored: a compact JSON object (\\u escapes only for lone surrogates)."""
    text = json.dumps(dict(tags), ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(dict(tags), separators=(",", ":"))
    return text


def merge_tags(
    iter_index: npt.NDArray[np.int64],
    offset: npt.NDArray[np.int64],
    size: npt.NDArray[np.int64],
    byte_pool: npt.NDArray[np.uint8],
) -> dict[int, dict[str, str]]:
    """/live/tags rows -> iter_index -> tags (several rows for one iteration are merged in
    order, later keys win)."""
    out: dict[int, dict[str, str]] = {}
    for i, o, z in zip(iter_index.tolist(), offset.tolist(), size.tolist(), strict=True):
        raw = byte_pool[o : o + z].tobytes().decode("utf-8", "replace")
        try:
            tags = json.loads(raw)
        except ValueError:
            continue
        if isinstance(tags, dict):
            out.setdefault(i, {}).update({str(k): str(v) for k, v in tags.items()})
    return out


def _split_bytes(split: Split) -> int:
    return SAMPLE_ROW_BYTES + (split.array.nbytes if split.array is not None else 0) + 256
