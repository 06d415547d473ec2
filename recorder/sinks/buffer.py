"""In-memory side of a recording: iteration bookkeeping and column buffers (pure code).

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
import operator
from collections.abc import Iterable, Mapping, Sequence
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
from recorder.client.values import RAW_END, RAW_MESSAGE, RAW_START, PVSample
from recorder.sinks.codec import DTYPE_BY_CODE, Split, encode_rest, split_sample
from recorder.sinks.template import PAD, Columns, Piece, TemplateSet

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
_COMPLETE = ITERATION_STATUS["complete"]
_INCOMPLETE = ITERATION_STATUS["incomplete"]

# /live/samples columns: one row per PV value, in arrival order (per PV: row order)
SAMPLE_COLUMNS: dict[str, np.dtype[Any]] = {
    "pv": np.dtype(np.int32),  # column in /pvs (pv_names attribute order)
    "iter_row": np.dtype(np.int64),  # row in /iterations, -1 = arrived after its iteration closed
    "iteration": np.dtype(np.int64),  # k2eg iter_index
    "time": np.dtype(np.int64),  # EPICS timeStamp, ns since epoch
    "severity": np.dtype(np.int32),
    "status": np.dtype(np.int32),
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


# a run of buffered rows from one event: PV columns, samples (or eager splits), message bytes
# (None for an eager split), estimated memory
@dataclass(slots=True)
class _Chunk:
    cols: list[int]
    items: Sequence[PVSample | Split]
    msgs: list[bytes | None]
    nbytes: int
    offset: int  # Kafka offset of the event


@dataclass(slots=True)
class _Open:
    iter_index: int
    header_timestamp_ns: int | None
    row: int | None = None  # assigned on activation
    pending: list[_Chunk] = field(default_factory=list)
    closed: IterationClosed | None = None
    n_written: int = 0


_PV_OF = operator.attrgetter("pv")
CHUNK_BYTES = 4 << 20  # payload bytes decoded at once (bounds the temporaries of take())
LEARN_ROUNDS = 4  # per chunk: learn from the first unmatched row of each PV, retry


class RecordingBuffer:
    """Everything of one recording segment that is not yet in the file.

    Samples are kept as they came (lazily-built samples: their msgpack bytes) and decoded at
    :meth:`take`: with learned templates (:mod:`recorder.sinks.template`), vectorized over
    all the rows that share a layout, and through :func:`split_sample` for the rest
    (``fast=False``: always). Eagerly-built samples are split at once.
    """

    def __init__(self, pv_names: Iterable[str] = (), *, fast: bool = True,
                 templates: TemplateSet | None = None) -> None:
        self.fast = fast
        self.templates = templates if templates is not None else TemplateSet()
        self.pv_names: list[str] = []
        self.pv_columns: dict[str, int] = {}
        self._new_pvs: list[str] = []
        self._pv_entries: list[tuple[int, int]] = []  # (byte offset, size) of new PV names
        self.pv_rows: list[int] = []  # rows per PV column (written + taken)
        self._bytes: list[bytes] = []
        self.bytes_len = 0
        self.buffered_bytes = 0
        for name in pv_names:
            self.column(name)
        # buffered rows in arrival order (samples of active iterations)
        self._items: list[PVSample | Split] = []
        self._msgs: list[bytes | None] = []
        self._cols: list[int] = []
        self._runs: list[tuple[int, int, int]] = []  # (rows, iter_row, iteration)
        self.pool_len: dict[int, int] = collections.defaultdict(int)
        self._meta: dict[str, list[int]] = {k: [] for k in META_COLUMNS}
        self._iter_rows: list[tuple[int, ...]] = []  # ITERATION_COLUMNS order
        self._tags: dict[str, list[int]] = {k: [] for k in TAG_COLUMNS}
        # tags of iterations not closed in this segment (moved to the next one on rotation)
        self.tags_pending: dict[int, dict[str, str]] = {}
        self._prev_rest: dict[int, Any] = {}
        self._prev_rest_json: dict[int, bytes] = {}
        self.open: collections.OrderedDict[int, _Open] = collections.OrderedDict()
        self._recently_closed: collections.deque[int] = collections.deque(maxlen=256)
        self.next_row = 0
        self._offsets: dict[tuple[str, int], int] = {}
        self._durable: dict[tuple[str, int], int] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self.iterations_closed = 0
        self.values_total = 0
        self._raw_seen = 0  # raw rows decoded so far (template learning back-off)

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
        offset = event.offset
        if offset >= 0:
            key = (event.topic, event.partition)
            if offset > self._offsets.get(key, -1):
                self._offsets[key] = offset
        cls = event.__class__
        if cls is ValuesReceived:
            self._values(event)  # type: ignore[arg-type]
            return []
        if cls is IterationOpened:
            ev: IterationOpened = event  # type: ignore[assignment]
            it = self.open.get(ev.iter_index)
            if it is None:
                self._open(ev.iter_index, ev.header_timestamp_ns)
            elif it.header_timestamp_ns is None:
                it.header_timestamp_ns = ev.header_timestamp_ns
            return []
        if isinstance(event, ValuesReceived):
            self._values(event)
            return []
        if isinstance(event, IterationOpened):
            it = self.open.get(event.iter_index)
            if it is None:
                self._open(event.iter_index, event.header_timestamp_ns)
            elif it.header_timestamp_ns is None:
                it.header_timestamp_ns = event.header_timestamp_ns
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
        for chunk in it.pending:
            self._add(chunk, it.row, it.iter_index, count=False)
            it.n_written += len(chunk.items)
        it.pending = []

    def _chunk(self, samples: Sequence[PVSample], offset: int) -> _Chunk:
        cols: list[int | None] = list(map(self.pv_columns.get, map(_PV_OF, samples)))
        if None in cols:
            cols = [self.column(s.pv) for s in samples]
        msgs = list(map(RAW_MESSAGE, samples))
        if None not in msgs:
            nbytes = sum(map(len, msgs)) + SAMPLE_ROW_BYTES * len(msgs)  # type: ignore[arg-type]
            return _Chunk(cols, samples, msgs, nbytes, offset)  # type: ignore[arg-type]
        items: list[PVSample | Split] = []
        nbytes = 0
        for s, m in zip(samples, msgs, strict=True):
            if m is None:
                split = split_sample(s)
                items.append(split)
                nbytes += _split_bytes(split)
            else:
                items.append(s)
                nbytes += len(m) + SAMPLE_ROW_BYTES
        return _Chunk(cols, items, msgs, nbytes, offset)  # type: ignore[arg-type]

    def _add(self, chunk: _Chunk, iter_row: int, iteration: int, *, count: bool = True) -> None:
        self._items.extend(chunk.items)
        self._msgs.extend(chunk.msgs)
        self._cols.extend(chunk.cols)
        self._runs.append((len(chunk.items), iter_row, iteration))
        if count:
            self.buffered_bytes += chunk.nbytes

    def _values(self, event: ValuesReceived) -> None:
        it = self.open.get(event.iter_index)
        if it is None:
            if event.iter_index in self._recently_closed:
                self.counters["values_after_close"] += len(event.samples)
                self._add(self._chunk(event.samples, event.offset), -1, event.iter_index)
                return
            self.counters["values_without_open"] += 1
            it = self._open(event.iter_index, None)
        if event.late:
            self.counters["late_batches"] += 1
        if it.row is None and next(iter(self.open)) == event.iter_index:
            self._activate(it)
        n = len(event.samples)
        self.values_total += n
        if not n:
            return
        chunk = self._chunk(event.samples, event.offset)
        if it.row is not None:
            self._add(chunk, it.row, it.iter_index)
            it.n_written += n
        else:
            it.pending.append(chunk)
            self.buffered_bytes += chunk.nbytes

    def _closed(self, event: IterationClosed) -> list[int]:
        it = self.open.get(event.iter_index)
        if it is None:
            it = self._open(event.iter_index, event.header_timestamp_ns)
        it.closed = event
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
        if self.tags_pending:
            self.tags_pending.pop(it.iter_index, None)
        if ev is not None:
            if ev.error_message:
                msg = ev.error_message.encode("utf-8", "surrogatepass")
                msg_offset = self._add_bytes(msg)
            else:
                msg = b""
                msg_offset = -1
            self._iter_rows.append((
                ev.iter_index,
                ev.header_timestamp_ns or it.header_timestamp_ns or 0,
                ev.tail_timestamp_ns or 0,
                _COMPLETE if ev.status is IterationStatus.COMPLETE else _INCOMPLETE,
                ITERATION_REASONS[ev.reason.value] if ev.reason else 0,
                ev.error_code,
                msg_offset,
                len(msg),
                ev.n_values,
                ev.n_pvs,
                ev.n_batches,
                it.n_written,
                -1 if ev.expected_messages is None else ev.expected_messages,
                -1 if ev.missing_messages is None else ev.missing_messages,
                ev.duplicates,
                ev.partition,
                ev.offset,
            ))
        else:
            self._iter_rows.append((
                it.iter_index, it.header_timestamp_ns or 0, 0, _INCOMPLETE,
                ITERATION_REASONS[reason or "recording_stopped"], 0, -1, 0, 0, 0, 0,
                it.n_written, -1, -1, 0, -1, -1,
            ))  # fmt: skip

    # --- column buffers -----------------------------------------------------------------------
    def _add_bytes(self, raw: bytes) -> int:
        offset = self.bytes_len
        self._bytes.append(raw)
        self.bytes_len += len(raw)
        self.buffered_bytes += len(raw)
        return offset

    # --- flushing -----------------------------------------------------------------------------
    def durable_offsets(self) -> dict[tuple[str, int], int]:
        """Highest offsets whose data is in the batches taken so far (pending data excluded)."""
        return dict(self._durable)

    def take(self) -> FlushBatch:
        """Everything buffered (except samples of not-yet-active iterations), as arrays."""
        samples, pools = self._columns()
        byte_pool = np.frombuffer(b"".join(self._bytes), dtype=np.uint8)
        meta = {k: np.array(v, dtype=META_COLUMNS[k]) for k, v in self._meta.items()}
        if self._iter_rows:
            iterations = {
                k: np.array(v, dtype=ITERATION_COLUMNS[k])
                for k, v in zip(ITERATION_COLUMNS, zip(*self._iter_rows, strict=True),
                                strict=True)
            }
        else:
            iterations = {k: np.zeros(0, dtype=dt) for k, dt in ITERATION_COLUMNS.items()}
        # offsets are durable up to the first event whose data still waits in memory
        offsets = dict(self._offsets)
        for it in self.open.values():
            for chunk in it.pending:
                offset = chunk.offset
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
        self._bytes = []
        self._meta = {k: [] for k in META_COLUMNS}
        self._iter_rows = []
        self._new_pvs = []
        self._pv_entries = []
        self.buffered_bytes = sum(c.nbytes for it in self.open.values() for c in it.pending)
        return batch

    def _columns(self) -> tuple[dict[str, npt.NDArray[Any]], dict[int, npt.NDArray[Any]]]:
        """The buffered rows as /live/samples columns and pool elements (rows are consumed)."""
        items, msgs, runs = self._items, self._msgs, self._runs
        n = len(items)
        cols = np.array(self._cols, dtype=np.int64)
        self._items, self._msgs, self._cols, self._runs = [], [], [], []
        if runs:
            counts, irows, iters = (np.array(x, dtype=np.int64) for x in zip(*runs, strict=True))
            iter_row = np.repeat(irows, counts)
            iteration = np.repeat(iters, counts)
        else:
            iter_row = iteration = np.zeros(0, np.int64)
        out = Columns(n)
        pieces: list[Piece] = []
        splits: dict[int, Split] = {}
        if self.fast and n:
            self.templates.compact()
            self._decode(items, msgs, cols, out=out, pieces=pieces, splits=splits)
        # the slow path: split_sample
        slow = np.flatnonzero(out.tid < 0)
        texts: dict[int, bytes] = {}
        arrays: list[tuple[int, npt.NDArray[Any]]] = []
        rests: dict[int, dict[str, Any]] = {}
        if len(slow):
            c_time: list[int] = []
            c_sev: list[int] = []
            c_stat: list[int] = []
            c_flags: list[int] = []
            c_kind: list[int] = []
            c_dtype: list[int] = []
            c_ival: list[int] = []
            c_fval: list[float] = []
            c_size: list[int] = []
            for i in slow.tolist():
                s = splits.get(i)
                if s is None:
                    item = items[i]
                    s = item if item.__class__ is Split else split_sample(item)  # type: ignore[arg-type]
                c_time.append(s.time_ns)
                c_sev.append(s.severity)
                c_stat.append(s.status)
                c_flags.append(s.flags)
                c_kind.append(s.kind)
                c_dtype.append(s.dtype)
                c_ival.append(s.ival)
                c_fval.append(s.fval)
                rests[i] = s.rest
                if s.array is not None:
                    c_size.append(int(s.array.size))
                    arrays.append((i, s.array))
                else:
                    c_size.append(-1)
                    if s.text is not None:
                        texts[i] = s.text
            out.time[slow] = np.array(c_time, dtype=np.int64)
            out.severity[slow] = np.array(c_sev, dtype=np.int64)
            out.status[slow] = np.array(c_stat, dtype=np.int64)
            out.flags[slow] = np.array(c_flags, dtype=np.uint8)
            out.kind[slow] = np.array(c_kind, dtype=np.uint8)
            out.dtype[slow] = np.array(c_dtype, dtype=np.uint8)
            out.ival[slow] = np.array(c_ival, dtype=np.int64)
            out.fval[slow] = np.array(c_fval, dtype=np.float64)
            out.size[slow] = np.array(c_size, dtype=np.int64)
        offset = np.full(n, -1, np.int64)
        size = np.maximum(out.size, 0)
        self._rests_and_texts(cols, out.tid, rests=rests, texts=texts, offset=offset, size=size)
        pools = self._pools(out, pieces, arrays, offset)
        samples: dict[str, npt.NDArray[Any]] = {
            "pv": cols.astype(np.int32),
            "iter_row": iter_row,
            "iteration": iteration,
            "time": out.time,
            "severity": out.severity.astype(np.int32),
            "status": out.status.astype(np.int32),
            "flags": out.flags,
            "kind": out.kind,
            "dtype": out.dtype,
            "ival": out.ival,
            "fval": out.fval,
            "offset": offset,
            "size": size,
        }
        return samples, pools

    def _decode(self, items: list[PVSample | Split], msgs: list[bytes | None],
                cols: npt.NDArray[np.int64], *, out: Columns, pieces: list[Piece],
                splits: dict[int, Split]) -> None:
        """Decode the rows that match a template (learning templates on the way)."""
        if None in msgs:
            raw_rows = np.array([i for i, m in enumerate(msgs) if m is not None], np.int64)
            r_msgs: list[bytes] = [msgs[i] for i in raw_rows.tolist()]
            r_items: list[PVSample] = [items[i] for i in raw_rows.tolist()]
        else:
            raw_rows = np.arange(len(msgs), dtype=np.int64)
            r_msgs, r_items = msgs, items  # type: ignore[assignment]
        n = len(raw_rows)
        if not n:
            return
        starts = np.fromiter(map(RAW_START, r_items), np.int64, n)
        lens = np.fromiter(map(len, r_msgs), np.int64, n)
        ends_list = list(map(RAW_END, r_items))
        if ends_list.count(None) == n:
            ends = lens
        else:
            ends = np.array([ln if e is None else e for e, ln in
                             zip(ends_list, lens.tolist(), strict=True)], np.int64)
        plen = ends - starts
        r_cols = cols[raw_rows]
        cum = np.cumsum(lens)
        templates = self.templates
        a = 0
        while a < n:
            before = int(cum[a - 1]) if a else 0
            b = max(a + 1, int(np.searchsorted(cum, before + CHUNK_BYTES, "right")))
            part = r_msgs[a:b]
            part.append(PAD)
            big = np.frombuffer(b"".join(part), np.uint8)
            del part
            pos = cum[a:b] - lens[a:b] - before + starts[a:b]
            c_cols = r_cols[a:b]
            c_len = plen[a:b]
            left = np.arange(b - a, dtype=np.int64)
            for _round in range(LEARN_ROUNDS):
                tids = templates.lookup(c_cols[left], c_len[left])
                has = tids >= 0
                if has.any():
                    sub = left[has]
                    hit = templates.decode(big, pos[sub], tids[has], raw_rows[a + sub],
                                           out=out, pieces=pieces)
                    left = np.sort(np.concatenate((left[~has], sub[~hit])))
                if not len(left):
                    break
                _, first = np.unique(c_cols[left], return_index=True)
                learned = False
                for j in np.sort(left[first]).tolist():
                    col = int(c_cols[j])
                    if not templates.may_learn(col, self._raw_seen):
                        continue
                    row = int(raw_rows[a + j])
                    split = splits.get(row)
                    if split is None:
                        split = splits[row] = split_sample(r_items[a + j])
                    payload = r_msgs[a + j][int(starts[a + j]) : int(ends[a + j])]
                    if templates.learn(col, payload, split):
                        learned = True
                    else:
                        templates.failed(col, self._raw_seen)
                if not learned:
                    break
            self._raw_seen += b - a
            a = b

    def _rests_and_texts(self, cols: npt.NDArray[np.int64], tid: npt.NDArray[np.int64], *,
                         rests: dict[int, dict[str, Any]], texts: dict[int, bytes],
                         offset: npt.NDArray[np.int64], size: npt.NDArray[np.int64]) -> None:
        """/live/meta rows where a PV's rest changes (as row by row: compared with the PV's
        previous rest, stored when its JSON differs) and string values, in arrival order."""
        n = len(cols)
        if not n:
            return
        key = tid.copy()
        slow = np.flatnonzero(tid < 0)
        key[slow] = -2 - slow  # every slow row has its own rest
        order = np.argsort(cols, kind="stable")
        sc = cols[order]
        sk = key[order]
        new_pv = np.empty(n, np.bool_)
        new_pv[0] = True
        np.not_equal(sc[1:], sc[:-1], out=new_pv[1:])
        change = new_pv.copy()
        change[1:] |= sk[1:] != sk[:-1]
        starts = np.flatnonzero(new_pv)
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))
        n_pvs = len(self.pv_rows)
        base = np.array(self.pv_rows, dtype=np.int64)
        counts = np.bincount(cols, minlength=n_pvs)
        self.pv_rows = (base + counts).tolist()
        special = np.zeros(n, np.bool_)
        special[order[change]] = True
        special[list(texts)] = True
        is_change = np.zeros(n, np.bool_)
        is_change[order[change]] = True
        templates = self.templates.templates
        m = self._meta
        for i in np.flatnonzero(special).tolist():
            if is_change[i]:
                col = int(cols[i])
                t = int(tid[i])
                tmpl = templates[t] if t >= 0 else None
                rest = tmpl.split.rest if tmpl is not None else rests[i]
                prev = self._prev_rest.get(col)
                if prev is None or prev != rest:
                    if tmpl is not None:
                        raw = tmpl.rest_json
                        if raw is None:
                            raw = tmpl.rest_json = encode_rest(rest)
                    else:
                        raw = encode_rest(rest)
                    if raw != self._prev_rest_json.get(col):
                        m["pv"].append(col)
                        m["row"].append(int(base[col] + rank[i]))
                        m["size"].append(len(raw))
                        m["offset"].append(self._add_bytes(raw))
                        self._prev_rest_json[col] = raw
                    self._prev_rest[col] = rest
            text = texts.get(i)
            if text is not None:
                offset[i] = self._add_bytes(text)
                size[i] = len(text)

    def _pools(self, out: Columns, pieces: list[Piece],
               arrays: list[tuple[int, npt.NDArray[Any]]],
               offset: npt.NDArray[np.int64]) -> dict[int, npt.NDArray[Any]]:
        """Array elements per dtype in arrival order; sets ``offset`` of the array rows."""
        has = out.size >= 0
        if not has.any():
            return {}
        rows = np.flatnonzero(has)
        codes = out.dtype[rows]
        pools: dict[int, npt.NDArray[Any]] = {}
        for code in np.unique(codes).tolist():
            r = rows[codes == code]
            sizes = out.size[r]
            start = self.pool_len[code]
            ends = np.cumsum(sizes)
            total = int(ends[-1])
            offset[r] = start + ends - sizes
            pool = np.empty(total, dtype=DTYPE_BY_CODE[code])
            for pr, arr, pcode in pieces:
                if pcode == code:
                    _place(pool, offset[pr] - start, arr)
            for i, arr in arrays:
                if out.dtype[i] == code:
                    o = int(offset[i]) - start
                    pool[o : o + arr.size] = arr.reshape(-1)
            pools[code] = pool
            self.pool_len[code] = start + total
        return pools

    def carry_over(self) -> RecordingBuffer:
        """A fresh buffer for the next segment: same PV columns, the open iterations moved."""
        nxt = RecordingBuffer(self.pv_names, fast=self.fast, templates=self.templates)
        nxt._offsets = dict(self._offsets)
        nxt._durable = dict(self._durable)
        nxt._raw_seen = self._raw_seen
        for iter_index, it in self.open.items():
            moved = nxt._open(iter_index, it.header_timestamp_ns)
            moved.closed = it.closed
            if moved.row is None:
                moved.pending = it.pending
                nxt.buffered_bytes += sum(c.nbytes for c in it.pending)
            else:
                for chunk in it.pending:
                    nxt._add(chunk, moved.row, iter_index)
                    moved.n_written += len(chunk.items)
        self.open.clear()
        for iter_index, tags in self.tags_pending.items():  # not (yet) in this segment
            nxt.tag(iter_index, tags)
        return nxt


def _place(pool: npt.NDArray[Any], at: npt.NDArray[np.int64], arr: npt.NDArray[Any]) -> None:
    """pool[at[k] : at[k] + m] = arr[k] for every row k of ``arr`` (n x m)."""
    n, m = arr.shape
    if not m:
        return
    if n > 1:
        step = np.diff(at)
        d = int(step[0])
        if d >= m and bool((step == d).all()):
            item = pool.itemsize
            view = np.lib.stride_tricks.as_strided(
                pool[int(at[0]) :], shape=(n, m), strides=(d * item, item), writeable=True
            )
            view[...] = arr
            return
    for k, o in enumerate(at.tolist()):
        pool[o : o + m] = arr[k]


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
