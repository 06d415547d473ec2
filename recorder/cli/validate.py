"""``k2eg-recorder validate PATH``: check run definitions and show what they would record.

A dry run of the daemon's loader: prints each run (snapshot, mode, autostart, PVs), the file
it would create first and the HDF5 groups per PV, then every error as
``file:line: field: message`` on stderr. Exit status 0 when everything is valid, 1 on any
error (also when some runs are valid), 2 on bad usage. An output directory that does not
exist or is not writable here is a note in the run's description, not an error: the daemon
may run on another host or as another user.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from recorder.config.models import RunDefinition

HELP = "check run definitions and show what they would record"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path", nargs="?", help="run-definition file or directory of *.yaml/*.yml files "
        "(default: $RECORDER_CONFIG_PATH, as the daemon)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead")
    parser.add_argument(
        "--schema",
        action="store_true",
        help="print the JSON Schema of run-definition files and exit",
    )
    parser.add_argument(
        "--quiet", "-q", action="store_true", help="print errors only (exit status tells)"
    )


def run(args: argparse.Namespace) -> int:
    from recorder.config.loader import check_runs
    from recorder.config.schema import run_file_schema

    if args.schema:
        json.dump(run_file_schema(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if not args.path:  # what the daemon would load
        from recorder.cli.data_paths import configured_path

        config, why_not = configured_path()
        if config is None:
            print(f"k2eg-recorder validate: give a PATH (invalid settings: {why_not})",
                  file=sys.stderr)
            return 2
        args.path = str(config)
    reserved, why_not = daemon_topics()
    if why_not is not None:
        print(f"note: the daemon's own topics (no snapshot may be published on one) are not "
              f"checked: invalid settings: {why_not}", file=sys.stderr)
    loaded, problems = check_runs(args.path, reserved_topics=reserved)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    described = [describe_run(d, str(loaded.sources[d.name]), now) for d in loaded]
    if args.json:
        document = {
            "path": str(args.path),
            "files": [str(f) for f in loaded.files],
            "valid": not problems,
            "runs": described,
            "errors": [
                {"file": p.file, "line": p.line, "field": p.field, "message": p.message}
                for p in problems
            ],
        }
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif not args.quiet and (loaded.files or not problems):  # not for a path that is not there
        print_runs(described, len(loaded.files), str(args.path), sys.stdout,
                   errors=len(problems))
    if not loaded.files and not problems and Path(args.path).is_dir():
        print(f"note: no *.yaml or *.yml file in {args.path}: the daemon would start with no "
              "runs", file=sys.stderr)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        count = len(problems)
        print(f"{count} error{'s' if count != 1 else ''}: nothing would start", file=sys.stderr)
        return 1
    return 0


def daemon_topics() -> tuple[dict[str, str], str | None]:
    """The topics the daemon of this environment's ``RECORDER_*`` settings refuses a snapshot
    to be published on, as its start and a reload do; ({}, why not) when they are invalid."""
    from pydantic import ValidationError

    from recorder.config.daemon import DaemonSettings, own_topics
    from recorder.settings import KafkaSettings, settings_problems

    try:
        return own_topics(DaemonSettings(), KafkaSettings.from_env()), None
    except ValidationError as exc:
        return {}, settings_problems(exc).replace("\n", "; ")


def describe_run(definition: RunDefinition, source: str, now: dt.datetime) -> dict[str, Any]:
    """What a run would do, as plain data (shared by the text and JSON output)."""
    from recorder.config.models import cadence
    from recorder.sinks.options import render_file_name

    snap = definition.snapshot
    out = definition.output
    first = render_file_name(
        out, run=definition.name, snapshot=snap.snapshot_name, start=now, seq=0
    )
    files = [str(first)]
    if out.segment.enabled:
        second = render_file_name(
            out, run=definition.name, snapshot=snap.snapshot_name, start=now, seq=0, segment=1
        )
        files.append(str(second))
    what = cadence(triggered=snap.triggered, timedbuffered=snap.type.value == "timedbuffered",
                   time_window=snap.time_window, sub_push_delay_msec=snap.sub_push_delay_msec)
    return {
        "name": definition.name,
        "source": source,
        "autostart": definition.autostart,
        "snapshot": snap.snapshot_name,
        "topic": snap.topic,
        "mode": definition.mode,
        "cadence": what,
        "pvs": list(snap.pv_uri_list),
        "pv_field_filter_list": list(snap.pv_field_filter_list),
        "directory": str(out.directory),
        "directory_note": directory_note(Path(out.directory)),
        "files": files,
        "segment": {k: v for k, v in out.segment.model_dump().items() if v is not None},
        "compression": out.compression.value,
        "groups": pv_groups(snap.pv_names),
        "metadata": definition.metadata.file_attributes(),
        "bridge": None if out.bridge is None else {
            k: v for k, v in out.bridge.model_dump().items() if v is not None},
    }


def directory_note(directory: Path) -> str | None:
    """What an operator should know about a run's output directory on this host (as the
    user running ``validate``; the service user may differ), or None when it is ready."""
    try:
        return _directory_note(directory)
    except (OSError, RuntimeError) as exc:  # e.g. a symlink loop, a path the kernel refuses
        return f"warning: cannot be checked on this host: {exc}"


def _directory_note(directory: Path) -> str | None:
    user = getpass.getuser()
    if directory.is_dir():
        if os.access(directory, os.W_OK | os.X_OK):
            return None
        return (f"warning: not writable by {user}: the service user needs write access "
                "(and the unit's ReadWritePaths= must list it)")
    if directory.exists():
        return "warning: exists and is not a directory: the run would fail to start"
    ancestor = directory.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"warning: cannot be created: {ancestor} is not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return (f"warning: does not exist, and {ancestor} is not writable by {user}: create "
                "it, writable by the service user, or the run fails to start")
    return f"note: does not exist yet on this host; created under {ancestor} at the first start"


def pv_groups(pv_names: tuple[str, ...]) -> list[str]:
    """HDF5 group of each PV (one group per base PV name, '/' escaped as the sink does)."""
    try:
        from recorder.sinks.codec import escape_name
    except ImportError:  # pragma: no cover - the sink package is part of the project
        return [f"/pvs/{name}" for name in pv_names]
    return [f"/pvs/{escape_name(name)}" for name in pv_names]


def print_runs(runs: list[dict[str, Any]], n_files: int, path: str, out: TextIO, *,
               errors: int = 0) -> None:
    """The runs ``path`` defines; with ``errors``, the daemon starts none of them (it refuses
    definitions with any error), and the summary says so."""
    starting = [r["name"] for r in runs if r["autostart"]]
    would = ("none would start with the daemon until the errors are fixed" if errors
             else f"{len(starting)} would start with the daemon")
    print(
        f"{len(runs)} valid run{'s' if len(runs) != 1 else ''} in {n_files} "
        f"file{'s' if n_files != 1 else ''} under {path}; {would}",
        file=out,
    )
    for r in runs:
        print(file=out)
        print(f"run {r['name']}  ({r['source']})", file=out)
        rows: list[tuple[str, str]] = [
            ("snapshot", f"{r['snapshot']} -> topic {r['topic']}"),
            ("mode", f"{r['mode']}: {r['cadence']}"),
            (
                "autostart",
                "yes: starts with the daemon"
                if r["autostart"]
                else "no: waits for `k2eg-recorder start " + r["name"] + "`",
            ),
        ]
        rows.extend(
            (f"PVs ({len(r['pvs'])})" if i == 0 else "", pv) for i, pv in enumerate(r["pvs"])
        )
        if r["pv_field_filter_list"]:
            rows.append(("fields", ", ".join(r["pv_field_filter_list"])))
        if r.get("directory_note"):
            rows.append(("directory", f"{r['directory']}: {r['directory_note']}"))
        rows.append(("files", r["files"][0]))
        if len(r["files"]) > 1:
            limits = ", ".join(f"{k}={v}" for k, v in r["segment"].items())
            rows.append(("", f"then {r['files'][1]} ... (new segment at {limits})"))
        else:
            rows.append(("", "one file per recording (no segment limit): it is finalized as a "
                             "whole when the run stops, about 1 µs per value (README: segments)"))
        rows.append(("compression", r["compression"]))
        if r.get("bridge"):
            b = r["bridge"]
            ends = ", ".join(f"{k} {b[k]}" for k in ("rep", "pub") if b.get(k))
            rows.append(("bridge", f"{ends} (Karabo bridge protocol "
                                   f"{b.get('protocol_version')}, docs/bridge.md)"))
        rows.extend(("groups" if i == 0 else "", group) for i, group in enumerate(r["groups"]))
        metadata = {k: v for k, v in r["metadata"].items() if v not in ("", [])}
        if metadata:
            rows.append(("metadata", ", ".join(f"{k}={v}" for k, v in metadata.items())))
        for label, value in rows:
            print(f"  {label:<12} {value}", file=out)
