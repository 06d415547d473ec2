"""The live file, read in blocks of rows (``block_bytes`` of data each), so that memory is
bounded whatever the size of the segment.

A first pass (:func:`_scan`) reads only a few small columns (PV, kind, dtype, size, iteration
row) to learn each PV's row count, type and waveform width, and where to cut the blocks: a
:class:`_Plan`. The second pass reads one block at a time (:func:`_read_block`: its sample
columns and the bytes and array elements they point to, a :class:`_Block`) and splits it by PV
(:func:`_pv_order`, :func:`_occurrence`); :class:`_Meta` gives each /live/meta entry its row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt

from recorder.sinks.buffer import SAMPLE_COLUMNS
from recorder.sinks.codec import DTYPE_BY_CODE, F_VALUE, STRING_DTYPE_CODE
from recorder.sinks.final_layout import K_ARRAY, K_NDARRAY, typing_rows
from recorder.sinks.livefile import Commit, sample_slice

SCAN_ROWS = 1 << 20  # rows per read in the first pass
ROW_OVERHEAD = 256  # bytes of memory per sample row in a block (columns + temporaries)


def _itemsizes() -> npt.NDArray[np.int64]:
    """Element bytes by storage dtype code (1 for an unknown code)."""
    out = np.ones(256, dtype=np.int64)
    for code, dt in DTYPE_BY_CODE.items():
        out[code] = dt.itemsize
    return out


_ITEMSIZE = _itemsizes()


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
        pref, cand = typing_rows(flags, kind, size)
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


TEXT_GAP = 64 * 1024  # byte-pool bytes between a block's texts read rather than skipped


@dataclass(slots=True)
class _Block:
    s: dict[str, npt.NDArray[Any]]
    bytes_lo: int
    raw: bytes
    pools: dict[int, tuple[int, npt.NDArray[Any]]]  # dtype -> (first element offset, elements)
    # byte-pool runs apart from ``raw`` (first offset, bytes): metadata JSON stored long
    # before the block's rows (a PV back to a structure it had)
    texts: tuple[tuple[int, bytes], ...] = ()

    def text(self, offset: int, size: int) -> bytes:
        if self.bytes_lo <= offset and offset + size <= self.bytes_lo + len(self.raw):
            return self.raw[offset - self.bytes_lo : offset - self.bytes_lo + size]
        for lo, run in self.texts:
            if lo <= offset and offset + size <= lo + len(run):
                return run[offset - lo : offset - lo + size]
        raise ValueError(f"bytes {offset}+{size} are not among the block's byte-pool runs")

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
    # read in runs: the texts of the block's rows are side by side, but a metadata entry may
    # point far back (/live/meta reuses the JSON of a structure seen before)
    # (vectorized: a block holds up to millions of texts)
    order = np.argsort(starts, kind="stable")
    a, e = starts[order], ends[order]
    runs: list[tuple[int, int]] = []
    if len(a):
        reach = np.maximum.accumulate(e)  # the furthest end so far
        first = np.flatnonzero(np.concatenate([[True], a[1:] > reach[:-1] + TEXT_GAP]))
        runs = list(zip(a[first].tolist(), np.maximum.reduceat(e, first).tolist(),
                        strict=True))
    read = [(lo, live["bytes"][lo:hi].tobytes() if hi > lo else b"") for lo, hi in runs]
    # the largest run (the rows' own texts) in ``raw``, the others beside it
    main = max(range(len(read)), key=lambda i: len(read[i][1]), default=None)
    b_lo, raw = read[main] if main is not None else (0, b"")
    pools: dict[int, tuple[int, npt.NDArray[Any]]] = {}
    arr = ((kind == K_ARRAY) | (kind == K_NDARRAY)) & (offset >= 0) & np.isin(
        dtype, list(DTYPE_BY_CODE))
    for code in np.unique(dtype[arr]).tolist():
        sel = arr & (dtype == code)
        p_lo = int(offset[sel].min())
        p_hi = int((offset[sel] + size[sel]).max())
        pools[code] = (p_lo, live[f"pool_{DTYPE_BY_CODE[code].name}"][p_lo:p_hi])
    return _Block(s, b_lo, raw, pools, tuple(r for i, r in enumerate(read) if i != main))
