"""``k2eg-recorder ls [PATH ...]``: the recordings on disk, one line each.

Without PATH it lists the output directories of the run definitions the daemon reads
(``RECORDER_CONFIG_PATH``). One line per recording (its segment files together): run, start
and end (UTC), status, files, iterations (incomplete ones in brackets; an iteration split
between two files by a rotation or a crash counts once), values, size; a recording that is not
complete also gets its reason. ``--files`` adds a line per file (counting its own rows),
``--json`` prints one JSON document instead (for scripts and catalogs).

Examples::

    k2eg-recorder ls                                   # every configured run's directory
    k2eg-recorder ls /data/k2eg-recorder/bpm --since 2h
    k2eg-recorder ls /data/k2eg-recorder/* --run bpm-10hz --since 2026-11-22 --until 2026-11-23
    k2eg-recorder ls /data/k2eg-recorder/bpm --json | jq '.recordings[].files[].path'

Each file is read in a worker process: one that does not answer within ``--file-timeout``
(HDF5 loops for ever on some damaged files) is reported as unreadable and the rest listed.

Exit status: 0, 1 when a file could not be read or a file given by name is not a
k2eg-recorder file (named on stderr, the rest is listed),
2 on bad usage (a time it cannot read, a PATH that does not exist, no PATH and no readable
run definitions).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, TextIO

from recorder.cli.argtypes import positive_seconds
from recorder.cli.data_paths import (
    add_paths_argument,
    add_selection_arguments,
    note_subdirectories,
    paths_to_read,
    time_window,
)

if TYPE_CHECKING:
    from recorder.catalog import Catalog, RecordingEntry

HELP = "list the recordings on disk (run, time span, status, files)"
FILE_TIMEOUT_S = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_paths_argument(parser)
    add_selection_arguments(parser)
    parser.add_argument("--files", action="store_true", help="also a line per file")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--file-timeout", type=positive_seconds, default=FILE_TIMEOUT_S, metavar="SECONDS",
        help="a file that does not answer within this long is reported as unreadable and "
        f"the others are listed (HDF5 loops for ever on some damaged files; default "
        f"{FILE_TIMEOUT_S:g})")


def run(args: argparse.Namespace) -> int:
    from recorder.catalog import describe_file, scan
    from recorder.deadline import DeadlineWorker

    paths = paths_to_read(args.paths, "ls")
    if paths is None:
        return 2
    window = time_window(args, "ls")
    if window is None:
        return 2
    since, until = window
    with DeadlineWorker(args.file_timeout) as worker:
        catalog = scan(paths, run=args.run, since=since, until=until,
                       describe=lambda path: worker.call(describe_file, path))
    if catalog.missing:
        for p in catalog.missing:
            print(f"k2eg-recorder ls: {p}: no such file or directory", file=sys.stderr)
        return 2
    if args.json:
        document = {
            "paths": [str(p) for p in paths],
            "recordings": [r.to_json() for r in catalog.recordings],
            "unreadable": [{"path": str(p), "error": why} for p, why in catalog.unreadable],
            "foreign": [str(p) for p in catalog.foreign],
        }
        json.dump(document, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print_table(catalog, sys.stdout, files=args.files)
    for p, why in catalog.unreadable:
        print(f"{p}: cannot read: {why}", file=sys.stderr)
    named = {p.resolve() for p in paths}  # (a directory is never one of catalog.foreign)
    not_ours = [p for p in catalog.foreign if p.resolve() in named]
    for p in not_ours:  # given by name (in a directory such files are only counted)
        print(f"{p}: not a k2eg-recorder file", file=sys.stderr)
    if args.paths:
        note_subdirectories(paths, "ls")
    return 1 if catalog.unreadable or not_ours else 0


def print_table(catalog: Catalog, out: TextIO, *, files: bool = False) -> None:
    from recorder.daemon.diskspace import format_bytes

    recs = catalog.recordings
    if not recs:
        print("no recordings", file=out)
    else:
        width = max(3, *(len(r.run) for r in recs))
        print(f"{'run':{width}}  {'start (UTC)':23}  {'end (UTC)':23}  {'status':10}  "
              f"{'files':>5}  {'iterations (incomplete)':>23}  {'values':>12}  "
              f"{'size':>10}", file=out)
        for r in recs:
            print(f"{r.run:{width}}  {_t(r.start_ns)}  {_t(r.end_ns)}  {r.status:10}  "
                  f"{len(r.files):>5}  {_iterations(r.iterations, r.incomplete):>23}  "
                  f"{r.values:>12,}  {format_bytes(r.bytes):>10}", file=out)
            for note in _notes(r):
                print(f"{'':{width}}  {note}", file=out)
            if files:
                for f in r.files:
                    print(f"{'':{width}}    {f.segment:04d}  {f.status:10}  "
                          f"{_t(f.start_ns)} .. {_t(f.end_ns)}  "
                          f"{_iterations(f.iterations, f.incomplete)} its  {f.path}", file=out)
        n_files = sum(len(r.files) for r in recs)
        total = sum(r.bytes for r in recs)
        print(f"{len(recs)} recording(s), {n_files} file(s), {format_bytes(total)}", file=out)
    unfinished = sum(f.status == "unfinished" for r in recs for f in r.files)
    if unfinished:
        print(f"{unfinished} file(s) unfinished: .partial, and no writer has them (left by a "
              "crash or a failed writer); k2eg-recorder recover DIR finalizes them", file=out)
    if catalog.foreign:
        print(f"{len(catalog.foreign)} file(s) skipped: not k2eg-recorder files", file=out)


def _notes(r: RecordingEntry) -> list[str]:
    if r.status in ("failed", "aborted") and r.reason:
        return [f"{r.status}: {r.reason}"]
    return []


def _iterations(n: int, incomplete: int) -> str:
    return f"{n:,} ({incomplete:,})"


def _t(ns: int) -> str:
    from recorder.catalog import utc

    return utc(ns).strftime("%Y-%m-%d %H:%M:%S.%f")[:23]
