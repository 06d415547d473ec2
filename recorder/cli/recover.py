"""``k2eg-recorder recover PATH...``: finalize files left by a crashed writer."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "make files left by a crashed writer clean and mark them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths", nargs="+", type=Path, help="*.h5.partial files or directories to scan"
    )


def run(args: argparse.Namespace) -> int:
    from recorder.sinks.recover import find_partials, recover_file

    files: list[Path] = []
    for p in args.paths:
        files.extend(find_partials(p) if p.is_dir() else [p])
    failures = 0
    for p in files:
        try:
            out = recover_file(p)
        except (OSError, ValueError, RuntimeError) as exc:
            print(f"{p}: NOT recovered: {exc}")
            failures += 1
            continue
        print(f"{p} -> {out}")
    if not files:
        print("nothing to recover")
    return 1 if failures else 0
