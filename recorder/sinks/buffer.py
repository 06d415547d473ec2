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
import gc
import json
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import numpy as np
import numpy.ma  # np.unique imports it on first use (~25 ms): here, not in a flush
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
from recorder.sinks.codec import DTYPE_BY_CODE, Split, encode_rest, same_rest, split_sample
from recorder.sinks.packed import PackedSamples
from recorder.sinks.template import PAD, Columns, Piece, RawArrays, TemplateSet, run_starts

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
SPLIT_REASONS = ("recording_stopped", "writer_crashed")
"""The reasons of the last row of a file whose iteration may go on in the next segment (open
at a rotation, or cut by a crash and resumed): it is one iteration when that segment's first
row has its ``iter_index``, with the later row's status."""
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
    "user_tag": np.dtype(np.int32),  # timeStamp.userTag where codec.F_USER_TAG (format 4.0)
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
REST_REUSE_MAX = 16  # distinct structures per PV whose stored JSON is reused (memory bound)
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


# a run of buffered rows from one event: PV columns, samples (eager splits; None for the
# rows of PackedSamples), message bytes (None for an eager split) and each PV map's start and
# end in them (end None: to the end of the message), estimated memory
@dataclass(slots=True)
class _Chunk:
    cols: list[int]
    items: Sequence[PVSample | Split | None]
    msgs: list[bytes | None]
    starts: list[int]
    ends: list[int | None]
    nbytes: int
    # Kafka offset of the event; of a held chunk (an iteration not yet active): the lowest
    # offset its messages may have (the highest offset handled before it, plus one)
    offset: int
    lazy: bool  # every item is a lazily-built sample (all msgs are bytes)


class _PVColumns(dict[str, int]):
    """PV name -> column; an unknown name gets the next column (``new``)."""

    __slots__ = ("new",)

    def __init__(self, new: Callable[[str], int]) -> None:
        super().__init__()
        self.new = new

    def __missing__(self, pv: str) -> int:
        return self.new(pv)


@dataclass(slots=True)
class _Open:
    iter_index: int
    header_timestamp_ns: int | None
    row: int | None = None  # assigned on activation
    pending: list[_Chunk] = field(default_factory=list)
    closed: IterationClosed | None = None
    n_written: int = 0
    held_from: int = -1  # closed while an older one is open: as _Chunk.offset of a held chunk


_PV_OF = operator.attrgetter("pv")
CHUNK_BYTES = 4 << 20  # payload bytes decoded at once (bounds the temporaries of take())
LEARN_ROUNDS = 4  # per take: learn from the first unmatched row of each PV, retry
# runs of rows of one template decoded in place (shorter ones are gathered by layout)
RUN_MIN = 512
BIG_MESSAGE = 2048  # larger messages are joined by template (smaller: in arrival order)
RUN_MIN_BYTES = 256 << 10


@dataclass(slots=True)
class _Messages:
    """The raw rows of a take(): each row's message and PV map start, its size for the
    small/large split, and the distinct messages (consecutive rows may share one)."""

    rows: list[bytes]  # per row
    m_len: npt.NDArray[np.int64]  # per row: its message's length, or its PV map's if shared
    starts: npt.NDArray[np.int64]  # per row: its PV map's start in its message
    uid: npt.NDArray[np.int64]  # per row: its message in u_msgs (non-decreasing)
    u_msgs: list[bytes]
    u_lens: npt.NDArray[np.int64]


def _distinct(
    msgs: list[bytes],
) -> tuple[npt.NDArray[np.int64], list[bytes], npt.NDArray[np.int64]]:
    """(per row: its message's number, the distinct messages, their lengths): a run of rows
    holding the same message object shares one number."""
    n = len(msgs)
    new = run_starts(np.fromiter(map(id, msgs), np.uint64, n))
    uid = np.cumsum(new, dtype=np.int64) - 1
    u_msgs = msgs if int(uid[-1]) == n - 1 else list(map(msgs.__getitem__,
                                                         np.flatnonzero(new).tolist()))
    return uid, u_msgs, np.fromiter(map(len, u_msgs), np.int64, len(u_msgs))


class RecordingBuffer:
    """Everything of one recording segment that is not yet in the file.

    Samples are kept as they came (lazily-built samples: their msgpack bytes; a writer
    process's :class:`~recorder.sinks.packed.PackedSamples`: the blob and each PV map's
    position in it, no object per row) and decoded at :meth:`take`: with learned templates
    (:mod:`recorder.sinks.template`), vectorized over all the rows that share a layout, and
    through :func:`split_sample` for the rest (``fast=False``: always). Eagerly-built samples
    are split at once.

    Decoding joins at most about :data:`CHUNK_BYTES` of messages at a time: small messages in
    arrival order (payloads then gathered by layout), large ones (>= :data:`BIG_MESSAGE`)
    ordered by template so that long runs are decoded in place and their arrays copied into
    the pool with one strided copy per run.
    """

    def __init__(self, pv_names: Iterable[str] = (), *, fast: bool = True,
                 templates: TemplateSet | None = None) -> None:
        self.fast = fast
        self.templates = templates if templates is not None else TemplateSet()
        self.pv_names: list[str] = []
        self.pv_columns: dict[str, int] = _PVColumns(self._new_column)
        self._new_pvs: list[str] = []
        self._pv_entries: list[tuple[int, int]] = []  # (byte offset, size) of new PV names
        self.pv_rows: list[int] = []  # rows per PV column (written + taken)
        self._bytes: list[bytes] = []
        self.bytes_len = 0
        self.buffered_bytes = 0
        # of buffered_bytes, those of samples of iterations not yet active (a flush cannot
        # take them: they wait for the older iterations still open)
        self.pending_bytes = 0
        for name in pv_names:
            self.column(name)
        # buffered rows in arrival order (samples of active iterations): the sample (an
        # eager split; None for a row of PackedSamples), its message (None for an eager
        # split: rows of PackedSamples share their blob) and its PV map's start and end in it
        self._items: list[PVSample | Split | None] = []
        self._msgs: list[bytes | None] = []
        self._starts: list[int] = []
        self._ends: list[int | None] = []
        self._cols: list[int] = []
        self._lazy = True  # every buffered item is a lazily-built sample
        self._runs: list[tuple[int, int, int]] = []  # (rows, iter_row, iteration)
        self.pool_len: dict[int, int] = collections.defaultdict(int)
        self._meta: dict[str, list[int]] = {k: [] for k in META_COLUMNS}
        self._iter_rows: list[tuple[int, ...]] = []  # ITERATION_COLUMNS order
        self._tags: dict[str, list[int]] = {k: [] for k in TAG_COLUMNS}
        # tags of iterations not closed in this segment (moved to the next one on rotation)
        self.tags_pending: dict[int, dict[str, str]] = {}
        self._prev_rest: dict[int, Any] = {}
        self._prev_rest_json: dict[int, bytes] = {}
        # per PV column: rest JSON already in /live/bytes -> (offset, size); a PV going back
        # to an earlier structure (an alarm message flapping between "NO_ALARM" and "HIGH")
        # gets a /live/meta row pointing at the stored bytes instead of a copy
        self._rest_at: dict[int, dict[bytes, tuple[int, int]]] = {}
        self._rest_eq: dict[tuple[int, int], tuple[Any, Any, bool]] = {}
        self.open: collections.OrderedDict[int, _Open] = collections.OrderedDict()
        self._recently_closed: collections.deque[int] = collections.deque(maxlen=256)
        self.max_index = 0  # highest iter_index opened in this segment
        self.next_row = 0
        self._offsets: dict[tuple[str, int], int] = {}
        self._durable: dict[tuple[str, int], int] = {}
        self._held_from = -1  # the event being handled: lowest offset its messages may have
        self.counters: collections.Counter[str] = collections.Counter()
        self.iterations_closed = 0
        self.values_total = 0
        self._raw_seen = 0  # raw rows decoded so far (template learning back-off)

    # --- PVs ----------------------------------------------------------------------------------
    def column(self, pv: str) -> int:
        col = self.pv_columns.get(pv)
        return self._new_column(pv) if col is None else col

    def _new_column(self, pv: str) -> int:
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
        """Buffer one event; returns the /iterations rows closed by it (possibly several).

        An opening's offset is not taken as handled: an iteration opened by its data (or
        tail) carries that message's offset before the message itself is delivered (the
        assembler still holds its batch, and may first deliver an older iteration's), and a
        header alone puts nothing in the file. Every other event's messages come after the
        offsets handled before it, so the messages of an event held in memory (an iteration
        not yet active) begin after them (``_held_from``)."""
        offset = event.offset
        if event.__class__ is IterationOpened:
            offset = -1
        if offset >= 0:
            key = (event.topic, event.partition)
            before = self._offsets.get(key, -1)
            if offset > before:
                self._offsets[key] = offset
                self._held_from = before + 1
            else:
                self._held_from = offset
        else:
            self._held_from = offset
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

    def repeats(self, iter_index: int) -> bool:
        """Would opening ``iter_index`` give this segment a second iteration of that index?
        The gateway's counter began again (a snapshot restart: stopped and started, or a
        restarted gateway). The client emits an iteration's opening once, so an index not
        open now is new unless it closed here: among the last 256 closed, or older than
        all of them (iterations open and close in index order within a few)."""
        if iter_index > self.max_index or iter_index in self.open:
            return False
        recent = self._recently_closed
        return iter_index in recent or (len(recent) == recent.maxlen and iter_index < min(recent))

    def _open(self, iter_index: int, header_ts: int | None) -> _Open:
        if iter_index > self.max_index:  # noqa: PLR1730 (hot path: no call)
            self.max_index = iter_index
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
            self.pending_bytes -= chunk.nbytes
        it.pending = []

    def _chunk(self, samples: Sequence[PVSample], offset: int) -> _Chunk:
        if samples.__class__ is PackedSamples:
            p: PackedSamples = samples
            n = len(p.pvs)
            return _Chunk(list(map(self.pv_columns.__getitem__, p.pvs)), [None] * n,
                          [p.blob] * n, p.starts, list(p.ends),
                          p.payload_bytes + SAMPLE_ROW_BYTES * n, offset, True)
        cols = list(map(self.pv_columns.__getitem__, map(_PV_OF, samples)))
        samples, msgs = raw_messages(samples)
        starts = list(map(RAW_START, samples))
        ends = list(map(RAW_END, samples))
        try:
            nbytes = sum(map(len, msgs)) + SAMPLE_ROW_BYTES * len(msgs)  # type: ignore[arg-type]
        except TypeError:  # eagerly-built samples among them
            pass
        else:
            return _Chunk(cols, samples, msgs, starts, ends, nbytes, offset, True)
        items: list[PVSample | Split | None] = []
        nbytes = 0
        for s, m in zip(samples, msgs, strict=True):
            if m is None:
                split = split_sample(s)
                items.append(split)
                nbytes += _split_bytes(split)
            else:
                items.append(s)
                nbytes += len(m) + SAMPLE_ROW_BYTES
        return _Chunk(cols, items, msgs, starts, ends, nbytes, offset, False)

    def _add(self, chunk: _Chunk, iter_row: int, iteration: int, *, count: bool = True) -> None:
        self._items.extend(chunk.items)
        self._msgs.extend(chunk.msgs)
        self._starts.extend(chunk.starts)
        self._ends.extend(chunk.ends)
        self._cols.extend(chunk.cols)
        if not chunk.lazy:
            self._lazy = False
        self._runs.append((len(chunk.cols), iter_row, iteration))
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
        samples = event.samples
        n = len(samples)
        self.values_total += n
        if not n:
            return
        if it.row is not None:  # the common case, inline: no chunk
            if samples.__class__ is PackedSamples:  # in a writer process: no object per row
                p: PackedSamples = samples
                self._cols.extend(map(self.pv_columns.__getitem__, p.pvs))
                self._items.extend(repeat(None, n))
                self._msgs.extend(repeat(p.blob, n))
                self._starts.extend(p.starts)
                self._ends.extend(p.ends)
                self._runs.append((n, it.row, it.iter_index))
                self.buffered_bytes += p.payload_bytes + SAMPLE_ROW_BYTES * n
                it.n_written += n
                return
            samples, msgs = raw_messages(samples)
            try:
                nbytes = sum(map(len, msgs))  # type: ignore[arg-type]
            except TypeError:  # eagerly-built samples among them
                pass
            else:
                self._cols.extend(map(self.pv_columns.__getitem__, map(_PV_OF, samples)))
                self._items.extend(samples)
                self._msgs.extend(msgs)
                self._starts.extend(map(RAW_START, samples))
                self._ends.extend(map(RAW_END, samples))
                self._runs.append((n, it.row, it.iter_index))
                self.buffered_bytes += nbytes + SAMPLE_ROW_BYTES * n
                it.n_written += n
                return
        if it.row is not None:
            self._add(self._chunk(samples, event.offset), it.row, it.iter_index)
            it.n_written += n
        else:
            chunk = self._chunk(samples, self._held_from)
            it.pending.append(chunk)
            self.buffered_bytes += chunk.nbytes
            self.pending_bytes += chunk.nbytes

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

    def end_segment(self) -> None:
        """Rows, in this segment, for the open iteration whose values it already holds (the
        oldest, active one): incomplete ``recording_stopped`` with its header timestamp; it
        goes on in the next segment (:meth:`carry_over`). Without this row, finalization
        would add one as for a writer that died (``writer_crashed``, no header)."""
        for it in self.open.values():
            if it.row is not None and it.n_written:
                self._iter_rows.append(self._unclosed_row(it, "recording_stopped"))

    def _iteration_row(self, it: _Open, ev: IterationClosed | None, reason: str | None) -> None:
        self.iterations_closed += 1
        if self.tags_pending:
            self.tags_pending.pop(it.iter_index, None)
        if ev is not None:
            if ev.error_message:
                try:  # the gateway's bytes (a text that was not UTF-8: its escapes)
                    msg = ev.error_message.encode("utf-8", "surrogateescape")
                except UnicodeEncodeError:  # other lone surrogates
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
            self._iter_rows.append(self._unclosed_row(it, reason or "recording_stopped"))

    @staticmethod
    def _unclosed_row(it: _Open, reason: str) -> tuple[int, ...]:
        """The /iterations row of an iteration ended without its close event: incomplete for
        ``reason``, its header time and the values it wrote, nothing else known."""
        return (
            it.iter_index, it.header_timestamp_ns or 0, 0, _INCOMPLETE,
            ITERATION_REASONS[reason], 0, -1, 0, 0, 0, 0,
            it.n_written, -1, -1, 0, -1, -1,
        )  # fmt: skip

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
        # the cyclic garbage collector is paused meanwhile: learning templates allocates many
        # long-lived containers (each would-be collection walks every sample in memory), and
        # nothing here makes reference cycles
        paused = gc.isenabled()
        if paused:
            gc.disable()
        try:
            samples, pools = self._columns()
        finally:
            if paused:
                gc.enable()
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
        # offsets are durable up to the first event whose data still waits in memory (the
        # samples and the close of iterations not yet active)
        offsets = dict(self._offsets)
        for it in self.open.values():
            held = [c.offset for c in it.pending]
            if it.closed is not None:  # its row waits for the older ones
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
        self._bytes = []
        self._meta = {k: [] for k in META_COLUMNS}
        self._iter_rows = []
        self._new_pvs = []
        self._pv_entries = []
        self.buffered_bytes = self.pending_bytes = sum(
            c.nbytes for it in self.open.values() for c in it.pending)
        return batch

    def _columns(self) -> tuple[dict[str, npt.NDArray[Any]], dict[int, npt.NDArray[Any]]]:
        """The buffered rows as /live/samples columns and pool elements (rows are consumed)."""
        items, msgs, runs = self._items, self._msgs, self._runs
        starts, ends = self._starts, self._ends
        n = len(items)
        cols = np.array(self._cols, dtype=np.int64)
        lazy = self._lazy
        self._items, self._msgs, self._cols, self._runs = [], [], [], []
        self._starts, self._ends = [], []
        self._lazy = True
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
            self._decode(items, msgs, starts, ends, lazy=lazy, cols=cols, out=out,
                         pieces=pieces, splits=splits)
        # the slow path: split_sample
        slow = np.flatnonzero(out.tid < 0)
        texts: dict[int, bytes] = {}
        arrays: list[tuple[int, npt.NDArray[Any]]] = []
        rests: dict[int, dict[str, Any]] = {}
        if len(slow):
            c_time: list[int] = []
            c_sev: list[int] = []
            c_stat: list[int] = []
            c_tag: list[int] = []
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
                    if item is None:  # a row of PackedSamples
                        item = self._sample(i, cols, msgs, starts, ends)
                    s = item if item.__class__ is Split else split_sample(item)  # type: ignore[arg-type]
                c_time.append(s.time_ns)
                c_sev.append(s.severity)
                c_stat.append(s.status)
                c_tag.append(s.user_tag)
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
            out.user_tag[slow] = np.array(c_tag, dtype=np.int64)
            out.flags[slow] = np.array(c_flags, dtype=np.uint8)
            out.kind[slow] = np.array(c_kind, dtype=np.uint8)
            out.dtype[slow] = np.array(c_dtype, dtype=np.uint8)
            out.ival[slow] = np.array(c_ival, dtype=np.int64)
            out.fval[slow] = np.array(c_fval, dtype=np.float64)
            out.size[slow] = np.array(c_size, dtype=np.int64)
        del msgs, starts, ends
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
            "user_tag": out.user_tag.astype(np.int32),
            "flags": out.flags,
            "kind": out.kind,
            "dtype": out.dtype,
            "ival": out.ival,
            "fval": out.fval,
            "offset": offset,
            "size": size,
        }
        return samples, pools

    def _sample(self, i: int, cols: npt.NDArray[np.int64], msgs: list[bytes | None],
                starts: list[int], ends: list[int | None]) -> PVSample:
        """Row ``i`` of PackedSamples as a sample (for the rows decoded one by one)."""
        return PVSample.from_raw(self.pv_names[int(cols[i])], msgs[i], starts[i], ends[i])  # type: ignore[arg-type]

    def _decode(self, items: list[PVSample | Split | None], msgs: list[bytes | None],
                starts_l: list[int], ends_l: list[int | None], *, lazy: bool,
                cols: npt.NDArray[np.int64], out: Columns, pieces: list[Piece],
                splits: dict[int, Split]) -> None:
        """Decode the rows that match a template (learning templates on the way).

        A row's PV map is ``msg[start:end]``. Consecutive rows may share their message (the
        rows of one PackedSamples share its blob): small rows are then decoded in the shared
        message as it is; PV maps of :data:`BIG_MESSAGE` bytes or more are first copied out
        into their own (so that runs of them are strided matrices, as for other rows)."""
        if lazy:
            raw_rows = np.arange(len(msgs), dtype=np.int64)
            r_msgs: list[bytes] = msgs  # type: ignore[assignment]
            r_starts, r_ends = starts_l, ends_l
        else:
            present = map(operator.is_not, msgs, repeat(None))
            raw_rows = np.flatnonzero(np.fromiter(present, np.bool_, len(msgs)))
            rl = raw_rows.tolist()
            r_msgs = list(map(msgs.__getitem__, rl))  # type: ignore[arg-type]
            r_starts = list(map(starts_l.__getitem__, rl))
            r_ends = list(map(ends_l.__getitem__, rl))
        n = len(raw_rows)
        if not n:
            return
        starts = np.array(r_starts, np.int64)
        uid, u_msgs, u_lens = _distinct(r_msgs)
        if r_ends.count(None):
            ends = np.array([-1 if e is None else e for e in r_ends], np.int64)
            to_end = ends < 0
            ends[to_end] = u_lens[uid[to_end]]
        else:
            ends = np.array(r_ends, np.int64)
        plen = ends - starts
        shared = np.bincount(uid)[uid] > 1
        if len(u_msgs) < n:
            cut = np.flatnonzero(shared & (plen >= BIG_MESSAGE))
            if len(cut):  # big PV maps in a shared message: each copied into its own
                r_msgs = list(r_msgs)
                for j, a, b in zip(cut.tolist(), starts[cut].tolist(), ends[cut].tolist(),
                                   strict=True):
                    r_msgs[j] = r_msgs[j][a:b]
                starts[cut] = 0
                ends[cut] = plen[cut]
                uid, u_msgs, u_lens = _distinct(r_msgs)
                shared = np.bincount(uid)[uid] > 1
        # a row's size for the small/large split: its message, or its PV map when shared
        m_len = np.where(shared, plen, u_lens[uid])
        r_cols = cols[raw_rows]
        templates = self.templates
        pending = np.arange(n, dtype=np.int64)
        tids = templates.lookup(r_cols, plen)
        msgs_of = _Messages(r_msgs, m_len, starts, uid, u_msgs, u_lens)
        for round_ in range(LEARN_ROUNDS + 1):
            has = tids >= 0
            left = pending[~has]
            if has.any():
                sel = pending[has]
                hit = self._decode_rows(sel, tids[has], msgs_of, raw_rows=raw_rows, out=out,
                                        pieces=pieces)
                if not hit.all():
                    left = np.sort(np.concatenate((left, sel[~hit])))
            if not len(left) or round_ == LEARN_ROUNDS:
                break
            # learn from the first unmatched row of each PV, retry
            _, first = np.unique(r_cols[left], return_index=True)
            entries: list[tuple[int, bytes, Split]] = []
            for j in np.sort(left[first]).tolist():
                col = int(r_cols[j])
                if not templates.may_learn(col, self._raw_seen):
                    continue
                row = int(raw_rows[j])
                split = splits.get(row)
                if split is None:
                    item = items[row]
                    if item is None:  # a row of PackedSamples
                        item = self._sample(row, cols, msgs, starts_l, ends_l)
                    split = splits[row] = split_sample(item)  # type: ignore[arg-type]
                entries.append((col, r_msgs[j][int(starts[j]) : int(ends[j])], split))
            learned = templates.learn_many(entries)
            for (col, _, _), ok in zip(entries, learned, strict=True):
                if not ok:
                    templates.failed(col, self._raw_seen)
            if not any(learned):
                break
            pending = left
            tids = templates.lookup(r_cols[left], plen[left])
        self._raw_seen += n

    def _decode_rows(self, sel: npt.NDArray[np.int64], tids: npt.NDArray[np.int64],
                     msgs: _Messages, *, raw_rows: npt.NDArray[np.int64], out: Columns,
                     pieces: list[Piece]) -> npt.NDArray[np.bool_]:
        """Decode raw rows ``sel`` with their templates ``tids``; which rows matched.

        Rows are joined ordered by (template, message length, start), at most about
        :data:`CHUNK_BYTES` at a time: a run of rows of one template with the same message
        length and start is then a strided matrix in the joined bytes (decoded in place with
        a few numpy operations); short runs are gathered by layout."""
        templates = self.templates
        matched = np.zeros(len(sel), np.bool_)
        m_len = msgs.m_len[sel]
        m_start = msgs.starts[sel]
        small = m_len < BIG_MESSAGE
        if small.any():  # joined in arrival order, gathered by layout
            k = np.flatnonzero(small)
            matched[k] = self._decode_small(sel[k], tids[k], msgs, raw_rows=raw_rows, out=out,
                                            pieces=pieces)
            if small.all():
                return matched
            k = np.flatnonzero(~small)
            matched[k] = self._decode_rows(sel[k], tids[k], msgs, raw_rows=raw_rows, out=out,
                                           pieces=pieces)
            return matched
        r_msgs = msgs.rows  # large rows have their own message
        order = np.lexsort((m_start, m_len, tids))
        s, t, ml, ms = sel[order], tids[order], m_len[order], m_start[order]
        new_run = np.empty(len(s), np.bool_)
        new_run[0] = True
        new_run[1:] = (t[1:] != t[:-1]) | (ml[1:] != ml[:-1]) | (ms[1:] != ms[:-1])
        cum = np.cumsum(ml)
        hit_sorted = np.zeros(len(s), np.bool_)
        a = 0
        while a < len(s):
            before = int(cum[a - 1]) if a else 0
            b = max(a + 1, int(np.searchsorted(cum, before + CHUNK_BYTES, "right")))
            part = list(map(r_msgs.__getitem__, s[a:b].tolist()))
            part.append(PAD)
            big = np.frombuffer(bytearray().join(part), np.uint8)
            at = cum[a:b] - ml[a:b] - before  # message starts in big
            rs = np.flatnonzero(new_run[a:b])
            if not len(rs) or rs[0]:  # a run cut by the chunk boundary
                rs = np.concatenate(([0], rs))
            ends = np.append(rs[1:], b - a)
            rows_ = ends - rs
            long_ = (rows_ >= RUN_MIN) | ((rows_ >= 2) & (rows_ * ml[a + rs] >= RUN_MIN_BYTES))
            short: list[npt.NDArray[np.int64]] = []
            for r0, r1, is_long in zip(rs.tolist(), ends.tolist(), long_.tolist(), strict=True):
                if not is_long:
                    short.append(np.arange(r0, r1))
                    continue
                hit_sorted[a + r0 : a + r1] = templates.decode_run(
                    big, raw_rows[s[a + r0 : a + r1]], at=int(at[r0]), msg_len=int(ml[a + r0]),
                    start=int(ms[a + r0]), tid=int(t[a + r0]), out=out, pieces=pieces,
                    msgs=part[r0:r1])
            if short:
                k = np.concatenate(short)
                hit_sorted[a + k] = templates.decode(
                    big, at[k] + ms[a + k], t[a + k], raw_rows[s[a + k]], out=out,
                    pieces=pieces)
            del part, big
            a = b
        matched[order] = hit_sorted
        return matched

    def _decode_small(self, sel: npt.NDArray[np.int64], tids: npt.NDArray[np.int64],
                      msgs: _Messages, *, raw_rows: npt.NDArray[np.int64], out: Columns,
                      pieces: list[Piece]) -> npt.NDArray[np.bool_]:
        """:meth:`_decode_rows` for small messages (``sel`` ascending): their messages
        joined in arrival order (cheaper than reordering them; a message shared by several
        rows once), payloads gathered by layout."""
        matched = np.zeros(len(sel), np.bool_)
        uid = msgs.uid[sel]
        m_start = msgs.starts[sel]
        new = run_starts(uid)
        first = np.flatnonzero(new)  # each message's first row
        du = uid[first]  # the messages, in order
        row_msg = np.cumsum(new) - 1  # row -> its message in du
        d_len = msgs.u_lens[du]
        cum = np.cumsum(d_len)
        u_msgs = msgs.u_msgs
        every = len(du) == len(u_msgs)
        a = 0
        while a < len(du):
            before = int(cum[a - 1]) if a else 0
            b = max(a + 1, int(np.searchsorted(cum, before + CHUNK_BYTES, "right")))
            part = u_msgs[a:b] if every else list(map(u_msgs.__getitem__, du[a:b].tolist()))
            part.append(PAD)
            big = np.frombuffer(b"".join(part), np.uint8)
            del part
            ra = int(first[a])
            rb = int(first[b]) if b < len(first) else len(sel)
            rm = row_msg[ra:rb]
            pos = cum[rm] - d_len[rm] - before + m_start[ra:rb]
            matched[ra:rb] = self.templates.decode(big, pos, tids[ra:rb], raw_rows[sel[ra:rb]],
                                                   out=out, pieces=pieces)
            a = b
        return matched

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
        new_pv = run_starts(sc)
        change = new_pv.copy()
        change[1:] |= sk[1:] != sk[:-1]
        starts = np.flatnonzero(new_pv)
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))
        n_pvs = len(self.pv_rows)
        base = np.array(self.pv_rows, dtype=np.int64)
        counts = np.bincount(cols, minlength=n_pvs)
        self.pv_rows = (base + counts).tolist()
        templates = self.templates.templates
        m = self._meta
        prev_rests = self._prev_rest
        chg = order[change]
        # PVs whose changes are all between templates with a rest equal to the PV's stored
        # one (a PV switching templates, e.g. with the width of its nanoseconds) store
        # nothing and keep their stored rest: checked once per (PV, template)
        c_col, c_tid = cols[chg], tid[chg]
        fixed = c_tid >= 0
        unsure = set(c_col[~fixed].tolist())
        for key in np.unique(c_col[fixed] << 32 | c_tid[fixed]).tolist():
            col = key >> 32
            if col in unsure:
                continue
            prev = prev_rests.get(col)
            rest = templates[key & 0xFFFFFFFF].split.rest
            if prev is None or not (prev is rest or self._same_rest(prev, rest)):
                unsure.add(col)
        chg = chg[np.isin(c_col, np.array(sorted(unsure), np.int64))]
        special = np.zeros(n, np.bool_)
        special[chg] = True
        special[list(texts)] = True
        is_change = np.zeros(n, np.bool_)
        is_change[chg] = True
        for i in np.flatnonzero(special).tolist():
            if is_change[i]:
                col = int(cols[i])
                t = int(tid[i])
                tmpl = templates[t] if t >= 0 else None
                rest = tmpl.split.rest if tmpl is not None else rests[i]
                prev = prev_rests.get(col)
                if prev is rest:
                    pass
                elif prev is None or not (
                    self._same_rest(prev, rest) if tmpl is not None else same_rest(prev, rest)
                ):
                    if tmpl is not None:
                        raw = tmpl.rest_json
                        if raw is None:
                            raw = tmpl.rest_json = encode_rest(rest)
                    else:
                        raw = encode_rest(rest)
                    if raw != self._prev_rest_json.get(col):
                        known = self._rest_at.get(col)
                        if known is None:
                            known = self._rest_at[col] = {}
                        at = known.get(raw)
                        if at is None:
                            at = (self._add_bytes(raw), len(raw))
                            if len(known) < REST_REUSE_MAX:
                                known[raw] = at
                        m["pv"].append(col)
                        m["row"].append(int(base[col] + rank[i]))
                        m["offset"].append(at[0])
                        m["size"].append(at[1])
                        self._prev_rest_json[col] = raw
                    self._prev_rest[col] = rest
            text = texts.get(i)
            if text is not None:
                offset[i] = self._add_bytes(text)
                size[i] = len(text)

    def _same_rest(self, a: dict[str, Any], b: dict[str, Any]) -> bool:
        """:func:`~recorder.sinks.codec.same_rest` for rests of templates (remembered: PVs
        switch between templates)."""
        cache = self._rest_eq
        hit = cache.get((id(a), id(b)))
        if hit is not None and hit[0] is a and hit[1] is b:
            return hit[2]
        same = same_rest(a, b)
        if len(cache) > 4096:
            cache.clear()
        cache[(id(a), id(b))] = (a, b, same)  # holds a and b: their ids stay theirs
        return same

    def _pools(self, out: Columns, pieces: list[Piece],
               arrays: list[tuple[int, npt.NDArray[Any]]],
               offset: npt.NDArray[np.int64]) -> dict[int, npt.NDArray[Any]]:
        """Array elements per dtype; sets ``offset`` of the array rows.

        Each piece (the rows of one template in a decoded chunk, in arrival order) gets one
        contiguous stretch of its pool, so it is copied with one strided assignment; the
        arrays of the slow path follow, in arrival order. (Arrival order for every row
        would scatter each piece row by row: a third of the writer's time for waveforms.)
        Readers find every array by its row's offset and size."""
        by_code: dict[int, list[tuple[npt.NDArray[np.int64], npt.NDArray[Any]]]] = {}
        for pr, arr, code in pieces:
            by_code.setdefault(code, []).append(
                (pr, arr.view() if isinstance(arr, RawArrays) else arr))
        slow: dict[int, list[tuple[int, npt.NDArray[Any]]]] = {}
        for i, arr in arrays:
            slow.setdefault(int(out.dtype[i]), []).append((i, arr))
        pools: dict[int, npt.NDArray[Any]] = {}
        for code in sorted(by_code.keys() | slow.keys()):
            placed = by_code.get(code, [])
            loose = slow.get(code, [])
            total = sum(a.size for _, a in placed) + sum(a.size for _, a in loose)
            start = self.pool_len[code]
            pool = np.empty(total, dtype=DTYPE_BY_CODE[code])
            o = 0
            for pr, arr in placed:
                n, m = arr.shape
                offset[pr] = np.arange(start + o, start + o + n * m, m) if m else start + o
                dst = pool[o : o + n * m].reshape(n, m)
                # float32 as msgpack-python gives it: float32 -> double -> float32
                dst[...] = arr.astype(np.float64) if arr.dtype == _F4BE else arr
                o += n * m
            for i, arr in loose:
                offset[i] = start + o
                pool[o : o + arr.size] = arr.reshape(-1)
                o += arr.size
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
            moved.held_from = it.held_from
            if moved.row is None:
                moved.pending = it.pending
                held = sum(c.nbytes for c in it.pending)
                nxt.buffered_bytes += held
                nxt.pending_bytes += held
            else:
                for chunk in it.pending:
                    nxt._add(chunk, moved.row, iter_index)
                    moved.n_written += len(chunk.items)
        self.open.clear()
        for iter_index, tags in self.tags_pending.items():  # not (yet) in this segment
            nxt.tag(iter_index, tags)
        return nxt


_F4BE = np.dtype(">f4")


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
    byte_pool: Any,
) -> dict[int, dict[str, str]]:
    """/live/tags rows -> iter_index -> tags (several rows for one iteration are merged in
    order, later keys win); ``byte_pool[a:b]`` gives the bytes (a uint8 array or a
    :class:`~recorder.sinks.livefile.LivePool`)."""
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


def raw_messages(
    samples: Sequence[PVSample],
) -> tuple[tuple[PVSample, ...], list[bytes | None]]:
    """``(samples, their messages)``, the samples rebuilt by :func:`own_payloads` first when
    their PV maps share one message (None: an eagerly-built sample)."""
    msgs = list(map(RAW_MESSAGE, samples))
    if len(msgs) > 1 and msgs[0] is msgs[1] and msgs[0] is not None:
        own = own_payloads(samples)
        return own, list(map(RAW_MESSAGE, own))
    return tuple(samples), msgs


def own_payloads(samples: Sequence[PVSample]) -> tuple[PVSample, ...]:
    """Samples whose PV maps share one message (several PVs in one buffer) rebuilt over their
    own bytes. The buffer sizes, joins and decodes samples by their message, which is one
    Kafka message per PV for everything the client produces; a message shared by a whole
    batch would make that quadratic in the batch size."""
    out: list[PVSample] = []
    for s in samples:
        msg = RAW_MESSAGE(s)
        if msg is None:
            out.append(s)
            continue
        end = RAW_END(s)
        own = PVSample.from_raw(s.pv, msg[RAW_START(s) : len(msg) if end is None else end], 0)
        out.append(own)
    return tuple(out)
