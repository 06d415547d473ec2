"""``k2eg-recorder start|stop|trigger|status|reload``: admin commands to a running daemon.

Each publishes one command on the admin topic (``RECORDER_ADMIN_TOPIC``), waits for its reply
on ``RECORDER_ADMIN_REPLY_TOPIC`` and prints it; signed with ``RECORDER_ADMIN_SECRET`` when
set. Exit code 0 when the daemon answered ok, 1 for an error reply (or a reply whose
signature does not verify: another secret), 2 for bad arguments (checked before anything is
sent: a run name or tags the daemon would refuse as malformed) or Kafka settings the client
refuses, 3 when no reply came;
``status --check`` exits 4 when the daemon answered but something needs attention (for
monitoring scripts).

Daemons that share one admin topic each answer every command: the replies read within
:data:`REPLY_GRACE_S` of the first (and, after an ``unknown_run`` first, those of the daemons
a ``status`` of the run finds having it) are printed one per line on stderr with the advice
to give each daemon its own admin topic; the exit code is that of the one ``ok`` when the
others are ``unknown_run``, else of the first reply.

Examples::

    k2eg-recorder status                       # a table of every run
    k2eg-recorder status bpm-10hz --json       # the raw status document
    k2eg-recorder status --check               # exit 4 (and say why) if anything needs a look
    k2eg-recorder trigger wf-triggered --tag shot=42 --tag operator=jdoe
    k2eg-recorder stop bpm-10hz
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import TYPE_CHECKING, Any

from recorder.cli.argtypes import not_empty, positive_seconds

if TYPE_CHECKING:
    from recorder.admin.protocol import AdminReply

ADD_ARGUMENTS_TAKES_NAME = True
HELP = "admin commands to a running daemon"
EXIT_ERROR_REPLY = 1
EXIT_NO_REPLY = 3
EXIT_ATTENTION = 4  # status --check: the daemon answered, and something needs attention
REPLY_GRACE_S = 0.5
"""After the first reply, how long other replies to the same command are read: several
daemons that read one admin topic each answer every command."""
SHARED_TOPIC_ADVICE = (
    "several daemons read this admin topic and each answered: give each daemon its own "
    "RECORDER_ADMIN_TOPIC (they may share the status, files and reply topics)"
)


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    if name in ("start", "stop", "trigger"):
        parser.add_argument("run", help="run name")
    elif name == "status":
        parser.add_argument("run", nargs="?", default=None, help="only this run")
        parser.add_argument("--check", action="store_true",
                            help="exit 4 when a run failed, is retrying its start or gets no "
                                 "data, a reload was refused, or a disk the runs write to is "
                                 "low, filling up or not answering (each reason on stderr)")
    if name == "trigger":
        parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                            help="recorded with the iteration (repeatable)")
    default = "120" if name == "stop" else "30"
    parser.add_argument("--timeout", type=positive_seconds, default=None,
                        help=f"seconds to wait for the reply (default: {default})")
    parser.add_argument("--json", action="store_true", help="print the reply as JSON")
    parser.add_argument("--bootstrap", type=not_empty, default=None, metavar="HOST:PORT",
                        help="Kafka bootstrap servers (default: $RECORDER_BOOTSTRAP_SERVERS)")
    parser.add_argument("--verbose", action="store_true",
                        help="also log the Kafka client's warnings (e.g. each failed connection "
                             "attempt) to stderr")


def parse_tags(items: list[str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--tag {item!r}: expected KEY=VALUE")
        if key in tags:
            raise ValueError(f"--tag {item!r}: tag {key!r} is given twice")
        tags[key] = value
    return tags


def _ms(ms: int | None) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def attention(doc: dict[str, Any], only: str | None = None) -> list[str]:
    """What in a status document needs an operator's look (empty: all is well)."""
    daemon = doc.get("daemon", {})
    out = [f"reload refused: {e}" for e in (daemon.get("config_errors") or [])]
    for disk in daemon.get("disks") or []:
        runs = set(disk.get("runs") or ())
        if disk.get("warning") and (only is None or only in runs):
            out.append(f"disk {disk.get('path')}: {disk['warning']}")
    for name, r in sorted((doc.get("runs") or {}).items()):
        if only is not None and name != only:
            continue
        state = r.get("state")
        why = f": {r['last_error']}" if r.get("last_error") else ""
        if state == "failed":
            out.append(f"run {name} is failed{why} (k2eg-recorder start {name} tries again; "
                       f"k2eg-recorder stop {name} ends its recording)")
        elif state == "retrying":
            out.append(f"run {name} is retrying{why}")
        if r.get("silent_since"):
            out.append(f"run {name} gets no data from the gateway since "
                       f"{_ms(r['silent_since'])} UTC")
    left_out = doc.get("runs_left_out") or {}
    if only is None and left_out.get("needing_a_look"):
        out.append(f"{left_out['needing_a_look']} more run(s) failed, retrying or silent, left "
                   "out of the status to fit one Kafka message (k2eg-recorder status RUN shows "
                   "one; the daemon's log names them)")
    return out


DISK_RUNS_SHOWN = 5
"""Runs named on a disk's line of the status table, at most: then how many write there (200
runs on one filesystem made it one line of ~1,800 characters)."""


def disk_line(disk: dict[str, Any], only: str | None = None) -> str:
    """``disk /data: 812.3 GiB free of 931.5 GiB (87.2%), full in ~22 h (runs a, b)``; the
    first :data:`DISK_RUNS_SHOWN` runs (``only`` first), then ``... N in all``."""
    from recorder.daemon.diskspace import format_bytes, format_duration

    free, total = disk.get("free_bytes"), disk.get("total_bytes")
    if free is None or not total:
        text = f"disk {disk.get('path')}: free space unknown"
    else:
        text = (f"disk {disk.get('path')}: {format_bytes(free)} free of {format_bytes(total)} "
                f"({100 * free / total:.1f}%)")
        if disk.get("full_in_s") is not None:
            text += f", full in {format_duration(disk['full_in_s'])}"
    runs = list(disk.get("runs") or ())
    if not runs:
        return text
    if only is not None and only in runs:
        shown = [only] if len(runs) > DISK_RUNS_SHOWN else runs
    else:
        shown = runs[:DISK_RUNS_SHOWN]
    names = ", ".join(shown) + (f", ... {len(runs)} in all" if len(shown) < len(runs) else "")
    return f"{text} (run{'s' if len(runs) != 1 else ''} {names})"


def status_table(doc: dict[str, Any], only: str | None = None) -> str:
    """A readable table of a status document."""
    d = doc.get("daemon", {})
    lines = [
        f"daemon {d.get('instance')} {d.get('state')} pid {d.get('pid')} version "
        f"{d.get('version')} up {d.get('uptime_s', 0):.0f} s config {d.get('config_path')}"
    ]
    for error in d.get("config_errors") or []:
        lines.append(f"  reload refused: {error}")
    for disk in d.get("disks") or []:
        if only is not None and only not in (disk.get("runs") or ()):
            continue
        lines.append(disk_line(disk, only))
        if disk.get("warning"):
            lines.append(f"  ! {disk['warning']}")
    header = (f"{'RUN':28} {'STATE':10} {'MODE':24} {'COMPLETE':>8} {'INCOMPL':>7} "
              f"{'LAST IT':>8} {'LAG':>5} {'ERR':>4}  FILE / LAST ERROR")
    lines.append(header)
    for name, r in sorted((doc.get("runs") or {}).items()):
        if only is not None and name != only:
            continue
        its = r.get("iterations", {})
        last = r.get("last_iteration")
        lag = r.get("lag")
        tail = r.get("current_file") or ""
        if r.get("last_error"):
            tail = f"{tail}  ! {r['last_error']}".strip()
        lines.append(
            f"{name:28} {r.get('state', '?'):10} {r.get('mode', ''):24} "
            f"{its.get('complete', 0):>8} {its.get('incomplete', 0):>7} "
            f"{'-' if last is None else last:>8} {'-' if lag is None else lag:>5} "
            f"{r.get('errors', 0):>4}  {tail}"
        )
        if r.get("silent_since"):
            lines.append(f"  silent since {_ms(r['silent_since'])} UTC: no data from the "
                         f"gateway; its snapshot start is re-sent with backoff")
        if r.get("writer_behind_since"):
            lines.append(f"  writing behind since {_ms(r['writer_behind_since'])} UTC: its topic "
                         f"is paused until the writer catches up (paused "
                         f"{r.get('backpressure_pauses', 0)} time(s) so far)")
        bridge = r.get("bridge")
        if bridge:
            endpoints = " ".join(f"{k} {v}" for k, v in sorted((bridge.get("endpoints") or {})
                                                               .items()))
            line = (f"  bridge {bridge.get('status', '?')} {endpoints or '(no endpoint)'} "
                    f"served {bridge.get('served', 0)} published {bridge.get('published', 0)}"
                    f"{' (subscribed)' if bridge.get('subscribers') else ''}")
            if bridge.get("reason"):
                line += f"  ! {bridge['reason']}"
            lines.append(line)
    left_out = doc.get("runs_left_out") or {}
    if only is None and left_out.get("count"):
        lines.append(f"... {left_out['count']} more run(s) not shown: the status is kept to one "
                     "Kafka message (k2eg-recorder status RUN shows one)")
    return "\n".join(lines)


def reply_text(reply: AdminReply) -> str:
    """A reply as printed: ``code: message``, then its files and problems one per line (and
    not in the message again)."""
    data = reply.data or {}
    problems = [str(p) for p in data.get("problems") or []]
    files = [str(f) for f in data.get("files") or []]
    message = reply.message
    if problems and "; ".join(problems) in message:  # listed below, one per line
        message = message.replace("; ".join(problems), "").rstrip(": ")
    if files and message.endswith("; files: " + ", ".join(files)):
        message = message.removesuffix("; files: " + ", ".join(files))
    lines = [f"{reply.code.value}: {message}"]
    lines.extend(f"  {path}" for path in files)
    lines.extend(f"  {problem}" for problem in problems)
    return "\n".join(lines)


CLOCK_HINT_MS = 2000
"""How far the daemon's clock (a reply's ``replied_at``) and this host's (when the reply was
read) may be apart before an ``expired`` reply is put down to them: a reply's way from the
daemon to here takes milliseconds."""


def clock_hint(reply: AdminReply, received_at_ms: int | None) -> str | None:
    """What an ``expired`` reply is due to when this host's clock and the daemon's differ
    (the command is dated by this host, judged by the daemon's clock); None otherwise."""
    from recorder.admin.protocol import ReplyCode

    if reply.code is not ReplyCode.EXPIRED or received_at_ms is None:
        return None
    apart_ms = reply.replied_at - received_at_ms
    if abs(apart_ms) < CLOCK_HINT_MS:
        return None
    said = "behind" if apart_ms > 0 else "ahead of"
    return (f"this host's clock is about {abs(apart_ms) / 1000:.0f} s {said} the daemon's "
            f"(its reply is dated {_ms(reply.replied_at)} UTC, read here at "
            f"{_ms(received_at_ms)} UTC): commands are "
            "dated by this host and judged by the daemon's clock; synchronize the clocks "
            "(NTP, chrony)")


def chosen_reply(replies: list[AdminReply]) -> AdminReply:
    """The reply the CLI acts on among those of several daemons: the ``ok`` when exactly one
    daemon answered ok and every other one ``unknown_run`` (the run is that daemon's), else
    the first."""
    from recorder.admin.protocol import ReplyCode

    ok = [r for r in replies if r.ok]
    if len(ok) == 1 and all(r.ok or r.code is ReplyCode.UNKNOWN_RUN for r in replies):
        return ok[0]
    return replies[0]


def several_replies_text(replies: list[AdminReply]) -> str:
    """One line per daemon's reply (``<instance>: <code> <message>``) and the advice."""
    lines = [f"{r.instance or '(a daemon that does not name itself)'}: {r.code.value} "
             f"{r.message}" for r in replies]
    return "\n".join([*lines, SHARED_TOPIC_ADVICE])


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from recorder.admin.protocol import build_command
    from recorder.config.daemon import DaemonSettings
    from recorder.daemon.adminclient import AdminClient
    from recorder.errors import ConfigError, RecorderError, UnverifiedReplyError
    from recorder.logging import configure_logging
    from recorder.settings import KafkaSettings, settings_problems

    command = args._name
    try:
        tags = parse_tags(getattr(args, "tag", []))
        daemon = DaemonSettings()
        overrides = {} if args.bootstrap is None else {"bootstrap_servers": args.bootstrap}
        kafka = KafkaSettings.from_env(**overrides)
        # a command the daemon would refuse as malformed (run name, tags) is refused here,
        # before anything is sent
        build_command(command, run=getattr(args, "run", None), tags=tags or None,
                      reply_topic=daemon.admin_reply_topic, secret=daemon.secret_bytes)
    except ValidationError as exc:
        print(f"k2eg-recorder {command}: invalid settings:\n{settings_problems(exc)}",
              file=sys.stderr)
        return 2
    except (ValueError, RecorderError) as exc:
        print(f"k2eg-recorder {command}: {exc}", file=sys.stderr)
        return 2
    # the outcome is printed below; librdkafka's retries (a warning per failed connection
    # attempt while the broker is unreachable) only with --verbose
    configure_logging(False, "INFO" if args.verbose else "CRITICAL", stream=sys.stderr)
    timeout = args.timeout if args.timeout is not None else (120.0 if command == "stop" else 30.0)
    try:
        with AdminClient(kafka, daemon.admin_topic, daemon.admin_reply_topic,
                         secret=daemon.secret_bytes) as client:
            replies = client.request_all(command, getattr(args, "run", None), tags or None,
                                         timeout_s=timeout, grace_s=REPLY_GRACE_S)
            received = dict(client.received_at)
    except UnverifiedReplyError as exc:
        print(f"k2eg-recorder {command}: {exc}", file=sys.stderr)
        return EXIT_ERROR_REPLY
    except ConfigError as exc:  # a Kafka setting librdkafka refuses: nothing was sent
        print(f"k2eg-recorder {command}: {exc}", file=sys.stderr)
        return 2
    except RecorderError as exc:
        print(f"k2eg-recorder {command}: {exc} (Kafka at {kafka.bootstrap_servers}: "
              "--bootstrap or RECORDER_BOOTSTRAP_SERVERS)", file=sys.stderr)
        return EXIT_NO_REPLY
    reply = chosen_reply(replies)
    if args.json:
        print(json.dumps(reply.to_json_obj(), indent=2))
    elif command == "status" and reply.ok and reply.data:
        print(status_table(dict(reply.data), getattr(args, "run", None)))
    else:
        print(reply_text(reply), file=sys.stdout if reply.ok else sys.stderr)
    hint = clock_hint(reply, received.get(reply.request_id or ""))
    if hint is not None:
        print(hint, file=sys.stderr)
    if len(replies) > 1:
        print(several_replies_text(replies), file=sys.stderr)
    if command == "status" and reply.ok and getattr(args, "check", False):
        needs = attention(dict(reply.data or {}), getattr(args, "run", None))
        for line in needs:
            print(f"attention: {line}", file=sys.stderr)
        return EXIT_ATTENTION if needs else 0
    return 0 if reply.ok else EXIT_ERROR_REPLY
