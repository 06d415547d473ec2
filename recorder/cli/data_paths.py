"""The PATH arguments of the commands that read recorded files (``ls``, ``verify``):
files or directories, by default the output directories of the configured runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_paths_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", type=Path, metavar="PATH",
                        help="directories (not recursive) or files; default: the output "
                        "directories of the run definitions (RECORDER_CONFIG_PATH)")


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """``--run``, ``--since``, ``--until``: which recordings' files (see recorder.catalog)."""
    parser.add_argument("--run", action="append", default=None, metavar="NAME",
                        help="only this run (repeatable)")
    parser.add_argument("--since", metavar="WHEN",
                        help="only files with data after WHEN: ISO 8601 (UTC unless an "
                        "offset is given), now, today, yesterday, or a time ago: 30m, 2h, 1d")
    parser.add_argument("--until", metavar="WHEN", help="only files with data before WHEN")


def time_window(args: argparse.Namespace, command: str) -> tuple[int | None, int | None] | None:
    """``--since`` / ``--until`` as ns since the epoch; None, said on stderr, when one cannot
    be read or the window is empty."""
    from recorder.catalog import parse_when

    try:
        since = None if args.since is None else parse_when(args.since)
        until = None if args.until is None else parse_when(args.until)
    except ValueError as exc:
        print(f"k2eg-recorder {command}: {exc}", file=sys.stderr)
        return None
    if since is not None and until is not None and since > until:
        print(f"k2eg-recorder {command}: --since is after --until: no file can match",
              file=sys.stderr)
        return None
    return since, until


def configured_path() -> tuple[Path | None, str | None]:
    """The run definitions the daemon would load (``RECORDER_CONFIG_PATH``), or (None, why
    not: the bad ``RECORDER_*`` settings, without their values)."""
    from pydantic import ValidationError

    from recorder.config.daemon import DaemonSettings
    from recorder.settings import settings_problems

    try:
        return DaemonSettings().config_path, None
    except ValidationError as exc:
        return None, settings_problems(exc).replace("\n", "; ")


def configured_directories() -> tuple[list[Path], str | None, str | None]:
    """The output directories of the configured runs, or ([], why not); and a note when
    the definitions have problems (the directories of runs with errors are not known)."""
    from recorder.config.loader import check_runs

    config, why_not = configured_path()
    if config is None:
        return [], why_not, None
    if not config.exists():
        return [], f"no run definitions at {config} (RECORDER_CONFIG_PATH)", None
    loaded, problems = check_runs(config)
    dirs = list(dict.fromkeys(Path(d.output.directory) for d in loaded))
    if not dirs:
        why = f"; {len(problems)} problem(s), see k2eg-recorder validate" if problems else ""
        return [], f"no valid run definition at {config}{why}", None
    note = None
    if problems:  # e.g. an edit a reload refused: the daemon still records those runs
        count = len(problems)
        note = (f"{count} problem{'s' if count != 1 else ''} in the run definitions at "
                f"{config}: the output directories of runs with errors are not read "
                "(k2eg-recorder validate lists the problems; or give their PATHs)")
    return dirs, None, note


def finalized_since(path: Path, command: str) -> Path:
    """``path``, or its final file when it is a ``.partial`` finalized since it was named
    (what ``status`` showed as a run's current file, a segment rotated since): said on
    stderr."""
    from recorder.catalog import now_at

    try:
        if path.exists():
            return path
    except OSError:  # cannot be looked up (too long, no search permission): said by the caller
        return path
    moved = now_at(path)
    if moved is None:
        return path
    print(f"k2eg-recorder {command}: {path}: finalized since; reading {moved}", file=sys.stderr)
    return moved


def paths_to_read(paths: list[Path], command: str) -> list[Path] | None:
    """``paths`` (a ``.partial`` finalized since: its final file, :func:`finalized_since`),
    or when none are given the configured output directories that exist (a
    run that has not recorded yet has none); None, said on stderr, when there are neither."""
    if paths:
        return [finalized_since(p, command) for p in paths]
    found, why, note = configured_directories()
    if note is not None:
        print(f"k2eg-recorder {command}: {note}", file=sys.stderr)
    if not found:
        print(f"k2eg-recorder {command}: give a PATH ({why})", file=sys.stderr)
        return None
    return [p for p in found if p.exists()]


def note_subdirectories(paths: list[Path], command: str) -> None:
    """Say on stderr which of ``paths`` are directories without recorder files of their own
    whose subdirectories have some (PATHs are not searched recursively: ``ls /data`` of
    ``/data/<run>/`` finds nothing, and would otherwise only say so)."""
    from recorder.catalog import candidates

    for p in paths:
        try:
            if not p.is_dir() or candidates([p])[0]:
                continue
        except OSError:  # cannot be looked up: the command says so for the path itself
            continue
        try:
            subdirs = sorted(c for c in p.iterdir() if c.is_dir() and candidates([c])[0])
        except OSError:  # cannot be listed: the command says so for the path itself
            continue
        if subdirs:
            shown = ", ".join(str(d) for d in subdirs[:5]) + (", ..." if len(subdirs) > 5 else "")
            print(f"k2eg-recorder {command}: {p}: no recorder files in it (directories are not "
                  f"searched recursively); its subdirectories with files: {shown} "
                  f"(e.g. k2eg-recorder {command} {p}/*)", file=sys.stderr)
