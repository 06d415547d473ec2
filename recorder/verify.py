"""Check recorder files against the file-format spec (``k2eg-recorder verify``).

    from recorder.verify import verify_file
    report = verify_file("/data/k2eg-recorder/bpm/bpm-10hz_20261122T101500Z_0000.h5")
    if not report.ok:
        for p in report.errors:
            print(p)                     # "/pvs/BPM:X/count: row 41: ..."

What a file says about itself is checked against ``docs/file-format.md`` (the counterpart of
``extra-data-validate`` for European XFEL files): root attributes (present, typed, JSON that
parses, a status a finalized file may have, times in order), ``/iterations`` (columns of one
length, each ``iter_index`` once, statuses and reasons from their enums, trigger tags that
parse), and for every PV of a finalized file its NXlog group against ``/pv_info`` (columns of
``count`` rows, the ``first``/``count`` index pointing at rows of exactly that iteration,
``n_written`` of each iteration equal to what the PVs hold, metadata entries in row order
whose JSON parses, alarm-message codes within their texts, the flags column present exactly
when ``/pv_info`` says so, plugin filters named on their datasets; files of format 1.x, whose
PV description was in group attributes, get their root attributes and ``/iterations``
checked). A live file (``.partial``)
is checked at its last complete commit: every sample row points at a known PV, an
``/iterations`` row of its own iteration, and element/byte ranges inside the committed pools.

``data=True`` also reads every dataset whole, in blocks (compressed chunks decompressed), so
damaged blocks on disk show up; without it only the index columns are read, and a directory
of large files is checked in seconds.

Problems are errors (the file breaks the spec: a reader may get wrong answers) or warnings
(allowed but worth a look: a finalized file left writable, commits a crash cut short).
No check writes to the file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt

from recorder.catalog import candidates, live_status
from recorder.client.values import ValueKind
from recorder.sinks.buffer import ITERATION_COLUMNS, ITERATION_REASONS, ITERATION_STATUS
from recorder.sinks.codec import (
    F_FRAME,
    F_USER_TAG,
    POOL_NAMES,
    STRING_DTYPE_CODE,
    escape_name,
)
from recorder.sinks.describe import plain
from recorder.sinks.final_layout import FORMAT_MAJOR, format_major
from recorder.sinks.h5open import check_heap, open_for_reading
from recorder.sinks.livefile import read_commit, read_pv_names
from recorder.sinks.options import PARTIAL_SUFFIX

with contextlib.suppress(ImportError):  # zstd / blosc2 datasets (data=True decompresses)
    import hdf5plugin  # noqa: F401

__all__ = ["KNOWN_MAJOR", "Problem", "Report", "verify_file", "verify_paths"]

KNOWN_MAJOR = FORMAT_MAJOR
"""The newest major ``format_version`` this verifier knows."""

ROOT_REQUIRED = (
    "format", "format_version", "layout", "creator", "creator_version", "hdf5_version",
    "h5py_version", "run_name", "recording_uid", "recording_seq", "segment", "host",
    "start_time", "start_time_ns", "segment_start_time", "status", "status_reason",
    "run_definition", "metadata", "pv_uri_map", "output_options", "required_plugins",
)
FINAL_REQUIRED = ("end_time", "end_time_ns", "n_iterations", "n_values")
# text that is never empty, and times, when present: the global heap that holds root
# attributes' text has no checksum, so zeroed bytes there read back as empty or cut text
NONEMPTY_TEXT = ("creator", "creator_version", "hdf5_version", "h5py_version", "run_name",
                 "recording_uid", "host", "status")
TIME_TEXT = ("start_time", "segment_start_time", "end_time")
# integers, when present (the catalog and the reader take them as such)
INTEGER_ATTRS = ("recording_seq", "segment", "start_time_ns", "end_time_ns", "n_iterations",
                 "n_values")
JSON_ATTRS = ("metadata", "pv_uri_map", "output_options", "snapshot_properties",
              "unmatched_tags")
FINAL_STATUSES = ("complete", "aborted", "failed")
# /iterations of a finalized file: the live columns, the error message as text, the tags
FINAL_ITERATION_COLUMNS = tuple(c for c in ITERATION_COLUMNS if c != "error_message_size")
PV_COLUMNS = ("time", "iteration", "severity", "status", "first", "count")
# filters every HDF5 has (deflate, shuffle, fletcher32, szip, nbit, scaleoffset) and LZF,
# which h5py carries itself; any other one needs a plugin and must be named on its dataset
PLAIN_FILTERS = frozenset({1, 2, 3, 4, 5, 6, 32000})
NO_VALUE_KINDS = ("none", "struct")
KINDS = tuple(k.value for k in ValueKind)
BLOCK_BYTES = 64 << 20  # data=True reads datasets in blocks of about this size
MAX_LISTED = 5  # rows named in one problem before "and N more"


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding: ``where`` is an HDF5 path (``/`` for root attributes)."""

    severity: str  # "error" | "warning"
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(slots=True)
class Report:
    """What :func:`verify_file` found in one file."""

    path: Path
    layout: str = ""
    status: str = ""
    format_version: str = ""
    iterations: int = 0
    pvs: int = 0
    values: int = 0
    bytes_read: int = 0  # data=True: bytes of dataset content read
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """No error (warnings allowed)."""
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "ok": self.ok,
            "layout": self.layout,
            "status": self.status,
            "format_version": self.format_version,
            "iterations": self.iterations,
            "pvs": self.pvs,
            "values": self.values,
            "errors": [{"where": p.where, "message": p.message} for p in self.errors],
            "warnings": [{"where": p.where, "message": p.message} for p in self.warnings],
        }


def verify_paths(paths: Iterable[str | os.PathLike[str]], *, data: bool = False
                 ) -> Iterator[Report]:
    """:func:`verify_file` of every recorder file in ``paths`` (directories are listed,
    not recursively, by :func:`recorder.catalog.candidates`; missing paths are skipped)."""
    files, _missing = candidates(paths)
    for path in files:
        yield verify_file(path, data=data)


def verify_file(path: str | os.PathLike[str], *, data: bool = False) -> Report:
    """Check the file at ``path``; never raises for what the file holds (an unreadable
    file is an error in the report)."""
    report = Report(Path(path))
    checker = _Checker(report, data=data)
    try:
        partial = report.path.name.endswith(PARTIAL_SUFFIX)
        if not partial:  # a .partial no writer holds is scanned as it opens
            check_heap(report.path)
        with open_for_reading(report.path, live_first=partial) as f:
            checker.check(f)
    except OSError as exc:
        checker.err("/", f"cannot read: {exc}")
    except Exception as exc:  # a structure the checks did not foresee is a finding too
        checker.err("/", f"cannot check: {type(exc).__name__}: {exc}")
    return report


class _StopError(Exception):
    """Nothing more can be checked (not a recorder file, a newer format)."""


class _Checker:
    def __init__(self, report: Report, *, data: bool) -> None:
        self.report = report
        self.data = data
        self._datasets: list[h5py.Dataset] | None = None
        self.file: h5py.File | None = None  # the file being checked (set by check())

    def err(self, where: str, message: str) -> None:
        self.report.problems.append(Problem("error", where, message))

    def warn(self, where: str, message: str) -> None:
        self.report.problems.append(Problem("warning", where, message))

    # --- the file ---------------------------------------------------------------------
    def check(self, f: h5py.File) -> None:
        self.file = f
        try:
            attrs = self.root(f)
        except _StopError:
            return
        if self.report.layout == "final":
            self.final(f, attrs)
        else:
            self.live(f)
        self.filters(f, attrs)
        if self.data:
            self.read_everything(f)

    def root(self, f: h5py.File) -> dict[str, Any]:
        a = {k: plain(v) for k, v in f.attrs.items()}
        if a.get("format") != "k2eg-recorder":
            self.err("/", "not a k2eg-recorder file (no root attribute format='k2eg-recorder')")
            raise _StopError
        version = str(a.get("format_version", ""))
        self.report.format_version = version
        major = format_major(version)
        if major is None:
            self.err("/", f"format_version {version!r} is not MAJOR.MINOR")
            raise _StopError
        if major > KNOWN_MAJOR:
            self.err("/", f"format {version} is newer than this k2eg-recorder knows "
                     f"({KNOWN_MAJOR}.x): check it with a newer version")
            raise _StopError
        layout = a.get("layout")
        if layout not in ("live", "final"):
            self.err("/", f"layout {layout!r} is neither 'live' nor 'final'")
            raise _StopError
        self.report.layout = str(layout)
        required = ROOT_REQUIRED + (FINAL_REQUIRED if layout == "final" else ())
        for name in required:
            if name not in a:
                self.err("/", f"root attribute {name!r} is missing")
        for name in NONEMPTY_TEXT:
            if name in a and not str(a[name]).strip():
                self.err("/", f"root attribute {name!r} is empty")
        for name in INTEGER_ATTRS:
            if name in a and (not isinstance(a[name], int) or isinstance(a[name], bool)):
                self.err("/", f"root attribute {name!r} is not an integer: {a[name]!r}")
        for name in TIME_TEXT:
            if name in a:
                try:
                    dt.datetime.fromisoformat(str(a[name]))
                except ValueError:
                    self.err("/", f"root attribute {name!r} is not an ISO 8601 time: "
                             f"{str(a[name])!r}")
        for name in JSON_ATTRS:
            if name in a:
                try:
                    loaded = json.loads(str(a[name]))
                except ValueError as exc:
                    self.err("/", f"root attribute {name!r} is not JSON: {exc}")
                else:
                    if name == "unmatched_tags" and not _tags_by_iteration(loaded):
                        self.err("/", "root attribute 'unmatched_tags' is not a JSON object "
                                 "of iter_index: tags ({\"<iter_index>\": {tag: value}})")
        status = str(a.get("status", ""))
        self.report.status = status
        partial = self.report.path.name.endswith(PARTIAL_SUFFIX)
        if layout == "final":
            if status not in FINAL_STATUSES:
                self.err("/", f"status {status!r} in a finalized file (one of "
                         f"{', '.join(FINAL_STATUSES)} expected)")
            elif status != "complete" and not a.get("status_reason"):
                self.warn("/", f"status {status!r} without a status_reason")
            if partial:
                self.warn("/", f"a finalized file named {PARTIAL_SUFFIX}: readers take it "
                          "for a file being written")
            mode = self.report.path.stat().st_mode
            if mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
                self.warn("/", f"finalized file is writable (mode {stat.filemode(mode)}; "
                          "the recorder leaves it 0444)")
            start, end = a.get("start_time_ns"), a.get("end_time_ns")
            if isinstance(start, int) and isinstance(end, int) and end < start:
                self.err("/", f"end_time_ns {end} is before start_time_ns {start}")
        elif not partial:
            self.warn("/", f"a live-layout file not named {PARTIAL_SUFFIX}: tools take it "
                      "for a finalized one")
        return a

    # --- /iterations -------------------------------------------------------------------
    def iterations(self, f: h5py.File, columns: Iterable[str], n: int | None
                   ) -> dict[str, npt.NDArray[Any]]:
        """The /iterations columns (the first ``n`` rows when given), checked."""
        group = f.get("iterations")
        if not isinstance(group, h5py.Group):
            self.err("/iterations", "missing")
            return {}
        cols: dict[str, npt.NDArray[Any]] = {}
        for name in columns:
            ds = group.get(name)
            if not isinstance(ds, h5py.Dataset):
                self.err("/iterations", f"column {name!r} is missing")
                continue
            cols[name] = ds[()] if n is None else ds[:n]
        lengths = {name: len(c) for name, c in cols.items()}
        if len(set(lengths.values())) > 1:
            self.err("/iterations", f"columns of different lengths: {lengths}")
            return {}
        if "iter_index" in cols:
            index = cols["iter_index"]
            values, counts = np.unique(index, return_counts=True)
            if len(values) < len(index):
                self.err("/iterations/iter_index",
                         f"iter_index {_listed(values[counts > 1])} more than once (a file "
                         "holds each iteration once)")
        if "status" in cols and "reason" in cols:
            self.enums(cols["status"], cols["reason"])
        return cols

    def enums(self, status: npt.NDArray[Any], reason: npt.NDArray[Any]) -> None:
        bad = ~np.isin(status, list(ITERATION_STATUS.values()))
        if bad.any():
            self.err("/iterations/status", f"rows {_listed(np.flatnonzero(bad))}: "
                     f"status not in {ITERATION_STATUS}")
        bad = ~np.isin(reason, list(ITERATION_REASONS.values()))
        if bad.any():
            self.err("/iterations/reason", f"rows {_listed(np.flatnonzero(bad))}: "
                     "unknown reason code")
        complete = status == ITERATION_STATUS["complete"]
        bad = complete & (reason != 0)
        if bad.any():
            self.err("/iterations/reason", f"rows {_listed(np.flatnonzero(bad))}: a complete "
                     "iteration with an incompleteness reason")
        bad = ~complete & (reason == 0)
        if bad.any():
            self.warn("/iterations/reason", f"rows {_listed(np.flatnonzero(bad))}: an "
                      "incomplete iteration without a reason")

    # --- final layout ------------------------------------------------------------------
    def final(self, f: h5py.File, attrs: Mapping[str, Any]) -> None:
        major = format_major(str(attrs["format_version"]))
        assert major is not None  # root() stopped at any other
        columns = FINAL_ITERATION_COLUMNS + (("tags",) if "tags" in f.get("iterations", {})
                                             else ())
        it = self.iterations(f, columns, None)
        n_iter = len(it["iter_index"]) if "iter_index" in it else 0
        self.report.iterations = n_iter
        if "n_iterations" in attrs and attrs["n_iterations"] != n_iter and it:
            self.err("/", f"n_iterations is {attrs['n_iterations']}, /iterations has "
                     f"{n_iter} rows")
        if "tags" in it:
            bad = [k for k, t in enumerate(it["tags"]) if not _json_object_or_empty(t)]
            if bad:
                self.err("/iterations/tags", f"rows {_listed(bad)}: not a JSON object")
        pvs = f.get("pvs")
        if not isinstance(pvs, h5py.Group):
            self.err("/pvs", "missing")
            return
        names = [str(x) for x in plain(pvs.attrs.get("pv_names", np.array([], object)))]
        self.report.pvs = len(names)
        if major < 2:  # the PV description was in group attributes then
            self.warn("/pvs", f"format {attrs['format_version']}: the PV groups of 1.x files "
                      "are not checked (root attributes and /iterations are)")
            # the values it holds all the same: a row per value in each PV's time column
            self.report.values = sum(
                len(t) for name in names
                if isinstance(g := pvs.get(escape_name(name)), h5py.Group)
                and isinstance(t := g.get("time"), h5py.Dataset))
            return
        info = self.pv_info(f, names)
        if info is None:
            return  # without the description the groups cannot be checked
        written = np.zeros(n_iter, np.int64)
        rows_total = 0
        groups_seen: set[str] = set()
        for i, name in enumerate(names):
            row = {k: plain(info[k][i]) for k in info.dtype.names or ()}
            path = str(row["group"])
            groups_seen.add(path.rsplit("/", 1)[-1])
            g = f.get(path)
            if not isinstance(g, h5py.Group):
                self.err(path, f"the group of PV {name!r} is missing")
                continue
            rows_total += self.pv_group(path, g, row, it=it, written=written, major=major)
        for extra in sorted(set(pvs) - groups_seen):
            self.warn(f"/pvs/{extra}", "a group that is not in /pvs@pv_names")
        for tree in ("index", "metadata") if major >= 5 else ():
            side = f.get(tree)
            for extra in sorted(set(side) - groups_seen) if isinstance(side, h5py.Group) else ():
                self.warn(f"/{tree}/{extra}", "a group that is not in /pvs@pv_names")
        self.report.values = rows_total
        if "n_values" in attrs and attrs["n_values"] != rows_total:
            self.err("/", f"n_values is {attrs['n_values']}, the PVs hold {rows_total} rows")
        if "n_written" in it and names:
            off = np.flatnonzero(it["n_written"] != written)
            if len(off):
                self.err("/iterations/n_written", "rows " + _listed(
                    [f"{k} (iter_index {it['iter_index'][k]}: {it['n_written'][k]}, the PVs "
                     f"hold {written[k]})" for k in off]))

    def pv_info(self, f: h5py.File, names: list[str]) -> npt.NDArray[Any] | None:
        ds = f.get("pv_info")
        if not isinstance(ds, h5py.Dataset):
            self.err("/pv_info", "missing")
            return None
        info: npt.NDArray[Any] = ds[()]
        fields = info.dtype.names or ()
        for needed in ("pv_name", "group", "kind", "storage_dtype", "count", "flags"):
            if needed not in fields:
                self.err("/pv_info", f"field {needed!r} is missing")
                return None
        if len(info) != len(names):
            self.err("/pv_info", f"{len(info)} rows for {len(names)} PVs in /pvs@pv_names")
            return None
        kinds = [str(plain(x)) for x in info["kind"]]
        bad = [k for k, kind in enumerate(kinds) if kind not in KINDS]
        if bad:
            self.err("/pv_info", f"rows {_listed(bad)}: kind {kinds[bad[0]]!r} is not one of "
                     f"{', '.join(KINDS)}")
        stored = [str(plain(x)) for x in info["pv_name"]]
        if stored != names:
            bad = [k for k, (a, b) in enumerate(zip(stored, names, strict=True)) if a != b]
            self.err("/pv_info", f"rows {_listed(bad)}: pv_name differs from /pvs@pv_names")
            return None
        return info

    def pv_group(self, path: str, g: h5py.Group, row: Mapping[str, Any], *,
                 it: Mapping[str, npt.NDArray[Any]], written: npt.NDArray[np.int64],
                 major: int = KNOWN_MAJOR) -> int:
        """Check one PV's group; returns its row count (adds its counts to ``written``)."""
        n = int(row["count"])
        m: dict[str, Any] = {name: g[name] for name in g}  # each member opened once
        where = dict.fromkeys(m, path)  # the group each member is in (for messages)
        if g.attrs.get("NX_class") not in ("NXlog", b"NXlog"):
            self.err(path, "NX_class is not 'NXlog'")
        if major >= 5:  # the NXlog holds per-value columns only (decision 0011)
            self.plain_nxlog(path, g, m, where)
        for name in PV_COLUMNS:
            if not isinstance(m.get(name), h5py.Dataset):
                self.err(where.get(name, path), f"dataset {name!r} is missing")
        for name in ("time", "iteration", "severity", "status", "shape", "flags",
                     "alarm_message", "user_tag", "unique_id", "data_time"):
            ds = m.get(name)
            if isinstance(ds, h5py.Dataset) and (ds.ndim == 0 or ds.shape[0] != n):
                self.err(f"{path}/{name}", f"{ds.shape} rows, the PV has {n}")
        time_ds = m.get("time")
        if isinstance(time_ds, h5py.Dataset) and plain(time_ds.attrs.get("units")) != "ns":
            self.err(f"{path}/time", "attribute units='ns' is missing")
        self.value(path, m, row, n)
        flags = int(row.get("flags", 0))
        if "flags" in m and flags != -1:
            self.err(f"{path}/flags", f"present, but /pv_info says every row has flags "
                     f"{flags}")
        if "flags" not in m and flags == -1:
            self.err(path, "no flags dataset, but /pv_info says the rows' flags differ")
        self.alarm_message(path, m)
        self.per_row(path, m, flags, F_USER_TAG, names=("user_tag",), what="user tag")
        self.per_row(path, m, flags, F_FRAME, names=("unique_id", "data_time"),
                     what="NTNDArray uniqueId and dataTimeStamp")
        self.metadata(path, m, row, n)
        self.index(path, m, it, written, n)
        return n

    def plain_nxlog(self, path: str, g: h5py.Group, m: dict[str, Any],
                    where: dict[str, str]) -> None:
        """Format 5.0: the PV's first/count index is in ``/index/<PV>`` and its changing
        metadata in ``/metadata/<PV>``, the frame time is ``data_timestamp``; they are
        merged into ``m`` under their 4.x names, so the checks below apply to both."""
        for name in ("first", "count", "metadata", "data_time"):
            if name in m:
                self.err(f"{path}/{name}", "format 5 names it 'data_timestamp'"
                         if name == "data_time" else
                         f"format 5 keeps {name!r} out of the PV group")
                del m[name]
        if "data_timestamp" in m:
            m["data_time"] = m.pop("data_timestamp")
        rel = path.rsplit("/", 1)[-1]
        # the open file, not g.file: h5py makes a new File object at each .file (~0.1 s
        # per 1,000 PVs)
        file = self.file if self.file is not None else g.file
        index = file.get(f"index/{rel}")
        if isinstance(index, h5py.Group):
            for name in ("first", "count"):
                if name in index:
                    m[name] = index[name]
                    where[name] = index.name
        else:
            self.err(f"/index/{rel}", "missing (the PV's first/count index)")
            where["first"] = where["count"] = f"/index/{rel}"
        meta = file.get(f"metadata/{rel}")
        if isinstance(meta, h5py.Group):
            m["metadata"] = meta
        self.nexus_axes(path, g, m)

    def nexus_axes(self, path: str, g: h5py.Group, m: Mapping[str, Any]) -> None:
        """NeXus ``axes`` / ``<column>_indices`` (format 5.0, array PVs): what loaders take
        the dimensions from, so they must name the time dimension and real per-row columns."""
        indices = {a[: -len("_indices")]: plain(g.attrs[a]) for a in g.attrs
                   if a.endswith("_indices")}
        if "axes" not in g.attrs:
            if indices:
                self.err(path, f"{sorted(indices)[0]}_indices without 'axes'")
            return
        axes = [str(a) for a in plain(g.attrs["axes"])]
        value = m.get("value")
        ndim = value.ndim if isinstance(value, h5py.Dataset) else None
        if not axes or axes[0] != "time" or (ndim is not None and len(axes) != ndim):
            self.err(path, f"axes {axes} must be 'time' and one entry per further dimension "
                     f"of value ({ndim} in all)")
        n = m["time"].shape[0] if isinstance(m.get("time"), h5py.Dataset) else None
        for name, index in sorted(indices.items()):
            column = g.get(name)
            if not isinstance(column, h5py.Dataset):
                self.err(path, f"{name}_indices names no dataset of the group")
            elif index != 0 or column.shape[:1] != (n,):
                self.err(f"{path}/{name}", f"{name}_indices is {index}, but only a column "
                         "of one row per value runs along time (index 0)")

    def value(self, path: str, m: Mapping[str, Any], row: Mapping[str, Any], n: int) -> None:
        kind = str(row.get("kind", ""))
        value = m.get("value")
        if value is None:
            if n and kind not in NO_VALUE_KINDS:
                self.err(path, f"no 'value' for {n} rows of kind {kind!r}")
            return
        if isinstance(value, h5py.Group):  # NTTable: one dataset per column
            width = self.table(path, value, n)
            if width is not None:
                self.shapes(path, m, (width,))
            return
        if value.ndim == 0 or value.shape[0] != n:
            self.err(f"{path}/value", f"{value.shape} rows, the PV has {n}")
        else:
            self.shapes(path, m, value.shape[1:])
        storage = str(row.get("storage_dtype", ""))
        if storage and storage not in ("utf-8", "table", "none"):
            try:
                expected = np.dtype(storage)
            except TypeError:
                self.err(f"{path}/value", f"/pv_info storage_dtype {storage!r} is no dtype")
            else:
                if value.dtype != expected:
                    self.err(f"{path}/value", f"dtype {value.dtype}, /pv_info says {storage}")

    def table(self, path: str, value: h5py.Group, n: int) -> int | None:
        """An NTTable's ``value`` group: a ``(n, max_rows)`` dataset for each name in its
        ``columns``, all of one width (a reader cuts every column to a table's rows).
        Returns that width (None when there is none)."""
        for column in value.values():
            if isinstance(column, h5py.Dataset) and column.shape[:1] != (n,):
                self.err(column.name, f"{column.shape[:1]} rows, the PV has {n}")
        if "columns" not in value.attrs:
            self.err(f"{path}/value", "attribute 'columns' is missing")
            return None
        widths: dict[str, int] = {}
        for name in (str(c) for c in plain(value.attrs["columns"])):
            column = value.get(escape_name(name))
            if not isinstance(column, h5py.Dataset):
                self.err(f"{path}/value", f"column {name!r} (in its 'columns') has no dataset")
            elif column.ndim != 2:
                self.err(str(column.name), f"shape {column.shape}, expected (rows, max_rows)")
            else:
                widths[name] = int(column.shape[1])
        if len(set(widths.values())) > 1:
            self.err(f"{path}/value", f"columns of different widths (rows per table): "
                     f"{widths}")
            return None
        return next(iter(widths.values()), None)

    def shapes(self, path: str, m: Mapping[str, Any], trailing: tuple[int, ...]) -> None:
        """Each row of ``shape`` (when there is one) lies within ``trailing``, the shape
        ``value`` has after its rows: the reader takes a row's value as
        ``value[i, :shape[i, 0], ...]``."""
        ds = m.get("shape")
        if not isinstance(ds, h5py.Dataset):
            return
        if ds.ndim != 2 or ds.shape[1] != len(trailing):
            self.err(f"{path}/shape", f"{ds.shape}: a rank of "
                     f"{ds.shape[1] if ds.ndim == 2 else '?'}, value has rows of rank "
                     f"{len(trailing)}")
            return
        shape = ds[()]
        bad = np.flatnonzero(((shape < 0) | (shape > np.asarray(trailing))).any(axis=1))
        if len(bad):
            self.err(f"{path}/shape", f"rows {_listed(bad)}: a shape outside "
                     f"0..{tuple(trailing)}, the trailing shape of value")

    def per_row(self, path: str, m: Mapping[str, Any], flags: int, bit: int, *,
                names: tuple[str, ...], what: str) -> None:
        """Rows with flag ``bit`` (format 4.0: 32 user tag, 64 NTNDArray frame id and time)
        need the integer columns ``names``."""
        for name in names:
            ds = m.get(name)
            if isinstance(ds, h5py.Dataset) and ds.dtype.kind not in "iu":
                self.err(f"{path}/{name}", f"dtype {ds.dtype}, expected an integer type")
        missing = [name for name in names if name not in m]
        if not missing:
            return
        per_row = m.get("flags")
        if flags == -1 and isinstance(per_row, h5py.Dataset):
            flagged = bool(np.any(per_row[()] & bit))
        else:
            flagged = flags != -1 and bool(flags & bit)
        if flagged:
            self.err(path, f"rows have flag {bit} ({what} in {', '.join(names)}), but there "
                     f"is no {' or '.join(repr(n) for n in missing)}")

    def alarm_message(self, path: str, m: Mapping[str, Any]) -> None:
        ds = m.get("alarm_message")
        if not isinstance(ds, h5py.Dataset):
            return
        texts = ds.attrs.get("texts")
        if texts is None:
            self.err(f"{path}/alarm_message", "attribute 'texts' is missing")
            return
        codes = ds[()]
        bad = np.flatnonzero((codes < -1) | (codes >= len(texts)))
        if len(bad):
            self.err(f"{path}/alarm_message", f"rows {_listed(bad)}: code outside "
                     f"-1..{len(texts) - 1}")

    def metadata(self, path: str, m: Mapping[str, Any], row: Mapping[str, Any], n: int) -> None:
        entries = int(row.get("metadata_entries", -1))
        meta = m.get("metadata")
        if not isinstance(meta, h5py.Group):
            if entries > 1:
                self.err(path, f"/pv_info says {entries} metadata entries, there is no "
                         "'metadata' group (format 5: /metadata/<PV>)")
            text = row.get("metadata")
            if isinstance(text, str) and text and not _json_object(text):
                self.err("/pv_info", f"the metadata JSON of {path} does not parse as a JSON "
                         "object")
            elif text == "" and n:
                self.err("/pv_info", f"the metadata JSON of {path} is empty, the PV has {n} "
                         "rows")
            return
        mpath = str(meta.name)  # {path}/metadata; format 5: /metadata/<PV>
        rows_ds, json_ds = meta.get("row"), meta.get("json")
        if not isinstance(rows_ds, h5py.Dataset) or not isinstance(json_ds, h5py.Dataset):
            self.err(mpath, "needs the datasets 'row' and 'json'")
            return
        rows = rows_ds[()]
        if len(rows) != json_ds.shape[0]:
            self.err(mpath, f"{len(rows)} rows but {json_ds.shape[0]} JSON texts")
            return
        if entries >= 0 and entries != len(rows):
            self.err(mpath, f"{len(rows)} entries, /pv_info says {entries}")
        if len(rows) and (rows[0] != 0 or np.any(np.diff(rows) <= 0) or rows[-1] >= max(n, 1)):
            self.err(f"{mpath}/row", "entries must start at row 0 and increase, "
                     f"below {n}: {_listed(rows)}")
        bad = [k for k, text in enumerate(json_ds[()]) if not _json_object(text)]
        if bad:
            self.err(f"{mpath}/json", f"entries {_listed(bad)} do not parse as a JSON object")

    def index(self, path: str, m: Mapping[str, Any], it: Mapping[str, npt.NDArray[Any]],
              written: npt.NDArray[np.int64], n: int) -> None:
        """``first``/``count``: rows ``first[k]:first[k]+count[k]`` are iteration k's."""
        first_ds, count_ds, iter_ds = m.get("first"), m.get("count"), m.get("iteration")
        if not (isinstance(first_ds, h5py.Dataset) and isinstance(count_ds, h5py.Dataset)
                and isinstance(iter_ds, h5py.Dataset)):
            return  # reported as missing columns
        first, count = first_ds[()], count_ds[()]
        n_iter = len(written)
        ipath = str(first_ds.name).rsplit("/", 1)[0]  # the PV group; format 5: /index/<PV>
        if len(first) != n_iter or len(count) != n_iter:
            self.err(ipath, f"first/count have {len(first)}/{len(count)} rows, /iterations "
                     f"has {n_iter}")
            return
        bad = np.flatnonzero((count < 0) | (first < 0) | (first + count > n))
        if len(bad):
            self.err(f"{ipath}/count", f"iteration rows {_listed(bad)}: first/count point "
                     f"outside the PV's {n} rows")
            return
        if np.any(np.diff(first) < 0):
            self.err(f"{ipath}/first", "decreases (each PV's rows are in iteration order)")
        written += count
        if "iter_index" not in it or not count.any():
            return
        iteration = iter_ds[()]
        if len(iteration) != n:
            return  # reported with the column lengths
        used = count > 0
        rows = _ranges(first[used], count[used])
        expected = np.repeat(it["iter_index"][used], count[used])
        bad = np.flatnonzero(iteration[rows] != expected)
        if len(bad):
            self.err(f"{path}/iteration", "rows " + _listed(
                [f"{rows[k]} (indexed as iteration {expected[k]}, holds {iteration[rows[k]]})"
                 for k in bad]))

    # --- live layout -------------------------------------------------------------------
    def live(self, f: h5py.File) -> None:
        live = f.get("live")
        if not isinstance(live, h5py.Group):
            self.err("/live", "missing")
            return
        commit = read_commit(f)
        if commit.n_commits == 0:
            self.warn("/live/state", "no complete commit: the file holds nothing yet")
        elif commit.n_commits < commit.n_rows:
            self.warn("/live/state", f"{commit.n_rows - commit.n_commits} commit(s) after the "
                      f"last complete one point past the data (a flush cut short); readers "
                      f"use commit {commit.n_commits}")
        self.report.status = live_status(commit.status, self.report.path)
        if self.report.status == "unfinished":
            self.warn("/", "no writer holds this file: a crashed or failed recording "
                      "(k2eg-recorder recover makes it a finalized file)")
        limits = commit.limits
        it = self.iterations(f, ITERATION_COLUMNS, limits["n_iterations"])
        n_iter = limits["n_iterations"]
        self.report.iterations = n_iter
        n_bytes = limits["n_bytes"]
        self.ranges("/iterations/error_message", it.get("error_message"),
                    it.get("error_message_size"), n_bytes, optional=True)
        pvs = {k: live["pvs"][k][: limits["n_pvs"]] for k in ("offset", "size")}
        if not self.ranges("/live/pvs", pvs["offset"], pvs["size"], n_bytes):
            return
        names = read_pv_names(f, commit)
        self.report.pvs = len(names)
        empty = np.flatnonzero([not n for n in names])
        if len(empty):
            self.err("/live/pvs", f"rows {_listed(empty)}: an empty PV name")
        seen: dict[str, int] = {}
        twice = np.flatnonzero([bool(n) and seen.setdefault(n, i) != i
                                for i, n in enumerate(names)])
        if len(twice):
            self.err("/live/pvs", f"rows {_listed(twice)}: the name of an earlier PV "
                     f"(e.g. {names[int(twice[0])]!r}); each PV is named once")
        ns = limits["n_samples"]
        self.report.values = ns
        s = {k: live["samples"][k][:ns] for k in ("pv", "iter_row", "iteration", "dtype",
                                                    "offset", "size")}
        bad = np.flatnonzero((s["pv"] < 0) | (s["pv"] >= len(names)))
        if len(bad):
            self.err("/live/samples/pv", f"rows {_listed(bad)}: no such PV")
        row = s["iter_row"]
        bad = np.flatnonzero(row < -1)
        if len(bad):
            self.err("/live/samples/iter_row", f"rows {_listed(bad)}: no such iteration row")
        elif "iter_index" in it:
            self.open_rows(row, s["iteration"], it["iter_index"])
            placed = (row >= 0) & (row < n_iter)
            bad = np.flatnonzero(placed)[
                s["iteration"][placed] != it["iter_index"][row[placed]]]
            if len(bad):
                self.err("/live/samples/iteration", f"rows {_listed(bad)}: not the "
                         "iter_index of their /iterations row")
            if "n_written" in it:
                held = np.bincount(row[placed], minlength=n_iter)
                bad = np.flatnonzero(it["n_written"] != held)
                if len(bad):
                    self.err("/iterations/n_written", f"rows {_listed(bad)}: not the number "
                             "of samples placed in them")
        for code, name in {**POOL_NAMES, STRING_DTYPE_CODE: ""}.items():
            mine = (s["dtype"] == code) & (s["size"] > 0)
            if mine.any():
                limit = n_bytes if code == STRING_DTYPE_CODE else limits[f"n_pool_{name}"]
                where = "/live/bytes" if code == STRING_DTYPE_CODE else f"/live/pool_{name}"
                self.ranges(where, s["offset"][mine], s["size"][mine], limit,
                            rows=np.flatnonzero(mine))
        nm = limits["n_meta"]
        meta = {k: live["meta"][k][:nm] for k in ("pv", "row", "offset", "size")}
        bad = np.flatnonzero((meta["pv"] < 0) | (meta["pv"] >= len(names)) | (meta["row"] < 0))
        if len(bad):
            self.err("/live/meta", f"rows {_listed(bad)}: no such PV or a negative row")
        if self.ranges("/live/meta", meta["offset"], meta["size"], n_bytes):
            self.texts("/live/meta", live["bytes"], meta["offset"], meta["size"],
                       _json_object)
        nt = limits["n_tags"]
        tags = {k: live["tags"][k][:nt] if "tags" in live else np.zeros(0, np.int64)
                for k in ("offset", "size")}  # none in 1.0 files from before trigger tags
        if self.ranges("/live/tags", tags["offset"], tags["size"], n_bytes):
            self.texts("/live/tags", live["bytes"], tags["offset"], tags["size"],
                       _json_object_or_empty)

    def open_rows(self, row: npt.NDArray[np.int64], iteration: npt.NDArray[np.int64],
                  index: npt.NDArray[np.int64]) -> None:
        """Samples of iterations still open at the commit point past ``/iterations`` (their
        rows come when they close): one iteration per such row, none already closed."""
        n_iter = len(index)
        pending = row >= n_iter
        if not pending.any():
            return
        rows, iters = row[pending], iteration[pending]
        pairs = np.unique(np.stack([rows, iters]), axis=1)
        shared = np.unique(pairs[0], return_counts=True)
        bad = shared[0][shared[1] > 1]
        if len(bad):
            self.err("/live/samples/iter_row", f"open iteration rows {_listed(bad)}: samples "
                     "of different iterations")
        closed = np.intersect1d(pairs[1], index)
        if len(closed):
            self.err("/live/samples/iter_row", f"iterations {_listed(closed)}: samples "
                     "point past /iterations, but the iteration has its row")

    def ranges(self, where: str, offset: npt.NDArray[Any] | None,
               size: npt.NDArray[Any] | None, limit: int, *, optional: bool = False,
               rows: npt.NDArray[np.int64] | None = None) -> bool:
        """Whether every ``offset[i]:offset[i]+size[i]`` lies in ``0:limit`` (``optional``:
        offset -1 = none; ``rows``: the row numbers of these entries, for the message)."""
        if offset is None or size is None:
            return False
        keep = offset >= 0 if optional else np.ones(len(offset), bool)
        bad = np.flatnonzero(keep & ((offset < 0) | (size < 0) | (offset + size > limit)))
        if len(bad):
            if rows is not None:
                bad = rows[bad]
            self.err(where, f"rows {_listed(bad)}: ranges outside the {limit} committed "
                     "elements")
            return False
        return True

    def texts(self, where: str, pool: h5py.Dataset, offset: npt.NDArray[Any],
              size: npt.NDArray[Any], good: Any) -> None:
        """Every distinct text of the byte pool that these rows point at passes ``good``."""
        seen: dict[tuple[int, int], bool] = {}
        bad = []
        for k, key in enumerate(zip(offset.tolist(), size.tolist(), strict=True)):
            ok = seen.get(key)
            if ok is None:
                o, z = key
                ok = seen[key] = good(pool[o : o + z].tobytes())
            if not ok:
                bad.append(k)
        if bad:
            self.err(where, f"rows {_listed(bad)}: not valid JSON")

    # --- every layout ------------------------------------------------------------------
    def filters(self, f: h5py.File, attrs: Mapping[str, Any]) -> None:
        """A dataset compressed with a plugin filter names it in ``required_filter``, and
        the file lists a plugin in ``required_plugins``."""
        plugins = plain(attrs.get("required_plugins", []))
        needs = False
        for ds in self.datasets(f):
            if ds.chunks is None:
                continue
            dcpl = ds.id.get_create_plist()
            ids = {dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())}
            if ids - PLAIN_FILTERS:
                if ds.name == "/kafka/topic" and "required_filter" not in ds.attrs:
                    # 5.1 writers before 2026-11-24 left it unnamed: readable all the same
                    # by every reader with hdf5plugin (the recorder's reader imports it)
                    self.warn(ds.name, "compressed with a plugin filter (hdf5plugin) that "
                              "neither it nor required_plugins names (written by a 5.1 "
                              "recorder before 2026-11-24)")
                    continue
                needs = True
                if "required_filter" not in ds.attrs:
                    self.err(ds.name, "compressed with a plugin filter without a "
                             "'required_filter' attribute naming it")
        if needs and not plugins:
            self.err("/", "datasets need a filter plugin, but required_plugins is empty")

    def datasets(self, f: h5py.File) -> list[h5py.Dataset]:
        """Every dataset of the file (once each, hard links too), found once."""
        if self._datasets is None:
            found: list[h5py.Dataset] = []
            f.visititems(
                lambda _n, obj: found.append(obj) if isinstance(obj, h5py.Dataset) else None)
            self._datasets = found
        return self._datasets

    def read_everything(self, f: h5py.File) -> None:
        """Read every dataset in blocks: decompresses every chunk, so damage shows."""
        for ds in self.datasets(f):
            try:
                self.report.bytes_read += _read_all(ds)
            except Exception as exc:  # HDF5 and filter errors come in several classes
                needs = str(plain(ds.attrs.get("required_filter", "")))
                hint = (f" (it needs {needs}: pip install hdf5plugin)" if "hdf5plugin" in needs
                        else f" (it needs {needs})" if needs else "")
                self.err(ds.name, f"cannot read its data{hint}: {type(exc).__name__}: {exc}")


def _read_all(ds: h5py.Dataset) -> int:
    if ds.shape is None or ds.ndim == 0:
        ds[()]
        return int(ds.dtype.itemsize)
    row_bytes = max(1, int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)
    step = ds.chunks[0] if ds.chunks else 1
    block = max(step, (BLOCK_BYTES // row_bytes) // step * step)
    texts = _utf8_fields(ds.dtype)
    total = 0
    for lo in range(0, ds.shape[0], block):
        part = ds[lo : lo + block]
        total += int(part.nbytes)
        for name in texts:
            column = part if name is None else part[name]
            per_row = max(1, int(np.prod(column.shape[1:], dtype=np.int64)))
            bad = sorted({lo + i // per_row for i, t in enumerate(column.ravel().tolist())
                          if isinstance(t, bytes) and not _is_utf8(t)})
            if bad:
                where = "" if name is None else f"field {name!r}, "
                raise ValueError(f"{where}rows {_listed(bad)}: text that is not UTF-8 "
                                 "(damaged bytes)")
    return total


def _utf8_fields(dtype: np.dtype[Any]) -> list[str | None]:
    """The variable-length UTF-8 text of a dataset's type: None for the whole value, or
    the names of such fields of a compound type (h5py hands them over as undecoded bytes)."""
    def utf8(t: np.dtype[Any]) -> bool:
        info = h5py.check_string_dtype(t)
        return info is not None and info.length is None and info.encoding == "utf-8"

    if dtype.names is None:
        return [None] if utf8(dtype) else []
    return [name for name in dtype.names if utf8(dtype[name])]


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _ranges(first: npt.NDArray[np.int64], count: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The row numbers ``first[k]:first[k]+count[k]`` of every k, concatenated."""
    ends = np.cumsum(count)
    starts = ends - count
    return np.arange(int(ends[-1]), dtype=np.int64) - np.repeat(starts - first, count)


def _listed(items: Iterable[Any]) -> str:
    items = list(items)
    shown = ", ".join(str(x) for x in items[:MAX_LISTED])
    more = len(items) - MAX_LISTED
    return f"{shown} and {more} more" if more > 0 else shown


def _text(raw: Any) -> str:
    return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)


def _json_object(raw: Any) -> bool:
    """A metadata entry: a JSON object (``{"d": structure, "f": float32_paths}``)."""
    try:
        return isinstance(json.loads(_text(raw)), dict)
    except ValueError:
        return False


def _tags_by_iteration(loaded: Any) -> bool:
    """``unmatched_tags``: ``{"<iter_index>": {tag: value}}``."""
    if not isinstance(loaded, dict):
        return False
    for key, tags in loaded.items():
        try:
            int(key)
        except ValueError:
            return False
        if not isinstance(tags, dict):
            return False
    return True


def _json_object_or_empty(raw: Any) -> bool:
    try:
        text = _text(raw)
        return text == "" or isinstance(json.loads(text), dict)
    except ValueError:
        return False
