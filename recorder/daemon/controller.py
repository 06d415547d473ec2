"""RunController: one run definition's lifecycle, driven by its own worker thread.

States (:class:`~recorder.admin.status.RunState`)::

    idle --start--> starting --ok--> recording --stop--> stopping --final+finalized--> idle
                       |  ^                |
                  fail |  | backoff        | the file cannot be written
                       v  |                v
                     retrying <--------- failed (an admin start tries again)
                                 disk full

A recording that fails because its disk (quota, file-size limit) ran out keeps its resume
state, like any failed recording, but the run does not wait for an operator: it stops reading
and leaves the gateway snapshot running (its data waits in Kafka), retries (state
``retrying``, the reason in ``last_error``) with backoff once its filesystem has room again
(``room_for``, injected: the daemon's disk watch, :mod:`recorder.daemon.diskspace`), and the
recording resumes from its last durable offset into a new segment: nothing still within the
topic's retention is lost. A stop while it waits stops the gateway snapshot.

The worker thread owns the run's :class:`~recorder.client.RecurringSnapshot` (iterator mode)
and its recording (:data:`~recorder.daemon.recording.hdf5_recording`: an HDF5 writer process
per recording, or in-process with ``output.isolate: false``): it takes events, writes them,
flushes on the recording's interval and, after each flush that moved the durable Kafka
offsets, rewrites the run's state file (:mod:`recorder.daemon.resume`). A ``.partial`` file a
crashed process left is recovered first (:mod:`recorder.daemon.leftovers`). Other threads (the
daemon's main loop) only queue requests — :meth:`RunController.start`, :meth:`~RunController.stop`,
:meth:`~RunController.trigger` return a :class:`~concurrent.futures.Future` holding the reply
text — and read :meth:`RunController.status`.

A stop sends the k2eg ``repeating_snapshot_stop`` from a helper thread while the worker keeps
draining events; once the client has delivered the final iteration and ended the subscription,
the recording is closed (files finalized) and the state file cleared.

A periodic run whose snapshot topic stays silent (no message for ``silence_after_s``, and
at least 5 time windows: :mod:`recorder.daemon.silence`) reports it in its status
(``silent_since``) and re-sends the snapshot's start from a helper thread, with backoff, until
messages arrive again: a restarted gateway has forgotten the snapshot and starts it anew. A
trigger the gateway answers "has not been found" (-2) re-sends the start, then the trigger.

A run whose ``output.bridge`` is set also serves each iteration live over the Karabo bridge
protocol (:mod:`recorder.sinks.bridge`, through :mod:`recorder.daemon.bridge`): the worker
creates the bridge sink with the recording, hands it every event it hands the recording (same
thread, right after it), and closes it with the recording's final status. The bridge never
affects recording: a sink that cannot be created (extra not installed, port taken) or raises
is logged, reported in the run's status (``bridge``) and dropped, and the recording goes on.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from recorder.admin.protocol import RESERVED_TAG_PREFIX, ReplyCode, files_text
from recorder.admin.status import RunState, RunStatus
from recorder.client import (
    Ack,
    GatewayError,
    IterationClosed,
    IterationEvent,
    IterationOpened,
    K2egClient,
    RecurringSnapshot,
    SnapshotProperties,
    StartAt,
    StopResult,
)
from recorder.client.throttle import RepeatThrottle
from recorder.config.models import RunDefinition
from recorder.daemon.backoff import Backoff
from recorder.daemon.bridge import (
    BRIDGE_COUNTERS,
    BridgeFactory,
    BridgeSink,
    bridge_status,
    karabo_bridge,
)
from recorder.daemon.diskspace import out_of_space
from recorder.daemon.leftovers import (
    LEFTOVER_TIMEOUT_S,
    finalize_leftover,
    offsets_in_file,
    recording_uid_in_file,
)
from recorder.daemon.pump import pending_bound
from recorder.daemon.recording import (
    Recording,
    RecordingFactory,
    hdf5_recording,
    prewarm_writers,
)
from recorder.daemon.resume import ActiveRecording, ResumeStore
from recorder.daemon.resume import RunState as StoredState
from recorder.daemon.silence import SilenceWatch, silence_limit_s
from recorder.errors import AdminCommandError, GatewayTimeoutError, RecorderError
from recorder.logging import bind_run
from recorder.metrics import RecorderMetrics
from recorder.newest import Newest
from recorder.sinks.bridge.options import BridgeOptions
from recorder.sinks.options import final_path, partial_path, render_file_name, taken_paths

_log = structlog.get_logger("recorder.daemon")

PUMP_BUDGET_S = 0.1  # longest stretch of event handling between two request checks
IDLE_WAIT_S = 0.2
ROOM_POLL_S = 1.0  # how often a run waiting for disk space asks whether there is room
LAG_EVERY_S = 2.0
TAGS_KEPT = 256  # trigger tags kept for tags_recorded (the newest): one per trigger, unbounded
STOP_ITERATION_TAGS: dict[str, str] = {f"{RESERVED_TAG_PREFIX}cause": "stop"}
"""Tags of the iteration a triggered snapshot publishes when it is stopped (not a trigger's)."""
SNAPSHOT_NOT_FOUND = -2  # the gateway's error code for a trigger of a snapshot it does not run
LOGGED_FILES = 10
"""Files a log line lists (the newest), beside how many there are: a recording of one-minute
segments has tens of thousands, and journald cuts a line over 48 kB (LineMax=) into pieces
that are not JSON."""


def logged_files(files: Newest[str]) -> dict[str, Any]:
    """Log fields for ``files``: the newest :data:`LOGGED_FILES` and how many there are."""
    return {"files": files.newest(LOGGED_FILES), "files_total": files.total}


@dataclass(slots=True)
class _Request:
    kind: str  # start | stop | trigger | exit
    future: Future[str]
    tags: Mapping[str, str] = field(default_factory=dict)
    reason: str = ""
    resumable: bool = False  # exit: a recording it interrupts is left for the next start
    restarting: bool = False  # exit: a reload changed the run, a new controller takes over


@dataclass(slots=True)
class _Resend:
    """A snapshot start re-sent from a helper thread, which fills in the answer."""

    thread: threading.Thread = field(default_factory=threading.Thread)
    result: Ack | BaseException | None = None


@dataclass(slots=True)
class _Stats:
    last_iteration: int | None = None
    last_iteration_at: int | None = None  # ms
    complete: int = 0
    incomplete: int = 0
    values_written: int = 0
    lag: int | None = None
    errors: int = 0
    last_error: str | None = None
    current_file: str | None = None
    recording_started_at: int | None = None
    # finalized files of the last recording started (those of earlier ones were told in
    # their file events and "recording closed" lines; kept, they grew for good): the newest
    # (FILES_KEPT: a month of 60 s segments is 43,200) and how many
    files: Newest[str] = field(default_factory=Newest)
    triggers: int = 0
    bridge: dict[str, Any] | None = None  # bridge_status() of the current/last bridge
    silent_since: int | None = None  # ms: the snapshot's silence is being reported
    snapshot_restarts: int = 0  # re-sent starts the gateway answered by starting it anew
    writer_behind_since: int | None = None  # ms: seen paused by back-pressure since then
    backpressure_pauses: int = 0  # of its subscriptions in this process


# what an operator can do about a trigger refused in each state (not_running)
_NOT_ARMED_HINT: dict[RunState, str] = {
    RunState.IDLE: "start it first (k2eg-recorder start {run})",
    RunState.FAILED: "start it again (k2eg-recorder start {run}); k2eg-recorder status {run} "
    "says why it failed",
    RunState.STARTING: "trigger again once it records (k2eg-recorder status {run})",
    RunState.RETRYING: "its start is retried; k2eg-recorder status {run} says why it waits",
    RunState.STOPPING: "it is being stopped; start it again afterwards",
    RunState.RECORDING: "it is not subscribed to its snapshot yet; trigger again",
}


class RunController:
    """See the module docstring. ``client`` is shared by every run of the daemon."""

    def __init__(
        self,
        definition: RunDefinition,
        client: K2egClient,
        store: ResumeStore,
        *,
        metrics: RecorderMetrics | None = None,
        recording_factory: RecordingFactory = hdf5_recording,
        bridge_factory: BridgeFactory = karabo_bridge,
        backoff: Backoff | None = None,
        value_budget: int | None = None,
        stop_timeout_s: float | None = None,
        silence_after_s: float = 30.0,
        room_for: Callable[[Path, float | None], bool] | None = None,
        on_file: Callable[[RunDefinition, Path], None] | None = None,
        leftover_timeout_s: float = LEFTOVER_TIMEOUT_S,
        replaces: RunStatus | None = None,
    ) -> None:
        self.definition = definition
        self.name = definition.name
        self._client = client
        self._store = store
        self._metrics = metrics
        self._factory = recording_factory
        self._bridge_factory = bridge_factory
        self._bridge: BridgeSink | None = None
        self._bridge_options: BridgeOptions | None = None  # those self._bridge was made with
        self._backoff = backoff or Backoff(initial_s=1.0, factor=2.0, max_s=30.0)
        self._value_budget = value_budget
        self._stop_timeout_s = stop_timeout_s
        self._silence_after_s = silence_after_s
        self._room_for = room_for or (lambda _directory, _since: True)
        self._awaiting_room = False  # retrying after the disk ran out: only once it has room
        # a start the gateway did not answer: it may still act on it (it reads its commands
        # when it is back, or when it gets to them), so a stop now must stop it there too
        self._start_unanswered = False
        self._ran_out_at = 0.0  # when (monotonic): room is judged on a later disk check
        self._on_file = on_file  # told of each finalized file (the daemon's file events)
        self._leftover_timeout_s = leftover_timeout_s
        self._announced = 0  # files of the current recording already told
        self._silence: SilenceWatch | None = None  # periodic runs while recording
        self._resend: _Resend | None = None  # the re-sent start in flight
        self._requests: queue.Queue[_Request] = queue.Queue()
        self._lock = threading.Lock()  # guards _state and _stats for status()
        self._state = RunState.IDLE
        # recording_wanted: start and stop requests not yet served, and which one of them
        # is the newest ("start" or "stop"); a lock of their own, taken before _lock
        self._asked_lock = threading.Lock()
        self._stops_asked = 0
        self._starts_asked = 0
        self._last_asked = ""
        self._stats = _Stats()
        if replaces is not None and replaces.state is RunState.FAILED:
            # the run's previous controller (a reload changed the run) ended failed: that
            # stands, with its error, until the run is started
            self._state = RunState.FAILED
            self._stats.errors, self._stats.last_error = replaces.errors, replaces.last_error
        self._sub: RecurringSnapshot | None = None
        self._rec: Recording | None = None
        self._stored: StoredState | None = None
        self._store_lock = threading.Lock()  # self._stored and its file: abandon() vs worker
        self._durable: dict[int, int] = {}
        # the iterations closed (counted in the status) whose close is not durable yet:
        # (partition, offset, complete, where it began if it opened in this recording). A
        # failed recording resumes before them, so they are uncounted then; a resume reads
        # from where the oldest began (ActiveRecording.open_offsets)
        self._undurable: list[tuple[int, int, bool, tuple[int, int] | None]] = []
        # where the iterations the recording has open began: iter_index -> (partition, offset)
        self._open_at: dict[int, tuple[int, int]] = {}
        # a resume's open offsets below its durable ones (partition -> offset): where the
        # iterations open at the crash began, until the partition's first iteration opens
        self._carried: dict[int, int] = {}
        self._next_attempt = 0.0
        self._start_waiters: list[Future[str]] = []
        self._stop_waiters: list[Future[str]] = []
        self._stop_thread: threading.Thread | None = None
        self._stop_result: StopResult | BaseException | None = None
        self._stop_reason = ""
        self._sub_ended = False
        self._pending_tags: deque[dict[str, str]] = deque()
        # (iter_index, tags) recorded, the newest TAGS_KEPT: the file has them all (a list grew
        # by one entry per trigger for as long as the daemon ran)
        self._tags: deque[tuple[int, dict[str, str]]] = deque(maxlen=TAGS_KEPT)
        self._flushes = 0
        self._values = 0
        self._bytes = 0  # rec.counters["bytes"] last seen, when the recording counts bytes
        self._file_sizes: dict[str, int] = {}  # else: size of each file being written
        self._skips: dict[str, int] = {}  # sub.skipped() last seen
        self._bp_pauses_seen = 0  # sub.stats["backpressure_pauses"] last seen
        self._receive_stuck = False  # reported a message too large to receive (this episode)
        self._first_segment = 0  # segment files the recording had before this process
        self._state_log_throttle = RepeatThrottle(60.0)  # "run state not saved", per error
        self._next_lag = 0.0
        self._exit = False
        self._abandoned = False  # the daemon exits without waiting for this run (abandon)
        self._stop_for_exit = False  # the stop in progress was begun by shutdown(), not stop()
        self._log = _log.bind(run=self.name, snapshot=definition.snapshot.snapshot_name)
        self._thread = threading.Thread(target=self._main, name=f"run-{self.name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ any thread
    def start(self) -> Future[str]:
        with self._asked_lock:
            self._starts_asked += 1
            self._last_asked = "start"
        return self._submit(_Request("start", Future()))

    def stop(self, reason: str = "stopped by an admin command") -> Future[str]:
        with self._asked_lock:
            self._stops_asked += 1
            self._last_asked = "stop"
        return self._submit(_Request("stop", Future(), reason=reason))

    def trigger(self, tags: Mapping[str, str] | None = None) -> Future[str]:
        return self._submit(_Request("trigger", Future(), tags=dict(tags or {})))

    def shutdown(self, reason: str = "daemon shutdown", *,
                 resumable: bool = False, restarting: bool = False) -> Future[str]:
        """Stop recording (as :meth:`stop`) and end the worker thread. ``resumable`` (the
        daemon's own shutdown): a recording interrupted earlier and not yet resumed (the
        run retries, e.g. waiting for room on its disk) stays in the state file for the
        next start to resume; otherwise (a reload removed or changed the run) it is ended
        as a stop ends it. ``restarting``: a reload changed the run and a new controller
        takes it over, starting it when :attr:`recording_wanted`; a start still waiting here
        is answered so."""
        return self._submit(_Request("exit", Future(), reason=reason, resumable=resumable,
                                     restarting=restarting))

    def abandon(self) -> None:
        """The daemon no longer waits for this run (its shutdown budget ran out): whatever
        the stop :meth:`shutdown` began still does before the process ends, the state file
        keeps the recording, so the next start resumes it from its last durable offset, as
        the daemon logs (a stop an admin command began stays a stop)."""
        with self._store_lock:
            self._abandoned = True
            stored = self._stored
            if (self.state is not RunState.STOPPING or self._stop_for_exit or stored is None
                    or stored.active is None):
                return
            # an admin stop: should the process end before the recording is closed, the
            # next start must not resume it (that stop was answered, it is not read again)
            try:
                self._stored = self._store.update(stored, stopped=True)
            except RecorderError as exc:
                self._log.error("run state not saved: the next start may resume the run "
                                "being stopped", error=str(exc))

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def state(self) -> RunState:
        with self._lock:
            return self._state

    @property
    def recording_wanted(self) -> bool:
        """Whether the run records or is starting to, unless a start or stop handed to it
        still waits for its worker: then whether the newest of those is a start (what a
        reload that restarts the run keeps to: such a command stands)."""
        with self._asked_lock:
            if self._stops_asked or self._starts_asked:
                return self._last_asked == "start"
            with self._lock:
                return self._state in (RunState.RECORDING, RunState.STARTING,
                                       RunState.RETRYING)

    def _stop_served(self) -> None:
        with self._asked_lock:
            self._stops_asked -= 1

    def _start_served(self) -> None:
        with self._asked_lock:
            self._starts_asked -= 1

    @property
    def tags_recorded(self) -> list[tuple[int, dict[str, str]]]:
        """The newest trigger tags recorded (at most ``TAGS_KEPT``), oldest first."""
        with self._lock:
            return list(self._tags)

    def status(self) -> RunStatus:
        d = self.definition
        with self._lock:
            s = self._stats
            return RunStatus(
                name=self.name,
                state=self._state,
                snapshot=d.snapshot.snapshot_name,
                topic=d.snapshot.topic,
                mode=d.mode,
                autostart=d.autostart,
                current_file=s.current_file,
                recording_started_at=s.recording_started_at,
                last_iteration=s.last_iteration,
                last_iteration_at=s.last_iteration_at,
                iterations_complete=s.complete,
                iterations_incomplete=s.incomplete,
                values_written=s.values_written,
                lag=s.lag,
                errors=s.errors,
                last_error=s.last_error,
                bridge=None if s.bridge is None else dict(s.bridge),
                silent_since=s.silent_since,
                snapshot_restarts=s.snapshot_restarts,
                writer_behind_since=s.writer_behind_since,
                backpressure_pauses=s.backpressure_pauses,
            )

    def files(self) -> Newest[str]:
        """Files finalized of the last recording started (this process): the newest
        (:data:`~recorder.newest.FILES_KEPT`) and how many (``total``)."""
        with self._lock:
            return self._stats.files.copy()

    def recording_files(self) -> list[str]:
        """Files finalized of the last recording started (what a stop reply lists): the
        newest (:data:`~recorder.newest.FILES_KEPT`)."""
        with self._lock:
            return list(self._stats.files)

    def _submit(self, request: _Request) -> Future[str]:
        if not self._thread.is_alive():
            if request.kind == "stop":
                self._stop_served()
            elif request.kind == "start":
                self._start_served()
            request.future.set_exception(
                AdminCommandError(ReplyCode.INTERNAL.value, f"run {self.name!r} is shut down")
            )
            return request.future
        self._requests.put(request)
        return request.future

    # ------------------------------------------------------------------ worker thread
    def _set_state(self, state: RunState) -> None:
        with self._lock:
            if self._state is state:
                return
            self._state = state
            if state is not RunState.RECORDING:
                self._stats.silent_since = None
                self._stats.writer_behind_since = None
                self._stats.lag = None  # it reads nothing: no lag to report
        if state is not RunState.RECORDING:
            self._silence = None
            self._resend = None  # a late answer then lands in its own, forgotten holder
        self._log.info("run state", state=state.value)
        if self._metrics is not None:
            self._metrics.set_recording(self.name, state is RunState.RECORDING)
            if state is not RunState.RECORDING:
                self._metrics.clear_lag(self.name)

    def _error(self, message: str) -> None:
        with self._lock:
            self._stats.errors += 1
            self._stats.last_error = message

    def _main(self) -> None:
        # what the k2eg client logs from this thread (subscribe, stop) names the run too
        with bind_run(run=self.name):
            try:
                self._end_stopped_leftover()
                self._main_loop()
            finally:  # the endpoints live as long as the run's worker (see _end_bridge_recording)
                self._close_bridge("complete", "")

    def _main_loop(self) -> None:
        while True:
            try:
                if self._step():
                    return
            except Exception as exc:  # a bug: never take the daemon down, report it; the
                self._crashed(exc)  # run is failed and serves on (a start tries again)

    def _step(self) -> bool:
        """One turn of the worker's loop; True once the worker is to end."""
        self._serve_requests()
        state = self.state
        if self._exit and state in (RunState.IDLE, RunState.FAILED):
            return True
        now = time.monotonic()
        if state in (RunState.STARTING, RunState.RETRYING) and now >= self._next_attempt:
            stopping = self._stop_thread
            if stopping is not None and stopping.is_alive():
                # the stop of the recording before still runs (that recording failed
                # meanwhile): its k2eg stop, and its end of the subscription, must not
                # come after the new start and hit the new recording's snapshot
                self._next_attempt = now + IDLE_WAIT_S
            elif self._awaiting_room and not self._room_for(
                    self.definition.output.directory, self._ran_out_at):
                self._next_attempt = now + ROOM_POLL_S
            else:
                self._attempt_start()
                return False
        if self._sub is not None:
            self._pump(PUMP_BUDGET_S)
            if self.state is RunState.STOPPING:
                self._check_stopped()
            elif self._sub_ended:
                self._lost_subscription()
            else:
                self._watch_silence()
            return False
        self._wait_request(IDLE_WAIT_S)
        return False

    def _crashed(self, exc: Exception) -> None:
        """A bug in the worker: reported, the recording aborted, the run failed. The worker
        goes on serving requests, so an admin start tries again (its thread ended: every
        later command was answered "shut down" until the daemon was restarted)."""
        self._log.exception("run worker crashed")
        self._error(f"internal error: {exc!r}")
        self._set_state(RunState.FAILED)
        self._abort_recording(f"internal error: {exc!r}")
        self._awaiting_room = False
        self._fail_waiters(f"internal error: {exc!r}")

    def _wait_request(self, timeout: float) -> None:
        try:
            request = self._requests.get(timeout=timeout)
        except queue.Empty:
            return
        self._serve(request)

    def _serve_requests(self) -> None:
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            self._serve(request)

    def _serve(self, request: _Request) -> None:
        try:
            if request.kind == "start":
                try:
                    self._on_start(request.future)
                finally:
                    self._start_served()
            elif request.kind == "stop":
                try:
                    self._on_stop(request.future, request.reason)
                finally:
                    self._stop_served()
            elif request.kind == "trigger":
                self._on_trigger(request.future, request.tags)
            elif request.kind == "exit":
                self._exit = True
                if self.state in (RunState.IDLE, RunState.FAILED):
                    request.future.set_result(f"run {self.name!r} shut down")
                else:
                    self._on_stop(request.future, request.reason,
                                  resumable=request.resumable,
                                  restarting=request.restarting)
        except AdminCommandError as exc:
            if not request.future.done():
                request.future.set_exception(exc)

    # ---- start ------------------------------------------------------------------------
    def _on_start(self, future: Future[str]) -> None:
        if self._exit:  # queued behind a shutdown: starting now would outlive the daemon
            raise AdminCommandError(ReplyCode.INTERNAL.value,
                                    f"run {self.name!r} is shutting down (the daemon is "
                                    "stopping or a reload removed it)")
        state = self.state
        if state is RunState.RECORDING:
            raise AdminCommandError(ReplyCode.ALREADY_RUNNING.value,
                                    f"run {self.name!r} is already recording")
        if state is RunState.STOPPING:
            raise AdminCommandError(ReplyCode.ALREADY_RUNNING.value,
                                    f"run {self.name!r} is stopping; start it again afterwards")
        if state is RunState.RETRYING and self._awaiting_room:  # may be hours: answer now
            with self._lock:
                why = self._stats.last_error
            future.set_result(f"run {self.name!r} waits for room on its disk ({why}); it "
                              "resumes by itself")
            return
        if state in (RunState.STARTING, RunState.RETRYING):
            self._start_waiters.append(future)
            return
        self._backoff.reset()
        self._next_attempt = 0.0
        self._start_waiters.append(future)
        with self._lock:
            self._stats.last_error = None
            self._stats.files = Newest()
        self._pending_tags.clear()  # a trigger whose iteration never came tags nothing new
        self._set_state(RunState.STARTING)

    def _attempt_start(self) -> None:
        d = self.definition
        props = d.snapshot.to_properties()
        with self._lock:  # the errors of this attempt stay in last_error, an earlier one's go
            errors_before = self._stats.errors
        stored = self._store.load(self.name)
        active = stored.active
        if active is not None and active.topic != d.snapshot.topic:
            self._log.warning("state file names another topic: not resumed",
                              topic=active.topic)
            if active.current_file:  # the file a crash left is finalized all the same (the
                self._recover_leftover(stored, active)  # state file is replaced below)
            active = None
        if active is not None:  # also when it names no file: a later segment may be left
            active = self._recover_leftover(stored, active)
        start_at: StartAt | None = None
        primed: dict[str, Any] = {}
        if active is not None and active.offsets:
            # a partition it does not name was added since: all it holds is newer
            start_at = StartAt.at(active.read_offsets(), others="beginning")
            if active.read_offsets() != active.resume_offsets():
                primed["prime_until"] = active.resume_offsets()
        prewarm_writers(self._factory, [d], self._log)  # overlaps the subscription
        budget = self._value_budget
        max_pending = pending_bound(len(props.pv_uri_list), *(() if budget is None else (budget,)))
        # what the client skipped on this topic before (earlier recordings): from here on, all
        # of it is this recording's (a resume's lost offsets come with its first fetch)
        skips_before = self._client.skipped(d.snapshot.topic)
        try:
            sub = self._client.snapshot_recurring(props, start=start_at, max_pending=max_pending,
                                                  **primed)
        except RecorderError as exc:
            if isinstance(exc, GatewayTimeoutError):
                self._start_unanswered = True
            self._start_failed(f"snapshot start failed: {exc}")
            return
        self._start_unanswered = False
        self._sub = sub
        self._sub_ended = False
        self._first_segment = active.segments if active is not None else 0
        if active is not None:
            self._log.info("resuming recording", recording_uid=active.recording_uid,
                           seq=active.seq, offsets=active.resume_offsets() or None,
                           next_segment=active.segments)
            seq, uid = active.seq, active.recording_uid
        else:
            seq, uid = stored.next_seq, None
        rec: Recording | None = None
        created_ns = (active.started_at_ns if active is not None and active.started_at_ns
                      else time.time_ns())
        try:
            rec = self._factory(d, seq=seq, recording_uid=uid,
                                first_segment=self._first_segment, start_ns=created_ns)
            reason = rec.reason
        except (RecorderError, OSError, ValueError, RuntimeError) as exc:
            reason = f"cannot create the recording: {exc}"
        if rec is None or rec.status != "recording":
            if self._metrics is not None:  # a file that cannot be written, as a failure later
                self._metrics.write_failed(self.name)
            if out_of_space(reason):  # no room for a new file: wait for it, as after a failure
                self._awaiting_room = True
                self._ran_out_at = time.monotonic()
                self._stop_snapshot_quietly(at_gateway=False)
                self._start_failed(f"{reason}; it resumes when its disk has room again")
                return
            self._error(reason)
            self._log.error("recording could not start", reason=reason)
            self._stop_snapshot_quietly()
            self._set_state(RunState.FAILED)
            self._resolve_start(error=f"run {self.name!r} could not start recording: {reason}")
            return
        self._rec = rec
        self._announced = 0
        rec.paths.hold(0)  # every file it finalizes is told, however many between two looks
        self._undurable, self._open_at = [], {}
        self._carried = {} if active is None else {
            p: o for p, o in active.open_offsets.items() if o <= active.offsets.get(p, -1)}
        # offsets before the first record of this recording count as durable: a crash before
        # the first flush resumes exactly where this recording started reading
        if active is not None and active.offsets:
            self._durable = dict(active.offsets)
        else:
            self._durable = {p: o - 1 for p, o in sub.start_offsets.items()}
        self._flushes = rec.counters.get("flushes", 0)
        self._values = rec.counters.get("values", 0)
        self._bytes = rec.counters.get("bytes", 0)
        self._file_sizes = {}
        self._skips = skips_before
        self._bp_pauses_seen = 0  # a new subscription counts from 0
        new_active = ActiveRecording(
            recording_uid=rec.uid,
            seq=seq,
            topic=sub.topic,
            snapshot_name=d.snapshot.snapshot_name,
            offsets=dict(self._durable),
            current_file=None if rec.current_path is None else str(rec.current_path),
            segments=self._first_segment + rec.counters.get("segments", 0),
            started_at_ns=created_ns,
            updated_at=time.time_ns() // 1_000_000,
            # a crash before the first flush resumes as this start did
            open_offsets=dict(active.open_offsets) if active is not None else {},
        )
        try:
            self._stored = self._store.begin(self.name, new_active)
        except RecorderError as exc:
            self._state_not_saved(exc)
            self._stored = StoredState(self.name, seq + 1, new_active)
        with self._lock:
            self._stats.current_file = new_active.current_file
            self._stats.recording_started_at = created_ns // 1_000_000  # a resume's: its own
            if self._stats.errors == errors_before:
                self._stats.last_error = None
        self._open_bridge(props)
        self._backoff.reset()
        if self._awaiting_room:
            self._awaiting_room = False
            self._log.info("disk has room again: recording resumed", file=new_active.current_file)
        limit = silence_limit_s(d.snapshot.time_window, self._silence_after_s)
        self._silence = None if d.triggered or limit == float("inf") else SilenceWatch(
            limit, time.monotonic(), Backoff(initial_s=limit, max_s=max(limit, 300.0))
        )
        self._set_state(RunState.RECORDING)
        armed = "armed (waiting for triggers)" if d.triggered else "recording"
        self._resolve_start(message=f"run {self.name!r} {armed} into {rec.current_path}")

    def _recover_leftover(self, stored: StoredState, active: ActiveRecording) -> ActiveRecording:
        """Finalize the ``.partial`` file an earlier process left and resume after the last
        offset it really holds: a writer process outlives a killed daemon long enough to
        flush what it had received, which may be more than the state file says. A state file
        that names no file (the last start recovered it, then died before it saved the file
        its resumed recording created): the segments after it only."""
        if active.current_file is None:
            offsets, segments = self._recover_later_segments(active, dict(active.offsets))
            if offsets == active.offsets and segments == active.segments:
                return active  # nothing left: the state file stays as it is
            return self._save_recovered(stored, active, offsets, segments)
        partial = Path(active.current_file)
        leftover = finalize_leftover(partial, self.name, timeout_s=self._leftover_timeout_s)
        finalized_before = final_path(partial)
        if leftover is None and not partial.exists() and finalized_before != partial \
                and finalized_before.exists():
            # `k2eg-recorder recover` (or an operator) finalized it while the daemon was
            # down: it may hold more than the state file says, as a file recovered here does
            self._log.info("the leftover file was finalized before this start",
                           path=str(finalized_before))
            # its event may never have gone out (a rotation the crashed daemon had not yet
            # told of; `recover` publishes none): told now, at the risk of a repeat
            self._adopt_file(finalized_before)
            leftover = finalized_before
        elif leftover is not None:
            self._adopt_file(leftover)
        if leftover is None:
            if partial.exists():
                return active  # left as .partial (logged); resume from the state file
            offsets = dict(active.offsets)
        else:
            offsets = self._offsets_after(leftover, active.topic, active.offsets)
        offsets, segments = self._recover_later_segments(active, offsets)
        return self._save_recovered(stored, active, offsets, segments)

    def _save_recovered(self, stored: StoredState, active: ActiveRecording,
                        offsets: dict[int, int], segments: int) -> ActiveRecording:
        """The state file once the files ``active`` left are recovered: resumed after
        ``offsets``, into segment ``segments``, naming no file."""
        try:
            new = self._store.update(stored, offsets=offsets, current_file=None,
                                     segments=segments)
        except RecorderError as exc:
            self._state_not_saved(exc)
            return replace(active, offsets=offsets, current_file=None, segments=segments)
        assert new.active is not None
        return new.active

    def _offsets_after(self, final: Path, topic: str, offsets: dict[int, int]
                       ) -> dict[int, int]:
        """``offsets`` moved past what the finalized file ``final`` holds."""
        in_file = offsets_in_file(final, topic)
        merged = {**offsets, **{p: max(o, offsets.get(p, -1)) for p, o in in_file.items()}}
        if merged != offsets:
            self._log.info("the recovered file holds more than the state file said",
                           state_offsets=offsets, file_offsets=in_file, path=str(final))
        return merged

    def _recover_later_segments(self, active: ActiveRecording, offsets: dict[int, int]
                                ) -> tuple[dict[int, int], int]:
        """Recover the segments the recording opened after its state file was last saved
        (a rotation is saved after the next flush: a crash in between leaves the state file
        naming the segment before): (offsets past what they hold, the next segment number)."""
        segments = active.segments
        if not active.started_at_ns:  # an old state file: the file names cannot be known
            return offsets, segments
        start = dt.datetime.fromtimestamp(active.started_at_ns / 1e9, dt.UTC)
        while True:
            name = render_file_name(
                self.definition.output, run=self.name, snapshot=active.snapshot_name,
                start=start, seq=active.seq, segment=segments)
            recovered: Path | None = None
            # the name, or one with a counter when an earlier recording's file had it (a
            # template without {seq}/{start}): the one of this recording
            for final in taken_paths(name):
                later = partial_path(final)
                if later.exists():
                    self._log.info("a later segment of the recording was left too",
                                   path=str(later))
                    found = finalize_leftover(later, self.name,
                                              timeout_s=self._leftover_timeout_s)
                    if found is None:  # left as .partial (logged)
                        return offsets, segments + 1  # its number is never reused
                elif final.exists():  # rotated out again before the crash (several
                    # rotations between two saves of the state file: short segments)
                    found = final
                else:
                    continue
                if recording_uid_in_file(found) in (None, active.recording_uid):
                    recovered = found
                    break
                self._log.info("a file of another recording has the name of a later "
                               "segment", path=str(found))
            if recovered is None:
                return offsets, segments
            self._log.info("a later segment of the recording was finalized",
                           path=str(recovered))
            segments += 1  # the resumed recording never reuses its number
            self._adopt_file(recovered)  # its event may not have gone out (see above)
            offsets = self._offsets_after(recovered, active.topic, offsets)

    def _adopt_file(self, path: Path) -> None:
        """A finalized file of the recording being resumed, which an earlier process left:
        listed among this run's files and told (its file event)."""
        with self._lock:
            self._stats.files.append(str(path))
        self._file_finalized(path)

    def _start_failed(self, message: str) -> None:
        delay = self._backoff.next_delay()
        self._next_attempt = time.monotonic() + delay
        self._error(message)
        self._log.warning("run start failed; retrying", error=message, retry_in_s=round(delay, 2),
                          attempt=self._backoff.attempts)
        self._set_state(RunState.RETRYING)
        self._resolve_start(
            message=f"run {self.name!r} accepted but not recording yet: {message}; "
                    f"retrying in {delay:.1f} s"
        )

    def _resolve_start(
        self, *, message: str = "", error: str | None = None,
        code: ReplyCode = ReplyCode.START_FAILED,
    ) -> None:
        waiters, self._start_waiters = self._start_waiters, []
        for future in waiters:
            if future.done():
                continue
            if error is not None:
                future.set_exception(AdminCommandError(code.value, error))
            else:
                future.set_result(message)

    # ---- events -----------------------------------------------------------------------
    def _pump(self, budget_s: float) -> None:
        sub, rec = self._sub, self._rec
        assert sub is not None
        deadline = time.monotonic() + budget_s
        idle = False  # the queue ran dry: the input is drained for now
        heard = False
        # a writer process behind by more than its backlog bound is waited for before it is
        # handed another event; not while stopping
        room: Callable[[float], bool] | None = (
            None if rec is None or self.state is RunState.STOPPING
            else getattr(rec, "wait_for_room", None))
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if room is not None and not room(remaining):
                break  # the writer is behind: events wait in the subscription, whose bounded
                # queue pauses the topic (their messages wait in Kafka, not in memory); not
                # while stopping: the stop waits for its final iteration to be read
            try:
                event = sub.get(timeout=remaining)
            except TimeoutError:
                idle = True
                break
            if event is None:
                self._sub_ended = True
                break
            heard = True
            if rec is not None:
                self._on_event(rec, event)
            if not self._requests.empty():
                break
        if heard and self._silence is not None:
            self._heard()
        if rec is not None:
            rec.maybe_flush(idle=idle)
            self._after_flush(rec)
            self._announce_files(rec)
        if self._bridge is not None:
            self._note_bridge(self._bridge)
        now = time.monotonic()
        if now >= self._next_lag and not self._sub_ended:
            self._next_lag = now + LAG_EVERY_S
            self._update_topic_stats(sub)

    def _on_event(self, rec: Recording, event: IterationEvent) -> None:
        rec.handle(event)
        if self._bridge is not None:
            self._feed_bridge(self._bridge, event)
        if isinstance(event, IterationOpened):
            at = event.offset
            carried = self._carried.pop(event.partition, None)
            if carried is not None and event.snapshot_name is None:
                # opened by data: the rest of the iteration open at the crash (its header
                # and first values were read before the resume's offsets)
                at = min(at, carried)
            self._open_at[event.iter_index] = (event.partition, at)
        if self._pending_tags and isinstance(event, IterationOpened):
            # the iteration a trigger produced; tagged once the recording (and the bridge)
            # has it open (a restarted snapshot's iteration 1 is then in the new segment, not
            # the old one's)
            self._tag(rec, event.iter_index, self._pending_tags.popleft())
        if isinstance(event, IterationClosed):
            now_ms = time.time_ns() // 1_000_000
            with self._lock:
                s = self._stats
                s.last_iteration = event.iter_index
                s.last_iteration_at = now_ms
                if event.complete:
                    s.complete += 1
                else:
                    s.incomplete += 1
            self._undurable.append((event.partition, event.offset, event.complete,
                                    self._open_at.pop(event.iter_index, None)))
            # an incomplete one is counted here and logged by the client's subscription (once
            # a minute per reason, with run=, the missing messages and the gateway's error)

    def _tag(self, rec: Recording, iter_index: int, tags: dict[str, str]) -> None:
        """Record trigger tags with the iteration the trigger produced."""
        with self._lock:
            self._tags.append((iter_index, tags))
        annotate: Callable[[int, Mapping[str, str]], Any] | None = getattr(
            rec, "tag_iteration", None
        )
        if annotate is not None:
            annotate(iter_index, tags)
        bridge = self._bridge
        if bridge is not None:  # served live with the iteration, as the file's trains() has them
            try:
                bridge.tag_iteration(iter_index, tags)
            except Exception as exc:
                self._bridge_failed(exc)
        self._log.info("trigger tags", iteration=iter_index, tags=tags)

    def _after_flush(self, rec: Recording) -> None:
        if rec.counters.get("flushes", 0) != self._flushes:
            self._flushed(rec)
        if rec.status == "failed":  # after saving what its flushes made durable: a resume
            self._recording_failed(rec)  # starts after it, nothing recorded twice

    def _flushed(self, rec: Recording) -> None:
        """Count what the recording's new flushes wrote and save the offsets they made
        durable (also when it failed after them: that data is in its file)."""
        self._count_written(rec)
        current = None if rec.current_path is None else str(rec.current_path)
        with self._lock:
            self._stats.current_file = current
        durable = {p: o for (_t, p), o in rec.last_durable_offset.items()}
        merged = {**self._durable, **{p: max(o, self._durable.get(p, -1))
                                      for p, o in durable.items()}}
        self._count_iterations([u for u in self._undurable if u[1] <= merged.get(u[0], -1)])
        self._undurable = [u for u in self._undurable if u[1] > merged.get(u[0], -1)]
        stored = self._stored
        if stored is None or stored.active is None:
            return
        segments = self._first_segment + rec.counters.get("segments", 0)
        if (merged != self._durable or current != stored.active.current_file
                or segments != stored.active.segments):
            self._durable = merged
            try:
                with self._store_lock:
                    self._stored = self._store.update(self._stored or stored,
                                                      offsets=dict(merged),
                                                      open_offsets=self._open_offsets(merged),
                                                      current_file=current, segments=segments)
            except RecorderError as exc:
                self._state_not_saved(exc)

    def _open_offsets(self, durable: dict[int, int]) -> dict[int, int]:
        """Per partition of ``durable``, where the oldest iteration open at its offset began
        (open now, or closed at an offset not durable yet: ``_undurable``, already trimmed
        to ``durable``), else one past it: a resume reads from there (what a leftover file
        holds beyond ``durable`` is primed too)."""
        out = {p: o + 1 for p, o in durable.items()}
        began = [*self._open_at.values(), *(b for *_u, b in self._undurable if b is not None),
                 *self._carried.items()]
        for partition, offset in began:
            if 0 <= offset < out.get(partition, -1):
                out[partition] = offset
        return out

    def _state_not_saved(self, exc: RecorderError) -> None:
        """The run's state file cannot be written (an unwritable or full state directory):
        counted and in the status at every attempt (after each flush), logged once a minute
        with the number of attempts held back."""
        self._error(str(exc))
        held_back = self._state_log_throttle.admit(str(exc))
        if held_back is not None:
            self._log.error("run state not saved: a restart may not resume", error=str(exc),
                            repeats_held_back=held_back)

    def _bytes_written(self, rec: Recording) -> int:
        """Bytes the recording added since the last call: its ``bytes`` counter if it keeps
        one, else the growth of the file being written (compressed data plus metadata)."""
        if "bytes" in rec.counters:
            total = rec.counters["bytes"]
            delta, self._bytes = total - self._bytes, total
            return max(0, delta)
        path = rec.current_path
        if path is None:
            return 0
        try:
            size = path.stat().st_size
        except OSError:
            return 0
        key = str(path)
        delta = size - self._file_sizes.get(key, 0)
        self._file_sizes = {key: size}  # a new segment file starts from 0
        return max(0, delta)

    def _update_topic_stats(self, sub: RecurringSnapshot) -> None:
        """Skipped messages (malformed/late/duplicate, charged to this run's topic by the
        client) and the lag behind the end of the topic."""
        self._update_skips(sub)
        self._update_lag(sub)
        self._update_backpressure(sub)

    def _update_counts(self, sub: RecurringSnapshot) -> None:
        """The subscription's counts since the last look (skips, pauses), before it goes:
        the next one's start from its own baseline."""
        self._update_skips(sub)
        self._update_backpressure(sub)

    def _update_backpressure(self, sub: RecurringSnapshot) -> None:
        pauses = sub.stats["backpressure_pauses"]
        behind = sub.backpressure_paused
        with self._lock:
            s = self._stats
            new = pauses - self._bp_pauses_seen
            self._bp_pauses_seen = pauses
            s.backpressure_pauses += max(0, new)
            if not behind:
                s.writer_behind_since = None
            elif s.writer_behind_since is None:
                s.writer_behind_since = int(time.time() * 1000)
                self._log.info("writing falls behind: the snapshot topic is paused until it "
                               "catches up", queued_bytes=sub.pending_bytes,
                               queued_events=sub.pending)
        if new > 0 and self._metrics is not None:
            self._metrics.backpressure_paused(self.name, new)

    def _update_skips(self, sub: RecurringSnapshot) -> None:
        skipped = sub.skipped()
        if skipped == self._skips:
            return
        previous, self._skips = self._skips, skipped
        lost = skipped.get("lost.retention", 0) - previous.get("lost.retention", 0)
        if lost > 0:  # the adapter logged the offsets; this says which run lost what
            message = (f"{lost} message(s) of the snapshot topic were deleted by its retention "
                       "before this run read them: the recording has a gap")
            self._log.error("messages lost to the topic's retention", lost=lost)
            self._error(message)
        if self._metrics is None:
            return
        for reason, count in skipped.items():
            delta = count - previous.get(reason, 0)
            if delta > 0:
                self._metrics.skipped(self.name, reason, delta)

    def _update_lag(self, sub: RecurringSnapshot) -> None:
        lag = sub.lag(timeout=1.0)
        if lag is None:
            if self._client.kafka_unreachable_since is not None:
                # not the value from before the outage (messages pile up in Kafka meanwhile)
                with self._lock:
                    self._stats.lag = None
                if self._metrics is not None:
                    self._metrics.clear_lag(self.name)
            return
        with self._lock:
            self._stats.lag = lag
        if self._metrics is not None:
            self._metrics.lag(self.name, lag)
        self._check_receive_limit(sub, lag)

    def _check_receive_limit(self, sub: RecurringSnapshot, lag: int) -> None:
        """A message too large for the consumer to receive holds up reading while this
        run's topic has messages to read: an error of the run, once per episode."""
        hit = self._client.receive_limit_exceeded
        if hit is None:
            self._receive_stuck = False
            return
        if lag <= 0 or self._receive_stuck:
            return
        self._receive_stuck = True
        size, limit = hit
        self._log.error("reading stuck at a Kafka message too large to receive",
                        topic=sub.topic, response_bytes=size, receive_message_max_bytes=limit)
        self._error(f"reading stopped at a Kafka message too large to receive ({size} bytes "
                    f"with receive.message.max.bytes {limit}): raise "
                    "RECORDER_KAFKA__RECEIVE__MESSAGE__MAX__BYTES above it")

    # ---- silence (periodic runs) --------------------------------------------------------
    def _heard(self) -> None:
        assert self._silence is not None
        lasted = self._silence.heard(time.monotonic())
        if lasted is None:
            return
        with self._lock:
            self._stats.silent_since = None
        self._log.info("snapshot messages again after a silence", silent_s=round(lasted, 1))

    def _watch_silence(self) -> None:
        """Re-send the start of a periodic snapshot that went silent (see
        :mod:`recorder.daemon.silence`), from a helper thread: the worker keeps pumping."""
        watch, sub = self._silence, self._sub  # a watch exists only while recording
        if watch is None or sub is None:
            return
        pending = self._resend
        if pending is not None:
            if pending.thread.is_alive():
                return
            self._resend = None
            self._resend_done(sub, pending.result)
        if sub.pending:  # messages wait to be taken (a flush outlasted the limit): not silent
            self._heard()
            return
        if (self._client.kafka_unreachable_since is not None  # Kafka's silence, not the
                or self._client.receive_limit_exceeded is not None):  # gateway's: its
            self._heard()  # messages wait in Kafka (and a start cannot go out)
            return
        now = time.monotonic()
        if not watch.due(now):
            return
        silent_s = round(watch.silent_for(now), 1)
        if watch.resends == 1:
            with self._lock:
                self._stats.silent_since = time.time_ns() // 1_000_000 - int(silent_s * 1000)
        self._log.warning("snapshot silent: re-sending its start", silent_s=silent_s,
                          topic=sub.topic, attempt=watch.resends)
        job = _Resend()

        def resend() -> None:
            try:
                job.result = sub.resend_start()
            except BaseException as exc:
                job.result = exc

        job.thread = threading.Thread(target=contextvars.copy_context().run, args=(resend,),
                                      name=f"resend-{self.name}", daemon=True)
        self._resend = job
        job.thread.start()

    def _resend_done(self, sub: RecurringSnapshot, result: Ack | BaseException | None) -> None:
        watch = self._silence
        if watch is None:
            return
        silent_s = round(watch.silent_for(time.monotonic()))
        if isinstance(result, Ack) and result.publishing_topic:
            outcome = "restarted"
            self._error(f"no message for {silent_s} s: the gateway had lost the snapshot "
                        f"and started it again")
            self._log.warning("gateway started the snapshot again", message=result.message,
                              publishing_topic=result.publishing_topic)
            if result.publishing_topic != sub.topic:
                self._log.error("the gateway now publishes to another topic",
                                publishing_topic=result.publishing_topic, topic=sub.topic)
        elif isinstance(result, Ack):
            outcome = "already_running"
            self._error(f"no message for {silent_s} s although the gateway says the snapshot "
                        f"runs ({result.message})")
            self._log.warning("gateway says the snapshot runs, but nothing arrives",
                              message=result.message, silent_s=silent_s)
        else:
            outcome = "failed"
            self._error(f"no message for {silent_s} s, and re-sending the snapshot start "
                        f"failed: {result}")
            self._log.warning("re-sending the snapshot start failed", error=str(result),
                              silent_s=silent_s)
        self._count_resend(outcome)

    def _count_resend(self, outcome: str) -> None:
        """A re-sent start and the gateway's answer: ``restarted`` (it had lost the
        snapshot), ``already_running`` or ``failed``."""
        if outcome == "restarted":
            with self._lock:
                self._stats.snapshot_restarts += 1
        if self._metrics is not None:
            self._metrics.snapshot_resent(self.name, outcome)

    # ---- trigger ------------------------------------------------------------------------
    def _on_trigger(self, future: Future[str], tags: Mapping[str, str]) -> None:
        if not self.definition.triggered:
            raise AdminCommandError(
                ReplyCode.WRONG_MODE.value,
                f"run {self.name!r} is {self.definition.mode}: only triggered runs take triggers",
            )
        if self.state is not RunState.RECORDING or self._sub is None:
            raise AdminCommandError(ReplyCode.NOT_RUNNING.value,
                                    f"run {self.name!r} is {self.state.value}, not armed: "
                                    f"{_NOT_ARMED_HINT[self.state].format(run=self.name)}")
        self._pending_tags.append(dict(tags))
        try:
            ack = self._trigger(self._sub, tags)
        except RecorderError as exc:
            self._pending_tags.pop()
            self._error(f"trigger failed: {exc}")
            raise AdminCommandError(ReplyCode.INTERNAL.value, f"trigger failed: {exc}") from exc
        with self._lock:
            self._stats.triggers += 1
        self._log.info("triggered", tags=dict(tags), message=ack.message)
        future.set_result(f"run {self.name!r} triggered")

    def _trigger(self, sub: RecurringSnapshot, tags: Mapping[str, str]) -> Ack:
        """Trigger; a gateway that does not know the snapshot (-2: it was restarted and
        forgot it) gets its start again and then the trigger."""
        name = self.definition.snapshot.snapshot_name
        try:
            return self._client.snapshot_trigger(name, tags=dict(tags) or None)
        except GatewayError as exc:
            if exc.code != SNAPSHOT_NOT_FOUND:
                raise
            self._log.warning("the gateway does not know the snapshot: starting it again",
                              error=str(exc))
        try:
            ack = sub.resend_start()
        except RecorderError:
            self._count_resend("failed")
            raise
        # publishing_topic: started anew (iter_index begins again at 1)
        self._count_resend("restarted" if ack.publishing_topic else "already_running")
        if ack.publishing_topic and len(self._pending_tags) > 1:
            # triggers the forgetful gateway acked before it restarted never made their
            # iteration: matched in order, their tags went to this trigger's iteration and
            # every later one was tagged with the trigger before it, for good
            current = self._pending_tags.pop()
            self._log.warning("triggers acknowledged before the gateway restarted made no "
                              "iteration; their tags are dropped",
                              tags=list(self._pending_tags))
            self._pending_tags.clear()
            self._pending_tags.append(current)
        return self._client.snapshot_trigger(name, tags=dict(tags) or None)

    # ---- stop ---------------------------------------------------------------------------
    def _on_stop(self, future: Future[str], reason: str, *, resumable: bool = False,
                 restarting: bool = False) -> None:
        state = self.state
        if state is RunState.IDLE:
            raise AdminCommandError(ReplyCode.NOT_RUNNING.value,
                                    f"run {self.name!r} is not recording ({state.value})")
        if state is RunState.FAILED:  # an operator's "seen, leave it": only an admin stop
            # comes here (a shutdown or reload keeps a failed run as it is). The failed
            # recording ends as a stop ends one that waits for room: no start resumes it
            self._end_interrupted_recording(reason)
            self._set_state(RunState.IDLE)
            future.set_result(f"run {self.name!r} stopped: its failed recording is ended "
                              "(a start begins a new one)")
            return
        if state in (RunState.STARTING, RunState.RETRYING):
            if restarting:  # the new controller starts the run (recording_wanted)
                self._resolve_start(message=f"run {self.name!r} starts with its new "
                                    "definition (a reload changed it)")
            else:
                self._resolve_start(error=f"run {self.name!r} was stopped before it started")
            if self._awaiting_room or self._start_unanswered:
                # its snapshot was left running for the resume, or the gateway may still
                # start it: the stop goes after the start, so it does not run on there
                self._awaiting_room = False
                self._start_unanswered = False
                self._stop_gateway_snapshot()
            if not resumable:
                self._end_interrupted_recording(reason)
            self._set_state(RunState.IDLE)
            future.set_result(f"run {self.name!r} stopped before it started recording")
            return
        self._stop_waiters.append(future)
        if state is RunState.STOPPING:
            return
        sub = self._sub
        assert sub is not None
        self._stop_reason = reason
        self._stop_for_exit = self._exit
        self._stop_result = None
        self._set_state(RunState.STOPPING)
        self._log.info("stopping run", reason=reason)
        if self.definition.triggered:
            # the gateway publishes one last iteration when a snapshot stops, triggered or
            # not: tagged, so analysts do not count it as a trigger's
            self._pending_tags.append(dict(STOP_ITERATION_TAGS))

        def stop_snapshot() -> None:
            try:
                # the worker takes events meanwhile: a run far behind reads its backlog
                # (then the final iteration) as fast as it writes, in bounded memory
                self._stop_result = sub.stop(final_timeout_s=self._stop_timeout_s,
                                             keep_backpressure=True)
            except BaseException as exc:
                self._stop_result = exc

        self._stop_thread = threading.Thread(  # logs with this thread's context (run=)
            target=contextvars.copy_context().run, args=(stop_snapshot,),
            name=f"stop-{self.name}", daemon=True,
        )
        self._stop_thread.start()

    def _end_stopped_leftover(self) -> None:
        """A recording an admin stop was ending when the last daemon exited (its shutdown
        budget ran out, see :meth:`abandon`): finalized now, never resumed."""
        try:
            stored = self._store.load(self.name)
            if stored.active is not None and stored.active.stopped:
                self._end_interrupted_recording("stopped by an admin command before the "
                                                "daemon's last shutdown", stored)
        except Exception:  # never keep the run from working
            self._log.exception("ending the stopped recording failed")

    def _end_interrupted_recording(self, reason: str,
                                   stored: StoredState | None = None) -> None:
        """A stop of a run that is not recording now but has a recording to resume (it
        failed, e.g. on a full disk, or a crash interrupted it, and the run retries): that
        recording ends here, as a stop ends a running one. Its ``.partial`` file is
        finalized (and told of) where possible, else left for ``k2eg-recorder recover``
        (logged); the state file no longer has it, so no later start resumes it. ``stored``:
        the run's state, when just loaded."""
        if stored is None:
            stored = self._store.load(self.name)
        active = stored.active
        if active is None:
            return
        partial = active.current_file
        self._recover_leftover(stored, active)  # also a later segment when it names none
        stored = self._store.load(self.name)
        if partial and Path(partial).exists():
            self._log.warning("the stopped recording's file could not be finalized now: "
                              "left for k2eg-recorder recover", path=partial)
        try:
            self._store.end(stored)
        except RecorderError as exc:
            self._state_not_saved(exc)
            return
        self._log.info("the interrupted recording ended with the run", reason=reason,
                       recording_uid=active.recording_uid)

    def _check_stopped(self) -> None:
        thread = self._stop_thread
        if thread is None or thread.is_alive():
            return
        result = self._stop_result
        sub = self._sub
        if isinstance(result, BaseException):
            # the gateway did not acknowledge the stop: end reading ourselves
            self._error(f"k2eg stop failed: {result}")
            self._log.error("k2eg stop failed", error=str(result))
            if sub is not None and not sub.ended:
                self._client.unsubscribe(sub)
        elif not self._sub_ended:
            return  # the subscription ended: drain what is still queued first
        if sub is not None:
            while True:
                try:
                    event = sub.get(timeout=0.5)
                except TimeoutError:
                    break
                if event is None:
                    break
                if self._rec is not None:
                    self._on_event(self._rec, event)
        if sub is not None:
            self._update_counts(sub)
        final_seen = isinstance(result, StopResult) and result.final_seen
        status = "complete" if final_seen else "aborted"
        why = self._stop_reason
        if isinstance(result, BaseException):
            why += f"; k2eg stop failed: {result}"
        elif not final_seen and isinstance(result, StopResult) and result.already_stopped:
            why += (f"; the gateway no longer ran the snapshot ({result.message}): it "
                    "published no final iteration")
        elif not final_seen:
            why += "; the final iteration did not arrive in time"
        files, failed = self._close_recording(status, why)
        self._stop_thread = None
        self._sub = None
        if failed is not None:  # e.g. its file could not be finalized: say so, not "stopped"
            self._set_state(RunState.FAILED)
            self._fail_waiters(f"run {self.name!r} stopped, but its recording failed: "
                               f"{failed}; {files_text(list(files), files.total)}")
            return
        self._set_state(RunState.IDLE)
        text = f"run {self.name!r} stopped ({status}); {files_text(list(files), files.total)}"
        waiters, self._stop_waiters = self._stop_waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(text)

    def _close_recording(self, status: str, reason: str) -> tuple[Newest[str], str | None]:
        """Close the recording as ``status``: (its files, why it failed or None). A failure
        found at the close (its file could not be finalized) counts as a write error."""
        rec, self._rec = self._rec, None
        if rec is None:
            return Newest(), None
        raised: str | None = None  # a close that raised left its file unfinalized: failed
        try:
            rec.close(status, reason)  # its files: rec.paths (the newest, and how many)
        except Exception as exc:
            raised = f"closing the recording failed: {type(exc).__name__}: {exc}"
            self._log.exception("closing the recording failed")
        self._count_written(rec)  # what its own last flush wrote, and that flush
        self._announce_files(rec)
        self._end_bridge_recording()
        files = rec.paths.mapped(str)
        with self._lock:
            self._stats.files.extend(files)
            self._stats.current_file = None
        failed = rec.reason if rec.status == "failed" else raised
        if failed is not None:
            self._uncount_undurable()
            if status != "failed":  # found at the close: not counted, logged nor in the
                if self._metrics is not None:  # status by _recording_failed
                    self._metrics.write_failed(self.name)
                self._log.error("recording failed", reason=failed, **logged_files(files))
                self._error(f"recording failed: {failed}")
            # keep the state file: a start resumes from the durable offset
            return files, failed or "the recording failed"
        if self._abandoned and self._stop_for_exit:  # the next start resumes it (abandon);
            # not a run an admin command was stopping: that stop stands
            self._log.warning("recording closed after the shutdown budget: its state is "
                              "kept, the next start resumes it", status=status,
                              **logged_files(files))
            return files, None
        with self._store_lock:
            stored = self._stored
            self._stored = None
            if stored is not None:
                try:
                    self._store.end(stored)
                except RecorderError as exc:
                    self._error(str(exc))
        closed, self._undurable = self._undurable, []  # in the finalized files now
        self._count_iterations(closed)
        self._log.info("recording closed", status=status, **logged_files(files))
        return files, None

    def _count_iterations(self, durable: list[tuple[int, int, bool, tuple[int, int] | None]]
                          ) -> None:
        """Prometheus counts an iteration once its close is durable (``durable``: entries of
        ``_undurable`` that are; a counter cannot take back the ones a failure leaves
        undurable, which the resume reads again)."""
        if self._metrics is None or not durable:
            return
        complete = sum(1 for _p, _o, c, _b in durable if c)
        if complete:
            self._metrics.iteration_closed(self.name, "complete", complete)
        if len(durable) - complete:
            self._metrics.iteration_closed(self.name, "incomplete", len(durable) - complete)

    def _uncount_undurable(self) -> None:
        """The recording failed and keeps its resume state: the iterations whose tail it had
        not made durable are read again by the resume, and counted then, not twice."""
        undurable, self._undurable = self._undurable, []
        complete = sum(1 for _p, _o, c, _b in undurable if c)
        with self._lock:
            self._stats.complete = max(0, self._stats.complete - complete)
            self._stats.incomplete = max(0, self._stats.incomplete
                                         - (len(undurable) - complete))

    # ---- the Karabo bridge (never affects recording) ----------------------------------
    def _open_bridge(self, props: SnapshotProperties) -> None:
        options = self.definition.output.bridge
        sink = self._bridge
        if sink is not None:  # the run's earlier recording's, still bound
            if options is not None and options == self._bridge_options \
                    and sink.status == "serving":
                try:
                    sink.begin_recording(props)
                except Exception as exc:
                    self._bridge_failed(exc)
                else:
                    self._note_bridge(sink)
                    self._log.info("karabo bridge serves the new recording",
                                   endpoints=dict(sink.endpoints))
                    return
            self._close_bridge("complete", "")
        if options is None:
            with self._lock:
                self._stats.bridge = None
            return
        try:
            sink = self._bridge_factory(options, run_name=self.name, snapshot=props)
        except Exception as exc:
            message = f"karabo bridge not started: {exc}"
            self._error(message)
            self._log.error("karabo bridge not started; recording goes on", error=str(exc))
            with self._lock:
                self._stats.bridge = {"status": "failed", "reason": str(exc),
                                      "endpoints": {}, "subscribers": False,
                                      **dict.fromkeys(BRIDGE_COUNTERS, 0)}
            return
        self._bridge, self._bridge_options = sink, options
        self._note_bridge(sink)
        if sink.status != "serving":
            self._error(f"karabo bridge failed: {sink.reason}")
            self._log.error("karabo bridge failed; recording goes on", reason=sink.reason)
            self._close_bridge("failed", sink.reason)
            return
        self._log.info("karabo bridge started", endpoints=dict(sink.endpoints))

    def _end_bridge_recording(self) -> None:
        """The recording ended: its open iterations are served as incomplete, and the bridge
        stays bound for the run's next recording (a REQ client's waiting request is answered
        then; one bound anew is never asked again), until the run's worker ends."""
        sink = self._bridge
        if sink is None:
            return
        try:
            sink.end_recording()
        except Exception as exc:
            self._bridge_failed(exc)
            return
        self._note_bridge(sink)

    def _feed_bridge(self, sink: BridgeSink, event: IterationEvent) -> None:
        try:
            sink.handle(event)
        except Exception as exc:
            self._bridge_failed(exc)

    def _bridge_failed(self, exc: Exception) -> None:
        """A bug in the live bridge: logged, counted, the bridge closed; recording goes on."""
        self._error(f"karabo bridge failed: {exc!r}")
        self._log.exception("karabo bridge failed; it is closed, recording goes on")
        self._close_bridge("failed", f"internal error: {exc!r}")

    def _note_bridge(self, sink: BridgeSink) -> None:
        try:
            doc = bridge_status(sink)
        except Exception:  # a status read must not stop the worker
            self._log.exception("karabo bridge status unavailable")
            return
        with self._lock:
            self._stats.bridge = doc

    def _close_bridge(self, status: str, reason: str) -> None:
        sink, self._bridge = self._bridge, None
        if sink is None:
            return
        try:
            sink.close(status, reason)
        except Exception:
            self._log.exception("closing the karabo bridge failed")
        self._note_bridge(sink)
        if status == "failed":
            with self._lock:
                if self._stats.bridge is not None:
                    self._stats.bridge = {**self._stats.bridge, "status": "failed",
                                          "reason": sink.reason or reason}

    def _announce_files(self, rec: Recording) -> None:
        """Tell of the files the recording finalized since the last call (a segment rotation,
        the close): ``rec.paths`` holds them from ``_announced`` on (:meth:`Newest.hold`)."""
        paths = rec.paths
        if paths.total <= self._announced:
            return
        new, self._announced = paths.since(self._announced), paths.total
        paths.hold(self._announced)
        for path in new:
            self._file_finalized(Path(path))

    def _file_finalized(self, path: Path) -> None:
        if self._on_file is None:
            return
        try:
            self._on_file(self.definition, path)
        except Exception:  # a file event must never stop a recording
            self._log.exception("file event failed", path=str(path))

    def _count_written(self, rec: Recording) -> None:
        """Count what the recording wrote since the last count (values, bytes) and its new
        flushes (each one's duration, the time of the last write)."""
        total = rec.counters.get("flushes", 0)
        flushes, self._flushes = total - self._flushes, total
        values = rec.counters.get("values", 0)
        delta, self._values = values - self._values, values
        nbytes = self._bytes_written(rec)  # 0 after close() without a bytes counter
        with self._lock:
            self._stats.values_written += max(0, delta)
        if self._metrics is not None:
            if flushes > 0 or delta > 0 or nbytes:
                self._metrics.values(self.name, max(0, delta), nbytes)
            if flushes > 0:  # each one (a rotation flushes inside handle(), then the pump)
                now = time.time()
                for seconds in list(rec.flush_seconds)[-flushes:]:
                    self._metrics.flushed(self.name, seconds, now)

    def _recording_failed(self, rec: Recording) -> None:
        """The file cannot be written: stop reading (Kafka keeps the data), keep the resume
        state, report. An admin start resumes from the last durable offset."""
        reason = rec.reason or "the recording failed"
        if self._metrics is not None:
            self._metrics.write_failed(self.name)
        # a stop was asked (its helper thread stops the gateway snapshot): the run does not
        # wait for room and resume by itself, it stops here
        stopping = self.state is RunState.STOPPING
        no_room = not stopping and (
            out_of_space(reason) or not self._room_for(self.definition.output.directory, None))
        # no room: stop reading, not the gateway snapshot (its data waits in Kafka)
        sub = self._sub
        self._stop_snapshot_quietly(at_gateway=not no_room and not stopping)
        if sub is not None:  # counted since the last look: the next start's baseline
            self._update_counts(sub)
        self._close_recording("failed", reason)
        self._sub = None
        if no_room:
            self._awaiting_room = True
            self._ran_out_at = time.monotonic()
            delay = self._backoff.next_delay()
            self._next_attempt = time.monotonic() + delay
            self._error(f"recording failed: {reason}; it resumes when its disk has room again")
            self._log.error("recording failed: its disk ran out; it resumes (from the last "
                            "durable offset, into a new segment) once the disk has room again",
                            reason=reason, directory=str(self.definition.output.directory))
            self._set_state(RunState.RETRYING)
        else:
            self._error(f"recording failed: {reason}")
            self._log.error("recording failed; run stopped (resume with an admin start)",
                            reason=reason)
            self._set_state(RunState.FAILED)
        self._fail_waiters(f"recording failed: {reason}")

    def _lost_subscription(self) -> None:
        """The client ended the subscription on its own (the client was closed)."""
        self._log.warning("snapshot subscription ended unexpectedly")
        if self._sub is not None:  # counted since the last look: the next start's baseline
            self._update_counts(self._sub)
        _, failed = self._close_recording("aborted",
                                          "the k2eg client stopped reading the snapshot")
        self._sub = None
        self._set_state(RunState.IDLE if failed is None else RunState.FAILED)

    def _stop_gateway_snapshot(self) -> None:
        """Stop the snapshot a run waiting for disk space left running at the gateway."""
        name = self.definition.snapshot.snapshot_name
        try:
            self._client.snapshot_stop(name, timeout=5.0, final_timeout_s=0.5)
        except RecorderError as exc:
            self._log.warning("k2eg stop failed", error=str(exc), snapshot=name)

    def _stop_snapshot_quietly(self, *, at_gateway: bool = True) -> None:
        """Stop reading the snapshot and, unless ``at_gateway`` is false (its data is to wait
        in Kafka), stop it at the gateway; a failed k2eg stop only unsubscribes."""
        sub, self._sub = self._sub, None
        if sub is None or sub.ended:
            return
        if at_gateway:
            try:
                # nobody takes its events now: back-pressure stays on, or the stop would
                # read a run's whole backlog into memory (it reads on while reading goes on)
                sub.stop(timeout=5.0, final_timeout_s=0.5, keep_backpressure=True)
                return
            except RecorderError as exc:
                self._log.warning("k2eg stop failed", error=str(exc))
        with contextlib.suppress(Exception):
            self._client.unsubscribe(sub)

    def _abort_recording(self, reason: str) -> None:
        with contextlib.suppress(Exception):
            self._stop_snapshot_quietly()
        with contextlib.suppress(Exception):
            self._close_recording("aborted", reason)

    def _fail_waiters(self, message: str) -> None:
        self._resolve_start(error=message, code=ReplyCode.INTERNAL)
        waiters, self._stop_waiters = self._stop_waiters, []
        for f in waiters:
            if not f.done():
                f.set_exception(AdminCommandError(ReplyCode.INTERNAL.value, message))

