"""``k2eg-recorder demo``: everything working together on one machine, in about 20 seconds.

Starts an embedded Kafka-protocol broker (Tansu) and the k2eg gateway simulator, then runs the
*same* daemon as ``k2eg-recorder run`` (:class:`recorder.service.Service`) on the example run
definitions shipped with the package (``recorder/examples/*.yaml``, output directories rewritten
to ``--output``): a recurring ``normal`` run at 10 Hz, a ``timedbuffered`` run with sub-push and a
triggered run fired through the admin topic (with tags). After ``--seconds`` it stops the daemon
the way SIGTERM does (k2eg stop, final iteration, files finalized) and prints the files and what
they hold.
"""

from __future__ import annotations

import argparse
import gc
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Container
from pathlib import Path
from typing import TYPE_CHECKING

from recorder.cli.argtypes import count, positive_seconds

if TYPE_CHECKING:
    from types import FrameType

    from recorder.admin.protocol import AdminReply
    from recorder.daemon.adminclient import AdminClient

HELP = "embedded broker + gateway simulator + example runs -> real .h5 files"

EXAMPLE_DATA_ROOT = "/data/k2eg-recorder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=positive_seconds, default=8.0,
                        help="how long to record (default 8)")
    parser.add_argument("--output", type=Path, default=None, metavar="DIR",
                        help="where the run definitions, files and logs go "
                             "(default: a new temporary directory)")
    parser.add_argument("--triggers", type=count, default=3,
                        help="admin triggers sent to the triggered run (default 3)")
    parser.add_argument("--verbose", action="store_true", help="show the daemon's log")


def write_examples(config_dir: Path, data_dir: Path) -> list[Path]:
    """Copy the packaged example run definitions, output directories under ``data_dir``."""
    from importlib import resources

    from recorder.errors import ConfigError

    examples = resources.files("recorder") / "examples"
    items = sorted((i for i in examples.iterdir() if i.name.endswith((".yaml", ".yml"))),
                   key=lambda p: p.name)
    names = {i.name for i in items}
    foreign = sorted(p.name for p in config_dir.glob("*.y*ml") if p.name not in names) if (
        config_dir.is_dir()) else []
    if foreign:
        raise ConfigError(
            f"{config_dir} holds run definitions that are not the demo's ({', '.join(foreign)}):"
            " give --output a new or empty directory (the demo writes its own runs.d there)"
        )
    config_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for item in items:
        text = item.read_text(encoding="utf-8").replace(EXAMPLE_DATA_ROOT, str(data_dir))
        target = config_dir / item.name
        target.write_text(text, encoding="utf-8")
        written.append(target)
    return written


def finish_killed_demo(state_dir: Path, config_dir: Path) -> list[str]:
    """A demo killed in this --output left its runs active in ``state_dir``, with the Kafka
    offsets of its broker, which died with it (Tansu keeps everything in memory). Resumed,
    they would read this demo's new broker from those offsets on: nothing is recorded until
    its topics reach them. So the files the killed demo left are finalized here, as
    ``k2eg-recorder recover`` does, and its runs start anew; returns what was done, a line
    per file."""
    from recorder.config.loader import check_runs
    from recorder.daemon.resume import ResumeStore
    from recorder.errors import FileBusyError
    from recorder.sinks.options import PARTIAL_SUFFIX
    from recorder.sinks.recover import recover_file

    if not state_dir.is_dir():
        return []
    store = ResumeStore(state_dir)
    done: list[str] = []
    for name in check_runs(config_dir)[0].runs:
        state = store.load(name)
        active = state.active
        if active is None:
            continue
        left = Path(active.current_file) if active.current_file else None
        if left is not None and left.name.endswith(PARTIAL_SUFFIX) and left.exists():
            try:
                done.append(str(recover_file(left, by="k2eg-recorder demo")))
            except FileBusyError:  # a demo running in the same --output writes it
                continue
            except (OSError, ValueError) as exc:  # left as it was: the summary names it
                done.append(f"{left}: not finalized: {exc}")
        store.end(state)
    return done


def _drive(service: object, admin_args: dict[str, object], *, seconds: float, triggers: int,
           report: list[str], errors: list[str], done: threading.Event) -> None:
    """The operator: trigger the triggered run through the admin topic, then stop. Ends as
    soon as ``done`` is set (the daemon stopped on SIGINT/SIGTERM): no command is sent to a
    daemon that no longer reads them."""
    from recorder.cli.admin import disk_line
    from recorder.daemon.adminclient import AdminClient
    from recorder.service import Service

    assert isinstance(service, Service)
    start = time.monotonic()
    try:
        deadline = start + 60
        while not service.ready.wait(0.1):
            if done.is_set():
                return
            if time.monotonic() > deadline:
                errors.append("the daemon did not become ready within 60 s")
                return
        client = AdminClient(**admin_args)  # type: ignore[arg-type]
        with client:
            gap = seconds / (triggers + 1)
            for shot in range(1, triggers + 1):
                if not _sleep_until(done, start + shot * gap):
                    return
                reply = _request(client, done, "trigger", "sim-triggered-images",
                                 tags={"shot": str(shot), "source": "demo"})
                if reply is None:
                    return
                report.append(f"trigger sim-triggered-images shot={shot}: {reply.code.value} "
                              f"- {reply.message}")
            if not _sleep_until(done, start + seconds):
                return
            reply = _request(client, done, "status")
            if reply is None:
                return
            runs = (reply.data or {}).get("runs", {})
            for name, st in runs.items():
                its = st.get("iterations", {})
                report.append(f"status {name}: {st.get('state')}, {its.get('complete', 0)} "
                              f"complete / {its.get('incomplete', 0)} incomplete iterations")
            for disk in (reply.data or {}).get("daemon", {}).get("disks") or []:
                report.append(f"status {disk_line(disk)}")
    except Exception as exc:
        if not done.is_set():
            errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        service.request_stop()  # the same path as SIGTERM


def _request(client: AdminClient, done: threading.Event, command: str, run: str | None = None, *,
             tags: dict[str, str] | None = None, timeout_s: float = 30.0) -> AdminReply | None:
    """``client.request(...)``, or None once ``done`` is set while waiting for the reply."""
    from recorder.errors import ServiceError

    cmd = client.build(command, run, tags)
    client.send(cmd)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.wait_reply(cmd.request_id, 0.5, command=cmd)
        except ServiceError:
            if done.is_set():
                return None
            if time.monotonic() >= deadline:
                raise ServiceError(f"no reply to {command!r} within {timeout_s:g} s") from None


def _count_messages(bootstrap: str, topic: str, expect: int, wait_s: float = 15.0) -> int:
    """Messages in ``topic`` (its one partition), read from its beginning until ``expect``
    came or ``wait_s`` passed. Read, not taken from the watermarks: Tansu's high watermark
    can lag messages whose production was acknowledged (seen under load: 1 of 3 after 5 s)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "k2eg-recorder-demo-count",
                         "enable.auto.commit": False, "enable.partition.eof": False})
    deadline = time.monotonic() + wait_s
    count = 0
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        while count < expect and time.monotonic() < deadline:
            count += sum(1 for m in consumer.consume(100, 0.2) if m.error() is None)
        return count
    except Exception:  # a count for the printout only
        return count
    finally:
        consumer.close()


def _sleep_until(done: threading.Event, deadline: float) -> bool:
    """Wait until ``deadline`` (monotonic); False if ``done`` was set first."""
    return not done.wait(max(0.0, deadline - time.monotonic()))


def run(args: argparse.Namespace) -> int:
    from recorder.broker import EmbeddedBroker
    from recorder.config.daemon import DaemonSettings
    from recorder.errors import RecorderError
    from recorder.logging import configure_logging
    from recorder.service import Service
    from recorder.settings import KafkaSettings, without_environment
    from recorder.sim import GatewaySimulator

    out = (args.output or Path(tempfile.mkdtemp(prefix="k2eg-recorder-demo-"))).resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file of that name, no permission
        print(f"k2eg-recorder demo: --output {out}: cannot use it as a directory: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 2
    data_dir = out / "data"
    config_dir = out / "runs.d"
    log_path = out / "daemon.log"
    try:
        write_examples(config_dir, data_dir)
        log_stream = sys.stdout if args.verbose else open(log_path, "a", encoding="utf-8")  # noqa: SIM115
    except RecorderError as exc:
        print(f"k2eg-recorder demo: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # no permission, a read-only file system, a directory in the way
        print(f"k2eg-recorder demo: --output {out}: cannot write "
              f"{exc.filename or 'there'}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    configure_logging("console" if args.verbose else "json", "INFO", stream=log_stream)
    log_where = "on this terminal" if args.verbose else str(log_path)
    recovered = finish_killed_demo(out / "state", config_dir)
    print(f"k2eg-recorder demo: output in {out}")
    if recovered:
        print(f"  an earlier demo here was killed: finalized {len(recovered)} file(s) it left "
              "(as k2eg-recorder recover does)")
        for line in recovered:
            print(f"    {line}")
    broker = EmbeddedBroker(log_path=out / "broker.log")
    sim: GatewaySimulator | None = None
    report: list[str] = []
    errors: list[str] = []
    interrupted: list[int] = []  # SIGINT/SIGTERM received while the daemon ran
    done = threading.Event()  # the daemon stopped: the driver ends
    code = 1
    try:
        broker.start()
        print(f"  embedded Kafka broker  {broker.bootstrap_servers} (pid {broker.pid})")
        cmd_topic = "k2eg-demo-cmd"
        sim = GatewaySimulator(broker.bootstrap_servers, cmd_topic).start()
        print(f"  gateway simulator      command topic {cmd_topic}")
        kafka = KafkaSettings.from_env({}, bootstrap_servers=broker.bootstrap_servers,
                                       cmd_topic=cmd_topic, app_name="k2eg-recorder-demo")
        daemon = without_environment(  # the operator's RECORDER_* are not the demo's
            DaemonSettings, config_path=config_dir, instance="demo",
            admin_topic="k2eg-recorder-demo-admin",
            admin_reply_topic="k2eg-recorder-demo-admin-reply",
            status_topic="k2eg-recorder-demo-status", heartbeat_interval_s=2.0,
            shutdown_timeout_s=30.0, metrics_port=None,
        )
        print(f"  recorder daemon        runs from {config_dir}, log {log_where}")
        print(f"  recording for {args.seconds:g} s ...", flush=True)
        service = Service(daemon, kafka, state_dir=out / "state")
        service.install_signal_handlers()
        _note_signals(interrupted)
        admin_args: dict[str, object] = {
            "kafka": kafka, "admin_topic": daemon.admin_topic,
            "reply_topic": daemon.admin_reply_topic, "secret": daemon.secret_bytes,
        }
        driver = threading.Thread(
            target=_drive, args=(service, admin_args),
            kwargs={"seconds": args.seconds, "triggers": args.triggers, "report": report,
                    "errors": errors, "done": done},
            name="demo-driver", daemon=True,
        )
        driver.start()
        started = time.monotonic()
        code = service.run()
        done.set()
        driver.join(10)
        if interrupted:
            print(f"k2eg-recorder demo: interrupted by {signal.Signals(interrupted[0]).name} "
                  f"after {time.monotonic() - started:.0f} s of {args.seconds:g}: the daemon "
                  "stopped the way SIGTERM stops it", file=sys.stderr, flush=True)
        if code != 0 and not service.ready.is_set():
            # it refused to start (the reasons are in its log): say so, not "0 files"
            from recorder.config.loader import check_runs

            print(f"k2eg-recorder demo: the daemon refused to start (exit {code}); "
                  f"see its log ({log_where})", file=sys.stderr)
            for problem in check_runs(config_dir)[1]:
                print(f"  {problem}", file=sys.stderr)
            return code
        for line in report:
            print(f"  {line}")
        for line in errors:
            print(f"  error: {line}", file=sys.stderr)
        finalized = {name: c.files() for name, c in service.controllers.items()}
        files = {name: list(f) for name, f in finalized.items()}  # (the newest, FILES_KEPT)
        # a run that starts by itself and left no file failed (its output directory cannot
        # be created, its disk is full, ...): the demo did not show it working
        failed = {name: c.status().last_error or f"the run ended {c.state.value}"
                  for name, c in service.controllers.items()
                  if c.definition.autostart and not files[name]}
        events = _count_messages(broker.bootstrap_servers, daemon.files_topic,
                                 expect=sum(f.total for f in finalized.values()))
        print(f"  files topic {daemon.files_topic}: {events} file event(s), one per file "
              f"finalized")
        # drop the daemon's Kafka handles before the broker goes away (librdkafka would log
        # reconnection attempts until they are garbage-collected)
        del service
        gc.collect()
    except RecorderError as exc:
        print(f"k2eg-recorder demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if sim is not None:
            sim.stop()
        broker.stop()
        if log_stream is not sys.stdout:
            log_stream.close()
    print()
    print_summary(files, failed)
    partials = sorted(str(p) for p in data_dir.rglob("*.partial"))
    if partials:
        print(f"not finalized: {partials}", file=sys.stderr)
        return 1
    if not print_verified([p for paths in files.values() for p in paths]):
        return 1
    if failed:
        print("k2eg-recorder demo: runs that recorded nothing:", file=sys.stderr)
        for name, reason in failed.items():
            print(f"  {name}: recorded no file: {reason}", file=sys.stderr)
        return 1
    print(f"list them: k2eg-recorder ls {data_dir}/*; read one: k2eg-recorder inspect FILE")
    if interrupted:
        return 128 + interrupted[0]  # as a shell reports a command a signal ended
    return 1 if errors or code != 0 else 0


def _note_signals(noted: list[int]) -> None:
    """Note SIGINT/SIGTERM in ``noted``, then hand them to the handlers installed before
    (the daemon's: a flag its main loop acts on)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(signum)

        def handler(num: int, frame: FrameType | None, previous: object = previous) -> None:
            noted.append(num)
            if callable(previous):
                previous(num, frame)

        signal.signal(signum, handler)


def print_verified(paths: list[str]) -> bool:
    """``k2eg-recorder verify`` of the demo's files (with their data): whether all pass."""
    from recorder.verify import verify_file

    reports = [verify_file(p, data=True) for p in paths]
    bad = [r for r in reports if not r.ok]
    print(f"k2eg-recorder verify --data: {len(reports) - len(bad)} of {len(reports)} file(s) "
          "match docs/file-format.md")
    for r in bad:
        for problem in r.errors:
            print(f"  {r.path}: {problem}", file=sys.stderr)
    return not bad


def print_summary(files: dict[str, list[str]], failed: Container[str] = ()) -> None:
    """What each file holds, read back with :mod:`recorder.reader`; ``failed``: the runs
    that were started but recorded nothing."""
    from recorder.reader import open_file

    for run_name, paths in files.items():
        if not paths:
            print(f"{run_name}: no file ({'failed' if run_name in failed else 'not started'})")
            continue
        for path in paths:
            with open_file(path) as f:
                its = f.iterations()
                n = len(its["iter_index"])
                complete = int((its["status"] == "complete").sum()) if n else 0
                print(f"{run_name}: {path}")
                print(f"  status {f.status}; {n} iterations ({complete} complete); "
                      f"{len(f.pv_names)} PVs")
                for row in f.summary():  # kind, storage dtype, shape as inspect prints
                    values = f.values(row["pv"])
                    shape = row["shape"]
                    shape_text = ("varies" if shape is None else
                                  "x".join(str(d) for d in shape) or "scalar")
                    last = _short(values[-1]) if len(values) else "-"
                    print(f"    {row['pv']:34} {row['count']:6} values  {row['kind']:8} "
                          f"{row['dtype']:8} {shape_text:7} last={last}")


def _short(value: object) -> str:
    """A value as numpy prints it (float32 with float32's digits), cut to 40 characters."""
    import numpy as np

    if isinstance(value, np.ndarray) and value.dtype != object:
        text = np.array2string(value, threshold=6, edgeitems=2, separator=", ",
                               max_line_width=10**6)
    elif isinstance(value, np.generic):
        text = str(value)
    else:
        text = repr(value)
    text = " ".join(text.split())
    return text if len(text) <= 40 else text[:37] + "..."
