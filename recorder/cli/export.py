"""``k2eg-recorder export FILE``: PVs side by side, one CSV row per iteration.

For a spreadsheet or a tool that does not read HDF5: the whole recording FILE belongs to (all
its segments in FILE's directory, unless ``--only-file``), one row per iteration with
``iter_index``, ``segment``, ``status``, the header time (ISO 8601 UTC and ns), ``tags`` (a
triggered iteration's trigger tags as a JSON object; empty when none), then one column per PV: its
value in that iteration (the last one; ``--pick first``), empty where it has none (a NaN the
PV sent prints as ``nan``: it is a value, not a gap); integers, enum indices and booleans
print as ``10``, ``2``, ``True``. Scalar, boolean, enum (the index)
and string PVs; by default all of them, or ``--pv NAME`` (repeat). An iteration open at a
segment rotation (or cut by a crash and resumed) has a row in each of its two files; the CSV
has one row for it, with the values of both and the status of the later one.

Examples::

    k2eg-recorder export /data/bpm/bpm-10hz_20261122T130002Z_0000.h5 -o bpm.csv
    k2eg-recorder export FILE --pv LINAC:BPM1:X --pv LINAC:BPM2:X | head
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import io
import json
import math
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from recorder.cli.argtypes import given_path

if TYPE_CHECKING:
    from recorder.reader import Recording, RecordingFile

HELP = "PVs side by side, one CSV row per iteration"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="a .h5 file of the recording (or .h5.partial)")
    parser.add_argument("--pv", action="append", default=None, metavar="NAME",
                        help="this PV (repeatable; default: every scalar/bool/enum/string PV)")
    parser.add_argument("--pick", choices=("last", "first"), default="last",
                        help="the value of an iteration holding several (timedbuffered)")
    parser.add_argument("--only-file", action="store_true",
                        help="this file only, not every segment of its recording")
    parser.add_argument("-o", "--output", type=_output, default=None,
                        help="CSV file to write (default, or -: standard output)")


def _output(text: str) -> Path | None:
    """``-o``: a file, or ``-`` (and nothing) for standard output."""
    return None if text == "-" else given_path(text)


def _iso(ns: int) -> str:
    if not ns:
        return ""
    stamp = dt.datetime.fromtimestamp(ns // 1000 / 1e6, dt.UTC)
    return stamp.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _cell(value: Any, gap: bool) -> Any:
    """A CSV cell: empty where the iteration has no value (``gap``, or a sample without a
    value: None); a NaN the PV sent is a value and prints as ``nan``."""
    if gap or value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def _texts(column: Any, stored: str = "") -> list[Any]:
    """A column's cells: float32 as float32 prints (``9.510565``, not its float64 widening);
    integers, enum indices and booleans of a PV stored as such (``stored``: its storage
    dtype) as ``10`` and ``True`` even where gaps made the table column float64 (the gaps'
    NaN become None)."""
    import numpy as np

    if column.dtype == np.float32:
        return [str(v) for v in column]
    kind = _kind_of(stored)
    if column.dtype.kind == "f" and kind in ("i", "u", "b"):
        return [_as_stored(v, kind) for v in column.tolist()]
    if column.dtype == object:  # a value of another kind after the PV changed type
        return [_other(v) for v in column.tolist()]
    return list(column.tolist())


def _other(value: Any) -> Any:
    """A value of an object column as its cell: an enum value as its index, an array (a
    waveform, a string array) as a JSON list of its exact values, others as they are."""
    from recorder.client.values import EnumValue

    if isinstance(value, EnumValue):
        return value.index
    if isinstance(value, list | tuple) or getattr(value, "ndim", 0) != 0:
        items = value.tolist() if hasattr(value, "tolist") else list(value)
        return json.dumps(items, ensure_ascii=False, default=_plain)
    return value


def _plain(value: Any) -> Any:
    """A numpy scalar or array inside a list, for ``json.dumps`` (others as text)."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _as_stored(value: float, kind: str) -> Any:
    """A float of an integer or boolean PV's table column as the PV sent it: None for a gap
    (NaN), ``10`` / ``True`` where it is one, else the float itself (a value sent after the
    PV changed type: 2.75 is not 2)."""
    if value != value:  # noqa: PLR0124
        return None
    if kind == "b":
        return bool(value) if value in (0.0, 1.0) else value
    return int(value) if value.is_integer() else value


def _kind_of(stored: str) -> str:
    """numpy kind of a storage dtype name (``int64``, ``bool``...), ``""`` for others."""
    import numpy as np

    try:
        return np.dtype(stored).kind
    except TypeError:  # utf-8, table, none
        return ""


def _regular(out: TextIO) -> bool:
    """Whether ``out`` is a regular file (not ``-o /dev/stdout``, a FIFO, a device)."""
    try:
        return stat.S_ISREG(os.fstat(out.fileno()).st_mode)
    except OSError:
        return False


def _one_of(output: Path, paths: list[Path]) -> bool:
    """Whether ``output`` is one of ``paths`` (a file being exported). A path that cannot be
    looked up (too long, a directory that may not be searched) is none: opening it for
    writing then says why."""
    for path in paths:
        try:
            if os.path.samefile(output, path):
                return True
        except OSError:
            continue
    return False


def write_csv(table: dict[str, Any], pvs: list[str], out: TextIO,
              stored: dict[str, str] | None = None,
              gaps: dict[str, Any] | None = None, *,
              keys: list[str] | None = None) -> int:
    """The table's rows as CSV (``stored``: each PV's storage dtype; ``gaps``: per PV, True
    in the iterations without a value, the mask of ``by_iteration``; without it a NaN is
    taken for a gap; ``keys``: the table's column of each PV, when not named as the PV);
    returns the number of rows."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["iter_index", "segment", "status", "header_time", "header_timestamp_ns",
                     "tags", *pvs])
    keyed = list(zip(keys or pvs, pvs, strict=True))
    columns = [_texts(table[key], (stored or {}).get(pv, "")) for key, pv in keyed]
    n = len(table["iter_index"])
    holes = [_gaps_of(table[key], (gaps or {}).get(pv)) for key, pv in keyed]
    segments = table["segment"].tolist() if "segment" in table else [""] * n
    tags = table["tags"].tolist() if "tags" in table else [None] * n
    for i in range(n):
        ns = int(table["header_timestamp"][i])
        writer.writerow([int(table["iter_index"][i]), segments[i], table["status"][i],
                         _iso(ns), ns, _tags_cell(tags[i]),
                         *(_cell(c[i], h[i]) for c, h in zip(columns, holes, strict=True))])
    return n


def _tags_cell(tags: Any) -> str:
    """An iteration's trigger tags as a compact JSON object, ``""`` when it has none."""
    return json.dumps(tags, ensure_ascii=False, separators=(",", ":")) if tags else ""


def _gaps_of(column: Any, mask: Any) -> list[bool]:
    """Which rows of a table column are gaps: the ``by_iteration`` mask when known, else
    its NaN (a float column) or None (an object column) rows."""
    import numpy as np

    if not len(column):
        return []
    if mask is not None:
        per_row = np.asarray(mask, dtype=bool).reshape(len(column), -1)
        return [bool(row.all()) for row in per_row]
    if column.dtype.kind == "f":
        return np.isnan(column).tolist()  # type: ignore[no-any-return]
    return [v is None for v in column.tolist()]


def join_split_rows(iterations: dict[str, Any], aligned: dict[str, Any], pick: str
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The rows of ``iterations`` (with ``segment``) and of the PVs' ``aligned`` columns
    (``by_iteration``'s masked arrays) with each iteration that a rotation or a crash split
    between two files in one row: the later one's, its gaps filled from the earlier (with
    ``pick="first"``, the earlier one's values first), its header time too when it has
    none."""
    import numpy as np

    from recorder.sinks.buffer import SPLIT_REASONS

    idx, seg = iterations["iter_index"], iterations["segment"]
    split = [i for i in range(len(idx) - 1)
             if iterations["reason"][i] in SPLIT_REASONS
             and idx[i + 1] == idx[i] and seg[i + 1] > seg[i]]
    if not split:
        return iterations, aligned
    header = iterations["header_timestamp"].copy()
    joined = {}
    for pv, column in aligned.items():
        m = column.copy()
        for i in split:
            earlier_gap, later_gap = (
                bool(np.ma.getmaskarray(m[j]).all()) for j in (i, i + 1))
            if not earlier_gap and (later_gap or pick == "first"):
                m[i + 1] = m[i]
        joined[pv] = m
    for i in split:
        if not header[i + 1]:
            header[i + 1] = header[i]
    keep = np.ones(len(idx), dtype=bool)
    keep[split] = False
    rows = {k: v[keep] for k, v in {**iterations, "header_timestamp": header}.items()}
    return rows, {pv: m[keep] for pv, m in joined.items()}


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from recorder.cli.inspect_cmd import open_or_report
    from recorder.reader import (
        SCALAR_KINDS,
        RecordingFile,
        aligned_table,
        open_file,
        open_recording,
    )

    path: Path = args.file
    opener: Callable[[Path], RecordingFile | Recording] = (
        open_file if args.only_file else open_recording)
    source = open_or_report(path, opener, "export")
    if source is None:
        return 1
    with source:
        files = [source] if isinstance(source, RecordingFile) else source.files
        # over the segments: the kind of the first with values (a PV may have none in the
        # first segment)
        summary = source.summary()
        kinds = {row["pv"]: row["kind"] for row in summary}
        stored = {row["pv"]: row["dtype"] for row in summary}
        exported = {pv for pv, kind in kinds.items() if kind in (*SCALAR_KINDS, "string")}
        allowed = exported | {pv for pv, kind in kinds.items() if kind == "none"}  # empty
        pvs = list(args.pv) if args.pv else [pv for pv in kinds if pv in exported]
        unknown = [pv for pv in pvs if pv not in kinds]
        not_scalar = [pv for pv in pvs if pv in kinds and pv not in allowed]
        if unknown or not_scalar:
            for pv in unknown:
                print(f"{path}: no PV {pv!r} in the recording", file=sys.stderr)
            for pv in not_scalar:
                print(f"{path}: {pv!r} holds {kinds[pv]} values, not one number or text per "
                      "iteration: read it with recorder.reader", file=sys.stderr)
            return 2
        # the table of source.table(), keeping each column's mask: a gap is an empty cell, a
        # NaN the PV sent is "nan"
        aligned = {pv: source.by_iteration(pv, pick=args.pick) for pv in pvs}
        iterations = source.iterations()
        if "segment" not in iterations:  # --only-file: the same columns, its segment number
            iterations["segment"] = np.full(len(iterations["iter_index"]),
                                            int(files[0].attrs.get("segment", 0)))
        iterations, aligned = join_split_rows(iterations, aligned, args.pick)
        # the PV columns under keys no PV name or column of the iterations can be (a PV
        # named "status" or "tags" would replace that column)
        keys = [f"\0{k}" for k in range(len(pvs))]
        table = aligned_table(iterations, {
            key: aligned[pv] for key, pv in zip(keys, pvs, strict=True)})
        table["tags"] = iterations["tags"]
        gaps = {pv: np.ma.getmaskarray(m) for pv, m in aligned.items()}
        if args.output is None:
            if isinstance(sys.stdout, io.TextIOWrapper):  # text the IOC sent not as UTF-8
                sys.stdout.reconfigure(errors="surrogateescape")  # (as -o writes it)
            try:
                write_csv(table, pvs, sys.stdout, stored, gaps, keys=keys)
                sys.stdout.flush()
            except BrokenPipeError:  # `| head`: the reader has what it wanted
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        else:
            if _one_of(args.output, [f.path for f in files]):
                print(f"{args.output}: is a file of the recording being exported; "
                      "not overwritten", file=sys.stderr)
                return 2
            try:
                # a text the IOC sent that is not UTF-8 (lone surrogates in the reader): its
                # bytes as sent
                out = open(args.output, "w", encoding="utf-8",  # noqa: SIM115
                           errors="surrogateescape", newline="")
            except OSError as exc:  # a missing directory, a directory, no permission
                print(f"{args.output}: cannot write: {exc.strerror or exc}", file=sys.stderr)
                return 1
            regular = _regular(out)
            try:
                with out:
                    n = write_csv(table, pvs, out, stored, gaps, keys=keys)
            except BaseException as exc:  # a full disk, Ctrl-C: the rows written so far
                if regular:  # make a well-formed CSV that looks whole: they go
                    with contextlib.suppress(OSError):
                        args.output.unlink()
                if not isinstance(exc, OSError):
                    raise
                print(f"{args.output}: cannot write: {exc.strerror or exc}", file=sys.stderr)
                return 1
            print(f"{args.output}: {n} iterations x {len(pvs)} PVs", file=sys.stderr)
    return 0
