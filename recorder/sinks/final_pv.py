"""One PV of the final file: :class:`_PV` turns the PV's rows of each live block into its
datasets (``/pvs/<PV>``: value, shape, time, iteration, alarms, flags, alarm_message, the
per-sample columns of flagged fields, NTTable columns; ``/index/<PV>``: first/count;
``/metadata/<PV>``) and its row of ``/pv_info``.

With many small PVs the cost is the number of HDF5 objects (format 2.0, see
docs/decisions/0004-final-layout-objects-per-pv.md): the per-PV description is one row of
``/pv_info`` instead of group attributes, ``metadata/*`` exists only when the PV structure
changes after row 0, and constant ``flags`` only in ``/pv_info``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from recorder.client.values import ValueKind, typed_value
from recorder.sinks.codec import (
    DTYPE_BY_CODE,
    F_FRAME,
    F_MESSAGE,
    F_USER_TAG,
    F_VALUE,
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
from recorder.sinks.final_blocks import SCAN_ROWS, _Block
from recorder.sinks.final_datasets import _Col, _Writer
from recorder.sinks.final_h5 import create_group, set_attrs
from recorder.sinks.final_layout import (
    EXTRACTED_AT_FINALIZE,
    FLAGGED_COLUMNS,
    K_ARRAY,
    K_NDARRAY,
    NXLOG,
    TIME_ATTRS,
)
from recorder.sinks.final_metadata import (
    _image_shape,
    _metadata_fields,
    first_metadata,
    hdf5_text,
    info_fields,
    value_attrs,
)

MESSAGE_TEXTS_MAX = 1024
"""Distinct alarm messages per PV in ``alarm_message``; later new texts stay in the metadata."""
MESSAGE_CACHE = 64  # rest JSON -> (without the message, code): entries remembered per PV


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
        self.rankless = 0  # NTNDArray rows before the first image (the rank is not known)
        self.schema: tuple[tuple[str, str], ...] | None = None  # NTTable (column, dtype)
        self.labels: list[str] | None = None
        self.untyped_tables = 0  # NTTable rows before the schema is known (no columns yet)
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
                                 ("severity", i32, None), ("status", i32, None)):
            self.cols[cname] = _Col(w, self.g, cname, n, dtype=dt, attrs=attrs, share=True)
        # `flags`: made at the first row whose flags differ from the rows before it; until
        # then only that one value and the number of rows (a constant one is /pv_info's,
        # also when the PV is written in pieces)
        self.same_flags: int | None = None
        self.same_flags_rows = 0
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
        # a string PV none of whose texts HDF5 can hold (not UTF-8) has the dtype code of
        # no row: its `value` is the fill "" all the same (the texts are in the metadata)
        if ((n and (dcode == STRING_DTYPE_CODE or self.kind is ValueKind.STRING))
                or self.kind is ValueKind.STRING_ARRAY):
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
        if kind is ValueKind.NDARRAY and value_col is not None and self.rank is None:
            self.rankless += m  # no image yet: these rows wait for the rank (or finish)
        elif kind is ValueKind.NDARRAY and value_col is not None:
            rank = self.rank or 1
            self._add_rankless(rank)
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
        self._add_flags(flags)
        self._index(s["iter_row"])
        self.rows += m

    def _add_rankless(self, rank: int) -> None:
        """The NTNDArray rows before the first image (no value), as images of ``rank``."""
        value = self.cols.get("value")
        if self.rankless and value is not None:
            value.add(np.zeros((self.rankless, *(0,) * rank), dtype=value.dtype))
            self._add_shapes(np.zeros((self.rankless, rank), dtype=np.int64))
        self.rankless = 0

    def _add_flags(self, flags: npt.NDArray[np.uint8]) -> None:
        """A block's ``flags``: counted while every row has the same, the column made (in
        its place after ``status``) at the first that differs."""
        col = self.cols.get("flags")
        if col is None:
            if not len(flags):
                return
            first = int(flags[0])
            if (self.same_flags is None or first == self.same_flags) and (
                    flags == first).all():
                self.same_flags = first
                self.same_flags_rows += len(flags)
                return
            col = _Col(self.w, self.g, "flags", self.n, dtype=np.dtype(np.uint8), share=True)
            if self.same_flags_rows:
                col.add(np.full(self.same_flags_rows, self.same_flags, dtype=np.uint8))
            cols = list(self.cols.items())
            at = [name for name, _ in cols].index("status") + 1
            self.cols = dict([*cols[:at], ("flags", col), *cols[at:]])
        col.add(flags)

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
            if len(lengths) > 1 or not _clean_strings(list(columns)) or any(
                isinstance(a, tuple) and not _clean_strings(list(a)) for a in columns.values()
            ):
                return None  # (column names: HDF5 names and attribute text)
            if self.schema is None:
                self.schema = schema
                labels = d.get("labels")
                self.labels = ([hdf5_text(str(x)) for x in labels] if isinstance(labels, list)
                               else [])
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
        if self.schema is None:  # no table fit typed columns yet: their rows are counted
            self.untyped_tables += m
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
                if self.untyped_tables:  # earlier blocks' rows (in their metadata JSON)
                    self.table[c].add(np.zeros((self.untyped_tables, 0), dtype=dt))
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
            self._make_shape_column()
        assert self.shape is not None
        self.shape.add(shapes)

    def _make_shape_column(self) -> None:
        """``shape``, made now: the rows seen so far all had ``same_shape``."""
        self.shape = _Col(self.w, self.g, "shape", self.n, dtype=np.dtype(np.int64),
                          share=True)
        if self.same_rows and self.same_shape is not None:
            self.shape.add(np.tile(self.same_shape, (self.same_rows, 1)))

    def finish(self) -> None:
        n_iter = self.w.n_iter
        self._add_rankless(self.rank or 1)
        if self.next_k:
            self.count.add(np.array([self.pending], dtype=np.int64))
        for lo in range(self.next_k, n_iter, SCAN_ROWS):  # iterations after the last row
            hi = min(n_iter, lo + SCAN_ROWS)
            self.first.add(np.full(hi - lo, self.rows, dtype=np.int64))
            self.count.add(np.zeros(hi - lo, dtype=np.int64))
        self.next_k = n_iter
        if self.kind is ValueKind.TABLE and self.n and self.value_group is None:
            # no table had columns HDF5 can hold (each one is in its row's metadata): a
            # `value` of no columns, as a table PV has one
            self.value_group = create_group(self.g, "value")
            set_attrs(self.value_group, {"columns": [], "labels": self.labels or [],
                                         "NX_class": "NXcollection"})
        # flags of every row when the same for all (no `flags` dataset), else -1
        const_flags = -1 if "flags" in self.cols else self.same_flags or 0
        message = self.message
        if message is not None and self.texts:
            if not message.spilled:
                message.attrs["texts"] = list(self.texts)
            # (a spilled one too: a per-row column, named in the NeXus `*_indices` below)
            self.cols["alarm_message"] = message
        elif message is not None:  # no row had a message to take out: nothing was buffered
            self.w.dirty.pop(message, None)
        if self.shape is None and self.same_shape is not None:
            data = next(iter(self.table.values()), None) or self.cols.get("value")
            trailing = (data.trailing or ())[: 1 if self.table else None] if data else None
            if trailing is not None and trailing != tuple(self.same_shape.tolist()):
                # readers take the shape from `value`: it must be that one, else written
                self._make_shape_column()
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
        if message is not None and message.spilled and self.texts:  # texts known only now
            set_attrs(message.dataset(), {"texts": list(self.texts)})
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
                or self.kind in (ValueKind.STRING, ValueKind.STRING_ARRAY)
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
