"""The datasets of the final file: :class:`_Col`, one column filled in row blocks with bounded
memory, and :class:`_Writer`, the state the columns of one finalization share (output file,
options, buffered-bytes budget, the columns written so far) and the creation of datasets.

Small PVs are buffered and written in one go at the end (compact datasets, which is what makes
10,000 PVs cheap); the buffers of all PVs together are spilled to chunked datasets whenever
they exceed ``block_bytes``: whole chunks first, so that each compressed chunk is written once,
with chunks sized (:func:`plan_piece_rows`) so that one partly filled chunk of every column fits
half the budget. A column identical to one already written (iteration, first/count, alarms,
often time) becomes a hard link to it (format 2.0, see
docs/decisions/0004-final-layout-objects-per-pv.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt
from h5py import h5d, h5o, h5s

from recorder.sinks.codec import STRING_DTYPE_CODE
from recorder.sinks.filters import filter_kwargs, rows_per_chunk
from recorder.sinks.final_blocks import _ITEMSIZE, _Plan
from recorder.sinks.final_h5 import (
    _DCPL_COMPACT,
    _DCPL_CONTIGUOUS,
    _OBJ_MTID,
    _OCPYPL,
    _space,
    _tid,
    set_attrs,
)
from recorder.sinks.final_layout import STR
from recorder.sinks.options import OutputOptions

COMPACT_MAX = 8 * 1024  # datasets up to this size are written compact (in the object header)
OBJ_BYTES = 64  # estimated memory of one element of an object (string) array
SHARE_MAX_BYTES = 64 * 1024 * 1024  # memory for the contents of shareable columns
CHUNK_BYTES = 512 * 1024  # chunk size of a dataset written whole
PIECE_CHUNK_MIN_BYTES = 8 * 1024  # smallest chunk of a column written in pieces
MAX_CHUNK_ROWS = 65536


def _buffered_size(data: npt.NDArray[Any]) -> int:
    """Estimated memory of a buffered block of rows."""
    return int(data.size * OBJ_BYTES if data.dtype == object else data.nbytes)


def _pad(pieces: list[npt.NDArray[Any]], trailing: tuple[int, ...]) -> npt.NDArray[Any]:
    """Concatenate row blocks, zero-padding (``""`` for strings) their trailing dims."""
    if all(p.shape[1:] == trailing for p in pieces):
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    n = sum(len(p) for p in pieces)
    out = np.zeros((n, *trailing), dtype=pieces[0].dtype)
    if out.dtype == object:
        out[...] = ""
    r = 0
    for p in pieces:
        region = (slice(r, r + len(p)), *(slice(0, d) for d in p.shape[1:]))
        out[region] = p
        r += len(p)
    return out


class _Col:
    """One dataset of the final file, filled in row blocks with bounded memory.

    Rows are buffered; :meth:`finish` writes a never-spilled column in one call (compact
    when small; ``share``: a hard link to an identical column written before, see
    :meth:`_Writer.create`), :meth:`spill` creates a chunked dataset of the final length
    (``total``; None = unknown, resizable) and writes what is buffered. Trailing dimensions
    grow with the data (waveforms, images, tables, string arrays). ``group`` is a low-level
    group id.

    The dataset is opened for each spill and closed after it, not held open from the first
    spill to :meth:`finish`: an open dataset costs ~12-17 kB in HDF5 (its copies of the
    creation and access property lists) and h5py, so the columns of thousands of PVs held
    open took memory that grew with the number of PVs, outside the budget (finalizing
    1,000 PVs: ~85 MB of the ~400 MB beyond the budget). Reopening costs ~10 % of the time.
    """

    __slots__ = ("attrs", "chunk0", "dtype", "group", "h5dtype", "name", "nbytes", "pieces",
                 "share", "spilled", "total", "trailing", "w", "written")

    def __init__(self, w: _Writer, group: Any, name: str, total: int | None, *,
                 dtype: np.dtype[Any], attrs: Mapping[str, Any] | None = None,
                 h5dtype: np.dtype[Any] | None = None, share: bool = False) -> None:
        self.w = w
        self.h5dtype = h5dtype
        self.group = group
        self.name = name
        self.total = total
        self.dtype = dtype
        self.attrs = dict(attrs or {})
        self.share = share
        self.pieces: list[npt.NDArray[Any]] = []
        self.trailing: tuple[int, ...] | None = None
        self.nbytes = 0
        self.written = 0
        self.spilled = False  # the chunked dataset exists (made at the first spill)
        self.chunk0 = 0  # its chunk's rows

    def dataset(self) -> h5py.Dataset:
        """The chunked dataset (after the first spill), opened anew."""
        return h5py.Dataset(h5d.open(self.group, self.name.encode()))

    def add(self, data: npt.NDArray[Any]) -> None:
        if not len(data):
            if self.trailing is None or len(data.shape[1:]) == len(self.trailing):
                self._grow(data.shape[1:])
            return
        base = data.base
        if isinstance(base, np.ndarray) and base.nbytes > 2 * data.nbytes:
            # a slice of a block's column (every PV's rows): held as it is, it would keep
            # the whole block in memory until this column is written (uncounted: 0.58 GB
            # instead of 0.3 for 1,000 PVs x 12,000 iterations with a 128 MiB budget)
            data = data.copy()
        self.pieces.append(data)
        self._grow(data.shape[1:])
        size = _buffered_size(data)
        self.nbytes += size
        self.w.buffered += size
        self.w.dirty[self] = None

    def _grow(self, shape: tuple[int, ...]) -> None:
        if self.trailing is None:
            self.trailing = tuple(shape)
        else:
            self.trailing = tuple(max(a, b) for a, b in zip(self.trailing, shape, strict=True))

    def _data(self) -> npt.NDArray[Any]:
        trailing = self.trailing or ()
        if not self.pieces:
            return np.zeros((0, *trailing), dtype=self.dtype)
        return _pad(self.pieces, trailing)

    def spill(self, *, whole_chunks: bool = False) -> h5py.Dataset | None:
        """Write what is buffered into the chunked dataset (made at the first spill); returns
        that dataset when it wrote to it.

        ``whole_chunks``: only the rows up to the last chunk boundary, keeping the rest
        buffered, so that each compressed chunk is written once; a partly filled chunk
        written now would be read back, decompressed and compressed again at every later
        spill (that made finalizing 1,000 PVs x 12,000 iterations take 28 s instead of 15).
        """
        if not self.pieces:
            return None
        n = sum(map(len, self.pieces))
        if whole_chunks:
            end = self.written + n
            if self.total is not None and end >= self.total:
                if not self.spilled:
                    return None  # complete: finish() writes it (compact, linked, left out)
            else:
                rows = self.chunk0 if self.spilled else (
                    self.w.chunk_rows(self.dtype, self.trailing or (), self.total,
                                      piece_rows=True))
                n = end - end % rows - self.written
                if n <= 0:
                    return None
        data = self._data()
        trailing = self.trailing or ()
        if not self.spilled:
            total = self.total
            ds = self.w.create_chunked(
                self.group, self.name, None, dtype=self.dtype,
                shape=(total if total is not None else 0, *trailing),
                maxshape=(total, *(None,) * len(trailing)), attrs=self.attrs,
                h5dtype=self.h5dtype, piece_rows=True,
            )
            self.spilled = True
            self.chunk0 = ds.chunks[0] if ds.chunks else 1
        else:
            ds = self.dataset()
        shape = ds.id.shape
        need = (max(shape[0], self.written + n), *trailing)
        if tuple(shape) != need:
            ds.resize(need)
        part = data if n == len(data) else data[:n]
        if part.dtype.kind in "biuf" and ds.id.dtype == part.dtype:
            # h5py's low-level write: the high-level one costs ~50 us of Python a call
            part = np.ascontiguousarray(part)
            fspace = ds.id.get_space()
            fspace.select_hyperslab((self.written, *(0,) * (part.ndim - 1)), part.shape)
            ds.id.write(h5s.create_simple(part.shape), fspace, part)
        else:
            region = (slice(self.written, self.written + n),
                      *(slice(0, d) for d in data.shape[1:]))
            ds[region] = part
        self.written += n
        rest = data[n:]
        self.w.buffered -= self.nbytes
        if len(rest):
            rest = rest.copy()  # not a view that keeps the written rows in memory
            self.pieces = [rest]
            self.nbytes = _buffered_size(rest)
            self.w.buffered += self.nbytes
        else:
            self.nbytes = 0
            self.pieces = []
        return ds

    def finish(self) -> None:
        if not self.spilled:
            data = self._data()
            if self.total is not None and len(data) < self.total:  # rows never seen: zeros
                data = _pad([data, np.zeros((self.total - len(data), *data.shape[1:]),
                                            dtype=self.dtype)], data.shape[1:])
            self.w.create(self.group, self.name, data, attrs=self.attrs, h5dtype=self.h5dtype,
                          share=self.share)
            self.w.dirty.pop(self, None)
            self.w.buffered -= self.nbytes
            self.pieces = []
            self.nbytes = 0
            return
        ds = self.spill()
        if self.total is None:
            if ds is None:
                ds = self.dataset()
            if ds.shape[0] != self.written:
                ds.resize((self.written, *ds.shape[1:]))


class _Writer:
    """Shared state of one finalization: output file, options, buffered-bytes budget, and
    the columns written so far by content (for hard links, see :meth:`create`)."""

    def __init__(self, out: h5py.File, options: OutputOptions, n_iter: int,
                 uris: dict[str, str], block_bytes: int) -> None:
        self.out = out
        self.options = options
        self.n_iter = n_iter
        self.uris = uris
        self.block_bytes = block_bytes
        self.plugins: set[str] = set()
        self.buffered = 0
        # buffered columns, in the order they got data (a dict: ties in maybe_spill's order
        # must not depend on memory addresses, or the same input gives other bytes)
        self.dirty: dict[_Col, None] = {}
        # chunk rows of the columns written in pieces (see plan_piece_rows)
        self.piece_rows = MAX_CHUNK_ROWS
        self.pvs = out.require_group("pvs")
        self.index = out.require_group("index")  # /index/<PV>/{first,count} (format 5.0)
        self._metadata: h5py.Group | None = None
        # (name, dtype, shape, attrs, bytes) -> (group id, name): columns to link to
        self.shared: dict[tuple[Any, ...], tuple[Any, bytes]] = {}
        self.shared_bytes = 0
        self.n_links = 0
        self.templates: dict[tuple[Any, ...], tuple[Any, bytes]] = {}  # see create()
        self.info: list[dict[str, Any]] = []  # /pv_info rows

    def metadata_group(self) -> h5py.Group:
        """``/metadata``, made for the first PV whose structure changes (format 5.0)."""
        if self._metadata is None:
            self._metadata = self.out.require_group("metadata")
        return self._metadata

    def create(self, gid: Any, name: str, data: npt.NDArray[Any], *,
               attrs: Mapping[str, Any] | None = None,
               h5dtype: np.dtype[Any] | None = None, share: bool = False) -> None:
        """A complete dataset: compact when small (contiguous when empty), else chunked and
        compressed. ``share``: a small numeric column identical (dtype, shape, bytes,
        attributes) to one written before becomes a hard link to it (an ordinary dataset for
        readers); the per-PV columns of a snapshot (iteration, first, count, alarms, flags,
        often time) are the same for most PVs, and a link costs a fraction of a dataset."""
        dtype, shape = data.dtype, data.shape
        is_obj = dtype.kind in "OST"
        if is_obj:  # vlen strings: compact (references into the global heap) when small
            small = data.size * 16 <= COMPACT_MAX and sum(
                len(x) for x in data.flat) <= COMPACT_MAX
        else:
            small = data.nbytes <= COMPACT_MAX
        if not small:
            self.create_chunked(gid, name, data, attrs=attrs, h5dtype=h5dtype)
            return
        bname = name.encode()
        key: tuple[Any, ...] | None = None
        raw = b""
        if share and not is_obj and h5dtype is None:
            # the dict hashes the bytes and compares them in full on a hash match
            raw = np.ascontiguousarray(data).tobytes()
            key = (name, dtype.str, shape, repr(sorted(attrs.items())) if attrs else "", raw)
            found = self.shared.get(key)
            if found is not None:
                gid.links.create_hard(bname, found[0], found[1])
                self.n_links += 1
                return
        tid = _tid(dtype, h5dtype)
        if not data.size:
            dsid = h5d.create(gid, bname, tid, _space(shape), dcpl=_DCPL_CONTIGUOUS)
            if attrs:
                set_attrs(dsid, attrs)
        elif attrs:
            # a copy of an earlier dataset with the same type, shape and attributes (then
            # overwritten) costs less than creating the dataset and its attributes
            tkey = (name, dtype.str, shape, h5dtype is None, repr(sorted(attrs.items())))
            template = self.templates.get(tkey)
            if template is not None:
                h5o.copy(template[0], template[1], gid, bname, copypl=_OCPYPL)
                dsid = h5d.open(gid, bname)
            else:
                dsid = h5d.create(gid, bname, tid, _space(shape), dcpl=_DCPL_COMPACT)
                set_attrs(dsid, attrs)
                self.templates[tkey] = (gid, bname)
            dsid.write(h5s.ALL, h5s.ALL, np.ascontiguousarray(data),
                       mtype=_OBJ_MTID if is_obj else tid)
        else:
            dsid = h5d.create(gid, bname, tid, _space(shape), dcpl=_DCPL_COMPACT)
            dsid.write(h5s.ALL, h5s.ALL, np.ascontiguousarray(data),
                       mtype=_OBJ_MTID if is_obj else tid)
        if key is not None and self.shared_bytes + len(raw) <= SHARE_MAX_BYTES:
            self.shared[key] = (gid, bname)
            self.shared_bytes += len(raw) + 200

    def chunk_rows(self, dtype: np.dtype[Any], trailing: tuple[int, ...], total: int | None,
                   *, piece_rows: bool = False) -> int:
        """Rows per chunk of a dataset of ``dtype`` rows of shape ``trailing``: about
        ``CHUNK_BYTES``, at most :attr:`piece_rows` (but ``PIECE_CHUNK_MIN_BYTES`` at
        least) for one written in pieces, at most ``total`` (when known and not 0)."""
        is_obj = dtype.kind in "OST"
        row_bytes = max(1, int(np.prod(trailing)) * (OBJ_BYTES if is_obj else dtype.itemsize))
        rows = rows_per_chunk(row_bytes, target=CHUNK_BYTES, max_rows=MAX_CHUNK_ROWS)
        if piece_rows:
            floor = rows_per_chunk(row_bytes, target=PIECE_CHUNK_MIN_BYTES,
                                   max_rows=MAX_CHUNK_ROWS)
            rows = min(rows, max(self.piece_rows, floor))
        if total:
            rows = min(rows, total)
        return max(1, rows)

    def create_chunked(self, gid: Any, name: str, data: npt.NDArray[Any] | None, *,
                       dtype: np.dtype[Any] | None = None,
                       shape: tuple[int, ...] | None = None,
                       maxshape: tuple[int | None, ...] | None = None,
                       attrs: Mapping[str, Any] | None = None,
                       h5dtype: np.dtype[Any] | None = None,
                       piece_rows: bool = False) -> h5py.Dataset:
        """A chunked, compressed dataset (written with ``data``, or empty of ``shape``).

        ``piece_rows``: the dataset is written in pieces (:meth:`_Col.spill`), its chunks
        sized by :attr:`piece_rows` so the partly filled chunks of every column fit the
        memory budget."""
        if data is not None:
            dtype, shape = data.dtype, data.shape
        assert dtype is not None and shape is not None
        is_obj = dtype.kind in "OST"
        rows = self.chunk_rows(dtype, shape[1:], shape[0], piece_rows=piece_rows)
        plugin = None
        if is_obj:
            kwargs: dict[str, Any] = {"compression": "gzip", "compression_opts": 4}
            dtype = STR
        else:
            kwargs, plugin = filter_kwargs(self.options, dtype)
            dtype = h5dtype or dtype
        kwargs["chunks"] = (max(1, rows), *(max(1, d) for d in shape[1:]))
        kwargs["maxshape"] = maxshape if maxshape is not None else (None, *shape[1:])
        kwargs["track_times"] = False
        group = h5py.Group(gid)
        if data is not None:
            ds = group.create_dataset(name, data=data, dtype=dtype, **kwargs)
        else:
            ds = group.create_dataset(name, shape=shape, dtype=dtype, **kwargs)
        a: dict[str, Any] = dict(attrs or {})
        if plugin:
            self.plugins.add(plugin)
            a["required_filter"] = plugin
        if a:
            set_attrs(ds.id, a)
        return ds

    def maybe_spill(self) -> None:
        """Over budget: write out the largest buffered columns until half of it is free
        (small columns stay buffered and become compact datasets at the end). Whole chunks
        first; partly filled chunks only when the rest alone is over half the budget."""
        if self.buffered <= self.block_bytes:
            return
        half = self.block_bytes // 2
        for whole in (True, False):
            for col in sorted(self.dirty, key=lambda c: c.nbytes, reverse=True):
                if self.buffered <= half:
                    return
                col.spill(whole_chunks=whole)
                if not col.pieces:
                    self.dirty.pop(col, None)


def plan_piece_rows(plan: _Plan, n_iter: int, block_bytes: int) -> int:
    """Chunk rows for the columns written in pieces: the largest count (up to
    ``MAX_CHUNK_ROWS``) for which one partly filled chunk of every column of every PV (the
    rows :meth:`_Col.spill` keeps back) fits in half of ``block_bytes``."""
    value = np.where(plan.dtype == STRING_DTYPE_CODE, OBJ_BYTES,
                     _ITEMSIZE[plan.dtype] * np.maximum(plan.width, 1))
    row_bytes = 8 + 8 + 4 + 4 + 1 + 8 + value  # time, iteration, alarms, flags, shape, value
    budget = block_bytes // 2

    def memory(rows: int) -> int:
        return int((row_bytes * np.minimum(plan.counts, rows)).sum()
                   + 16 * len(plan.counts) * min(rows, n_iter))  # first, count

    lo, hi = 1, MAX_CHUNK_ROWS
    if memory(hi) <= budget:
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if memory(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo
