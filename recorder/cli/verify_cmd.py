"""``k2eg-recorder verify [PATH ...]``: check recorded files against the file-format spec.

Each file is checked as ``recorder.verify`` describes (root attributes, ``/iterations``,
every PV's NXlog group and its ``first``/``count`` index; a live file at its last complete
commit). ``--data`` also reads every dataset whole, so blocks damaged on disk show up (slow
for big files: it reads them entirely). Without PATH it checks the output directories of
the run definitions the daemon reads (``RECORDER_CONFIG_PATH``). ``--run``, ``--since``,
``--until`` select recordings as ``ls`` does (files with data in the window; files that
cannot be read, or give no answer within ``--file-timeout``, are always checked).

Examples::

    k2eg-recorder verify /data/k2eg-recorder/bpm                # before archiving
    k2eg-recorder verify --data run_20261122T101500Z_0000.h5     # after copying it
    k2eg-recorder verify -q --data --since 26h                   # nightly (systemd timer)
    k2eg-recorder verify /data/k2eg-recorder/bpm --json | jq '.files[] | select(.ok | not)'

A line per file (``ok``, ``WARN`` or ``FAIL``), then its problems, then a total. Exit
status: 0 when no file has an error (warnings allowed), 1 when one has, 2 on bad usage (a
PATH that does not exist, no PATH and no run definitions).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
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
    from recorder.verify import Report

HELP = "check recorded files against the file-format spec"
FILE_TIMEOUT_S = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_paths_argument(parser)
    add_selection_arguments(parser)
    parser.add_argument("--data", action="store_true",
                        help="also read every dataset whole (finds damaged blocks; reads "
                        "the whole file)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="only files with problems, and the total")
    parser.add_argument(
        "--file-timeout", type=positive_seconds, default=FILE_TIMEOUT_S, metavar="SECONDS",
        help="with --run/--since/--until: a file whose run and times do not answer within "
        "this long is checked as one that cannot be read (HDF5 loops for ever on some "
        f"damaged files; default {FILE_TIMEOUT_S:g})")


def run(args: argparse.Namespace) -> int:
    from recorder.catalog import candidates, describe_file, now_at, scan
    from recorder.deadline import DeadlineWorker
    from recorder.verify import verify_file

    paths = paths_to_read(args.paths, "verify")
    window = time_window(args, "verify")
    if paths is None or window is None:
        return 2
    unlisted: list[tuple[Path, str]] = []
    files, missing = candidates(paths, unlisted)
    for p in missing:
        print(f"k2eg-recorder verify: {p}: no such file or directory", file=sys.stderr)
    for p, why in unlisted:
        print(f"k2eg-recorder verify: {p}: {why}", file=sys.stderr)
    if missing or unlisted:
        return 2
    if args.run or args.since or args.until:
        # the files of the selected recordings, and every file that could not be described
        # (it cannot be placed in time or run, and is exactly what needs a look)
        # (each file described in a worker with a deadline, as `ls` does: HDF5 loops for
        # ever on a finalized file whose global heap was zero-filled, which verify names)
        with DeadlineWorker(args.file_timeout) as worker:
            catalog = scan(files, run=args.run, since=window[0], until=window[1],
                           describe=lambda path: worker.call(describe_file, path))
        chosen = {f.path for r in catalog.recordings for f in r.files}
        chosen.update(p for p, _why in catalog.unreadable)
        files = [p for p in files if p in chosen or now_at(p) in chosen]
    reports: list[Report] = []
    for listed in files:
        path = now_at(listed)
        if path is None:
            print(f"k2eg-recorder verify: {listed}: removed since it was listed; not checked",
                  file=sys.stderr)
            continue
        report = verify_file(path, data=args.data)
        reports.append(report)
        if not args.json:
            print_report(report, sys.stdout, quiet=args.quiet)
    if args.json:
        json.dump({"paths": [str(p) for p in paths], "data": args.data,
                   "files": [r.to_json() for r in reports]}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print_total(reports, sys.stdout)
    if args.paths:
        note_subdirectories(paths, "verify")
    return 0 if all(r.ok for r in reports) else 1


def print_report(report: Report, out: TextIO, *, quiet: bool = False) -> None:
    verdict = "FAIL" if not report.ok else "WARN" if report.warnings else "ok"
    if quiet and verdict == "ok":
        return
    what = (f"{report.layout or '?'}, {report.status or '?'}, {report.iterations} "
            f"iterations, {report.pvs} PVs, {report.values} values"
            if report.layout else "")
    print(f"{verdict:4}  {report.path}" + (f"  ({what})" if what else ""), file=out)
    for p in report.problems:
        print(f"      {p.severity}: {p}", file=out)


def print_total(reports: list[Report], out: TextIO) -> None:
    failed = sum(not r.ok for r in reports)
    warned = sum(r.ok and bool(r.warnings) for r in reports)
    n = len(reports)
    print(f"{n} file(s) checked: {n - failed - warned} ok, {warned} with warnings, "
          f"{failed} failed", file=out)
