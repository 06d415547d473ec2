"""``k2eg-recorder recover PATH...``: finalize files left by a crashed writer.

Files a running writer holds (its writer lock, :mod:`recorder.sinks.writelock`) are left
alone and named, so this is safe to run while the daemon records into the same directory.
Each recovered file is then checked against the file-format spec (``recorder.verify``,
structure and index; ``--no-verify`` skips it). Exit status 1 when a file could not be
recovered or its recovered file does not pass.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "make files left by a crashed writer clean and mark them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths", nargs="+", type=Path, help="*.h5.partial files or directories to scan"
    )
    parser.add_argument("--no-verify", action="store_true",
                        help="do not check the recovered files (k2eg-recorder verify)")


def run(args: argparse.Namespace) -> int:
    from recorder.errors import FileBusyError
    from recorder.sinks.recover import find_partials, recover_file
    from recorder.verify import verify_file

    files: list[Path] = []
    failures = busy = 0
    for p in args.paths:
        if not p.exists():
            print(f"{p}: no such file or directory")
            failures += 1
            continue
        try:
            files.extend(find_partials(p) if p.is_dir() else [p])
        except OSError as exc:  # a directory that cannot be listed
            print(f"{p}: cannot list the directory: {exc.strerror or exc}")
            failures += 1
    for p in files:
        try:
            out = recover_file(p)
        except FileBusyError:
            print(f"{p}: left alone: a running writer is writing it")
            busy += 1
            continue
        except (OSError, ValueError, RuntimeError) as exc:
            print(f"{p}: NOT recovered: {exc}")
            failures += 1
            continue
        if args.no_verify:
            print(f"{p} -> {out}")
            continue
        errors = verify_file(out).errors
        if errors:
            print(f"{p} -> {out}: does NOT pass k2eg-recorder verify ({len(errors)} "
                  f"error(s)); the first: {errors[0]}")
            failures += 1
        else:
            print(f"{p} -> {out} (verified)")
    if (not files or busy == len(files)) and not failures:
        print("nothing to recover")
    return 1 if failures else 0
