"""The recorder daemon: run definitions + k2eg client + admin topic + HDF5 recordings.

``k2eg-recorder run --config PATH`` (the systemd ``ExecStart``) builds a :class:`Service` and
calls :meth:`Service.run`, which returns the exit code.

Threads
    * **main** (this module): signals only set flags (and wake the loop); the loop wakes at
      least every 0.1 s to read admin commands (handed over by the admin link's queue), answer
      them, apply reloads, publish heartbeats, update ``STATUS=`` and ping ``WATCHDOG=1``;
    * **admin link** consumer thread (:mod:`recorder.daemon.adminlink`): owns the admin
      topic's ``Consumer``, queues records for the main loop; it starts where the previous
      daemon stopped reading (offset saved in the state directory), so commands sent while
      the daemon was down are answered (``expired`` past the max age, else acted on);
    * **k2eg client** consumer + dispatcher threads (:mod:`recorder.client`): read the reply
      and snapshot topics, assemble iterations into one bounded queue per run (the topic is
      paused when a run's queue is full: back-pressure, never drops);
    * **one worker per run** (:mod:`recorder.daemon.controller`): start with retry/backoff,
      hand events to the HDF5 recording (a writer process per recording unless
      ``output.isolate: false``) and to the Karabo bridge when ``output.bridge`` is set,
      flush, save the resume state, stop/finalize;
    * **disk probe** (:mod:`recorder.daemon.diskprobe`): ``statvfs`` of the runs' output
      directories every ``disk_check_interval_s``; the main loop judges the readings
      (:mod:`recorder.daemon.diskspace`: low, filling up, not answering), so a hung network
      filesystem cannot hang the loop that pings the watchdog;
    * optional Prometheus HTTP server thread.

Lifecycle
    load + validate run definitions (bad YAML: exit 2 before touching Kafka) -> ``READY=1``
    (decision 0012) -> connect (retried with backoff until SIGTERM; Kafka settings librdkafka
    refuses: exit 2) -> start the ``autostart`` runs and every run a crash left recording,
    autostart or not (recurring snapshots begin, triggered ones are armed; a recording
    interrupted by a crash is resumed from its last durable offset) -> loop ->
    SIGTERM/SIGINT: ``STOPPING=1``, every run stopped the k2eg way (stop command, final
    iteration, file finalized) within ``shutdown_timeout_s`` -> exit 0. SIGHUP (or an admin
    ``reload``) re-reads the definitions.
"""

from __future__ import annotations

import contextlib
import contextvars
import faulthandler
import fcntl
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from recorder import __version__
from recorder.admin.files import FileEvent
from recorder.admin.protocol import ReplyCode
from recorder.admin.status import DaemonState, RunState, RunStatus, StatusDocument
from recorder.config.daemon import DaemonSettings, own_topics
from recorder.config.diff import RunDiff, diff_runs
from recorder.config.loader import LoadedRuns, Problem, check_runs
from recorder.config.models import RunDefinition
from recorder.daemon.admin import AdminHandler, RunHandle
from recorder.daemon.adminlink import AdminCursor, AdminLink
from recorder.daemon.backoff import Backoff
from recorder.daemon.controller import LOGGED_FILES, RunController
from recorder.daemon.diskprobe import DiskProbe
from recorder.daemon.diskspace import DiskChange, DiskWatch, MinFree, format_bytes
from recorder.daemon.heartbeat import Heartbeat
from recorder.daemon.recording import RecordingFactory, hdf5_recording, prewarm_writers
from recorder.daemon.resume import ResumeStore
from recorder.errors import AdminCommandError, ConfigError, RecorderError, TransportError
from recorder.gctune import MemoryUpkeep, tune_gc
from recorder.metrics import RecorderMetrics, start_metrics_server
from recorder.notify import Notifier, WatchdogPinger, watchdog_interval
from recorder.settings import KafkaSettings

__all__ = ["EXIT_CONFIG", "EXIT_OK", "Service", "default_state_dir"]

log = structlog.get_logger("recorder.service")

EXIT_OK = 0
EXIT_CONFIG = 2
STATE_LOCK_FILE = ".daemon.lock"  # run names cannot start with a dot: no clash
LOOP_WAIT_S = 0.1
EXTEND_EVERY_S = 5.0
EXIT_WORK_S = 60.0
"""What exiting takes once the runs stopped or the shutdown budget ran out, asked of systemd
then (``EXTEND_TIMEOUT_USEC``): the k2eg client and the admin link closed (each waits for
its consumer thread and flushes its producer), the runs' threads joined
(``RUN_THREADS_EXIT_S``), the writer processes reaped (a busy one
after ``REAP_GRACE_S``, then killed)."""
RUN_THREADS_EXIT_S = 5.0
"""How long exiting waits, once the Kafka client is closed, for the runs' threads still ending
what a stop began (those the shutdown budget left behind: closing the client ends their
stops, and they close their recordings): long enough for a stop ended so, not for a long
finalization (that file stays ``.partial``, for the next start). The interpreter is not
finalized under a thread that can be let finish (see :func:`_load_hdf5`)."""
RELOAD_CHECK_TIMEOUT_S = 30.0
"""How long a reload's check of the run definitions may take (a 100,000-PV file takes ~6 s):
it resolves the output directories, which hangs on a file system that does not answer (a
hung NFS mount), and the main loop that pings the watchdog waits for it."""
CONFIG_ERRORS_KEPT = 50
"""Problems of a refused reload listed in the status, the heartbeats and the reload's reply
(one long PV list with a wrong prefix is thousands: all of them made every status document
too large for a Kafka message); a last line says how many more there are."""


def default_state_dir(environ: dict[str, str] | None = None) -> Path:
    """``$RECORDER_STATE_DIR``, systemd's ``$STATE_DIRECTORY``, else ``~/.local/state``."""
    env = dict(os.environ if environ is None else environ)
    if env.get("RECORDER_STATE_DIR"):
        return Path(env["RECORDER_STATE_DIR"])
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "k2eg-recorder"


@dataclass(slots=True)
class _Deferred:
    """A run to (re)create once the controllers it waits for have stopped."""

    definition: RunDefinition
    start: bool
    blockers: list[RunController] = field(default_factory=list)


class _RestartingRun:
    """The admin handle of a run a reload is creating again (its definition changed, or a
    run of its topic is still stopping): its controller is made once the ones it waits for
    have stopped. ``start``/``stop`` say whether it starts then; a trigger is refused
    (``not_running``): it could only be acted on late. Before, such a run was answered
    ``unknown_run`` while status listed it."""

    def __init__(self, deferred: _Deferred) -> None:
        self._deferred = deferred
        self.name = deferred.definition.name

    @staticmethod
    def _answer(message: str | None = None, error: AdminCommandError | None = None
                ) -> Future[str]:
        future: Future[str] = Future()
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(message or "")
        return future

    def start(self) -> Future[str]:
        self._deferred.start = True
        return self._answer(f"run {self.name!r} starts once its previous recording has "
                            "stopped (a reload is restarting it)")

    def stop(self, reason: str = "") -> Future[str]:
        self._deferred.start = False
        return self._answer(f"run {self.name!r} stays stopped (a reload was restarting it; "
                            "its previous recording is being finalized)")

    def trigger(self, tags: Mapping[str, str] | None = None) -> Future[str]:
        return self._answer(error=AdminCommandError(
            ReplyCode.NOT_RUNNING.value, f"run {self.name!r} is restarting after a reload "
            "(its previous recording is being finalized): trigger it once it records"))

    def recording_files(self) -> list[str]:
        return [f for c in self._deferred.blockers for f in c.recording_files()]


def _load_hdf5() -> None:
    """Import h5py (with numpy and the filter plugins) in the main thread, before any run's
    thread can: h5py registers, when imported, an atexit handler that takes its type
    converters out of HDF5 again, and HDF5's own exit handler calls whichever are left, which
    take the GIL of an interpreter that is gone. Imported first by a run's thread while the
    interpreter was already finalizing (a stop the shutdown budget cut short published its
    file's event after the main thread had returned), h5py's handler never ran and the daemon
    died of SIGSEGV in ``exit()`` (exit code -11 for 0, seen in CI). ~0.2 s and ~10 MB, which
    the first finalized file cost anyway."""
    import recorder.sinks.describe  # noqa: F401


class Service:
    """The long-running recorder daemon (see the module docstring)."""

    def __init__(
        self,
        settings: DaemonSettings,
        kafka: KafkaSettings,
        *,
        state_dir: Path | None = None,
        notifier: Notifier | None = None,
        metrics: RecorderMetrics | None = None,
        recording_factory: RecordingFactory = hdf5_recording,
        connect_backoff: Backoff | None = None,
        run_backoff: Callable[[], Backoff] | None = None,
        client_options: dict[str, Any] | None = None,
        gc_tuning: bool = True,
    ) -> None:
        self.settings = settings
        self._gc_tuning = gc_tuning
        self.kafka = kafka
        self.state_dir = state_dir or default_state_dir()
        self.notifier = notifier or Notifier.from_env()
        self.metrics = metrics or RecorderMetrics()
        self._factory = recording_factory
        self._connect_backoff = connect_backoff or Backoff(initial_s=1.0, max_s=30.0)
        self._run_backoff = run_backoff or (lambda: Backoff(initial_s=1.0, max_s=30.0))
        self._client_options = dict(client_options or {})
        self._store = ResumeStore(self.state_dir)
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._wake = threading.Event()
        # set by the signal handlers, acted on by the main thread (see install_signal_handlers)
        self._stop_signalled = False
        self._reload_signalled = False
        self._state = DaemonState.STARTING
        self._started_ms = time.time_ns() // 1_000_000
        self._started_mono = time.monotonic()  # the uptime: a wall-clock step does not move it
        self._definitions: dict[str, RunDefinition] = {}
        self._controllers: dict[str, RunController] = {}
        self._retiring: list[RunController] = []
        self._deferred: list[_Deferred] = []
        self._config_errors: list[str] = []  # at most CONFIG_ERRORS_KEPT, then "... more"
        self._config_error_count = 0  # problems of the last refused reload, all of them
        self._client: Any = None  # K2egClient (imported lazily: confluent-kafka)
        self._link: AdminLink | None = None
        self._cursor: AdminCursor | None = None
        self._admin: AdminHandler | None = None
        self._heartbeat: Heartbeat | None = None
        self._watchdog = WatchdogPinger(self.notifier, watchdog_interval())
        self._upkeep = MemoryUpkeep()
        self._last_status_line = ""
        self._metrics_server: Any = None
        self._metrics_problem: str | None = None
        self._disk_probe: DiskProbe | None = None
        self._disk_watch: DiskWatch | None = None
        self.ready = threading.Event()  # set once READY=1 was sent (tests, the demo)
        self._consumers_dead: list[str] = []  # whose Kafka consumer thread died (logged)
        self._offsets_reset_seen = 0  # the client's offsets_reset counted in the metrics
        # why run() returned EXIT_CONFIG (what `k2eg-recorder run` prints last, on stderr)
        self.refusal: str | None = None
        self._state_lock: int | None = None  # fd of the state directory's lock, while held
        self._reload_check: Future[tuple[LoadedRuns, tuple[Problem, ...]]] | None = None

    # ------------------------------------------------------------------ control (any thread)
    def request_stop(self) -> None:
        """Begin a graceful shutdown (what SIGTERM does), from any thread; not from a signal
        handler (see :meth:`install_signal_handlers`)."""
        self._stop.set()
        self._wake.set()

    def request_reload(self) -> None:
        """Re-read the run definitions (what SIGHUP does), from any thread; not from a
        signal handler."""
        self._reload.set()
        self._wake.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop, SIGHUP reloads. The handlers only set a flag, which the main
        loop turns into :meth:`request_stop` / :meth:`request_reload` within ``LOOP_WAIT_S``:
        a handler runs in the main thread between two bytecodes, and one that took a lock
        the interrupted code holds waits for itself for ever. ``Event.set()`` did, when
        SIGTERM came while the main loop was inside the same Event's ``clear()`` or
        ``wait()``: the daemon then ignored SIGTERM (seen once in CI)."""

        def on_stop(signum: int, _frame: FrameType | None) -> None:
            self._stop_signalled = True

        def on_hup(signum: int, _frame: FrameType | None) -> None:
            self._reload_signalled = True

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        # SIGUSR1: every thread's stack to stderr (the journal), the daemon goes on; for a
        # daemon that seems stuck (`systemctl kill -s USR1 k2eg-recorder`: writers too)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        # a crash (SIGSEGV, SIGABRT in a C library) leaves every thread's stack in the journal
        faulthandler.enable(all_threads=True)

    @property
    def controllers(self) -> dict[str, RunController]:
        return dict(self._controllers)

    # ------------------------------------------------------------------ main
    def run(self) -> int:
        """Run until :meth:`request_stop`; returns the process exit code."""
        loaded, problems = self._check_runs()
        if problems:
            for p in problems:
                log.error("invalid run definition", problem=str(p))
            log.error("refusing to start: fix the run definitions",
                      config_path=str(self.settings.config_path), errors=len(problems))
            self.refusal = (f"invalid run definitions in {self.settings.config_path} (see the "
                            "errors above; `k2eg-recorder validate` explains them)")
            return EXIT_CONFIG
        if not self._lock_state_dir():
            return EXIT_CONFIG
        _load_hdf5()
        self._definitions = dict(loaded.runs)
        log.info("run definitions loaded", runs=list(self._definitions),
                 config_path=str(self.settings.config_path), state_dir=str(self.state_dir))
        self._name_orphaned_leftovers()
        self._start_metrics()
        self._start_disk_checks()
        # runs that start: autostart, and those an unclean exit left recording (a crash, a
        # kill: their state file still has an active recording), whoever started them
        starting = {name: d.autostart or self._interrupted(d)
                    for name, d in self._definitions.items()}
        for name, d in self._definitions.items():
            if starting[name] and not d.autostart:
                log.warning("run was recording when the daemon exited without stopping it: "
                            "resuming it", run=name)
        # the writers of the runs started below begin loading while Kafka is connected
        prewarm_writers(self._factory, [d for d in self._definitions.values() if starting[d.name]],
                        log)
        # started: the run definitions are valid and the daemon runs. Kafka may be down at
        # boot; waiting for it is the daemon's job (retried, shown in STATUS=), not a failed
        # start that TimeoutStartSec= would kill and Restart= repeat
        self.notifier.ready(f"connecting to Kafka at {self.kafka.bootstrap_servers}; "
                            f"{len(self._definitions)} run(s) loaded")
        try:
            try:
                connected = self._connect()
            except ConfigError as exc:  # a Kafka setting librdkafka refuses: no retry mends it
                log.error("refusing to start: fix the Kafka settings", error=str(exc))
                self.notifier.status(f"refusing to start: {exc}")
                self.refusal = f"refusing to start: {exc}"
                return EXIT_CONFIG
            # stopped while still connecting, or a SIGTERM during the last connection attempt:
            # no run starts only to be stopped (interrupted ones resume next time)
            if not connected or self._stopping():
                self.notifier.stopping("stopped while connecting to Kafka; no run started")
                return EXIT_OK
            if self._reload.is_set():  # a SIGHUP while connecting: no run has started yet,
                self._reload.clear()  # so they start as the definitions now say
                starting = self._reload_before_start(starting)
            if self._gc_tuning:
                # before any run consumes: the full collection does not stall a consumer
                # that has just begun, and in-flight messages are not frozen with start-up
                tune_gc()
            for definition in self._definitions.values():
                self._add_controller(definition, start=starting[definition.name])
            self._state = DaemonState.RUNNING
            self.notifier.status(self._status_line())
            self.ready.set()
            log.info("daemon ready", runs=len(self._controllers),
                     admin_topic=self.settings.admin_topic,
                     status_topic=self.settings.status_topic)
            self._loop()
            self._shutdown()
            return EXIT_OK
        finally:
            self._close()

    def _connect(self) -> bool:
        """Create the k2eg client and the admin link; retry with backoff until stopped."""
        from recorder.client import K2egClient

        while not self._stopping():
            try:
                self._client = K2egClient(self.kafka, **self._client_options)
                s = self.settings
                cursor = AdminCursor(self.state_dir, s.admin_topic)
                self._link = AdminLink(self.kafka, s.admin_topic,
                                       ensure_topics=(s.admin_reply_topic, s.status_topic,
                                                      s.files_topic),
                                       start=cursor.load())
                cursor.reset(self._link.start_offsets)
                cursor.save()  # commands sent while this daemon is down are read next start
                self._cursor = cursor
            except RecorderError as exc:
                if self._client is not None:
                    self._client.close(5.0)
                    self._client = None
                if isinstance(exc, ConfigError):
                    raise
                delay = self._connect_backoff.next_delay()
                log.error("cannot connect to Kafka; retrying", error=str(exc),
                          retry_in_s=round(delay, 2), bootstrap=self.kafka.bootstrap_servers)
                self.notifier.status(f"waiting for Kafka ({exc}); retry in {delay:.0f} s")
                self._sleep(delay)
                continue
            self._admin = self._admin_handler(self._link.produce)
            self._admin.remember(cursor.answered)  # not carried out twice after a crash
            self._heartbeat = Heartbeat(self.settings.heartbeat_interval_s, self._publish_status)
            return True
        return False

    def _publish_status(self, payload: bytes) -> None:
        if self._link is not None:
            self._link.produce(self.settings.status_topic, payload, key=self.settings.instance)

    def _stopping(self) -> bool:
        """Main thread: act on what the signal handlers noted; True once a stop is asked."""
        if self._stop_signalled:
            self._stop_signalled = False
            self.request_stop()
        if self._reload_signalled:
            self._reload_signalled = False
            self.request_reload()
        return self._stop.is_set()

    def _sleep(self, seconds: float) -> None:
        """Wait (for a backoff) while still pinging the watchdog; ends early on stop."""
        deadline = time.monotonic() + seconds
        while not self._stopping():
            now = time.monotonic()
            if now >= deadline:
                return
            self._watchdog.maybe_ping(now)
            self._wake.wait(min(LOOP_WAIT_S, deadline - now))
            self._wake.clear()

    def _loop(self) -> None:
        while not self._stopping():
            self._wake.clear()
            if self._reload.is_set():
                self._reload.clear()
                self.reload("SIGHUP")
            self._pass()
            self._wake.wait(LOOP_WAIT_S)

    def _pass(self) -> None:
        """One pass of the main loop (also run while shutting down)."""
        now = time.monotonic()
        link, admin = self._link, self._admin
        if link is not None and admin is not None:
            records = link.take()
            waiting = admin.pending
            for record in records:
                admin.handle(record, self)
                if self._cursor is not None:
                    self._cursor.advance(record.partition, record.offset + 1)
            admin.poll()
            if records or admin.pending != waiting:
                self._save_admin_position(admin)
        self._apply_deferred()
        if self._heartbeat is not None:
            self._heartbeat.maybe_beat(now, self._heartbeat_doc)
        if self._consumers_alive():
            self._watchdog.maybe_ping(now)
        self._upkeep.maybe_run(now)
        self.metrics.set_kafka_up(self._kafka_unreachable_since() is None)
        self._count_offsets_reset()
        self._judge_disks(now)
        line = self._status_line()
        if line != self._last_status_line and self.notifier.status(line):
            self._last_status_line = line  # else sent again next pass (or not under systemd)

    def _count_offsets_reset(self) -> None:
        """The client's topics found deleted and created again (read from their beginning,
        logged by it) into ``kafka_offsets_reset_total``."""
        client = self._client
        if client is None:
            return
        total = client.offsets_reset
        if total > self._offsets_reset_seen:
            self.metrics.offsets_reset(total - self._offsets_reset_seen)
            self._offsets_reset_seen = total

    def _consumers_alive(self) -> bool:
        """Whether the Kafka consumer threads of the k2eg client and of the admin link are
        alive while the daemon runs. One that died (a bug, a library crash) leaves a daemon
        that reads neither data nor commands: the watchdog is no longer pinged, so systemd
        restarts it (``WatchdogSec``) and its runs resume from their durable offsets."""
        if self._state is not DaemonState.RUNNING:
            return True  # connecting, stopping: their own pings
        dead = [what for what, part in (("k2eg client", self._client), ("admin link", self._link))
                if part is not None and not part.running]
        if dead and not self._consumers_dead:
            self._consumers_dead = dead  # in the status line from now on
            log.critical("a Kafka consumer thread died: the watchdog is no longer pinged, so "
                         "systemd restarts the daemon", consumers=dead)
        return not dead

    def _save_admin_position(self, admin: AdminHandler) -> None:
        """Save the admin read position, not past a command still waiting for its reply, with
        the request_ids answered (see :class:`~recorder.daemon.adminlink.AdminCursor`)."""
        if self._cursor is not None:
            self._cursor.save(hold=admin.unanswered(), answered=admin.answered_ids())

    def _shutdown(self) -> None:
        self._state = DaemonState.STOPPING
        budget = self.settings.shutdown_timeout_s
        self.notifier.stopping(f"stopping {len(self._controllers)} run(s)")
        self.notifier.extend_timeout(budget + 10)
        log.info("shutting down", runs=len(self._controllers), budget_s=budget)
        if self._heartbeat is not None:
            self._heartbeat.beat(time.monotonic(), self._heartbeat_doc)
        controllers = [*self._controllers.values(), *self._retiring]
        self._deferred.clear()
        for c in controllers:
            c.shutdown("daemon shutdown", resumable=True)
        deadline = time.monotonic() + budget
        next_extend = time.monotonic() + EXTEND_EVERY_S
        while any(c.alive for c in controllers) and time.monotonic() < deadline:
            self._pass()
            now = time.monotonic()
            if now >= next_extend:
                next_extend = now + EXTEND_EVERY_S
                self.notifier.extend_timeout(deadline - now + 10)
            time.sleep(LOOP_WAIT_S)
        # the time asked for so far ends 10 s after the budget: too short for what exiting
        # still does, when the budget outlasts TimeoutStopSec= (systemd killed the daemon)
        self.notifier.extend_timeout(EXIT_WORK_S)
        late = [c.name for c in controllers if c.alive]
        for c in self._controllers.values():  # not runs a reload removed or changed
            if c.alive:  # closing the client below ends its stop: its state is kept
                c.abandon()
        if late:
            log.error("runs did not stop within the shutdown budget; their files stay .partial "
                      "and resume at the next start", runs=late, budget_s=budget)
        if self._admin is not None:
            self._admin.poll()
            self._admin.fail_pending("the daemon is shutting down")
            self._save_admin_position(self._admin)  # answered: not read again at next start
        if self._heartbeat is not None:
            self._heartbeat.beat(time.monotonic(), self._heartbeat_doc)
        files = {c.name: c.files() for c in controllers}  # the newest listed (LOGGED_FILES)
        log.info("daemon stopped", files={n: f.newest(LOGGED_FILES) for n, f in files.items()},
                 files_total={n: f.total for n, f in files.items()})

    def _join_run_threads(self) -> None:
        """Wait (``RUN_THREADS_EXIT_S`` in all) for the runs' threads: those the shutdown
        budget left behind end their stops once the client is closed. Not when the runs were
        never told to stop (an exception ended :meth:`run`)."""
        if self._state is not DaemonState.STOPPING:
            return
        deadline = time.monotonic() + RUN_THREADS_EXIT_S
        controllers = [*self._controllers.values(), *self._retiring]
        for c in controllers:
            c.join(max(0.0, deadline - time.monotonic()))
        late = [c.name for c in controllers if c.alive]
        if late:
            log.error("runs still closing their recordings at exit; their files stay .partial",
                      runs=late, waited_s=RUN_THREADS_EXIT_S)

    def _lock_state_dir(self) -> bool:
        """Hold the state directory (an exclusive lock, until :meth:`_close`); False (the
        refusal said) when another daemon holds it: two daemons on one directory save their
        admin positions over each other's and take each other's runs' state files."""
        path = self.state_dir / STATE_LOCK_FILE
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:  # the state store says what it cannot write, later
            log.warning("state directory not locked", path=str(path), error=str(exc))
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            self.refusal = (f"state directory {self.state_dir} is used by another daemon "
                            f"(pid {holder}): give each daemon its own RECORDER_STATE_DIR")
            log.error("refusing to start: " + self.refusal)
            self.notifier.status(f"refusing to start: {self.refusal}")
            return False
        except OSError as exc:  # a filesystem without locks
            os.close(fd)
            log.warning("state directory not locked", path=str(path), error=str(exc))
            return True
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._state_lock = fd
        return True

    def _close(self) -> None:
        for closer in (
            (lambda: self._client.close(10.0)) if self._client is not None else None,
            self._join_run_threads,  # before the link: their file events are still published
            self._link.close if self._link is not None else None,
            self._metrics_server.shutdown if self._metrics_server is not None else None,
            self._disk_probe.close if self._disk_probe is not None else None,
        ):
            if closer is None:
                continue
            try:
                closer()
            except Exception:
                log.exception("error while closing")
        self._client = None
        self._link = None
        self._metrics_server = None
        self._disk_probe = None
        if self._state_lock is not None:
            os.close(self._state_lock)  # the lock with it
            self._state_lock = None

    def _start_metrics(self) -> None:
        port = self.settings.metrics_port
        if port is None:
            return
        try:
            server, _thread = start_metrics_server(port, self.metrics.registry,
                                                   addr=self.settings.metrics_addr)
        except OSError as exc:
            log.error("metrics endpoint not started", port=port, error=str(exc))
            # in `systemctl status` too: a scrape of that port reaches whatever holds it
            self._metrics_problem = f"metrics endpoint not started (port {port}: " \
                f"{exc.strerror or exc})"
            return
        self._metrics_server = server
        log.info("metrics endpoint", url=f"http://{self.settings.metrics_addr}:"
                                         f"{server.server_port}/metrics")

    # ------------------------------------------------------------------ disks
    def _start_disk_checks(self) -> None:
        s = self.settings
        if s.disk_check_interval_s <= 0:
            return
        self._disk_watch = DiskWatch(MinFree.parse(s.disk_min_free), s.disk_full_warning_s)
        self._disk_probe = DiskProbe(s.disk_check_interval_s)
        self._watch_disks()
        self._disk_probe.start()

    def _watch_disks(self) -> None:
        """Point the disk probe at the output directories of the current definitions."""
        if self._disk_probe is None:
            return
        runs_by_dir: dict[str, list[str]] = {}
        for name, definition in self._definitions.items():
            runs_by_dir.setdefault(str(definition.output.directory), []).append(name)
        self._disk_probe.set_directories(runs_by_dir)

    def _room_for(self, directory: Path, since: float | None = None) -> bool:
        """Whether a recording into ``directory`` may resume after its disk ran out (at
        ``since``, monotonic: judged on a later reading) (any thread: reads the watch's
        latest statuses)."""
        watch = self._disk_watch
        return True if watch is None else watch.has_room(str(directory), since)

    def _judge_disks(self, now: float) -> None:
        probe, watch = self._disk_probe, self._disk_watch
        if probe is None or watch is None:
            return
        before = watch.statuses
        for change in watch.update(now, probe.latest(), probe.busy()):
            _log_disk_change(change)
        if watch.statuses != before:
            self.metrics.disks(watch.statuses)

    # ------------------------------------------------------------------ runs
    def _admin_handler(self, send: Callable[[str, bytes], Any]) -> AdminHandler:
        """The admin command handler, replying through ``send(topic, payload)``."""
        return AdminHandler(self.settings.command_policy(), self.settings.admin_reply_topic,
                            send, metrics=self.metrics,
                            protected_topics=tuple(self._own_topics()),
                            instance=self.settings.instance)

    def _own_topics(self) -> dict[str, str]:
        """The daemon's own topics and the gateway's command topic (:func:`own_topics`)."""
        return own_topics(self.settings, self.kafka)

    def _check_runs_in_time(self) -> tuple[LoadedRuns, tuple[Problem, ...]]:
        """:meth:`_check_runs` for a reload: in a thread of its own while this (main) thread
        goes on pinging the watchdog, refused when it does not end within
        :data:`RELOAD_CHECK_TIMEOUT_S` (the definitions in force stay). Before, a check stuck
        on a hung mount held the main loop until systemd's watchdog killed the daemon."""
        where = str(self.settings.config_path)
        running = self._reload_check
        if running is not None and not running.done():
            return LoadedRuns(), (Problem(where, None, "", (
                "the previous reload's check of the run definitions has still not ended (an "
                "output directory on a file system that does not answer?)")),)
        future: Future[tuple[LoadedRuns, tuple[Problem, ...]]] = Future()

        def check() -> None:
            try:
                future.set_result(self._check_runs())
            except BaseException as exc:  # given to the main thread
                future.set_exception(exc)

        self._reload_check = future
        threading.Thread(target=contextvars.copy_context().run, args=(check,),
                         name="reload-check", daemon=True).start()
        deadline = time.monotonic() + RELOAD_CHECK_TIMEOUT_S
        while not future.done():
            now = time.monotonic()
            if self._stopping():  # a SIGTERM meanwhile: the shutdown does not wait for it
                return LoadedRuns(), (Problem(where, None, "", (
                    "the daemon is stopping: the check of the run definitions was not "
                    "waited for")),)
            if now >= deadline:
                log.error("reload: the check of the run definitions did not end in time",
                          timeout_s=RELOAD_CHECK_TIMEOUT_S)
                return LoadedRuns(), (Problem(where, None, "", (
                    f"checking the run definitions did not end within "
                    f"{RELOAD_CHECK_TIMEOUT_S:g} s (an output directory on a file system "
                    "that does not answer, e.g. a hung NFS mount?)")),)
            self._watchdog.maybe_ping(now)
            with contextlib.suppress(FutureTimeoutError):
                future.result(min(LOOP_WAIT_S, deadline - now))
        return future.result()

    def _check_runs(self) -> tuple[LoadedRuns, tuple[Problem, ...]]:
        """The run definitions and their problems, with those only this daemon sees: a
        snapshot whose k2eg topic (its normalized name) is one of the daemon's own topics or
        the gateway's command topic, into which the gateway would write its data."""
        return check_runs(self.settings.config_path, reserved_topics=self._own_topics())

    def _name_orphaned_leftovers(self) -> None:
        """Runs no longer defined whose state file still names the file a crash left: no
        run resumes (and so finalizes) it; say where it is and how to finalize it."""
        try:
            names = sorted(p.stem for p in self.state_dir.glob("*.json")
                           if not p.name.startswith("."))
        except OSError:
            return
        for name in names:
            if name in self._definitions:
                continue
            active = self._store.load(name).active
            if active is not None and active.current_file and Path(active.current_file).exists():
                log.warning("a run no longer defined left this file unfinalized: finalize it "
                            "with `k2eg-recorder recover`", run=name, path=active.current_file)

    def _interrupted(self, definition: RunDefinition) -> bool:
        """The run's state file still holds an active recording of its snapshot topic: the
        last daemon did not stop it (crash, kill -9), so it resumes whether it autostarts
        or was started by an admin command."""
        active = self._store.load(definition.name).active
        return (active is not None and active.topic == definition.snapshot.topic
                and not active.stopped)  # an admin stop the shutdown budget cut short

    def _add_controller(self, definition: RunDefinition, *, start: bool,
                        replaces: RunController | None = None) -> RunController:
        """``replaces``: the run's previous controller (a reload changed the run), stopped;
        a failure it ended in stands in the new one's status until the run is started."""
        controller = RunController(
            definition, self._client, self._store, metrics=self.metrics,
            recording_factory=self._factory, backoff=self._run_backoff(),
            silence_after_s=self.settings.silence_after_s, room_for=self._room_for,
            on_file=self._on_file, leftover_timeout_s=self.settings.leftover_timeout_s,
            replaces=None if replaces is None else replaces.status(),
        )
        self._controllers[definition.name] = controller
        self.metrics.set_recording(definition.name, False)
        if start:
            controller.start()
        return controller

    def _on_file(self, definition: RunDefinition, path: Path) -> None:
        """A run finalized ``path``: publish its file event (a run's worker thread)."""
        from recorder.sinks.describe import file_event_fields

        info: dict[str, Any] = {}
        error = None
        try:
            info = file_event_fields(path)
        except (OSError, KeyError, ValueError, RuntimeError) as exc:  # HDF5 on damage: any
            error = f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(OSError):  # its size, unless it is gone
                info = {"bytes": path.stat().st_size}
        event = FileEvent(
            time=time.time_ns() // 1_000_000, instance=self.settings.instance,
            run=definition.name, snapshot=definition.snapshot.snapshot_name, path=str(path),
            error=error, **info,
        )
        link = self._link

        def delivered(failure: TransportError | None) -> None:  # a producer poll's thread
            if failure is not None:  # timed out while Kafka was down, or dropped at exit
                log.error("file event not delivered", run=definition.name, path=str(path),
                          error=str(failure))

        published = link is not None and link.produce(
            self.settings.files_topic, event.encode(), key=definition.name,
            on_delivery=delivered)
        self.metrics.file_finalized(definition.name, event.status or "unknown")
        log.info("file event", run=definition.name, path=str(path), status=event.status,
                 iterations=event.iterations, bytes=event.bytes, published=published,
                 error=error)

    def run_handle(self, name: str) -> RunHandle | None:
        controller = self._controllers.get(name)
        if controller is not None:
            return controller
        for deferred in self._deferred:  # a reload is creating it again
            if deferred.definition.name == name:
                return _RestartingRun(deferred)
        return None

    def reload(self, origin: str) -> tuple[bool, str, dict[str, Any]]:
        """Re-read the definitions; apply the difference (see :mod:`recorder.config.diff`).
        A bad set of definitions changes nothing and is reported. Refused while the daemon
        shuts down (its loop still answers admin commands): the runs it would create would
        outlive the shutdown."""
        if self._state is DaemonState.STOPPING:
            raise AdminCommandError(ReplyCode.INTERNAL.value,
                                    "the daemon is shutting down: reload refused")
        self.notifier.reloading(f"reloading run definitions ({origin})")
        previous = self._state
        self._state = DaemonState.RELOADING
        try:
            return self._reload_now(origin)
        finally:
            self._state = previous
            self.notifier.ready(self._status_line())

    def _refuse_reload(self, problems: tuple[Any, ...], origin: str) -> str:
        self._config_errors = [str(p) for p in problems[:CONFIG_ERRORS_KEPT]]
        self._config_error_count = len(problems)
        if len(problems) > CONFIG_ERRORS_KEPT:
            self._config_errors.append(
                f"... and {len(problems) - CONFIG_ERRORS_KEPT} more problem(s), "
                f"{len(problems)} in all (k2eg-recorder validate "
                f"{self.settings.config_path} lists them all)")
        self.metrics.reload(False)
        for p in problems:
            log.error("reload refused: invalid run definition", problem=str(p), origin=origin)
        return (f"reload refused, the previous definitions stay in force: "
                f"{len(problems)} problem(s): " + "; ".join(self._config_errors))

    def _take_definitions(self, runs: Mapping[str, RunDefinition]) -> RunDiff:
        """A reload's good definitions in force (the disks they write to watched, the reload
        counted); what changed against the previous ones."""
        self._config_errors = []
        self._config_error_count = 0
        diff = diff_runs(self._definitions, runs)
        self._definitions = dict(runs)
        self._watch_disks()
        self.metrics.reload(True)
        return diff

    def _reload_before_start(self, starting: dict[str, bool]) -> dict[str, bool]:
        """A reload asked while connecting (before any run started): the definitions are
        read again (a bad set keeps those read at start, reported as a refused reload), so
        a run removed meanwhile is not started only to be stopped; which runs start."""
        loaded, problems = self._check_runs_in_time()
        if problems:
            self._refuse_reload(problems, "SIGHUP")
            return starting
        diff = self._take_definitions(loaded.runs)
        log.info("run definitions reloaded", origin="SIGHUP", summary=diff.summary())
        return {name: d.autostart or self._interrupted(d) for name, d in self._definitions.items()}

    def _reload_now(self, origin: str) -> tuple[bool, str, dict[str, Any]]:
        loaded, problems = self._check_runs_in_time()
        if problems:
            message = self._refuse_reload(problems, origin)
            return False, message, {"problems": list(self._config_errors)}
        diff = self._take_definitions(loaded.runs)
        for definition in diff.removed:  # its metrics go once it has stopped (_apply_deferred)
            if self._drop_deferred(definition.name) is not None:
                continue  # an earlier reload was creating it again: not any more
            old = self._controllers.pop(definition.name)
            old.shutdown("run removed by a reload")
            self._retiring.append(old)
        recreated: list[_Deferred] = []
        for change in diff.changed:
            deferred = self._drop_deferred(change.name)
            if deferred is not None:  # an earlier reload is creating it again: with this one
                recreated.append(_Deferred(change.new, deferred.start, [*deferred.blockers]))
                continue
            old = self._controllers[change.name]
            if not change.restart_required:
                old.definition = change.new
                continue
            active = old.recording_wanted  # not when a stop handed to it is still queued
            old.shutdown("run definition changed by a reload", restarting=True)
            self._retiring.append(old)
            del self._controllers[change.name]
            recreated.append(_Deferred(change.new, active, [old]))
        for deferred in recreated:  # once every run this reload stops is retiring: a run
            # taking over another's snapshot (a swap, a rename) also waits for that one
            topic = deferred.definition.snapshot.topic
            deferred.blockers.extend(c for c in self._retiring if c not in deferred.blockers
                                     and c.definition.snapshot.topic == topic)
            self._deferred.append(deferred)
        for definition in diff.added:  # also after its own earlier recording, when an
            # earlier reload removed it: both would write the run's state file
            blockers = [c for c in self._retiring
                        if c.definition.snapshot.topic == definition.snapshot.topic
                        or c.name == definition.name]
            self._deferred.append(_Deferred(definition, definition.autostart, blockers))
        self._apply_deferred()
        log.info("run definitions reloaded", origin=origin, summary=diff.summary())
        return True, f"reloaded: {diff.summary()}", diff.as_dict()

    def _drop_deferred(self, name: str) -> _Deferred | None:
        """Take the run ``name`` out of those a reload is creating again (if it is one)."""
        for deferred in self._deferred:
            if deferred.definition.name == name:
                self._deferred.remove(deferred)
                return deferred
        return None

    def _apply_deferred(self) -> None:
        stopped = [c for c in self._retiring if not c.alive]
        self._retiring = [c for c in self._retiring if c.alive]
        for c in stopped:  # a removed run's series: not before its stop has counted its last
            name = c.definition.name
            if (name not in self._definitions
                    and not any(r.definition.name == name for r in self._retiring)):
                self.metrics.remove_run(name)
        if not self._deferred:
            return
        waiting: list[_Deferred] = []
        for d in self._deferred:
            if any(c.alive for c in d.blockers) or d.definition.name in self._controllers:
                waiting.append(d)
            else:
                previous = next((c for c in d.blockers if c.name == d.definition.name), None)
                self._add_controller(d.definition, start=d.start, replaces=previous)
        self._deferred = waiting

    # ------------------------------------------------------------------ status
    def _run_statuses(self) -> dict[str, RunStatus]:
        """Every run: its controller's status, else (a reload is restarting it) that of its
        previous recording still stopping, else of the run waiting for another's to stop (a
        rename, a swap of snapshots): starting, or idle when it will not start."""
        runs = {c.name: c.status() for c in self._retiring if c.alive}
        runs.update({name: c.status() for name, c in self._controllers.items()})
        for deferred in self._deferred:
            d = deferred.definition
            if d.name not in runs:
                runs[d.name] = RunStatus(
                    name=d.name, state=RunState.STARTING if deferred.start else RunState.IDLE,
                    snapshot=d.snapshot.snapshot_name, topic=d.snapshot.topic, mode=d.mode,
                    autostart=d.autostart)
        return runs

    def status_document(self, kind: str = "heartbeat", seq: int = 0) -> StatusDocument:
        runs = self._run_statuses()
        return StatusDocument(
            instance=self.settings.instance,
            state=self._state,
            time=time.time_ns() // 1_000_000,
            started_at=self._started_ms,
            uptime=time.monotonic() - self._started_mono,
            runs=tuple(runs.values()),
            pid=os.getpid(),
            version=__version__,
            config_path=str(self.settings.config_path),
            config_errors=tuple(self._config_errors),
            seq=seq,
            kind=kind,
            disks=() if self._disk_watch is None else self._disk_watch.statuses,
        )

    def _heartbeat_doc(self, seq: int) -> StatusDocument:
        return self.status_document("heartbeat", seq)

    def _kafka_unreachable_since(self) -> float | None:
        client = self._client
        return None if client is None else client.kafka_unreachable_since

    def _status_line(self) -> str:
        states: dict[str, int] = {}
        complete = silent = 0
        for st in self._run_statuses().values():
            states[st.state.value] = states.get(st.state.value, 0) + 1
            complete += st.iterations_complete
            silent += st.silent_since is not None
        parts = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no runs"
        text = f"{self._state.value}: {parts}; {complete} iterations recorded"
        if silent:
            text += f"; {silent} silent (no data from the gateway)"
        down = self._kafka_unreachable_since()
        if down is not None:
            at = time.strftime("%H:%M:%S", time.gmtime(down))
            text += f"; Kafka unreachable since {at} UTC"
        too_large = None if self._client is None else self._client.receive_limit_exceeded
        if too_large is not None:
            text += ("; reading stuck at a Kafka message too large to receive (raise "
                     "RECORDER_KAFKA__RECEIVE__MESSAGE__MAX__BYTES)")
        if self._consumers_dead:
            text += (f"; Kafka consumer of the {' and '.join(self._consumers_dead)} died, "
                     "waiting for the watchdog to restart the daemon")
        if self._config_errors:
            text += f"; reload refused ({self._config_error_count} problem(s))"
        if self._metrics_problem:
            text += f"; {self._metrics_problem}"
        if self._disk_watch is not None:
            for warning in self._disk_watch.warnings():
                text += f"; disk {warning}"
        return text


def _log_disk_change(change: DiskChange) -> None:
    d = change.status
    free = None if d.free_bytes is None else format_bytes(d.free_bytes)
    if change.kind == "warning":
        log.warning("disk needs a look", path=d.path, warning=d.warning, free=free,
                    free_bytes=d.free_bytes, total_bytes=d.total_bytes, runs=list(d.runs))
    else:
        log.info("disk fine again", path=d.path, free=free, free_bytes=d.free_bytes,
                 runs=list(d.runs))

