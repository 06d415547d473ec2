"""Reading k2eg-recorder files (finalized and live/crashed ones) for analysts.

    from recorder.reader import open_file, open_recording
    with open_file("linac_20250101T000000Z_0003.h5") as f:
        f.pv_names                       # ['LINAC:BPM1:X', ...]
        f.values("LINAC:BPM1:X")         # numpy array, one row per value
        f.times("LINAC:BPM1:X")          # int64 ns since epoch (EPICS timeStamp)
        f.iterations_of("LINAC:BPM1:X")  # k2eg iter_index of each value
        f.samples("LINAC:BPM1:X")        # PVSample objects equal to what the gateway sent
        f.by_iteration("LINAC:BPM1:X")   # one value per /iterations row, masked where none
        f.table()                        # scalar PVs side by side, one row per iteration
        for data, meta in f.trains():    # karabo-bridge style, one pair per iteration
            data["LINAC:BPM1:X"]["value"], meta["LINAC:BPM1:X"]["timestamp.tid"]

``open_recording(paths)`` chains the segment files of one recording (a list of them, one of
them, or a directory of one recording; files of several recordings are refused). Files
compressed with zstd/blosc2 need ``hdf5plugin``; it is imported here when installed.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import functools
import inspect
import json
import os
import warnings
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import h5py
import numpy as np
import numpy.typing as npt

from recorder.client.values import PVSample, ValueKind
from recorder.errors import (
    DAMAGED_VALUE_ERRORS,
    DamagedFileError,
    FileFormatError,
    NotInFileError,
    RecorderError,
)
from recorder.reader_align import SCALAR_KINDS, _pick, _scalar_pvs, aligned_table
from recorder.reader_rows import (
    StoredRow,
    _column_items,
    _decode_tags,
    _group_index,
    frame_time_name,
    sample_value,
)
from recorder.reader_summary import (
    _extracted_shape,
    _first_last_time,
    _image_shape_of,
    _type_row,
)
from recorder.reader_values import (
    ENUM_NO_INDEX,
    _object_array,
    exact_in_float64,
    join_rows,
    values_of,
)
from recorder.sinks.bridge.mapping import (
    FlatCache,
    FlatTemplate,
    FlatValue,
    IterationInfo,
    Train,
    build_train_flat,
    flatten_sample,
    stacked_for,
)
from recorder.sinks.buffer import REASON_NAMES, SAMPLE_COLUMNS, STATUS_NAMES, merge_tags
from recorder.sinks.codec import (
    DTYPE_BY_CODE,
    F_FRAME,
    F_MESSAGE,
    F_SEVERITY,
    F_STATUS,
    F_TIME,
    F_USER_TAG,
    F_VALUE,
    KINDS_BY_CODE,
    STRING_DTYPE_CODE,
    decode_rest,
    escape_name,
    rebuild_data,
)
from recorder.sinks.describe import plain
from recorder.sinks.final_layout import format_major
from recorder.sinks.h5open import open_for_reading
from recorder.sinks.livefile import LiveView, read_live
from recorder.sinks.options import PARTIAL_SUFFIX, final_path
from recorder.sinks.writelock import writer_active

with contextlib.suppress(ImportError):  # zstd / blosc2 datasets
    import hdf5plugin  # noqa: F401

__all__ = [
    "ENUM_NO_INDEX", "SCALAR_KINDS", "TRAIN_WINDOW_VALUES", "Recording", "RecordingFile",
    "SkippedFileWarning", "aligned_table", "join_rows", "open_file", "open_recording",
    "reporting_damage", "unknown_pv", "values_of",
]

TRAIN_WINDOW_VALUES = 65_536
"""trains() reads this many values (about) at a time."""
INDEX_BLOCK_ENTRIES = 1 << 21
"""trains() of a finalized file reads the first/count index of this many PV-iterations (about,
16 bytes each) at a time."""
SUPPORTED_MAJORS = ("1", "2", "3", "4", "5")  # 5.0: the PV groups are plain NXlogs
SHAPED_KINDS = (ValueKind.ARRAY, ValueKind.NDARRAY, ValueKind.STRING_ARRAY, ValueKind.TABLE)
"""Kinds whose rows have a shape: a ``shape`` dataset, or (5.0, when every row has the same
shape) none, and then every row has the trailing shape of ``value``."""


def _open_h5(path: Path) -> h5py.File:
    # a live file (or one left by a crashed writer) opens in SWMR read mode
    try:
        return open_for_reading(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if str(path) in str(exc):
            raise
        raise OSError(f"{path}: cannot open as HDF5: {exc}") from exc


def unknown_pv(pv: str, names: Iterable[str], where: str) -> NotInFileError:
    """A KeyError that says which PV is not there, where, and what is (close matches, the
    base name of a URI)."""
    import difflib

    known = list(names)
    base = pv.split("://", 1)[1] if "://" in pv else None
    if base is not None and base in known:
        hint = f"PVs are named without their protocol: {base!r}"
    else:
        close = difflib.get_close_matches(pv, known, n=3)
        hint = (f"did you mean {', '.join(map(repr, close))}?" if close
                else f"it has {len(known)} PV(s)" + (f", e.g. {known[0]!r}" if known else ""))
    return NotInFileError(f"no PV {pv!r} in {where}; {hint}")


_UNSEEN: Any = object()
MEMBERS_CACHED = 65_536  # PV groups whose member names are kept (see RecordingFile.refresh)
META_CACHE_BYTES = 64 << 20
"""A final file's metadata entries kept in memory once read (all PVs together); beyond it
they are read again at every read of rows."""
OPEN_FILES_KEPT = 64
"""Finalized files a :class:`Recording` keeps open at once, the last read (the others are
opened again when read): an open HDF5 file takes a file descriptor (``ulimit -n``: 1024 by
default) and ~0.6 MB, and a recording of one-minute segments has 10,000 files in a week."""


T = TypeVar("T")

def _member(group: h5py.Group | h5py.File, name: str) -> Any:
    """``group[name]``, or None when there is no such link. Not ``group.get(name)``, which
    also says None when the object is there but cannot be read (damaged metadata)."""
    return group[name] if name in group else None  # noqa: SIM401 (see above)


def _damage(path: Path, exc: BaseException) -> DamagedFileError | None:
    """``exc`` as "``path``: damaged: ..." when the file's content caused it: h5py raised it
    (metadata or data that did not read back: a checksum, a decompression, a missing object
    of the layout), or a value read from the file was impossible (a code or row out of
    range, text that does not decode). None for the reader's own errors (an unknown PV ...)."""
    if isinstance(exc, RecorderError):
        return None
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    from_h5py = tb is not None and "h5py" in Path(tb.tb_frame.f_code.co_filename).parts
    if from_h5py and isinstance(exc, (KeyError, RuntimeError, OSError)):
        text = str(exc.args[0]) if exc.args else str(exc)
    elif isinstance(exc, DAMAGED_VALUE_ERRORS):
        text = f"{type(exc).__name__}: {exc}"  # a value of the file that cannot be
    else:
        return None
    return DamagedFileError(f"{path}: damaged: {text}")


_CONTENT_ERRORS = (KeyError, IndexError, RuntimeError, OSError, ValueError)


@contextlib.contextmanager
def reporting_damage(path: Path) -> Iterator[None]:
    """Errors the file's content caused (:func:`_damage`) leave as DamagedFileError naming
    ``path`` (for code that builds on what the reader read, e.g. from
    :meth:`RecordingFile.stored_rows`)."""
    try:
        yield
    except _CONTENT_ERRORS as exc:
        damaged = _damage(path, exc)
        if damaged is None:
            raise
        raise damaged from exc


def _reporting(fn: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generate(self: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
            with reporting_damage(self.path):
                yield from fn(self, *args, **kwargs)
        return generate

    @functools.wraps(fn)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        with reporting_damage(self.path):
            return fn(self, *args, **kwargs)
    return call


def _damage_reported(cls: type[T]) -> type[T]:
    """Every public method and property of ``cls`` raises :class:`DamagedFileError` ("PATH:
    damaged: ...") for errors the file's content caused (:func:`_damage`) instead of a bare
    KeyError, UnicodeDecodeError ... naming no file (as opening it does)."""
    for name, attr in list(vars(cls).items()):
        if name.startswith("_"):
            continue
        if isinstance(attr, property) and attr.fget is not None:
            setattr(cls, name, property(_reporting(attr.fget), attr.fset, attr.fdel,
                                        attr.__doc__))
        elif inspect.isfunction(attr):
            setattr(cls, name, _reporting(attr))
    return cls


@_damage_reported
class RecordingFile:
    """One k2eg-recorder HDF5 file (see docs/file-format.md)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._h5: h5py.File | None = _open_h5(self.path)
        self._kept: _OpenFiles | None = None  # the Recording's files kept open, if one's
        try:
            with reporting_damage(self.path):
                self._open()
        except BaseException:
            self.close()
            raise

    @property
    def h5(self) -> h5py.File:
        """The HDF5 file (opened again if :meth:`release` closed it)."""
        h5 = self._h5
        if h5 is None:
            h5 = self._h5 = _open_h5(self.path)
        if self._kept is not None:
            self._kept.read(self)
        return h5

    def release(self) -> None:
        """Close a finalized file's HDF5 file until it is read again (a live file stays
        open: its view of the last commit reads from it)."""
        h5 = self._h5
        if h5 is not None and self.layout != "live":
            self._h5 = None
            h5.close()

    def _open(self) -> None:
        attrs = self.h5.attrs
        # keys() reads them all (damage shows as an error), where .get() would say None
        if "format" not in attrs.keys() or attrs["format"] != "k2eg-recorder":  # noqa: SIM118
            raise FileFormatError(f"{self.path} is not a k2eg-recorder file")
        version = str(attrs.get("format_version", ""))
        major = format_major(version)
        if major is None or str(major) not in SUPPORTED_MAJORS:
            raise FileFormatError(f"{self.path}: unsupported format_version {version!r}")
        self.attrs: dict[str, Any] = {k: plain(v) for k, v in attrs.items()}
        segment = self.attrs.get("segment", 0)
        if not isinstance(segment, int):  # segments are ordered by it
            raise DamagedFileError(f"{self.path}: damaged: root attribute 'segment' is not "
                                   f"an integer: {segment!r}")
        self.layout = str(self.attrs.get("layout", "final"))
        self._live: LiveView | None = None
        self._cache: dict[str, list[PVSample]] = {}
        self._info: dict[str, dict[str, Any]] | None = None
        self.refresh()

    # --- basics -------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read a live file (new iterations appear); no-op for finalized files. A live
        file finalized since it was opened (its ``.partial`` gone, ``NAME.h5`` of the same
        recording and segment in its place) is reopened as that file: :attr:`path`,
        :attr:`layout` and :attr:`status` then say so (the live file's last commit still
        says ``recording``)."""
        if self.layout == "live" and not self.path.exists():
            self._follow_finalized()
        self._cache.clear()
        self._live_index: tuple[npt.NDArray[Any], npt.NDArray[Any]] | None = None
        self._live_cols: dict[str, int] | None = None
        self._live_meta_index: tuple[npt.NDArray[Any], npt.NDArray[Any]] | None = None
        self._names: tuple[list[str], frozenset[str]] | None = None
        # final files, per PV: its group's member names and its metadata entries (asked for
        # by every read of rows; kept while they total at most META_CACHE_BYTES)
        self._members: dict[str, frozenset[str]] = {}
        self._meta: dict[str, tuple[npt.NDArray[Any], Any]] = {}
        self._meta_bytes = 0
        if self.layout == "live":
            self._live = read_live(self.h5)

    def _follow_finalized(self) -> None:
        final = self.path.with_name(self.path.name.removesuffix(PARTIAL_SUFFIX))
        if final == self.path or not final.is_file():
            return
        try:
            done = RecordingFile(final)
        except (OSError, FileFormatError):
            return
        same = all(done.attrs.get(k) == self.attrs.get(k) for k in ("recording_uid", "segment"))
        if not same or done.layout == "live":
            done.close()
            return
        self.h5.close()
        self.path, self._h5, self.attrs, self.layout = done.path, done.h5, done.attrs, done.layout
        self._live = None
        self._info = None
        self._members, self._meta, self._meta_bytes = {}, {}, 0

    @property
    def status(self) -> str:
        if self._live is not None:
            return self._live.status
        return str(self.attrs.get("status", ""))

    @property
    def writer_active(self) -> bool | None:
        """Whether a writer still writes this file: True while a recorder holds the lock of a
        live ``.partial``; False for a finalized file (a ``.partial`` finalized since is
        followed, as :meth:`refresh` does) and for a ``.partial`` nobody holds (a
        crashed or failed writer: its last commit still says ``recording``; ``k2eg-recorder
        recover`` finalizes it); None where it cannot be told (no OFD locks, e.g. some
        network file systems). A watch loop that also ends on a dead writer::

            while f.status == "recording" and f.writer_active is not False:
                f.refresh()
        """
        if self.layout == "live" and not self.path.exists():
            # finalized since, or removed: follow the finalized file now, so that the
            # status read after a watch loop that ends here is its status, not the
            # ``recording`` of the live file's last commit (which looks like a crash)
            self.refresh()
        if self.layout != "live" or not self.path.exists():
            return False
        return writer_active(self.path)

    @property
    def pv_names(self) -> list[str]:
        return list(self._pv_names()[0])

    def _pv_names(self) -> tuple[list[str], frozenset[str]]:
        """The PV names in file order and as a set, read once per refresh (a per-PV loop used
        to decode the whole name attribute for every PV it touched)."""
        if self._names is None:
            if self._live is not None:
                names = list(self._live.pv_names)
            else:
                names = [str(n) for n in self.attrs_of("pvs").get("pv_names", [])]
            self._names = (names, frozenset(names))
        return self._names

    def attrs_of(self, path: str) -> dict[str, Any]:
        return {k: plain(v) for k, v in self.h5[path].attrs.items()}

    def _live_tags(self) -> dict[int, dict[str, str]]:
        view = self._live
        assert view is not None
        t = view.tags
        return merge_tags(t["iter_index"], t["offset"], t["size"], view.byte_pool)

    def iterations(self) -> dict[str, npt.NDArray[Any]]:
        """The /iterations table as columns (status/reason as strings, ``tags`` as dicts of
        str, ``{}`` when the iteration has none). A complete iteration's reason is ``""``
        (falsy; the final file's enum names it ``none``, as HDF5 enum names cannot be
        empty), the same as the Karabo bridge's ``reason``."""
        if self._live is not None:
            live_tags = self._live_tags()
            cols = dict(self._live.iterations)
            view = self._live
            cols["error_message"] = np.array(
                [
                    view.text(int(o), int(z)).decode("utf-8", "replace") if o >= 0 else ""
                    for o, z in zip(
                        cols["error_message"].tolist(),
                        cols.pop("error_message_size").tolist(),
                        strict=True,
                    )
                ],
                dtype=object,
            )
            cols["tags"] = _object_array(
                [dict(live_tags.get(i, {})) for i in cols["iter_index"].tolist()]
            )
        else:
            table = self.h5["iterations"]
            cols = {k: table[k][()] for k in table}
            for needed in ("iter_index", "header_timestamp", "status", "reason",
                           "error_message"):
                if needed not in cols:
                    raise DamagedFileError(f"{self.path}: damaged: /iterations has no "
                                           f"{needed!r} column")
            lengths = {k: len(c) for k, c in cols.items()}
            if len(set(lengths.values())) > 1:
                raise DamagedFileError(f"{self.path}: damaged: /iterations has columns of "
                                       f"different lengths: {lengths}")
            if cols["iter_index"].dtype.kind not in "iu":
                raise DamagedFileError(f"{self.path}: damaged: /iterations/iter_index is "
                                       f"{cols['iter_index'].dtype}, not integers")
            raw_tags = cols.get("tags")
            cols["tags"] = _object_array(
                [_decode_tags(t) for t in raw_tags.tolist()]
                if raw_tags is not None
                else [{} for _ in range(len(cols["iter_index"]))]
            )
            cols["error_message"] = np.array(
                [m.decode() if isinstance(m, bytes) else m for m in cols["error_message"]],
                dtype=object,
            )
        cols["status"] = np.array([STATUS_NAMES[int(x)] for x in cols["status"]], dtype=object)
        cols["reason"] = np.array([REASON_NAMES[int(x)] for x in cols["reason"]], dtype=object)
        return cols

    def unmatched_tags(self) -> dict[int, dict[str, str]]:
        """Trigger tags of iterations that are not in this file (never produced, or in
        another segment); for a live file: those not (yet) attached to a closed iteration."""
        if self._live is not None:
            done = set(self._live.iterations["iter_index"].tolist())
            return {i: t for i, t in self._live_tags().items() if i not in done}
        raw = self.attrs.get("unmatched_tags")
        loaded = json.loads(raw) if isinstance(raw, str) and raw else {}
        return {int(k): {str(a): str(b) for a, b in v.items()} for k, v in loaded.items()}

    def pv_info(self, pv: str) -> dict[str, Any]:
        if self._live is not None:  # from the sample columns (no value read), the kind
            rows = self._live_rows(pv)  # as summary() and finalization give it
            info: dict[str, Any] = {"pv_name": pv, "count": len(rows)}
            if len(rows):
                s = self._live.samples
                kind = KINDS_BY_CODE.get(int(s["kind"][_type_row(s, rows)]), ValueKind.NONE)
                info["kind"] = kind.value
            return info
        return dict(self._pv_info(pv))

    def pv_table(self) -> npt.NDArray[Any]:
        """The /pv_info table (final layout, format 2): one row per PV, as a numpy structured
        array (strings as bytes); ``pandas.DataFrame(f.pv_table())`` makes a table of it.
        A KeyError that says so for a file without one (live, format 1.x)."""
        if "pv_info" not in self.h5:
            why = ("a live file gets it when it is finalized" if self._live is not None
                   else f"format {self.attrs.get('format_version')} files have none")
            raise NotInFileError(f"{self.path} has no /pv_info table ({why}); summary() and "
                           "pv_info(pv) describe its PVs")
        return np.asarray(self.h5["pv_info"][()])

    def _pv_info(self, pv: str) -> dict[str, Any]:
        """The PV's description: its /pv_info row (format 2) or its group attributes (1.x)."""
        if self._info is None:
            if "pv_info" in self.h5:
                table = self.h5["pv_info"][()]
                names = table.dtype.names or ()
                self._info = {}
                for row in table:
                    item = {k: plain(row[k]) for k in names}
                    self._info[str(item["pv_name"])] = item
            else:
                self._info = {}
        info = self._info.get(pv)
        if info is None:
            if pv not in self._pv_names()[1]:
                raise unknown_pv(pv, self.pv_names, str(self.path))
            info = self._info[pv] = self.attrs_of(f"pvs/{escape_name(pv)}")
        return info

    # --- per-PV arrays ------------------------------------------------------------------------
    def _group(self, pv: str) -> h5py.Group:
        if pv not in self._pv_names()[1]:
            raise unknown_pv(pv, self.pv_names, str(self.path))
        return self.h5["pvs"][escape_name(pv)]

    def _side(self, pv: str, tree: str, old: str) -> h5py.Group | None:
        """The PV's entry in a side tree of the final layout: format 5.0 keeps the first/count
        index in ``/index/<PV>`` and changing metadata in ``/metadata/<PV>`` (so the PV
        group is a plain NXlog); older files keep them in the PV group (``old``: ``""`` for the
        group itself, which holds the index, or the name of its ``metadata`` subgroup). None
        when there is none."""
        g = self._group(pv)
        side = _member(self.h5, f"{tree}/{escape_name(pv)}")
        if isinstance(side, h5py.Group):
            return side
        if not old:
            return g
        sub = _member(g, old)
        return sub if isinstance(sub, h5py.Group) else None

    def _shapes(self, g: h5py.Group, kind: ValueKind, rows: slice = slice(None), *,
                names: frozenset[str] | None = None, value: Any = _UNSEEN,
                ) -> npt.NDArray[np.int64] | None:
        """The shape of each row (``rows``) of a PV of a shaped kind: its ``shape`` dataset,
        or, where format 5.0 left it out because every row has the same shape, the trailing
        shape of ``value`` for each row. None for other kinds (and PVs without values).
        ``names`` (the group's members) and ``value`` (its value object, None if it has
        none), when the caller has them, save opening them again."""
        if "shape" in (g if names is None else names):
            return np.asarray(g["shape"][rows])
        if value is _UNSEEN:
            value = _member(g, "value")
        if kind not in SHAPED_KINDS or value is None:
            return None
        if isinstance(value, h5py.Group):  # NTTable: rows of a table = its columns' length
            columns = [c for c in map(value.__getitem__, value) if isinstance(c, h5py.Dataset)]
            n, trailing = (columns[0].shape[0], columns[0].shape[1:2]) if columns else (
                int(g["time"].shape[0]), (0,))
        else:
            n, trailing = value.shape[0], value.shape[1:]
        count = len(range(*rows.indices(n)))
        return np.tile(np.asarray(trailing, dtype=np.int64), (count, 1))

    def _live_rows(self, pv: str) -> npt.NDArray[Any]:
        """The live rows of ``pv``, ascending: from one stable sort of the PV column, made
        on first use (per PV it is a slice; a scan per PV would cost PVs x rows)."""
        view = self._live
        assert view is not None
        if self._live_index is None:
            keys, n = view.samples["pv"], len(view.pv_names)
            outside = np.flatnonzero((keys < 0) | (keys >= n)) if len(keys) else keys[:0]
            if len(outside):  # else their values would be left out without a word
                from recorder.verify import _listed  # verify's words for the same damage

                raise DamagedFileError(f"{self.path}: damaged: /live/samples/pv: rows "
                                       f"{_listed(outside.tolist())}: no such PV")
            self._live_index = _group_index(keys, n)
        order, bounds = self._live_index
        col = self._live_col(pv)
        return order[bounds[col] : bounds[col + 1]]

    def _live_meta(self, col: int) -> npt.NDArray[Any]:
        """Indices of PV ``col``'s rows in /live/meta, in order (one stable sort, first use)."""
        view = self._live
        assert view is not None
        if self._live_meta_index is None:
            self._live_meta_index = _group_index(view.meta["pv"], len(view.pv_names))
        order, bounds = self._live_meta_index
        return order[bounds[col] : bounds[col + 1]]

    def _live_col(self, pv: str) -> int:
        assert self._live is not None
        if self._live_cols is None:
            self._live_cols = {name: i for i, name in enumerate(self._live.pv_names)}
        col = self._live_cols.get(pv)
        if col is None:  # the KeyError of a finalized file, with its hints
            raise unknown_pv(pv, self.pv_names, str(self.path))
        return col

    def _column(self, pv: str, name: str) -> npt.NDArray[Any]:
        if self._live is not None:
            return self._live.samples.take((name,), self._live_rows(pv))[name]
        return np.asarray(self._group(pv)[name][()])

    def _column_range(self, pv: str, name: str, lo: int, hi: int | None) -> npt.NDArray[Any]:
        if self._live is not None:
            return self._live.samples.take((name,), self._live_rows(pv)[lo:hi])[name]
        return np.asarray(self._group(pv)[name][lo:hi])

    def row_count(self, pv: str) -> int:
        """How many values of ``pv`` the file holds (late ones included)."""
        if self._live is not None:
            return len(self._live_rows(pv))
        return int(self._group(pv)["iteration"].shape[0])

    def iterations_range(self, pv: str, lo: int, hi: int | None) -> npt.NDArray[np.int64]:
        """:meth:`iterations_of` of rows ``lo:hi`` only (reads only those rows)."""
        return self._column_range(pv, "iteration", lo, hi)

    def times(self, pv: str) -> npt.NDArray[np.int64]:
        return self._column(pv, "time")

    def iterations_of(self, pv: str) -> npt.NDArray[np.int64]:
        return self._column(pv, "iteration")

    def severity(self, pv: str) -> npt.NDArray[np.int32]:
        return self._column(pv, "severity")

    def alarm_status(self, pv: str) -> npt.NDArray[np.int32]:
        return self._column(pv, "status")

    def alarm_messages(self, pv: str) -> npt.NDArray[Any]:
        """``alarm.message`` of every value (object array of str, None where a sample had
        none). Formats 3.x and 4.x keep it in the ``alarm_message`` column when the PV's
        structure changes, else in its one metadata entry; live and 1.x/2.x files in the
        metadata entries (see docs/file-format.md)."""
        if self._live is None:
            g = self._group(pv)
            if "alarm_message" in g and "flags" not in g and int(
                self._pv_info(pv)["flags"]
            ) & F_MESSAGE:  # every row's message is in the column
                codes, texts = self._message_column(g)
                out = np.empty(len(codes), dtype=object)
                out[:] = np.array(texts, dtype=object)[codes] if len(codes) else []
                return out
        out = np.empty(len(self.samples(pv)), dtype=object)
        out[:] = [s.alarm_message for s in self.samples(pv)]
        return out

    def user_tags(self, pv: str) -> npt.NDArray[Any]:
        """``timeStamp.userTag`` of every value (EPICS 7's UTAG: a pulse id at some
        facilities): int64, 0 where a sample had none; an object array when some tag is not
        an integer (None, ...). Format 4.x keeps nonzero tags in the ``user_tag`` column
        (read directly when every row is in it), the others in the metadata."""
        if self._live is None:
            g = self._group(pv)
            flags = int(self._pv_info(pv).get("flags", 0))
            if "user_tag" in g and "flags" not in g and flags & F_USER_TAG:
                return np.asarray(g["user_tag"][()], dtype=np.int64)
        tags: list[Any] = []
        for sample in self.samples(pv):
            ts = sample.data.get("timeStamp")
            tags.append(ts.get("userTag", 0) if isinstance(ts, dict) else 0)
        if all(t.__class__ is int and -(2**63) <= t < 2**63 for t in tags):
            return np.array(tags, dtype=np.int64)
        return _object_array(tags)

    def values(self, pv: str) -> npt.NDArray[Any]:
        """One row per value: scalars 1-D in their dtype, waveforms/images stacked when all have
        the same shape (else an object array of arrays), strings/tables/structures as objects,
        enums as the index (int64; :data:`ENUM_NO_INDEX`, -1, where a sample has no index,
        never the file's fill 0, which is the first choice). A sample without a value is None
        in an object array (enums: -1). From a finalized file's ``value`` dataset directly
        when every row of the PV is in it (no per-row objects: as fast as h5py), else from
        :meth:`samples`."""
        direct = self._final_values(pv) if self._live is None else self._live_values(pv)
        if direct is not None:
            return direct
        return values_of(self.samples(pv))

    def _live_values(self, pv: str) -> npt.NDArray[Any] | None:
        """:meth:`values` of a live PV from its inline columns (``fval``/``ival``) when every
        row is a typed scalar, bool or enum of one dtype; else None."""
        view = self._live
        assert view is not None
        rows = self._live_rows(pv)
        if pv in self._cache or not len(rows):
            return None
        s = view.samples.take(("flags", "kind", "dtype"), rows)
        kind, code = int(s["kind"][0]), int(s["dtype"][0])
        vkind = KINDS_BY_CODE.get(kind)
        if (vkind not in (ValueKind.SCALAR, ValueKind.BOOL, ValueKind.ENUM)
                or code not in DTYPE_BY_CODE or not (s["flags"] & F_VALUE).all()
                or (s["kind"] != kind).any() or (s["dtype"] != code).any()):
            return None
        dt = DTYPE_BY_CODE[code]
        if dt.kind == "f":
            return view.samples.take(("fval",), rows)["fval"].astype(dt)
        ival = view.samples.take(("ival",), rows)["ival"]
        if vkind is ValueKind.ENUM:
            return ival.astype(np.int64)
        return ival.view(np.uint64).copy() if dt == np.uint64 else ival.astype(dt)

    def _final_values(self, pv: str) -> npt.NDArray[Any] | None:
        """:meth:`values` read straight from the final layout, or None when some row's value
        is elsewhere (flags differ between rows, or lack 8) or the kind needs the samples."""
        g = self._group(pv)
        if "flags" in g or "value" not in g or not isinstance(g["value"], h5py.Dataset):
            return None
        info = self._pv_info(pv)
        if "flags" not in info or not int(info["flags"]) & F_VALUE:
            return None
        kind = ValueKind(info["kind"])
        ds = g["value"]
        if kind in (ValueKind.SCALAR, ValueKind.BOOL, ValueKind.ENUM):
            return np.asarray(ds[()])
        if kind is ValueKind.STRING:
            return _object_array(ds.asstr()[()].tolist())
        shapes = self._shapes(g, kind)
        if kind is ValueKind.ARRAY and shapes is not None:
            data = ds[()]
            lengths = shapes[:, 0]
            if len(lengths) and (lengths == data.shape[1]).all():
                return np.asarray(data)
            return _object_array([data[i, :n] for i, n in enumerate(lengths.tolist())])
        if kind is ValueKind.NDARRAY and shapes is not None:  # images, zero-padded to the
            data = ds[()]  # largest
            if len(shapes) and (shapes == data.shape[1:]).all():
                return np.asarray(data)
            return _object_array([data[(i, *(slice(0, d) for d in shape))]
                                  for i, shape in enumerate(shapes.tolist())])
        return None

    def summary(self) -> list[dict[str, Any]]:
        """One row per PV, what ``k2eg-recorder inspect`` prints: ``pv``, ``kind``, ``dtype``
        (storage dtype, ``utf-8``, ``table``...), ``shape`` (of one value; None when it varies),
        ``units``, ``count``, ``first_ns``/``last_ns`` (EPICS time of the first and last value;
        None without values or when that value's time stamp was not a storable one; 0 is
        a real time, 1970-01-01, which an IOC sends for a record never processed). Read from
        the tables (/pv_info and dataset shapes; a live file's sample columns), not from the
        values, so it stays quick for large files (1.x files: from the samples)."""
        if self._live is not None:
            return self._live_summary()
        if "pv_info" not in self.h5:
            return [self._samples_summary(pv) for pv in self.pv_names]
        rows = []
        for pv in self.pv_names:
            info = self._pv_info(pv)
            g = self._group(pv)
            n = int(info["count"])
            t = g["time"]
            shape: tuple[int, ...] | None = ()
            lengths = self._shapes(g, ValueKind(str(info["kind"])))
            if lengths is not None:
                same = len(lengths) and (lengths == lengths[0]).all()
                shape = tuple(int(x) for x in lengths[0]) if same else None
            flags = int(info.get("flags", 0))
            rows.append({
                "pv": pv, "kind": str(info["kind"]), "dtype": str(info["storage_dtype"]),
                "shape": shape, "units": str(info.get("units") or ""), "count": n,
                **_first_last_time(t, g["flags"] if flags == -1 else flags, n),
            })
        return rows

    def _samples_summary(self, pv: str) -> dict[str, Any]:
        times, vals = self.times(pv), self.values(pv)
        info = self.pv_info(pv)
        return {
            "pv": pv, "kind": str(info.get("kind", "-")), "dtype": str(vals.dtype),
            "shape": None if vals.dtype == object else tuple(vals.shape[1:]),
            "units": str(info.get("units") or ""), "count": len(times),
            "first_ns": int(times[0]) if len(times) else None,
            "last_ns": int(times[-1]) if len(times) else None,
        }

    def _live_summary(self) -> list[dict[str, Any]]:
        view = self._live
        assert view is not None
        s = view.samples
        rows = []
        for col, pv in enumerate(view.pv_names):
            idx = self._live_rows(pv)
            n = len(idx)
            kind, dtype, units = ValueKind.NONE, "none", ""
            shape: tuple[int, ...] | None = ()
            if n:
                typed = _type_row(s, idx)
                kind = KINDS_BY_CODE.get(int(s["kind"][typed]), ValueKind.NONE)
                code = int(s["dtype"][typed])
                dtype = ("table" if kind is ValueKind.TABLE else
                         "utf-8" if code == STRING_DTYPE_CODE
                         or kind is ValueKind.STRING_ARRAY else
                         DTYPE_BY_CODE[code].name if code in DTYPE_BY_CODE else "none")
                first = self._live_meta(col)
                if kind is ValueKind.ARRAY:
                    sizes = s["size"][idx]
                    shape = (int(sizes[0]),) if (sizes == sizes[0]).all() else None
                elif kind is ValueKind.NDARRAY:  # the image shape is in each row's metadata
                    at = dict.fromkeys(zip(view.meta["offset"][first].tolist(),
                                           view.meta["size"][first].tolist(), strict=True))
                    shape = _image_shape_of(s, idx, (view.text(o, z) for o, z in at))
                elif kind in (ValueKind.STRING_ARRAY, ValueKind.TABLE):
                    shape = _extracted_shape(self.values(pv))  # in each row's metadata
                if len(first):
                    i = int(first[0])
                    rest = decode_rest(view.text(int(view.meta["offset"][i]),
                                                 int(view.meta["size"][i])))
                    display = rest.get("d", {}).get("display")
                    if isinstance(display, dict) and isinstance(display.get("units"), str):
                        units = display["units"]
            ends = idx[[0, -1]] if n else idx  # only the first and last rows' times
            rows.append({
                "pv": pv, "kind": kind.value, "dtype": dtype, "shape": shape, "units": units,
                "count": n, **_first_last_time(s["time"][ends], s["flags"][ends], len(ends)),
            })
        return rows

    def first_count(self, pv: str) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """For each /iterations row: first row and number of this PV's values (XFEL INDEX)."""
        if self._live is None:
            g = self._side(pv, "index", "")
            assert g is not None
            return g["first"][()], g["count"][()]
        rows = self._column(pv, "iter_row")
        n_iter = len(self._live.iterations["iter_index"])
        count = np.bincount(rows[rows >= 0], minlength=n_iter)[:n_iter].astype(np.int64)
        valid = np.flatnonzero(rows >= 0)  # skip values that arrived after their iteration
        first = np.append(valid, len(rows))[np.searchsorted(rows[valid], np.arange(n_iter))]
        return first.astype(np.int64), count

    def by_iteration(self, pv: str, *, pick: str = "last") -> np.ma.MaskedArray:
        """``pv``'s value in each /iterations row, aligned with :meth:`iterations`: the last
        (``pick="first"``: the first) of its values in that iteration, in arrival order,
        masked where the iteration has none (a PV that did not answer, an incomplete
        iteration). Shape
        ``(n_iterations, *value_shape)`` in the dtype of :meth:`values`; masked entries hold
        NaN (floats), 0 or None, never another iteration's value (an enum's 0 there is
        masked; an unmasked -1 is a sample without an index, as in :meth:`values`)."""
        first, count = self.first_count(pv)
        return _pick(self.values(pv), first, count, pick)

    def table(self, pvs: Iterable[str] | None = None, *, pick: str = "last"
              ) -> dict[str, npt.NDArray[Any]]:
        """PVs side by side, one row per iteration (see :func:`aligned_table`: the dtype of a
        column with gaps, enums, booleans); default: every scalar, boolean and enum PV.
        ``pandas.DataFrame(f.table()).set_index("iter_index")`` is the usual next step."""
        names = _scalar_pvs(self.summary()) if pvs is None else list(pvs)
        its = self.iterations()
        return aligned_table(its, {pv: self.by_iteration(pv, pick=pick) for pv in names})

    def samples(self, pv: str) -> list[PVSample]:
        """Every value of ``pv`` as a PVSample equal to what the client decoded."""
        cached = self._cache.get(pv)
        if cached is not None:
            return cached
        out = self.samples_range(pv, 0, None)
        self._cache[pv] = out
        return out

    def samples_range(self, pv: str, lo: int, hi: int | None) -> list[PVSample]:
        """The PV's samples of rows ``lo:hi`` (not cached): reads only those rows and the
        metadata entry in effect at ``lo``."""
        cached = self._cache.get(pv)
        if cached is not None:
            return cached[lo:hi]
        if self._live is not None:
            return self._live_samples(pv, lo, hi)
        return self._final_samples(pv, lo, hi)

    def _live_samples(self, pv: str, lo: int, hi: int | None) -> list[PVSample]:
        view = self._live
        assert view is not None
        rows = self._live_rows(pv)
        lo, hi, _ = slice(lo, hi).indices(len(rows))  # as a slice does (-2: the last two)
        idx = rows[lo:max(lo, hi)]
        s = view.samples.take(SAMPLE_COLUMNS, idx)
        sel = self._live_meta(self._live_col(pv))
        entries = [
            (int(view.meta["row"][i]), int(view.meta["offset"][i]), int(view.meta["size"][i]))
            for i in sel
        ]
        out: list[PVSample] = []
        rest: dict[str, Any] = {"d": {}, "f": []}
        j = max(0, bisect.bisect_right([e[0] for e in entries], lo) - 1)  # in effect at lo
        for r in range(len(idx)):
            while j < len(entries) and entries[j][0] <= lo + r:
                rest = decode_rest(view.text(entries[j][1], entries[j][2]))
                j += 1
            flags = int(s["flags"][r])
            value = sample_value(view, s, r, rest) if flags & F_VALUE else None
            framed = flags & F_FRAME  # an NTNDArray's uniqueId in fval, dataTimeStamp in ival
            data = rebuild_data(
                rest,
                flags=flags,
                kind=int(s["kind"][r]),
                time_ns=int(s["time"][r]),
                severity=int(s["severity"][r]),
                status=int(s["status"][r]),
                value=value,
                user_tag=int(s["user_tag"][r]),
                unique_id=int(s["fval"][r]) if framed else 0,
                data_time_ns=int(s["ival"][r]) if framed else 0,
            )
            out.append(PVSample(pv, data, frozenset(rest.get("f", ()))))
        return out

    def stored_rows(self, pv: str, lo: int, hi: int | None) -> list[StoredRow] | None:
        """The PV's rows ``lo:hi`` of a finalized file as stored: the per-row columns with
        the metadata entry in effect at each (:class:`~recorder.reader_rows.StoredRow`; its
        ``sample(pv)`` is the row's entry of :meth:`samples_range`). Rows of one metadata
        entry share its ``rest`` object. None for a live file (and a PV :meth:`samples`
        cached): use :meth:`samples_range`."""
        if self._live is not None or pv in self._cache:
            return None
        return list(self._final_rows(pv, lo, hi))

    def _final_samples(self, pv: str, lo: int, hi: int | None) -> list[PVSample]:
        return [row.sample(pv) for row in self._final_rows(pv, lo, hi)]

    def flat_range(self, pv: str, lo: int, hi: int | None,
                   cache: FlatCache | None = None) -> list[FlatValue]:
        """The PV's values of rows ``lo:hi`` as :meth:`trains` holds them: (flat fields, EPICS
        time) each, equal to :func:`~recorder.sinks.bridge.flatten_sample` of
        :meth:`samples_range` (``cache``: see there). From a finalized file, rows sharing a
        metadata entry and flags reuse the first one's fields
        (:class:`~recorder.sinks.bridge.mapping.FlatTemplate`) instead of each being rebuilt
        and flattened in full."""
        if self._live is not None or pv in self._cache:
            return [(flatten_sample(s, cache), s.timestamp_ns)
                    for s in self.samples_range(pv, lo, hi)]
        out: list[FlatValue] = []
        rest: dict[str, Any] | None = None
        templates: dict[int, FlatTemplate | None] = {}  # by flags, for the entry in effect
        for row in self._final_rows(pv, lo, hi):
            if row.rest is not rest:
                rest = row.rest
                templates = {}
            flags = row.flags
            tmpl = templates.get(flags, _UNSEEN)
            if tmpl is not None and tmpl is not _UNSEEN:
                got = tmpl.row(row.value, row.time, row.severity, row.status,
                               row.message, row.user_tag)
                if got is not None:
                    out.append(got)
                    continue
            sample = row.sample(pv)
            flat = flatten_sample(sample, cache)
            out.append((flat, sample.timestamp_ns))
            if tmpl is _UNSEEN:
                templates[flags] = FlatTemplate.of(
                    sample, flat, value=bool(flags & F_VALUE), time=bool(flags & F_TIME),
                    severity=bool(flags & F_SEVERITY), status=bool(flags & F_STATUS),
                    message=bool(flags & F_MESSAGE), user_tag=bool(flags & F_USER_TAG),
                    frame=bool(flags & F_FRAME))
        return out

    def _final_rows(self, pv: str, lo: int, hi: int | None) -> Iterator[StoredRow]:
        """The stored columns of the PV's rows ``lo:hi`` with the metadata entry in effect
        at each (reads only those rows)."""
        g = self._group(pv)
        names = self._members.get(pv)
        if names is None:
            if len(self._members) >= MEMBERS_CACHED:
                self._members.clear()
            names = self._members[pv] = frozenset(g)
        info = self._pv_info(pv)
        kind = ValueKind(info["kind"])
        n_all = int(info.get("count", len(g["time"])))
        lo, hi, _ = slice(lo, hi).indices(n_all)
        hi = max(lo, hi)
        n = hi - lo
        rows = slice(lo, hi)
        cols = {k: g[k][rows] for k in ("time", "severity", "status")}
        if "flags" in names:
            cols["flags"] = g["flags"][rows]
        else:  # 2.x: the same flags in every row, in /pv_info
            cols["flags"] = np.full(n, int(info["flags"]), dtype=np.uint8)
        value: Any = None
        table: list[tuple[str, npt.NDArray[Any]]] | None = None
        stored = g["value"] if "value" in names else None
        if isinstance(stored, h5py.Group):  # NTTable: one dataset a column
            cnames = [str(c) for c in plain(stored.attrs["columns"])]
            table = [(c, stored[escape_name(c)][rows]) for c in cnames]
        elif stored is not None:
            value = stored[rows]
        shape = self._shapes(g, kind, rows, names=names, value=stored)
        codes, texts = (self._message_column(g, rows) if "alarm_message" in names
                        else (np.zeros(0, np.int32), []))
        storage = str(info.get("storage_dtype", "none"))
        meta_rows, meta_json = self._meta_entries(pv, info, n_all)
        rest: dict[str, Any] = {"d": {}, "f": []}
        j = max(0, int(np.searchsorted(meta_rows, lo, "right")) - 1)  # in effect at lo
        kind_code = {k: c for c, k in KINDS_BY_CODE.items()}[kind]
        scalar_kind = None
        if storage not in ("utf-8", "table", "none") and shape is None:
            code = {dt.name: c for c, dt in DTYPE_BY_CODE.items()}[storage]
            scalar_kind = DTYPE_BY_CODE[code].kind
        # per-row columns as Python lists (a list index costs a fraction of a numpy one)
        times, sevs, stats = (cols[k].tolist() for k in ("time", "severity", "status"))
        # 4.x: user tags, NTNDArray frame ids and times (0 where not taken out)
        tags, uids, dts = (g[k][rows].tolist() if k in names else [0] * n
                           for k in ("user_tag", "unique_id", frame_time_name(names)))
        flag_list, code_list = cols["flags"].tolist(), codes.tolist()
        # (a scalar storage dtype: no shape, not utf-8 strings or a table)
        scalars = value.tolist() if scalar_kind is not None and value is not None else None
        f32: frozenset[str] = frozenset()
        for r in range(n):
            while j < len(meta_rows) and int(meta_rows[j]) <= lo + r:
                raw = meta_json[j]
                rest = decode_rest(raw if isinstance(raw, bytes) else raw.encode())
                f32 = frozenset(rest.get("f", ()))
                j += 1
            flags = flag_list[r]
            v: Any = None
            if flags & F_VALUE and table is not None and shape is not None:
                length = int(shape[r][0])
                by_name = {c: _column_items(a[r][:length]) for c, a in table}
                placeholder = rest["d"].get("value")
                order = list(placeholder) if isinstance(placeholder, dict) else list(by_name)
                v = {c: by_name[c] for c in order}
            elif flags & F_VALUE and value is not None:
                if kind is ValueKind.STRING_ARRAY and shape is not None:
                    v = _column_items(value[r][: int(shape[r][0])])
                elif storage == "utf-8":
                    item = value[r]
                    v = item.decode("utf-8") if isinstance(item, bytes) else str(item)
                elif shape is not None:
                    sl = tuple(slice(0, int(d)) for d in shape[r])
                    v = value[r][sl].reshape(-1).tolist()
                elif scalars is not None:  # tolist(): float / bool / int as msgpack gave them
                    v = scalars[r]
                else:
                    item = value[r]
                    v = (float(item) if scalar_kind == "f" else bool(item)
                         if scalar_kind == "b" else int(item))
            yield StoredRow(rest, f32, flags, kind_code, times[r], sevs[r], stats[r], v,
                       texts[code_list[r]] if flags & F_MESSAGE else None, tags[r], uids[r],
                       dts[r])

    def _meta_entries(self, pv: str, info: Mapping[str, Any], n_all: int
                      ) -> tuple[npt.NDArray[Any], Any]:
        """The PV's metadata entries of a final file: (first row of each, its JSON), read once
        while the cached ones total at most :data:`META_CACHE_BYTES`."""
        got = self._meta.get(pv)
        if got is not None:
            return got
        meta_rows: npt.NDArray[Any] = np.zeros(0, np.int64)
        meta_json: Any = []
        meta = self._side(pv, "metadata", "metadata")
        if meta is not None:  # 1.x always; 2.x-4.x (5.0: in /metadata) when it changed
            meta_rows, meta_json = meta["row"][()], meta["json"][()]
        elif info.get("metadata") and n_all:  # 2.x: row 0's metadata is in /pv_info
            meta_rows, meta_json = np.zeros(1, np.int64), [info["metadata"]]
        size = meta_rows.nbytes + sum(map(len, meta_json)) + 64 * len(meta_json)
        if self._meta_bytes + size <= META_CACHE_BYTES:
            self._meta[pv] = (meta_rows, meta_json)
            self._meta_bytes += size
        return meta_rows, meta_json

    @staticmethod
    def _message_column(g: h5py.Group, rows: slice = slice(None)
                        ) -> tuple[npt.NDArray[Any], list[str]]:
        """``alarm_message`` codes (of ``rows``) and texts (3.x and later, PVs whose structure
        changes), else none."""
        if "alarm_message" not in g:
            return np.zeros(0, np.int32), []
        ds = g["alarm_message"]
        return ds[rows], [str(t) for t in plain(ds.attrs["texts"])]

    # --- iteration by iteration ---------------------------------------------------------------
    def trains(self) -> Iterator[Train]:
        """(data, metadata) per /iterations row: the karabo-bridge container the live bridge
        serves for the same iteration (built by :func:`recorder.sinks.bridge.build_train`;
        see docs/bridge.md): ``data[pv]`` holds the PV structure's fields flattened with
        dots (``value``, ``alarm.severity``, ``timeStamp.secondsPastEpoch``, ...; an enum
        has ``value.index``/``value.choices`` and no ``value``, a table ``value.<column>``:
        see docs/bridge.md), stacked along a first axis in timedbuffered runs;
        ``metadata[pv]`` the PV's EPICS ``timestamp``/``timestamp.sec``/``timestamp.frac``
        and ``timestamp.tid`` (the k2eg iter_index); ``data["k2eg-recorder/iteration"]``
        the iteration record.
        """
        its = self.iterations()
        names = self.pv_names
        stacked = stacked_for(self.attrs.get("snapshot_type"))
        run_name = str(self.attrs.get("run_name", ""))
        snapshot_name = str(self.attrs.get("snapshot_name", ""))
        n_rows = len(its["iter_index"])
        # the first/count index (16 bytes per PV and iteration: held whole, it outgrew the
        # file) of a finalized file is read a block of iterations at a time; a live file's
        # is worked out whole from its sample columns
        whole = {pv: self.first_count(pv) for pv in names} if self._live is not None else None
        n_values = (sum(int(c.sum()) for _, c in whole.values()) if whole is not None
                    else sum(self.row_count(pv) for pv in names))
        # a window of iterations at a time: each PV's rows of the window are read at once,
        # so memory holds one window, not the file (TRAIN_WINDOW_VALUES values)
        flat_cache: FlatCache = {}  # metadata dicts shared by the rows of one entry
        per_iteration = max(1, n_values // max(1, n_rows))
        window = max(1, TRAIN_WINDOW_VALUES // per_iteration)
        block = max(1, INDEX_BLOCK_ENTRIES // max(1, len(names)) // window) * window
        for b0 in range(0, n_rows, block):
            b1 = min(n_rows, b0 + block)
            index = ({pv: (f[b0:b1], c[b0:b1]) for pv, (f, c) in whole.items()}
                     if whole is not None else {pv: self._index_rows(pv, b0, b1) for pv in names})
            for k0 in range(b0, b1, window):
                k1 = min(b1, k0 + window)
                j0, j1 = k0 - b0, k1 - b0  # the window in the block's index
                # per PV with values in the window: its rows' flat values, and where each
                # iteration's values start in them and how many there are
                rows: dict[str, tuple[list[FlatValue], list[int], list[int]]] = {}
                for pv, (first, count) in index.items():
                    counts = count[j0:j1]
                    if counts.any():
                        lo = int(first[j0])
                        hi = int((first[j0:j1] + counts).max())
                        rows[pv] = (self.flat_range(pv, lo, hi, flat_cache),
                                    (first[j0:j1] - lo).tolist(), counts.tolist())
                for row in range(k0, k1):
                    by_pv: dict[str, list[FlatValue]] = {}
                    for pv, (values, starts, ns) in rows.items():
                        n = ns[row - k0]
                        if n:
                            a = starts[row - k0]
                            by_pv[pv] = values[a : a + n]
                    yield build_train_flat(
                        IterationInfo.from_columns(its, row),
                        by_pv,
                        stacked=stacked,
                        run_name=run_name,
                        snapshot_name=snapshot_name,
                    )

    def _index_rows(self, pv: str, lo: int, hi: int
                    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """:meth:`first_count` of /iterations rows ``lo:hi`` of a finalized file (reads only
        those)."""
        g = self._side(pv, "index", "")
        assert g is not None
        return np.asarray(g["first"][lo:hi]), np.asarray(g["count"][lo:hi])

    def close(self) -> None:
        if self._kept is not None:
            self._kept.forget(self)
        if self._h5 is not None:
            self._h5.close()

    def __enter__(self) -> RecordingFile:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _OpenFiles:
    """The files of a :class:`Recording` whose HDF5 file is open, the last read first out:
    beyond :data:`OPEN_FILES_KEPT` the one read longest ago is released."""

    def __init__(self) -> None:
        self._open: collections.OrderedDict[int, RecordingFile] = collections.OrderedDict()

    def read(self, f: RecordingFile) -> None:
        key = id(f)
        if key in self._open:
            self._open.move_to_end(key)
            return
        self._open[key] = f
        while len(self._open) > OPEN_FILES_KEPT:
            _, old = self._open.popitem(last=False)
            old.release()

    def forget(self, f: RecordingFile) -> None:
        self._open.pop(id(f), None)


class Recording:
    """The segment files of one recording, in order. Files of other recordings (another
    ``recording_uid``) or one file given twice are a :class:`FileFormatError`: their
    iterations would be chained as if one recording's. A ``.partial`` beside its own
    finalized file is left out (the final file holds all of it)."""

    def __init__(self, paths: Iterable[str | os.PathLike[str]]) -> None:
        # files beside it that open_recording could not read (path, why): see
        # SkippedFileWarning
        self.skipped: list[tuple[Path, str]] = []
        given = _now_at_all(paths)
        if not given:  # a glob that matched nothing: not a recording without PVs
            raise FileFormatError("no files given: open_recording takes the files of one "
                                  "recording, one of them, or its directory")
        names = {p.resolve() for p in given}
        self.files = []
        kept = _OpenFiles()
        for p in given:
            f = _open_now(p, names)
            if f is not None:
                f._kept = kept
                kept.read(f)
                self.files.append(f)
        try:
            _one_recording(self.files)
        except FileFormatError:
            self.close()
            raise
        self.files = _without_finalized_partials(self.files)
        # segment order; a segment number a crashed daemon used twice: by opening time
        self.files.sort(key=lambda f: (int(f.attrs.get("segment", 0)),
                                       str(plain(f.attrs.get("segment_start_time", ""))),
                                       f.path.name))

    @property
    def pv_names(self) -> list[str]:
        names: dict[str, None] = {}
        for f in self.files:
            names.update(dict.fromkeys(f.pv_names))
        return list(names)

    def _check(self, pv: str) -> None:
        if self.files and not any(pv in f.pv_names for f in self.files):
            raise unknown_pv(pv, self.pv_names, f"this recording ({len(self.files)} file(s))")

    def _cat(self, method: str, pv: str) -> npt.NDArray[Any]:
        self._check(pv)
        return join_rows([getattr(f, method)(pv) for f in self.files if pv in f.pv_names])

    def values(self, pv: str) -> npt.NDArray[Any]:
        """:meth:`RecordingFile.values` of every segment, as one file holding all of them
        would give them: a PV whose dtype or kind changed between segments (a bool then a
        number, float32 then float64, an enum then a number) is joined by the rules of
        :func:`values_of`, not an object array beside another segment's numbers."""
        self._check(pv)
        held = [f for f in self.files if pv in f.pv_names]
        parts = [f.values(pv) for f in held]
        filled = [(f, p) for f, p in zip(held, parts, strict=True) if len(p)]
        dtypes = {p.dtype for _, p in filled}
        enum = {f.pv_info(pv).get("kind") == ValueKind.ENUM.value for f, _ in filled}
        if len(enum) > 1 or (len(dtypes) > 1 and any(dt.kind not in "biuf" for dt in dtypes)):
            return values_of(self.samples(pv))
        if len(dtypes) > 1 and len({p.shape[1:] for _, p in filled}) == 1:
            joined = np.concatenate([p for _, p in filled])  # in their common dtype
            if joined.dtype.kind != "f" or all(
                    p.dtype.kind not in "iu" or exact_in_float64(p) for _, p in filled):
                return joined
        return join_rows(parts)

    def times(self, pv: str) -> npt.NDArray[Any]:
        return self._cat("times", pv)

    def iterations_of(self, pv: str) -> npt.NDArray[Any]:
        return self._cat("iterations_of", pv)

    def alarm_messages(self, pv: str) -> npt.NDArray[Any]:
        return self._cat("alarm_messages", pv)

    def user_tags(self, pv: str) -> npt.NDArray[Any]:
        return self._cat("user_tags", pv)

    def severity(self, pv: str) -> npt.NDArray[Any]:
        return self._cat("severity", pv)

    def alarm_status(self, pv: str) -> npt.NDArray[Any]:
        return self._cat("alarm_status", pv)

    def samples(self, pv: str) -> list[PVSample]:
        self._check(pv)
        return [s for f in self.files if pv in f.pv_names for s in f.samples(pv)]

    def pv_info(self, pv: str) -> dict[str, Any]:
        """:meth:`RecordingFile.pv_info` of the first segment holding the PV."""
        self._check(pv)
        return next(f.pv_info(pv) for f in self.files if pv in f.pv_names)

    def summary(self) -> list[dict[str, Any]]:
        """:meth:`RecordingFile.summary` over every segment, one row per PV: ``count``
        summed, ``first_ns`` of the first segment with values and ``last_ns`` of the last,
        ``shape`` None when the segments' differ; ``kind``, ``dtype`` and ``units`` of the
        first segment with typed values (not kind ``none``: samples without a value, as one
        file holding them all is typed by its first typed value), else of the first with
        values (of the first holding the PV when none has)."""
        rows: dict[str, list[dict[str, Any]]] = {}
        for f in self.files:
            for row in f.summary():
                rows.setdefault(row["pv"], []).append(row)
        out = []
        for parts in rows.values():
            valued = [r for r in parts if r["count"]] or parts[:1]
            typed = [r for r in valued if r["kind"] != ValueKind.NONE.value] or valued
            shapes = {r["shape"] for r in typed}
            out.append({**typed[0], "count": sum(r["count"] for r in parts),
                        "shape": shapes.pop() if len(shapes) == 1 else None,
                        "first_ns": valued[0]["first_ns"], "last_ns": valued[-1]["last_ns"]})
        return out

    def iterations(self) -> dict[str, npt.NDArray[Any]]:
        """Every segment's /iterations table, in order, plus ``segment`` (the file's segment
        number) per row: ``iter_index`` is unique within a file, not across the files of a
        recording whose snapshot was restarted (docs/decisions/0006), nor for an iteration
        open at a segment rotation: it has a row in both files, the first one incomplete
        with reason ``recording_stopped``, its values split between them (leave those rows
        out to count iterations)."""
        tables = [f.iterations() for f in self.files]
        if not tables:
            return {}
        out = {k: np.concatenate([t[k] for t in tables]) for k in tables[0]}
        out["segment"] = np.concatenate([
            np.full(len(t["iter_index"]), int(f.attrs.get("segment", 0)), dtype=np.int64)
            for f, t in zip(self.files, tables, strict=True)
        ])
        return out

    def by_iteration(self, pv: str, *, pick: str = "last") -> np.ma.MaskedArray:
        """:meth:`RecordingFile.by_iteration` over every segment, aligned with
        :meth:`iterations` (all masked in a segment without the PV; a PV in none of the
        segments is a KeyError, as in :meth:`values`)."""
        values = self.values(pv)  # picked from the recording's values: in their dtype
        firsts, counts = [], []
        rows = 0
        for f in self.files:
            if pv in f.pv_names:
                first, count = f.first_count(pv)
                firsts.append(np.asarray(first, dtype=np.int64) + rows)
                counts.append(np.asarray(count, dtype=np.int64))
                rows += f.row_count(pv)
            else:
                n = len(f.iterations()["iter_index"])
                firsts.append(np.zeros(n, dtype=np.int64))
                counts.append(np.zeros(n, dtype=np.int64))
        if rows > len(values):  # an index past the values read: name the file that lacks them
            for f in self.files:
                if pv in f.pv_names and len(f.values(pv)) < f.row_count(pv):
                    raise DamagedFileError(
                        f"{f.path}: damaged: {pv!r} has {len(f.values(pv))} values, its "
                        f"index {f.row_count(pv)} rows")
        return _pick(values, np.concatenate(firsts), np.concatenate(counts), pick)

    def table(self, pvs: Iterable[str] | None = None, *, pick: str = "last"
              ) -> dict[str, npt.NDArray[Any]]:
        """:meth:`RecordingFile.table` over every segment, with their ``segment`` column."""
        if pvs is None:
            names: dict[str, None] = {}
            for f in self.files:
                names.update(dict.fromkeys(_scalar_pvs(f.summary())))
            pvs = list(names)
        names_list = list(pvs)
        return aligned_table(self.iterations(),
                             {pv: self.by_iteration(pv, pick=pick) for pv in names_list})

    def trains(self) -> Iterator[Train]:
        for f in self.files:
            yield from f.trains()

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _one_recording(files: Sequence[RecordingFile]) -> None:
    """Raise :class:`FileFormatError` unless ``files`` are distinct files of one recording."""
    uids: dict[str, list[RecordingFile]] = {}
    for f in files:
        uids.setdefault(str(f.attrs.get("recording_uid", "")), []).append(f)
    if len(uids) > 1:
        which = "; ".join(f"{uid or '(none)'} (run {plain(fs[0].attrs.get('run_name'))!r}): "
                          + ", ".join(str(f.path) for f in fs) for uid, fs in uids.items())
        raise FileFormatError(f"these files belong to {len(uids)} recordings, not one: {which}."
                              " Open each recording on its own (`k2eg-recorder ls` lists them)")
    seen: dict[tuple[int, int], RecordingFile] = {}
    for f in files:
        try:
            st = os.stat(f.path)
        except FileNotFoundError:  # a .partial finalized since it was opened (its final
            continue  # file, if given too, is left out by _without_finalized_partials)
        if (st.st_dev, st.st_ino) in seen:
            raise FileFormatError(f"{f.path} given twice (as {seen[st.st_dev, st.st_ino].path})")
        seen[st.st_dev, st.st_ino] = f


def _without_finalized_partials(files: list[RecordingFile]) -> list[RecordingFile]:
    """``files`` without a live ``NAME.h5.partial`` whose finalized ``NAME.h5`` (same
    segment) is among them, closed: finalization writes the final file before it removes
    the ``.partial`` (a writer killed in between leaves both until ``recover``), and the
    final file holds every iteration of it; chained both, each would come twice."""
    finals = {(f.path.resolve(), f.attrs.get("segment")) for f in files if f.layout != "live"}
    kept = []
    for f in files:
        if f.layout == "live" and (final_path(f.path).resolve(),
                                   f.attrs.get("segment")) in finals:
            f.close()
        else:
            kept.append(f)
    return kept


def _now_at(path: Path) -> Path:
    """``path``, or its final file when it is a ``.partial`` finalized since it was listed
    (a segment rotated, the run ended: the directory is read beside the writer); ``path``
    when neither exists (opening it says so)."""
    from recorder.catalog import now_at

    return now_at(path) or path


def _now_at_all(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """:func:`_now_at` of each path; a ``.partial`` finalized since into a file also given
    (listed between the rename and the removal) once, as that file."""
    given = [Path(p) for p in paths]
    names = {p.resolve() for p in given}
    out = []
    for p in given:
        now = _now_at(p)
        if now == p or now.resolve() not in names:
            out.append(now)
    return out


def _open_now(path: Path, names: Container[Path]) -> RecordingFile | None:
    """``RecordingFile(path)``; a ``.partial`` finalized since :func:`_now_at` found it
    (while the files before it opened) from its final file, None when that file is among
    ``names`` (the resolved paths opened with it) already."""
    try:
        return RecordingFile(path)
    except FileNotFoundError:
        now = _now_at(path)
        if now == path:
            raise
        return None if now.resolve() in names else RecordingFile(now)


def open_file(path: str | os.PathLike[str]) -> RecordingFile:
    return RecordingFile(path)


class SkippedFileWarning(RuntimeWarning):
    """:func:`open_recording` could not read a file beside the recording's: it may be one of
    its segments (then missing from the :class:`Recording`) or another recording's. The
    recording's ``skipped`` lists them (path, why)."""


def _recording_files(directory: Path) -> tuple[dict[str, list[Path]], list[tuple[Path, str]]]:
    """The k2eg-recorder files of ``directory`` (``.partial`` ones too; the files ``ls``
    takes, :func:`recorder.catalog.candidates`) by recording_uid, and those that could not
    be read (path, why)."""
    from recorder.catalog import candidates

    found: dict[str, list[Path]] = {}
    unread: list[tuple[Path, str]] = []
    for p in _now_at_all(candidates([directory])[0]):
        try:
            with open_for_reading(p, live_first=p.suffix == ".partial") as h:
                if plain(h.attrs.get("format")) == "k2eg-recorder":
                    found.setdefault(str(plain(h.attrs.get("recording_uid"))), []).append(p)
        except (OSError, KeyError, RuntimeError) as exc:  # unreadable, damaged: not chained
            unread.append((p, f"{type(exc).__name__}: {exc}"))
    return found, unread


def _skipped(rec: Recording, unread: list[tuple[Path, str]]) -> Recording:
    """``rec`` told of the files beside it that could not be read (a warning each)."""
    rec.skipped = list(unread)
    for p, why in unread:
        warnings.warn(f"{p} could not be read ({why}); if it is a segment of this recording, "
                      "the recording lacks it", SkippedFileWarning, stacklevel=3)
    return rec


def open_recording(paths: Iterable[str | os.PathLike[str]] | str | os.PathLike[str]) -> Recording:
    """Open all segments of a recording: a list of its files; one of them (a file path: the
    files of its directory with the same ``recording_uid``, ``.partial`` ones too); or a
    directory holding the files of one recording. Files of several recordings are a
    :class:`FileFormatError` (:func:`recorder.catalog.find_recordings` tells them apart).
    A ``.partial`` finalized since it was listed or given is read from its final file."""
    if isinstance(paths, (str, os.PathLike)):
        path = Path(paths)
        found, unread = _recording_files(path if path.is_dir() else path.parent)
        if path.is_dir():
            if len(found) != 1:
                raise FileFormatError(
                    f"{path} holds the files of {len(found)} recordings; open_recording "
                    "takes a directory of one (or one of its files): "
                    "recorder.catalog.find_recordings / `k2eg-recorder ls` list them")
            return _skipped(Recording(next(iter(found.values()))), unread)
        path = _now_at(path)
        with RecordingFile(path) as first:
            uid = str(first.attrs.get("recording_uid"))
        return _skipped(Recording(found.get(uid, [path])), unread)
    return Recording(paths)
