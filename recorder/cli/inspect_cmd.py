"""``k2eg-recorder inspect FILE``: a readable summary of a recorded file."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

HELP = "summarize a recorded HDF5 file"
T = TypeVar("T")


TIMEOUT_S = 300.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from recorder.cli.argtypes import positive_seconds

    parser.add_argument("file", type=Path, help="a .h5 file (or a .h5.partial being written)")
    parser.add_argument(
        "--timeout", type=positive_seconds, default=TIMEOUT_S, metavar="SECONDS",
        help="give up on a file that does not answer within this long (HDF5 loops for ever "
        f"on some damaged files; Ctrl-C ends it too; default {TIMEOUT_S:g})")


def _t(ns: int | None) -> str:
    """An EPICS time (0 is a real one: 1970-01-01, a record never processed), ``-`` for none."""
    if ns is None:
        return "-"
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat(timespec="milliseconds")


def quietly_opened(opener: Callable[[Path], T], path: Path) -> T:
    """``opener(path)``; the files beside a recording that could not be read (its
    ``skipped``: a segment of it would be missing) are said on stderr, one line each,
    instead of as Python warnings."""
    import warnings

    from recorder.reader import SkippedFileWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedFileWarning)
        opened = opener(path)
    for p, why in getattr(opened, "skipped", ()):
        print(f"{p}: could not be read ({why}); if it is a segment of this recording, it is "
              "missing here", file=sys.stderr)
    return opened


def open_or_report(path: Path, opener: Callable[[Path], T], command: str = "inspect"
                   ) -> T | None:
    """``opener(path)``, or None after saying on stderr why the file cannot be read (missing,
    not a file, not HDF5, not ours): what ``inspect`` and ``export`` tell their users. A
    ``.partial`` finalized since it was named is read as its final file (said on stderr)."""
    from recorder.cli.data_paths import finalized_since
    from recorder.errors import FileFormatError

    path = finalized_since(path, command)

    try:
        path.is_file()
    except OSError as exc:  # a name too long, a directory on the way not searchable
        print(f"{path}: cannot open: {exc.strerror or exc}", file=sys.stderr)
        return None
    if not path.is_file():
        print(f"{path}: {'not a file' if path.exists() else 'no such file'}", file=sys.stderr)
        return None
    try:
        return quietly_opened(opener, path)
    except FileFormatError as exc:
        print(str(exc), file=sys.stderr)  # names the file
    except OSError as exc:  # h5py's text: "Unable to synchronously open file (<why>)"
        why = str(exc)
        if "file signature not found" in why:
            why = "not an HDF5 file"
        print(f"{path}: cannot open: {why}", file=sys.stderr)
    return None


def run(args: argparse.Namespace) -> int:
    """The summary is printed by a forked worker process (:mod:`recorder.deadline`), which
    is killed when it does not answer within ``--timeout``."""
    import functools

    from recorder.cli import OUTPUT_FULL
    from recorder.deadline import DeadlineWorker

    with DeadlineWorker(args.timeout) as worker:
        try:
            return worker.call(functools.partial(_summarize, args), args.file)
        except BrokenPipeError:
            raise  # the reader of our output left (`| head`): the CLI says so
        except OSError as exc:
            if exc.errno in OUTPUT_FULL:
                raise  # our output could not be written (a full disk): the CLI says so
            print(f"{args.file}: cannot read: {exc}", file=sys.stderr)
            return 1


def _summarize(args: argparse.Namespace, _path: Path) -> int:
    try:
        return _print_summary(args)
    finally:
        with contextlib.suppress(BrokenPipeError):
            sys.stdout.flush()
            sys.stderr.flush()


def _print_summary(args: argparse.Namespace) -> int:
    from recorder.catalog import live_status
    from recorder.reader import open_file

    path: Path = args.file
    f = open_or_report(path, open_file)
    if f is None:
        return 1
    with f:
        a = f.attrs
        print(f"file      {args.file}")
        print(f"format    {a.get('format')} {a.get('format_version')} ({f.layout} layout)")
        print(f"run       {a.get('run_name')}  recording {a.get('recording_uid')} "
              f"seq {a.get('recording_seq')} segment {a.get('segment')}")
        print(f"snapshot  {a.get('snapshot_name', '-')}  {snapshot_mode(a)}")
        reason = a.get("status_reason") or ""
        status = f.status
        end = a.get("end_time", "(still recording)")
        if f.layout == "live":  # a .partial: "recording" only while a writer holds it
            status = live_status(status, path)
            if status == "unfinished":
                reason = reason or ("no writer holds this file: a crashed or failed recording; "
                                    "k2eg-recorder recover makes it a finalized file")
                end = "(not finalized)"
        print(f"status    {status}" + (f" ({reason})" if reason else ""))
        print(f"time      {a.get('start_time')} .. {end}")
        its = f.iterations()
        n = len(its["iter_index"])
        complete = int((its["status"] == "complete").sum()) if n else 0
        print(f"iterations {n} ({complete} complete, {n - complete} incomplete)", end="")
        if n:
            print(f"  iter_index {its['iter_index'][0]}..{its['iter_index'][-1]}")
            print(goes_on_note(its), end="")
        else:
            print()
        print(f"{'PV':40} {'kind':12} {'dtype':10} {'shape':12} {'units':8} {'count':>8}  "
              "first .. last time")
        for row in f.summary():
            shape = str(row["shape"]) if row["shape"] is not None else "varies"
            print(f"{row['pv']:40} {row['kind']:12} {row['dtype']:10} {shape:12} "
                  f"{row['units'] or '-':8} {row['count']:>8}  "
                  f"{_t(row['first_ns'])} .. {_t(row['last_ns'])}")
    return 0


def goes_on_note(its: dict[str, Any]) -> str:
    """A line on the file's last iteration when it was still open as the file ended (a
    rotation, a crash: ``recording_stopped`` / ``writer_crashed``): the counts above are of
    this file's rows, and a next segment beginning with that iteration completes it."""
    from recorder.sinks.buffer import SPLIT_REASONS

    reason = str(its["reason"][-1])
    if reason not in SPLIT_REASONS:
        return ""
    return (f"           iter_index {its['iter_index'][-1]} was open when this file ended "
            f"({reason}): counted here as this file's row; where the next segment begins "
            "with it, it is one iteration of the recording (as ls and export count it)\n")


def snapshot_mode(a: dict[str, Any]) -> str:
    """``periodic normal: latest values every 100 ms``, ``triggered timedbuffered: ...``
    from a file's ``snapshot_*`` attributes (``type -`` when the sink was used without
    a snapshot)."""
    from recorder.config.models import cadence

    kind = a.get("snapshot_type")
    if kind is None:
        return "type -"
    triggered = bool(a.get("snapshot_triggered", False))
    try:
        what = cadence(triggered=triggered, timedbuffered=kind == "timedbuffered",
                       time_window=int(a.get("snapshot_time_window", 0)),
                       sub_push_delay_msec=int(a.get("snapshot_sub_push_delay_msec", 0) or 0))
    except (TypeError, ValueError):
        what = "?"
    return f"{'triggered' if triggered else 'periodic'} {kind}: {what}"
