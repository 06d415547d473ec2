"""Finalization: rewrite a live ``*.partial`` file into the final per-PV layout.

The final file is written next to the partial one as ``<final>.finalizing``, fsync'ed,
made read-only (0444) and renamed to its final name; only then is the partial file removed.
A crash at any point leaves the partial file intact, so ``recover`` can simply run this again.

Memory is bounded whatever the size of the segment: the live tables are read in blocks of
rows (``block_bytes`` of data each, default 128 MiB). A first pass reads only a few small
columns (PV, kind, dtype, size, iteration row) to learn each PV's row count, type and
waveform width, and where to cut the blocks; the second pass splits each block by PV and
appends it to that PV's datasets. Small PVs are buffered and written in one go at the end
(compact datasets, which is what makes 10,000 PVs cheap); the buffers of all PVs together
are spilled to chunked datasets whenever they exceed ``block_bytes``: whole chunks first, so
that each compressed chunk is written once, with chunks sized (:func:`plan_piece_rows`) so
that one partly filled chunk of every column fits half the budget.

With many small PVs the cost is the number of HDF5 objects (format 2.0, see
docs/decisions/0004-final-layout-objects-per-pv.md): a column identical to one already
written (iteration, first/count, alarms, often time) becomes a hard link to it, the per-PV
description is one row of ``/pv_info`` instead of group attributes, ``metadata/*`` exists only
when the PV structure changes after row 0, constant ``flags`` only in ``/pv_info``, and every
per-PV object goes through h5py's low-level API.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt
from h5py import h5a, h5d, h5g, h5o, h5p, h5s, h5t

from recorder.client.values import ValueKind, typed_value
from recorder.sinks.buffer import (
    ITERATION_COLUMNS,
    ITERATION_REASONS,
    ITERATION_STATUS,
    SAMPLE_COLUMNS,
    TAG_COLUMNS,
    merge_tags,
    tags_json,
)
from recorder.sinks.codec import (
    DTYPE_BY_CODE,
    F_FRAME,
    F_MESSAGE,
    F_USER_TAG,
    F_VALUE,
    KIND_CODES,
    KINDS_BY_CODE,
    STRING_DTYPE_CODE,
    decode_rest,
    encode_rest,
    escape_name,
    rebuild_data,
    strip_message,
    typed_scalar,
    utf8_text,
)
from recorder.sinks.filters import filter_kwargs, rows_per_chunk
from recorder.sinks.livefile import Commit, read_commit, read_pv_names, sample_slice
from recorder.sinks.options import OutputOptions

FINAL_SUFFIX = ".finalizing"
STATUS_ENUM = h5py.enum_dtype(ITERATION_STATUS, basetype="u1")
REASON_ENUM = h5py.enum_dtype(
    {(k or "none"): v for k, v in ITERATION_REASONS.items()}, basetype="u1"
)
STR = h5py.string_dtype("utf-8")
_STR_TID = h5t.py_create(STR, logical=True)
_SCALAR_SPACE = h5s.create(h5s.SCALAR)

DEFAULT_BLOCK_BYTES = 128 * 1024 * 1024
"""Memory budget of one block of the live file (and of the buffered PV data)."""
SCAN_ROWS = 1 << 20  # rows per read in the first pass
ROW_OVERHEAD = 256  # bytes of memory per sample row in a block (columns + temporaries)
COMPACT_MAX = 8 * 1024  # datasets up to this size are written compact (in the object header)
OBJ_BYTES = 64  # estimated memory of one element of an object (string) array
SHARE_MAX_BYTES = 64 * 1024 * 1024  # memory for the contents of shareable columns
CHUNK_BYTES = 512 * 1024  # chunk size of a dataset written whole
PIECE_CHUNK_MIN_BYTES = 8 * 1024  # smallest chunk of a column written in pieces
MAX_CHUNK_ROWS = 65536
CHUNK_CACHE = 0  # no chunk cache: rows go out in large blocks (HDF5 2.0 caches 8 MiB a dataset)

K_SCALAR, K_BOOL, K_STRING, K_ENUM = (
    KIND_CODES[ValueKind.SCALAR],
    KIND_CODES[ValueKind.BOOL],
    KIND_CODES[ValueKind.STRING],
    KIND_CODES[ValueKind.ENUM],
)
K_ARRAY, K_NDARRAY = KIND_CODES[ValueKind.ARRAY], KIND_CODES[ValueKind.NDARRAY]
K_STRING_ARRAY, K_TABLE = KIND_CODES[ValueKind.STRING_ARRAY], KIND_CODES[ValueKind.TABLE]
EXTRACTED_AT_FINALIZE = (K_STRING_ARRAY, K_TABLE)  # typed only in the final layout


def _itemsizes() -> npt.NDArray[np.int64]:
    """Element bytes by storage dtype code (1 for an unknown code)."""
    out = np.ones(256, dtype=np.int64)
    for code, dt in DTYPE_BY_CODE.items():
        out[code] = dt.itemsize
    return out


_ITEMSIZE = _itemsizes()

# display / control / valueAlarm fields copied to PV attributes
META_ATTRS: dict[str, tuple[str, str]] = {
    "units": ("display", "units"),
    "precision": ("display", "precision"),
    "description": ("display", "description"),
    "format": ("display", "format"),
    "display_limit_low": ("display", "limitLow"),
    "display_limit_high": ("display", "limitHigh"),
    "control_limit_low": ("control", "limitLow"),
    "control_limit_high": ("control", "limitHigh"),
    "control_min_step": ("control", "minStep"),
    "alarm_low_alarm_limit": ("valueAlarm", "lowAlarmLimit"),
    "alarm_low_warning_limit": ("valueAlarm", "lowWarningLimit"),
    "alarm_high_warning_limit": ("valueAlarm", "highWarningLimit"),
    "alarm_high_alarm_limit": ("valueAlarm", "highAlarmLimit"),
    "alarm_hysteresis": ("valueAlarm", "hysteresis"),
}
TIME_ATTRS = {"units": "ns", "start": "1970-01-01T00:00:00Z"}
FORMAT_VERSION = "5.0"
"""format_version of both layouts (docs/file-format.md; 3.0 changed the final layout only,
4.0 added the per-sample columns of user tags and NTNDArray frame ids and times, decision
0009; 5.0 made the PV groups plain NXlogs, decision 0011: final layout only)."""
FLAGGED_COLUMNS: dict[int, tuple[tuple[str, np.dtype[Any], Mapping[str, Any] | None], ...]] = {
    F_USER_TAG: (("user_tag", np.dtype(np.int32), None),),
    F_FRAME: (("unique_id", np.dtype(np.int32), None),
              ("data_timestamp", np.dtype(np.int64), TIME_ATTRS)),
}
"""Per-row columns of fields taken out under a flag (format 4.0, decision 0009): the flag
-> (dataset, dtype, attributes) each, in the order of the live columns that feed them."""
MESSAGE_TEXTS_MAX = 1024
"""Distinct alarm messages per PV in ``alarm_message``; later new texts stay in the metadata."""
MESSAGE_CACHE = 64  # rest JSON -> (without the message, code): entries remembered per PV
# /pv_info columns: (name, "s" = vlen UTF-8 string, else a numpy dtype)
PV_INFO_FIELDS: tuple[tuple[str, str], ...] = (
    ("pv_name", "s"), ("group", "s"), ("source", "s"), ("protocol", "s"), ("kind", "s"),
    ("storage_dtype", "s"), ("count", "<i8"), ("flags", "<i2"),
    *((a, "s" if a in ("units", "description", "format") else "<f8") for a in META_ATTRS),
    ("choices", "s"), ("metadata", "s"), ("metadata_entries", "<i8"),
)


NXLOG = {"NX_class": "NXlog"}
INFO_STR = ("units", "description", "format")  # /pv_info string columns from META_ATTRS


def _attr_value(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, default=str)


def first_metadata(raw: bytes) -> dict[str, Any]:
    """The structure (``d``) of a metadata entry, enough to read units, limits and choices
    (plain JSON: tagged values are decoded only where they are used)."""
    try:
        top = json.loads(raw.decode("utf-8"))
    except ValueError:
        return {}
    d = top.get("d") if isinstance(top, dict) else None
    if not isinstance(d, dict):
        return {}
    if "__map__" in d:  # keys that JSON cannot hold: decode the tags
        d = decode_rest(raw).get("d", {})
    return d if isinstance(d, dict) else {}


def _untag(value: Any) -> Any:
    if isinstance(value, dict) and len(value) == 1 and "__float__" in value:
        return float(value["__float__"])
    return value


def _metadata_fields(d: Mapping[str, Any]) -> dict[str, Any]:
    """META_ATTRS present in a structure, and enum choices."""
    out: dict[str, Any] = {}
    for attr, (group, key) in META_ATTRS.items():
        sub = d.get(group)
        if type(sub) is dict and sub.get(key) is not None:  # (decoded JSON: plain dicts)
            out[attr] = _untag(sub[key])
    value = d.get("value")
    if type(value) is dict and isinstance(value.get("choices"), list):
        out["choices"] = [str(c) for c in value["choices"]]
    return out


def value_attrs(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes of the ``value`` dataset (from :func:`_metadata_fields`): ``units`` and
    (enums) ``choices``."""
    out: dict[str, Any] = {}
    if "units" in fields:
        out["units"] = str(_attr_value(fields["units"]))
    if "choices" in fields:
        out["choices"] = fields["choices"]
    return out


def info_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The /pv_info columns from the first metadata (:func:`_metadata_fields`): strings
    ``""`` and numbers NaN when absent (non-numbers too; the JSON keeps them exactly)."""
    out: dict[str, Any] = {}
    for attr in META_ATTRS:
        v = fields.get(attr)
        if attr in INFO_STR:
            out[attr] = "" if v is None else str(_attr_value(v))
        elif isinstance(v, (int, float)):
            try:
                out[attr] = float(v)
            except OverflowError:
                out[attr] = float("nan")
        else:
            out[attr] = float("nan")
    choices = fields.get("choices")
    out["choices"] = json.dumps(choices) if choices is not None else ""
    return out


def _image_shape(rest: Mapping[str, Any], size: int) -> tuple[int, ...]:
    dims = rest["d"].get("dimension")
    sizes: list[int] = []
    if isinstance(dims, list):
        for dim in dims:
            if isinstance(dim, Mapping):
                s = dim.get("size", 0)
                sizes.append(int(s) if isinstance(s, int) else 0)
    shape = tuple(reversed(sizes))
    if shape and int(np.prod(shape)) == size:
        return shape
    return (size,)


# --- low-level HDF5 helpers (h5py's high-level calls cost 2x more per object) ----------------
def _plist(cls: Any, layout: int | None = None) -> Any:
    plist = h5p.create(cls)
    plist.set_obj_track_times(False)  # no timestamps in object headers: smaller, reproducible
    if layout is not None:
        plist.set_layout(layout)
    return plist


_GCPL = _plist(h5p.GROUP_CREATE)
_DCPL_COMPACT = _plist(h5p.DATASET_CREATE, h5d.COMPACT)
_DCPL_CONTIGUOUS = _plist(h5p.DATASET_CREATE, h5d.CONTIGUOUS)
_OCPYPL = h5p.create(h5p.OBJECT_COPY)
_OBJ_MTID = h5t.py_create(np.dtype(object))  # memory type of str objects (vlen strings)
_TIDS: dict[str, Any] = {}


def _tid(dtype: np.dtype[Any], h5dtype: np.dtype[Any] | None = None) -> Any:
    """The HDF5 type of ``dtype`` (``h5dtype``: an enum or string type to store instead)."""
    if h5dtype is not None:
        return h5t.py_create(h5dtype, logical=True)
    if dtype.kind in "OST":
        return _STR_TID
    tid = _TIDS.get(dtype.str)
    if tid is None:
        tid = _TIDS[dtype.str] = h5t.py_create(dtype, logical=True)
    return tid


_SPACES: dict[tuple[int, ...], Any] = {}


def _space(shape: tuple[int, ...]) -> Any:
    """A simple dataspace of ``shape`` (cached: the same few shapes recur for every PV)."""
    sid = _SPACES.get(shape)
    if sid is None:
        if len(_SPACES) > 1024:
            _SPACES.clear()
        sid = _SPACES[shape] = h5s.create_simple(shape)
    return sid


def _hl(oid: Any) -> h5py.HLObject:
    return h5py.Dataset(oid) if isinstance(oid, h5d.DatasetID) else h5py.Group(oid)


def create_group(parent: Any, name: str) -> Any:
    """A group (low-level id) under the group id ``parent``, without object timestamps."""
    return h5g.create(parent, name.encode(), None, _GCPL)


def set_attrs(obj: Any, attrs: Mapping[str, Any]) -> None:
    """Write attributes on an object (h5py object or low-level id): str/int/float and lists of
    str through the low-level API, the rest through h5py."""
    oid = obj.id if isinstance(obj, h5py.HLObject) else obj
    for name, v in attrs.items():
        key = name.encode()
        if isinstance(v, str):
            h5a.create(oid, key, _STR_TID, _SCALAR_SPACE).write(np.array(v, dtype=STR))
        elif isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63:
            h5a.create(oid, key, h5t.STD_I64LE, _SCALAR_SPACE).write(np.array(v, np.int64))
        elif isinstance(v, float):
            h5a.create(oid, key, h5t.IEEE_F64LE, _SCALAR_SPACE).write(np.array(v, np.float64))
        elif isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            h5a.create(oid, key, _STR_TID, h5s.create_simple((len(v),))).write(
                np.array(v, dtype=STR))
        elif isinstance(v, list) and all(isinstance(x, str) for x in v):
            _hl(oid).attrs.create(name, v, dtype=STR)
        else:
            _hl(oid).attrs[name] = v


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
    """

    __slots__ = ("attrs", "ds", "dtype", "group", "h5dtype", "name", "nbytes", "pieces",
                 "share", "total", "trailing", "w", "written")

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
        self.ds: h5py.Dataset | None = None

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
        self.w.dirty.add(self)

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

    def spill(self, *, whole_chunks: bool = False) -> None:
        """Write what is buffered into the chunked dataset (made at the first spill).

        ``whole_chunks``: only the rows up to the last chunk boundary, keeping the rest
        buffered, so that each compressed chunk is written once; a partly filled chunk
        written now would be read back, decompressed and compressed again at every later
        spill (that made finalizing 1,000 PVs x 12,000 iterations take 28 s instead of 15).
        """
        if not self.pieces:
            return
        n = sum(map(len, self.pieces))
        if whole_chunks:
            end = self.written + n
            if self.total is not None and end >= self.total:
                if self.ds is None:
                    return  # complete: finish() writes it (compact, linked, or left out)
            else:
                rows = self.ds.chunks[0] if self.ds is not None and self.ds.chunks else (
                    self.w.chunk_rows(self.dtype, self.trailing or (), self.total,
                                      piece_rows=True))
                n = end - end % rows - self.written
                if n <= 0:
                    return
        data = self._data()
        trailing = self.trailing or ()
        if self.ds is None:
            total = self.total
            self.ds = self.w.create_chunked(
                self.group, self.name, None, dtype=self.dtype,
                shape=(total if total is not None else 0, *trailing),
                maxshape=(total, *(None,) * len(trailing)), attrs=self.attrs,
                h5dtype=self.h5dtype, piece_rows=True,
            )
        ds = self.ds
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

    def finish(self) -> None:
        if self.ds is None:
            data = self._data()
            if self.total is not None and len(data) < self.total:  # rows never seen: zeros
                data = _pad([data, np.zeros((self.total - len(data), *data.shape[1:]),
                                            dtype=self.dtype)], data.shape[1:])
            self.w.create(self.group, self.name, data, attrs=self.attrs, h5dtype=self.h5dtype,
                          share=self.share)
            self.w.dirty.discard(self)
            self.w.buffered -= self.nbytes
            self.pieces = []
            self.nbytes = 0
            return
        self.spill()
        if self.total is None and self.ds.shape[0] != self.written:
            self.ds.resize((self.written, *self.ds.shape[1:]))


# --- the live file, read in blocks ------------------------------------------------------------
class _Meta:
    """Walks /live/meta in order, giving each entry its global sample row."""

    def __init__(self, f: h5py.File, n: int) -> None:
        live = f["live"]["meta"]
        self.ds = {k: live[k] for k in ("pv", "row", "offset", "size")}
        self.n = n
        self.pos = 0
        self.buf = {k: np.zeros(0, dtype=np.int64) for k in self.ds}

    def _more(self) -> bool:
        if self.pos >= self.n:
            return False
        hi = min(self.n, self.pos + SCAN_ROWS)
        for k, ds in self.ds.items():
            self.buf[k] = np.concatenate([self.buf[k], ds[self.pos : hi].astype(np.int64)])
        self.pos = hi
        return True

    def take(self, pv: npt.NDArray[Any], occ: npt.NDArray[np.int64],
             after: npt.NDArray[np.int64]) -> dict[str, npt.NDArray[np.int64]]:
        """Entries of the sample rows (``pv``, per-PV row ``occ``); ``after`` = per-PV row
        counts once these rows are done. Adds ``local``: the row within ``pv``."""
        while True:
            b = self.buf
            inside = b["row"] < after[b["pv"]] if len(b["pv"]) else np.zeros(0, bool)
            k = int(np.argmin(inside)) if len(inside) and not inside.all() else len(inside)
            if k < len(inside) or not self._more():
                break
        out = {key: v[:k] for key, v in self.buf.items()}
        self.buf = {key: v[k:] for key, v in self.buf.items()}
        keys = pv.astype(np.int64) << 32 | occ
        order = np.argsort(keys, kind="stable")
        mkeys = out["pv"] << 32 | out["row"]
        pos = np.searchsorted(keys[order], mkeys)
        pos = np.minimum(pos, max(0, len(keys) - 1))
        found = (keys[order][pos] == mkeys) if len(keys) else np.zeros(len(mkeys), bool)
        out = {key: v[found] for key, v in out.items()}
        out["local"] = order[pos[found]]
        return out


def _pv_order(pv: npt.NDArray[Any]) -> npt.NDArray[np.intp]:
    """Row order grouping ``pv`` by PV, rows in order within a PV (a stable sort; of PV
    numbers that fit 16 bits, numpy's radix sort: ~4x faster than sorting int64)."""
    small = len(pv) > 0 and int(pv.min()) >= 0 and int(pv.max()) < 1 << 16
    return np.argsort(pv.astype(np.uint16) if small else pv, kind="stable")


def _occurrence(pv: npt.NDArray[Any], prior: npt.NDArray[np.int64],
                order: npt.NDArray[np.intp] | None = None) -> npt.NDArray[np.int64]:
    """Per-PV row index of each sample row (rows before this block: ``prior``); ``order``:
    :func:`_pv_order` of ``pv`` when known."""
    if order is None:
        order = _pv_order(pv)
    sp = pv[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sp)) + 1]
    lengths = np.diff(np.r_[starts, len(sp)])
    rank = np.empty(len(pv), dtype=np.int64)
    rank[order] = np.arange(len(pv)) - np.repeat(starts, lengths)
    result: npt.NDArray[np.int64] = prior[pv] + rank
    return result


@dataclass(slots=True)
class _Plan:
    counts: npt.NDArray[np.int64]  # rows per PV
    kind: npt.NDArray[np.int64]  # the PV's kind code (see _scan)
    dtype: npt.NDArray[np.int64]
    width: npt.NDArray[np.int64]  # max waveform length
    cuts: list[int]  # block boundaries (sample rows), first 0, last n
    entries: npt.NDArray[np.int64]  # /live/meta rows per PV (> 1: the structure changed)
    extra_iters: dict[int, tuple[int, int]]  # iteration row >= n_iter -> (iter_index, count)


def _scan(f: h5py.File, commit: Commit, n_pvs: int, n_iter: int, block_bytes: int) -> _Plan:
    """First pass: row counts, kinds, waveform widths and block boundaries."""
    live = f["live"]
    s = live["samples"]
    n = commit.limits["n_samples"]
    counts = np.zeros(n_pvs, dtype=np.int64)
    first_pref = np.full(n_pvs, -1, dtype=np.int64)  # first non-empty typed value
    first_any = np.full(n_pvs, -1, dtype=np.int64)
    kind_pref = np.zeros(n_pvs, dtype=np.int64)
    dtype_pref = np.zeros(n_pvs, dtype=np.int64)
    kind_any = np.zeros(n_pvs, dtype=np.int64)
    dtype_any = np.zeros(n_pvs, dtype=np.int64)
    first_kind = np.full(n_pvs, -1, dtype=np.int64)
    width = np.zeros(n_pvs, dtype=np.int64)
    meta = _Meta(f, commit.limits["n_meta"])
    entries = np.zeros(n_pvs, dtype=np.int64)
    cuts = [0]
    acc = 0
    extra: dict[int, list[int]] = {}
    for lo in range(0, n, SCAN_ROWS):
        hi = min(n, lo + SCAN_ROWS)
        pv = s["pv"][lo:hi].astype(np.int64)
        kind = s["kind"][lo:hi].astype(np.int64)
        dtype = s["dtype"][lo:hi].astype(np.int64)
        flags = s["flags"][lo:hi]
        size = s["size"][lo:hi]
        iter_row = s["iter_row"][lo:hi]
        occ = _occurrence(pv, counts)
        counts += np.bincount(pv, minlength=n_pvs)
        # the PV's type: its first typed value, preferring non-empty ones
        cand = ((flags & F_VALUE) != 0) | np.isin(kind, EXTRACTED_AT_FINALIZE)
        pref = cand & ~((kind == K_ARRAY) & (size == 0))
        for mask, first, k_arr, d_arr in ((pref, first_pref, kind_pref, dtype_pref),
                                          (cand, first_any, kind_any, dtype_any)):
            rows = np.flatnonzero(mask)
            upv, idx = np.unique(pv[rows], return_index=True)
            new = first[upv] < 0
            upv, idx = upv[new], rows[idx[new]]
            first[upv] = lo + idx
            k_arr[upv] = kind[idx]
            d_arr[upv] = dtype[idx]
        upv, idx = np.unique(pv, return_index=True)
        new = first_kind[upv] < 0
        first_kind[upv[new]] = kind[idx[new]]
        arr = (kind == K_ARRAY) & ((flags & F_VALUE) != 0)
        np.maximum.at(width, pv[arr], size[arr])
        # rows of iterations that were never closed (the writer died)
        late = np.flatnonzero(iter_row >= n_iter)
        if len(late):
            its = s["iteration"][lo:hi][late]
            for r, it in zip(iter_row[late].tolist(), its.tolist(), strict=True):
                entry = extra.setdefault(int(r), [int(it), 0])
                entry[1] += 1
        # memory of each row: columns, values, strings, metadata JSON
        weight = np.full(len(pv), ROW_OVERHEAD, dtype=np.int64)
        weight += np.where(dtype == STRING_DTYPE_CODE, 2 * size, size * _ITEMSIZE[dtype])
        m = meta.take(pv, occ, counts)
        entries += np.bincount(m["pv"], minlength=n_pvs)
        np.add.at(weight, m["local"], 2 * m["size"])
        cum = np.cumsum(weight) + acc
        crossings = np.flatnonzero(cum // block_bytes > (cum - weight) // block_bytes)
        for c in crossings.tolist():
            if lo + c > cuts[-1]:
                cuts.append(lo + c)
        acc = int(cum[-1]) if len(cum) else acc
    if cuts[-1] != n:
        cuts.append(n)
    kind_out = np.where(first_pref >= 0, kind_pref, np.where(first_any >= 0, kind_any, -1))
    dtype_out = np.where(first_pref >= 0, dtype_pref, np.where(first_any >= 0, dtype_any, 0))
    kind_out = np.where(kind_out >= 0, kind_out, np.maximum(first_kind, 0))
    return _Plan(counts, kind_out, dtype_out, width, cuts, entries,
                 {r: (v[0], v[1]) for r, v in sorted(extra.items())})


GATHER_ELEMENTS = 1 << 20  # elements gathered at a time by _Block.gather


@dataclass(slots=True)
class _Block:
    s: dict[str, npt.NDArray[Any]]
    bytes_lo: int
    raw: bytes
    pools: dict[int, tuple[int, npt.NDArray[Any]]]  # dtype -> (first element offset, elements)

    def text(self, offset: int, size: int) -> bytes:
        return self.raw[offset - self.bytes_lo : offset - self.bytes_lo + size]

    def elements(self, code: int, offset: int, size: int) -> npt.NDArray[Any]:
        lo, pool = self.pools[code]
        return pool[offset - lo : offset - lo + size]

    def gather(self, code: int, offsets: npt.NDArray[np.int64], sizes: npt.NDArray[np.int64],
               out: npt.NDArray[Any], rows: npt.NDArray[np.int64]) -> None:
        """``out[rows[k], :sizes[k]] = elements(code, offsets[k], sizes[k])`` for every k,
        vectorized per array length: rows side by side in the pool (as one decoded piece is
        stored) are one reshaped slice, others a fancy-indexed gather."""
        if not len(rows):
            return
        lo, pool = self.pools[code]
        for z in np.unique(sizes).tolist():
            if not z:
                continue
            k = np.flatnonzero(sizes == z)
            at = offsets[k] - lo
            a = int(at[0])
            if len(at) == 1 or (np.diff(at) == z).all():
                out[rows[k], :z] = pool[a : a + len(at) * z].reshape(len(at), z)
                continue
            step = max(1, GATHER_ELEMENTS // z)  # bounds the index array (8 bytes/element)
            span = np.arange(z)
            for c in range(0, len(at), step):
                out[rows[k[c : c + step]], :z] = pool[at[c : c + step, None] + span]


def _read_block(f: h5py.File, lo: int, hi: int, meta: dict[str, npt.NDArray[Any]]) -> _Block:
    live = f["live"]
    samples = live["samples"]
    s = {k: sample_slice(samples, k, lo, hi) for k in SAMPLE_COLUMNS}
    kind, dtype, size, offset = s["kind"], s["dtype"], s["size"], s["offset"]
    # byte pool: string values and metadata JSON of these rows (contiguous: appended together)
    is_text = (dtype == STRING_DTYPE_CODE) & (offset >= 0)
    starts = np.concatenate([offset[is_text], meta["offset"]])
    ends = np.concatenate([offset[is_text] + size[is_text], meta["offset"] + meta["size"]])
    b_lo = int(starts.min()) if len(starts) else 0
    b_hi = int(ends.max()) if len(ends) else 0
    raw = live["bytes"][b_lo:b_hi].tobytes() if b_hi > b_lo else b""
    pools: dict[int, tuple[int, npt.NDArray[Any]]] = {}
    arr = ((kind == K_ARRAY) | (kind == K_NDARRAY)) & (offset >= 0) & np.isin(
        dtype, list(DTYPE_BY_CODE))
    for code in np.unique(dtype[arr]).tolist():
        sel = arr & (dtype == code)
        p_lo = int(offset[sel].min())
        p_hi = int((offset[sel] + size[sel]).max())
        pools[code] = (p_lo, live[f"pool_{DTYPE_BY_CODE[code].name}"][p_lo:p_hi])
    return _Block(s, b_lo, raw, pools)


# --- one PV ------------------------------------------------------------------------------------
class _PV:
    """The datasets of one PV and the state carried from block to block."""

    def __init__(self, w: _Writer, name: str, *, n: int, kind: int, dcode: int,
                 width: int, split_message: bool = False) -> None:
        self.w = w
        self.name = name
        self.n = n
        self.kind_code = kind
        self.kind = KINDS_BY_CODE.get(kind, ValueKind.NONE)
        self.dcode = dcode
        self.width = width
        self.rows = 0  # rows done
        self.base_raw: bytes = b""  # the live rest in effect (JSON)
        self._base: dict[str, Any] | None = None
        self.last_json: bytes | None = None  # the last metadata entry written
        self.fields: dict[str, Any] = {}  # _metadata_fields of the first metadata
        self.rank: int | None = None  # NTNDArray rank
        self.schema: tuple[tuple[str, str], ...] | None = None  # NTTable (column, dtype)
        self.labels: list[str] | None = None
        self.run_max = -1  # running max of iter_row (first/count index)
        self.next_k = 0  # first iteration whose `first` is not written yet
        self.pending = 0  # rows of iteration next_k - 1 seen so far (may continue)
        self.path = escape_name(name)
        self.g = create_group(w.pvs.id, self.path)
        self.index_group = create_group(w.index.id, self.path)  # /index/<PV> (format 5.0)
        self.cols: dict[str, _Col] = {}
        self.table: dict[str, _Col] = {}
        self.value_group: Any = None
        i64, i32 = np.dtype(np.int64), np.dtype(np.int32)
        for cname, dt, attrs in (("time", i64, TIME_ATTRS), ("iteration", i64, None),
                                 ("severity", i32, None), ("status", i32, None),
                                 ("flags", np.dtype(np.uint8), None)):
            self.cols[cname] = _Col(w, self.g, cname, n, dtype=dt, attrs=attrs, share=True)
        self.first = _Col(w, self.index_group, "first", w.n_iter, dtype=i64, share=True)
        self.count = _Col(w, self.index_group, "count", w.n_iter, dtype=i64, share=True)
        self.first_json: bytes | None = None  # the metadata of row 0
        # alarm.message as a column: only for PVs whose structure changes (else the one
        # message stays in the one metadata entry); texts in code order
        self.message: _Col | None = None
        self.texts: dict[str, int] = {}
        self.message_cache: dict[bytes, tuple[bytes, int]] = {}
        self.no_message = 0  # rows before the first message (the column starts with it)
        if split_message and n:
            self.message = _Col(w, self.g, "alarm_message", n, dtype=np.dtype(np.int32),
                                share=True)
        # columns of fields taken out per row (FLAGGED_COLUMNS), made at the first such row;
        # until then, the rows seen without the flag (the columns start with their zeros)
        self.flagged: dict[int, tuple[_Col, ...]] = {}
        self.unflagged = dict.fromkeys(FLAGGED_COLUMNS, 0)
        self.n_meta = 0  # metadata entries (row 0 and each change)
        self.meta_row: _Col | None = None
        self.meta_json: _Col | None = None
        if (n and dcode == STRING_DTYPE_CODE) or self.kind is ValueKind.STRING_ARRAY:
            self.cols["value"] = _Col(w, self.g, "value", n, dtype=np.dtype(object))
        elif n and dcode in DTYPE_BY_CODE and self.kind is not ValueKind.TABLE:
            self.cols["value"] = _Col(w, self.g, "value", n, dtype=DTYPE_BY_CODE[dcode])
        # `shape`: made at the first row whose shape differs from the rows before it (format
        # 5.0: left out when every row has the same shape, the trailing shape of `value`)
        self.shape: _Col | None = None
        self.same_shape: npt.NDArray[np.int64] | None = None  # the rows' shape so far
        self.same_rows = 0  # rows seen with it
        set_attrs(self.g, NXLOG)

    # --- rests ----------------------------------------------------------------------------
    def base(self) -> dict[str, Any]:
        if self._base is None:
            self._base = decode_rest(self.base_raw) if self.base_raw else {"d": {}, "f": []}
        return self._base

    def _take_message(self, raw: bytes) -> tuple[bytes, int]:
        """``raw`` without its alarm message, and the message's code (-1: left in ``raw``)."""
        hit = self.message_cache.get(raw)
        if hit is None:
            split = strip_message(raw)
            hit = (raw, -1)
            if split is not None:
                code = self.texts.get(split[1])
                if code is None and len(self.texts) < MESSAGE_TEXTS_MAX:
                    code = self.texts[split[1]] = len(self.texts)
                if code is not None:
                    hit = (split[0], code)
            if len(self.message_cache) >= MESSAGE_CACHE:
                self.message_cache.clear()
            self.message_cache[raw] = hit
        return hit

    def _emit(self, row: int, raw: bytes) -> None:
        """A metadata entry: row 0's goes to /pv_info; a group ``metadata`` (row, json) is
        made only when the rest changes later (then it holds every entry, row 0's too)."""
        if raw == self.last_json:
            return
        self.last_json = raw
        self.n_meta += 1
        if self.first_json is None:
            self.first_json = raw
            self.fields = _metadata_fields(first_metadata(raw))
            value = self.cols.get("value")
            if value is not None:
                value.attrs.update(value_attrs(self.fields))
            return
        if self.meta_row is None or self.meta_json is None:
            mg = create_group(self.w.metadata_group().id, self.path)  # /metadata/<PV>
            self.meta_row = _Col(self.w, mg, "row", None, dtype=np.dtype(np.int64))
            self.meta_json = _Col(self.w, mg, "json", None, dtype=np.dtype(object))
            self.meta_row.add(np.array([0], dtype=np.int64))
            self.meta_json.add(np.array([self.first_json.decode("utf-8")], dtype=object))
        self.meta_row.add(np.array([row], dtype=np.int64))
        self.meta_json.add(np.array([raw.decode("utf-8")], dtype=object))

    # --- one block of rows --------------------------------------------------------------------
    def add(self, b: _Block, s: dict[str, npt.NDArray[Any]], entries: dict[int, bytes]) -> None:
        """The PV's rows of block ``b`` (``s``: their columns), with the metadata entries
        that start at these rows (by row within ``s``)."""
        m = len(s["flags"])
        w0 = self.rows
        flags = s["flags"].copy()
        kinds = s["kind"].astype(np.int64)
        dtypes = s["dtype"].astype(np.int64)
        valued = (flags & F_VALUE) != 0
        demote = valued & ((kinds != self.kind_code) | (dtypes != self.dcode))
        extract = self.kind_code in EXTRACTED_AT_FINALIZE
        # rows whose metadata entry must be looked at: live entries, demoted rows and the
        # rows after them, the first row of the block; every row for tables/string arrays
        check = set(entries)
        check.add(0)
        value_col = self.cols.get("value")
        shapes: npt.NDArray[np.int64] | None = None
        value: npt.NDArray[Any] | None = None
        py_values: dict[int, Any] = {}  # demoted rows: their Python value
        table_cols: dict[str, list[Any]] = {}
        if extract:
            check.update(range(m))
        kind = self.kind
        if kind in (ValueKind.SCALAR, ValueKind.BOOL, ValueKind.ENUM) and value_col is not None:
            dt = DTYPE_BY_CODE[self.dcode]
            if dt.kind == "f":
                # rows of another type (demoted below, then zeroed) may not fit a float32
                with np.errstate(over="ignore", invalid="ignore"):
                    value = s["fval"].astype(dt)
            elif dt == np.uint64:
                value = s["ival"].view(np.uint64).copy()
            else:
                value = s["ival"].astype(dt)
            value[demote | ~valued] = 0
        elif kind is ValueKind.STRING and value_col is not None:
            texts: list[str] = []
            for i in range(m):
                if demote[i] or not valued[i]:
                    texts.append("")
                    continue
                t = b.text(int(s["offset"][i]), int(s["size"][i])).decode("utf-8")
                if "\x00" in t:
                    demote[i] = True
                    t = ""
                texts.append(t)
            value = np.array(texts, dtype=object)
        elif kind is ValueKind.ARRAY and value_col is not None:
            value = np.zeros((m, self.width), dtype=DTYPE_BY_CODE[self.dcode])
            shapes = np.zeros((m, 1), dtype=np.int64)
            rows = np.flatnonzero(valued & ~demote)
            shapes[rows, 0] = s["size"][rows]
            b.gather(self.dcode, s["offset"][rows], s["size"][rows], value, rows)
        elif kind is ValueKind.NDARRAY and value_col is not None:
            check.update(range(m))  # the image shape comes from each row's rest
        demoted_rows = np.flatnonzero(demote).tolist()
        check.update(demoted_rows)
        check.update(r + 1 for r in demoted_rows if r + 1 < m)
        images: list[tuple[int, npt.NDArray[Any]]] = []
        strings: list[tuple[int, list[str]]] = []
        checked = sorted(check)
        codes: list[int] = []  # alarm message code from each checked row on
        for r in checked:
            raw = entries.get(r)
            if raw is not None:
                self.base_raw = raw
                self._base = None
            out = self.base_raw
            if demote[r]:
                rest = self.base()
                pyv = self._py_value(b, s, r)
                py_values[r] = pyv
                data = rebuild_data(rest, flags=F_VALUE, kind=int(kinds[r]), time_ns=0,
                                    severity=0, status=0, value=pyv)
                out = encode_rest({"d": data, "f": rest.get("f", [])})
            elif kind is ValueKind.NDARRAY and valued[r] and value_col is not None:
                z = int(s["size"][r])
                a = b.elements(self.dcode, int(s["offset"][r]), z)
                a = a.reshape(_image_shape(self.base(), z))
                if self.rank is None:
                    self.rank = a.ndim
                if a.ndim != self.rank:
                    demote[r] = True
                    pyv = a.reshape(-1).tolist()
                    rest = self.base()
                    data = rebuild_data(rest, flags=F_VALUE, kind=int(kinds[r]), time_ns=0,
                                        severity=0, status=0, value=pyv)
                    out = encode_rest({"d": data, "f": rest.get("f", [])})
                else:
                    images.append((r, a))
            elif extract and int(kinds[r]) == self.kind_code:
                got = self._extract(r, strings, table_cols)
                if got is not None:
                    out = got
                    flags[r] |= F_VALUE
            if self.message is not None:
                out, code = self._take_message(out)
                codes.append(code)
            self._emit(w0 + r, out)
        if self.message is not None:
            row_codes = np.repeat(np.array(codes, dtype=np.int32), np.diff([*checked, m]))
            flags[row_codes >= 0] |= np.uint8(F_MESSAGE)
            if not self.texts:
                self.no_message += m
            else:
                if self.no_message:
                    self.message.add(np.full(self.no_message, -1, dtype=np.int32))
                    self.no_message = 0
                self.message.add(row_codes)
        if kind is ValueKind.NDARRAY and value_col is not None:
            rank = self.rank or 1
            shapes = np.zeros((m, rank), dtype=np.int64)
            for r, a in images:
                if a.ndim == rank:
                    shapes[r] = a.shape
            maxshape = tuple(int(x) for x in shapes.max(axis=0)) if m else (0,) * rank
            value = np.zeros((m, *maxshape), dtype=DTYPE_BY_CODE[self.dcode])
            for r, a in images:
                if a.ndim == rank and a.size:
                    region: tuple[int | slice, ...] = (r, *(slice(0, d) for d in a.shape))
                    value[region] = a
        if kind is ValueKind.STRING_ARRAY and value_col is not None:
            widest = max((len(x) for _, x in strings), default=0)
            value = np.full((m, widest), "", dtype=object)
            shapes = np.zeros((m, 1), dtype=np.int64)
            for r, items in strings:
                value[r, : len(items)] = items
                shapes[r, 0] = len(items)
        if kind is ValueKind.TABLE:
            shapes = np.zeros((m, 1), dtype=np.int64)
            self._add_table(m, table_cols, shapes)
        flags[demote] &= ~np.uint8(F_VALUE)
        if value is not None and value_col is not None:
            value_col.add(value)
        if shapes is not None:
            self._add_shapes(shapes)
        self._add_flagged(flags, F_USER_TAG, s["user_tag"])
        self._add_flagged(flags, F_FRAME, s["fval"], s["ival"])  # the live row's id, time
        self.cols["time"].add(s["time"])
        self.cols["iteration"].add(s["iteration"])
        self.cols["severity"].add(s["severity"])
        self.cols["status"].add(s["status"])
        self.cols["flags"].add(flags)
        self._index(s["iter_row"])
        self.rows += m

    def _add_flagged(self, flags: npt.NDArray[np.uint8], bit: int,
                     *values: npt.NDArray[Any]) -> None:
        """The :data:`FLAGGED_COLUMNS` of flag ``bit`` for a block's rows, ``values`` in rows
        with the flag, 0 in the others (they keep the field in their metadata entry); made at
        the first row with the flag, so a PV without one has no such dataset."""
        on = (flags & bit) != 0
        cols = self.flagged.get(bit)
        if cols is None:
            if not on.any():
                self.unflagged[bit] += len(flags)
                return
            cols = self.flagged[bit] = tuple(
                _Col(self.w, self.g, name, self.n, dtype=dt, attrs=attrs, share=True)
                for name, dt, attrs in FLAGGED_COLUMNS[bit])
            for col in cols:
                self.cols[col.name] = col
                if self.unflagged[bit]:
                    col.add(np.zeros(self.unflagged[bit], col.dtype))
        for col, v in zip(cols, values, strict=True):
            col.add(np.where(on, v, 0).astype(col.dtype))

    def _py_value(self, b: _Block, s: dict[str, npt.NDArray[Any]], r: int) -> Any:
        dcode = int(s["dtype"][r])
        kind = int(s["kind"][r])
        if dcode == STRING_DTYPE_CODE:
            return b.text(int(s["offset"][r]), int(s["size"][r])).decode("utf-8")
        if kind in (K_ARRAY, K_NDARRAY):
            return b.elements(dcode, int(s["offset"][r]), int(s["size"][r])).tolist()
        return typed_scalar(dcode, int(s["ival"][r]), float(s["fval"][r]))

    def _extract(self, r: int, strings: list[tuple[int, list[str]]],
                 table_cols: dict[str, list[Any]]) -> bytes | None:
        """String array / NTTable value of row ``r`` moved out of the rest (JSON of the rest
        without it), or None when it does not fit the PV's typed columns."""
        rest = self.base()
        d = rest.get("d", {})
        v = d.get("value")
        if self.kind is ValueKind.STRING_ARRAY:
            if not isinstance(v, list) or not _clean_strings(v):
                return None
            strings.append((r, v))
            placeholder: Any = None
        else:
            kind, table = typed_value(d, frozenset(rest.get("f", ())))
            if kind is not ValueKind.TABLE or not isinstance(v, Mapping):
                return None
            columns = table.columns
            schema = tuple((c, "str" if isinstance(a, tuple) else a.dtype.str)
                           for c, a in columns.items())
            lengths = {len(a) for a in columns.values()}
            if len(lengths) > 1 or any(
                isinstance(a, tuple) and not _clean_strings(list(a)) for a in columns.values()
            ):
                return None
            if self.schema is None:
                self.schema = schema
                labels = d.get("labels")
                self.labels = [str(x) for x in labels] if isinstance(labels, list) else []
            elif [c for c, _ in schema] != [c for c, _ in self.schema] or any(
                len(columns[c]) and t != t0
                for (c, t), (_, t0) in zip(schema, self.schema, strict=True)
            ):
                return None
            for c, a in columns.items():
                table_cols.setdefault(c, []).append((r, a))
            placeholder = dict.fromkeys(v)
        d2 = dict(d)
        d2["value"] = placeholder
        return encode_rest({"d": d2, "f": rest.get("f", [])})

    def _add_table(self, m: int, table_cols: dict[str, list[Any]],
                   shapes: npt.NDArray[np.int64]) -> None:
        if self.schema is None:
            return
        if self.value_group is None:
            self.value_group = create_group(self.g, "value")
            names = [c for c, _ in self.schema]
            set_attrs(self.value_group, {"columns": names, "labels": self.labels or [],
                                         "NX_class": "NXcollection"})
            for c, t in self.schema:
                dt = np.dtype(object) if t == "str" else np.dtype(t)
                attrs = {"column": c, "dtype": "utf-8" if t == "str" else dt.name}
                self.table[c] = _Col(self.w, self.value_group, escape_name(c), self.n,
                                     dtype=dt, attrs=attrs)
        for c, t in self.schema:
            items = table_cols.get(c, [])
            widest = max((len(a) for _, a in items), default=0)
            dt = self.table[c].dtype
            arr = np.zeros((m, widest), dtype=dt)
            if t == "str":
                arr[...] = ""
            for r, a in items:
                arr[r, : len(a)] = list(a) if t == "str" else a
                shapes[r, 0] = len(a)
            self.table[c].add(arr)

    def _index(self, iter_row: npt.NDArray[np.int64]) -> None:
        """XFEL-style first/count per /iterations row, written as the rows stream by.

        first[k] = the PV's first row whose iteration row is >= k (rows that arrived after
        their iteration closed, iter_row -1, belong to the iteration before them)."""
        n_iter = self.w.n_iter
        if not len(iter_row):
            return
        run = np.maximum.accumulate(np.maximum(iter_row, self.run_max))
        valid = iter_row >= 0
        top = min(int(run[-1]), n_iter - 1)
        # iterations next_k .. top get their `first` in this block
        if top >= self.next_k:
            ks = np.arange(self.next_k, top + 1)
            self.first.add(self.rows + np.searchsorted(run, ks).astype(np.int64))
            counts = np.bincount(iter_row[valid] - self.next_k + 1 if self.next_k else
                                 iter_row[valid] + 1, minlength=top - self.next_k + 2)
            # counts[0] = rows of iteration next_k - 1 (carried), counts[1:] = next_k .. top
            if self.next_k:
                self.count.add(np.array([self.pending + counts[0]], dtype=np.int64))
            counts = counts[1 : top - self.next_k + 2].astype(np.int64)
            self.count.add(counts[:-1])
            self.pending = int(counts[-1])
            self.next_k = top + 1
        elif self.next_k:
            self.pending += int(np.count_nonzero(iter_row[valid] == self.next_k - 1))
        self.run_max = int(run[-1])

    def _add_shapes(self, shapes: npt.NDArray[np.int64]) -> None:
        """The rows' shapes: counted while they are all the same, a ``shape`` column from the
        first row that differs (the rows before it get the common shape)."""
        if self.shape is None:
            if not len(shapes):
                return
            if self.same_shape is None:
                self.same_shape = shapes[0].copy()
            if (shapes == self.same_shape).all():
                self.same_rows += len(shapes)
                return
            self.shape = _Col(self.w, self.g, "shape", self.n, dtype=np.dtype(np.int64),
                              share=True)
            if self.same_rows:
                self.shape.add(np.tile(self.same_shape, (self.same_rows, 1)))
        self.shape.add(shapes)

    def finish(self) -> None:
        n_iter = self.w.n_iter
        if self.next_k:
            self.count.add(np.array([self.pending], dtype=np.int64))
        for lo in range(self.next_k, n_iter, SCAN_ROWS):  # iterations after the last row
            hi = min(n_iter, lo + SCAN_ROWS)
            self.first.add(np.full(hi - lo, self.rows, dtype=np.int64))
            self.count.add(np.zeros(hi - lo, dtype=np.int64))
        self.next_k = n_iter
        flags = self.cols["flags"]
        const_flags = -1  # flags of every row when the same for all (no `flags` dataset)
        if flags.ds is None:
            f = flags._data()
            if not len(f) or (f == f[0]).all():
                const_flags = int(f[0]) if len(f) else 0
                del self.cols["flags"]
                self.w.buffered -= flags.nbytes
                self.w.dirty.discard(flags)
        message = self.message
        if message is not None and message.ds is None:
            if self.texts:
                message.attrs["texts"] = list(self.texts)
                self.cols["alarm_message"] = message
            else:  # no row had a message to take out: nothing was buffered
                self.w.dirty.discard(message)
        if self.shape is None and self.same_shape is not None:
            value = next(iter(self.table.values()), None) or self.cols.get("value")
            trailing = (value.trailing or ())[: 1 if self.table else None] if value else None
            if trailing is not None and trailing != tuple(self.same_shape.tolist()):
                # readers take the shape from `value`: it must be that one, else written
                self.shape = _Col(self.w, self.g, "shape", self.n,
                                  dtype=np.dtype(np.int64), share=True)
                self.shape.add(np.tile(self.same_shape, (self.same_rows, 1)))
        if self.shape is not None:
            self.cols["shape"] = self.shape
        for c in (*self.cols.values(), *self.table.values(), self.first, self.count):
            c.finish()
        value = self.cols.get("value")
        if value is not None and value.trailing and (
                self.shape is None or self.shape.trailing == (1,)):
            # an array per row (of one shape, or 1-D: `shape` (n, 1) is then read as one
            # length per row): say which dimension the per-row columns run along (NeXus
            # `axes`/`AXISNAME_indices`), else a loader guesses it from the lengths, and
            # 1,000 rows of 1,000-element waveforms are ambiguous (decision 0011)
            set_attrs(self.g, {"axes": ["time", *["."] * len(value.trailing)], **{
                f"{name}_indices": 0 for name in self.cols if name not in ("value", "time")}})
        if message is not None and message.ds is not None:  # spilled: texts known only now
            message.finish()
            set_attrs(message.ds, {"texts": list(self.texts)})
        if self.meta_row is not None and self.meta_json is not None:
            self.meta_row.finish()
            self.meta_json.finish()
        uri = self.w.uris.get(self.name)
        info: dict[str, Any] = {
            "pv_name": self.name,
            "group": "/pvs/" + self.path,
            "source": uri or "",
            "protocol": uri.split("://", 1)[0] if uri and "://" in uri else "",
            "kind": self.kind.value if self.n else ValueKind.NONE.value,
            "storage_dtype": (
                DTYPE_BY_CODE[self.dcode].name if self.dcode in DTYPE_BY_CODE
                and self.kind not in (ValueKind.STRING_ARRAY, ValueKind.TABLE)
                else "utf-8" if self.dcode == STRING_DTYPE_CODE
                or self.kind is ValueKind.STRING_ARRAY
                else "table" if self.kind is ValueKind.TABLE
                else "none"
            ),
            "count": self.n,
            "flags": const_flags,
            "metadata": self.first_json.decode("utf-8") if self.first_json is not None else "",
            "metadata_entries": self.n_meta,
        }
        info.update(info_fields(self.fields))
        self.w.info.append(info)


def _clean_strings(items: list[Any]) -> bool:
    """All str, UTF-8 encodable, no NUL (HDF5 strings end at NUL)."""
    return all(utf8_text(x) is not None for x in items)


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
        self.dirty: set[_Col] = set()
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
                    self.dirty.discard(col)


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


def _write_iterations(f: h5py.File, out: h5py.File, w: _Writer, commit: Commit,
                      plan: _Plan) -> int:
    """Copy /iterations (in blocks), adding rows for iterations the writer never closed."""
    src = f["iterations"]
    n = commit.limits["n_iterations"]
    extra = plan.extra_iters
    missing = list(range(n, max(extra) + 1)) if extra else []
    total = n + len(missing)
    it = create_group(out.id, "iterations")
    cols: dict[str, _Col] = {}
    for name, dt in ITERATION_COLUMNS.items():
        if name == "error_message_size":
            continue
        if name == "error_message":
            cols[name] = _Col(w, it, name, total, dtype=np.dtype(object))
        elif name in ("status", "reason"):
            cols[name] = _Col(w, it, name, total, dtype=dt,
                              h5dtype=STATUS_ENUM if name == "status" else REASON_ENUM)
        else:
            attrs = TIME_ATTRS if name in ("header_timestamp", "tail_timestamp") else None
            cols[name] = _Col(w, it, name, total, dtype=dt, attrs=attrs)
    cols["tags"] = _Col(w, it, "tags", total, dtype=np.dtype(object))
    bytes_ds = f["live"]["bytes"]
    tags = _read_tags(f, commit)
    matched: set[int] = set()

    def tag_column(iter_index: npt.NDArray[np.int64]) -> npt.NDArray[Any]:
        out = []
        for i in iter_index.tolist():
            t = tags.get(i)
            out.append(tags_json(t) if t else "")
            if t is not None:
                matched.add(i)
        return np.array(out, dtype=object)

    for lo in range(0, n, SCAN_ROWS):
        hi = min(n, lo + SCAN_ROWS)
        block = {k: src[k][lo:hi] for k in ITERATION_COLUMNS}
        off, size = block["error_message"], block["error_message_size"]
        messages = [
            bytes_ds[o : o + z].tobytes().decode("utf-8", "replace") if o >= 0 and z else ""
            for o, z in zip(off.tolist(), size.tolist(), strict=True)
        ]
        block["error_message"] = np.array(messages, dtype=object)
        block["tags"] = tag_column(block["iter_index"])
        for k, c in cols.items():
            c.add(block[k])
        w.maybe_spill()
    if missing:
        m = len(missing)
        add: dict[str, npt.NDArray[Any]] = {
            k: np.zeros(m, dtype=dt) for k, dt in ITERATION_COLUMNS.items()
        }
        add["iter_index"][:] = [extra.get(r, (-1, 0))[0] for r in missing]
        add["n_written"][:] = [extra.get(r, (-1, 0))[1] for r in missing]
        add["status"][:] = ITERATION_STATUS["incomplete"]
        add["reason"][:] = ITERATION_REASONS["writer_crashed"]
        for k in ("expected_messages", "missing_messages", "partition", "offset"):
            add[k][:] = -1
        add["error_message"] = np.array([""] * m, dtype=object)
        add["tags"] = tag_column(add["iter_index"])
        for k, c in cols.items():
            c.add(add[k])
    for c in cols.values():
        c.finish()
    w.dirty.clear()
    # tags of iterations that are not in this file: kept at the recording level
    unmatched = {str(i): t for i, t in tags.items() if i not in matched}
    out.attrs["unmatched_tags"] = json.dumps(unmatched, separators=(",", ":"))
    return total


def _read_tags(f: h5py.File, commit: Commit) -> dict[int, dict[str, str]]:
    """The committed /live/tags rows, merged per iter_index."""
    live = f["live"]
    n = commit.limits["n_tags"]
    if not n:
        return {}
    rows = {k: live["tags"][k][:n] for k in TAG_COLUMNS}
    lo = int(rows["offset"].min())
    hi = int((rows["offset"] + rows["size"]).max())
    pool = live["bytes"][lo:hi]
    return merge_tags(rows["iter_index"], rows["offset"] - lo, rows["size"], pool)


def finalize(
    partial: Path,
    final: Path,
    *,
    status: str,
    reason: str = "",
    options: OutputOptions | None = None,
    end_time: float | None = None,
    extra_attrs: Mapping[str, Any] | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> Path:
    """Write ``final`` from the live file ``partial``; returns ``final``."""
    tmp = final.with_name(final.name + FINAL_SUFFIX)
    if tmp.exists():
        tmp.unlink()
    with h5py.File(partial, "r", swmr=True, rdcc_nbytes=CHUNK_CACHE) as f:
        attrs = dict(f.attrs)
        if options is None:
            opts_json = attrs.get("output_options")
            options = (
                OutputOptions.model_validate_json(opts_json)
                if isinstance(opts_json, str)
                else OutputOptions(directory=final.parent)
            )
        try:
            _write_final(f, tmp, attrs, options, status=status, reason=reason,
                         end_time=end_time, extra_attrs=extra_attrs, block_bytes=block_bytes)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o444)
    if final.exists():
        raise FileExistsError(f"{final} exists; refusing to overwrite")
    os.rename(tmp, final)
    partial.unlink()
    dfd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return final


def _write_final(f: h5py.File, tmp: Path, attrs: dict[str, Any], options: OutputOptions, *,
                 status: str, reason: str, end_time: float | None,
                 extra_attrs: Mapping[str, Any] | None, block_bytes: int) -> None:
    commit = read_commit(f)
    pv_names = read_pv_names(f, commit)
    n_pvs = len(pv_names)
    n_iter_live = commit.limits["n_iterations"]
    plan = _scan(f, commit, n_pvs, n_iter_live, block_bytes)
    uri_json = attrs.get("pv_uri_map")
    uris = json.loads(uri_json) if isinstance(uri_json, str) else {}
    # no chunk cache: otherwise each open dataset keeps chunks in memory (memory would grow
    # with the number of PVs); rows are written in large blocks anyway
    with h5py.File(tmp, "x", libver=("v110", "v110"), rdcc_nbytes=CHUNK_CACHE) as out:
        for k, v in attrs.items():
            if k != "required_plugins":
                out.attrs[k] = v
        out.attrs["status"] = status
        out.attrs["status_reason"] = reason
        end = end_time if end_time is not None else time.time()
        out.attrs["end_time"] = _iso(end)
        out.attrs["end_time_ns"] = int(end * 1e9)
        out.attrs["layout"] = "final"
        out.attrs["format_version"] = FORMAT_VERSION
        for k, v in (extra_attrs or {}).items():
            out.attrs[k] = v
        w = _Writer(out, options, 0, uris, block_bytes)
        n_iter = _write_iterations(f, out, w, commit, plan)
        w.n_iter = n_iter
        w.piece_rows = plan_piece_rows(plan, n_iter, block_bytes)
        kafka = out.create_group("kafka")
        live = f["live"]
        nk = commit.limits["n_kafka"]
        for k in ("topic", "partition", "offset", "time"):
            kafka.create_dataset(k, data=live["kafka"][k][:nk])
        pvs = w.pvs
        set_attrs(pvs, {"NX_class": "NXcollection"})
        pvs.attrs.create("pv_names", pv_names, dtype=STR)
        writers = [
            _PV(w, name, n=int(plan.counts[col]), kind=int(plan.kind[col]),
                dcode=int(plan.dtype[col]), width=int(plan.width[col]),
                split_message=bool(plan.entries[col] > 1))
            for col, name in enumerate(pv_names)
        ]
        meta = _Meta(f, commit.limits["n_meta"])
        prior = np.zeros(n_pvs, dtype=np.int64)
        for lo, hi in zip(plan.cuts[:-1], plan.cuts[1:], strict=True):
            pv = live["samples"]["pv"][lo:hi].astype(np.int64)
            order = _pv_order(pv)
            occ = _occurrence(pv, prior, order)
            prior = prior + np.bincount(pv, minlength=n_pvs)
            m = meta.take(pv, occ, prior)
            block = _read_block(f, lo, hi, m)
            sp = pv[order]
            starts = np.r_[0, np.flatnonzero(np.diff(sp)) + 1] if len(sp) else np.zeros(0, int)
            ends = np.r_[starts[1:], len(sp)] if len(sp) else np.zeros(0, int)
            # the block's columns grouped by PV (in row order within a PV): one slice each
            grouped = {k: v[order] for k, v in block.s.items()}
            # metadata entries by PV: local row within the PV's rows of this block
            m_order = np.argsort(m["pv"], kind="stable")
            m_pv = m["pv"][m_order]
            cols = sp[starts]
            m_lo = np.searchsorted(m_pv, cols, "left").tolist()
            m_hi = np.searchsorted(m_pv, cols, "right").tolist()
            m_row = m["row"][m_order].tolist()
            m_off = m["offset"][m_order].tolist()
            m_size = m["size"][m_order].tolist()
            for col, a, z, ml, mh in zip(cols.tolist(), starts.tolist(), ends.tolist(), m_lo,
                                         m_hi, strict=True):
                pw = writers[col]
                entries = {m_row[i] - pw.rows: block.text(m_off[i], m_size[i])
                           for i in range(ml, mh)}
                pw.add(block, {k: v[a:z] for k, v in grouped.items()}, entries)
                w.maybe_spill()
            del block
        writers.reverse()
        while writers:  # (each PV's objects are released once written)
            writers.pop().finish()
            w.maybe_spill()
        _write_pv_info(out, w.info)
        out.attrs.create("required_plugins", sorted(w.plugins), dtype=STR)
        out.attrs["n_iterations"] = n_iter
        out.attrs["n_values"] = int(commit.limits["n_samples"])


def _write_pv_info(out: h5py.File, rows: list[dict[str, Any]]) -> None:
    """/pv_info: one row per PV (in /pvs@pv_names order), the per-PV description."""
    fields = [(name, STR if kind == "s" else np.dtype(kind)) for name, kind in PV_INFO_FIELDS]
    table = np.zeros(len(rows), dtype=np.dtype(fields))
    for name, kind in PV_INFO_FIELDS:
        if kind == "s":
            table[name] = np.array([r[name] for r in rows] or [], dtype=object)
        else:
            table[name] = [r[name] for r in rows]
    kwargs: dict[str, Any] = {}
    if len(rows):
        kwargs = {"chunks": (min(len(rows), 4096),), "compression": "gzip",
                  "compression_opts": 4, "shuffle": True}
    ds = out.create_dataset("pv_info", data=table, track_times=False, **kwargs)
    ds.attrs["description"] = (
        "one row per PV: name, group, source URI, protocol, kind, storage dtype, count, "
        "units, precision, display/control/alarm limits and enum choices of its first "
        "metadata (NaN / empty when absent), that metadata as JSON, and the number of "
        "metadata entries (> 1: the group has metadata/row and metadata/json)")


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"
