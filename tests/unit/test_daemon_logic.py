"""Pure daemon logic with fakes: backoff, queue sizing, resume state, the run controller's
state machine, and admin command handling (exactly one reply per command)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from recorder.admin.protocol import CommandPolicy, ReplyCode, build_command, encode_command
from recorder.admin.status import DaemonState, RunState, RunStatus, StatusDocument
from recorder.client import IterationClosed, IterationOpened, IterationStatus, ValuesReceived
from recorder.client.results import Ack, StopResult
from recorder.client.wire import Record
from recorder.config.models import RunDefinition
from recorder.daemon.admin import AdminHandler
from recorder.daemon.adminlink import AdminCursor
from recorder.daemon.backoff import Backoff
from recorder.daemon.controller import RunController
from recorder.daemon.pump import MAX_PENDING, MIN_PENDING, pending_bound
from recorder.daemon.resume import ActiveRecording, ResumeStore
from recorder.errors import (
    AdminCommandError,
    GatewayError,
    GatewayTimeoutError,
    RecorderError,
    ServiceError,
    SinkError,
)
from recorder.metrics import RecorderMetrics
from recorder.newest import FILES_KEPT, Newest


# ------------------------------------------------------------------ backoff / sizing
def test_backoff_grows_caps_and_resets() -> None:
    b = Backoff(initial_s=0.5, factor=2, max_s=3, jitter=0)
    assert [b.next_delay() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    b.reset()
    assert b.next_delay() == 0.5


def test_backoff_jitter_stays_within_bounds() -> None:
    b = Backoff(initial_s=1, factor=1, max_s=1.05, jitter=0.1)
    delays = [b.next_delay() for _ in range(200)]
    assert all(0.9 <= d <= 1.05 for d in delays) and len(set(delays)) > 10


def test_backoff_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        Backoff(initial_s=0)
    with pytest.raises(ValueError):
        Backoff(jitter=1.5)


def test_pending_bound_is_a_value_budget() -> None:
    assert pending_bound(10_000, 200_000) == 20  # 20 iterations of 10k values
    assert pending_bound(1, 200_000) == MAX_PENDING
    assert pending_bound(1_000_000, 200_000) == MIN_PENDING
    assert pending_bound(10, 200_000, batches_per_iteration=100) == MAX_PENDING


# ------------------------------------------------------------------ resume store
def test_resume_store_round_trip_and_end(tmp_path: Path) -> None:
    store = ResumeStore(tmp_path / "state")
    assert store.load("r").active is None
    active = ActiveRecording("uid", 3, "topic", "snap", {0: 41}, "/x.h5.partial")
    state = store.begin("r", active)
    assert state.next_seq == 4
    state = store.update(state, offsets={0: 99})
    loaded = store.load("r")
    assert loaded.active is not None and loaded.active.resume_offsets() == {0: 100}
    assert loaded.active.current_file == "/x.h5.partial"
    store.end(loaded)
    assert store.load("r").active is None and store.load("r").next_seq == 4


def test_resume_store_ignores_a_corrupt_file(tmp_path: Path) -> None:
    store = ResumeStore(tmp_path)
    store.path("r").write_text("{not json")
    assert store.load("r").active is None


def test_a_short_write_of_the_state_file_is_completed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """write(2) may write less than asked (a disk or quota filling up in the middle of it,
    some network and FUSE file systems): the state file was renamed into place cut short,
    the next start found it unreadable and resumed nothing ("unreadable run state file
    ignored"). The rest is written; a write that fails then leaves the old file."""
    from recorder.daemon import resume

    real = os.write
    monkeypatch.setattr(resume.os, "write", lambda fd, data: real(fd, bytes(data[:16])))
    store = ResumeStore(tmp_path / "state")
    active = ActiveRecording("uid", 3, "topic", "snap", {0: 41}, "/x.h5.partial")
    store.begin("r", active)
    loaded = store.load("r").active
    assert loaded is not None and loaded.resume_offsets() == {0: 42}

    def full(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(resume.os, "write", full)
    with pytest.raises(ServiceError, match="No space left"):
        store.update(store.load("r"), offsets={0: 99})
    loaded = store.load("r").active
    assert loaded is not None and loaded.resume_offsets() == {0: 42}


def test_admin_cursor_saves_only_moves_and_ignores_another_topic(tmp_path: Path) -> None:
    cursor = AdminCursor(tmp_path / "state", "admin-a")
    assert cursor.load() is None  # first start: read from the end
    cursor.reset({0: 5})
    assert cursor.save()
    saved = json.loads((tmp_path / "state" / ".admin-offsets.json").read_text())
    assert saved["topic"] == "admin-a" and saved["offsets"] == {"0": 5}
    cursor.advance(0, 7)
    cursor.advance(0, 6)  # never backwards
    assert cursor.save()
    again = AdminCursor(tmp_path / "state", "admin-a")
    assert again.load() == {0: 7}
    mtime = again.path.stat().st_mtime_ns
    assert again.save() and again.path.stat().st_mtime_ns == mtime  # unchanged: not rewritten
    assert AdminCursor(tmp_path / "state", "admin-b").load() is None
    assert again.save(answered={"req-1": 1_795_291_545_000})  # answered ids: saved with it
    third = AdminCursor(tmp_path / "state", "admin-a")
    assert third.load() == {0: 7} and third.answered == {"req-1": 1_795_291_545_000}
    again.path.write_text('{"topic": "admin-a", "offsets": {"0": 9}}')  # before 2026-11-24
    older = AdminCursor(tmp_path / "state", "admin-a")
    assert older.load() == {0: 9} and older.answered == {}
    again.path.write_text("{broken")
    assert AdminCursor(tmp_path / "state", "admin-a").load() is None


# ------------------------------------------------------------------ controller with fakes
def _definition(tmp_path: Path, *, triggered: bool = False,
                bridge: dict[str, Any] | None = None, time_window: int = 1000) -> RunDefinition:
    output: dict[str, Any] = {"directory": str(tmp_path / "out")}
    if bridge is not None:
        output["bridge"] = bridge
    return RunDefinition.model_validate({
        "name": "r",
        "snapshot": {"snapshot_name": "snap", "pv_uri_list": ["pva://A:B"],
                     "triggered": triggered, "time_window": time_window},
        "output": output,
    })


class FakeSub:
    def __init__(self, topic: str, stop_fails: bool = False) -> None:
        self.stopped = False
        self.topic = topic
        self.stop_fails = stop_fails
        self.skips: dict[str, int] = {}
        self.start_offsets = {0: 10}
        self.events: queue.Queue[Any] = queue.Queue()
        self.ended = False
        self.resends: list[float] = []
        self.resend_answers: list[Ack | Exception] = []  # then: "already running"
        self.resend_gate: threading.Event | None = None  # holds the answer back until set
        self.stats: Counter[str] = Counter()
        self.backpressure_paused = False
        self.pending_bytes = 0

    def resend_start(self, timeout: float | None = None) -> Ack:
        self.resends.append(time.monotonic())
        if self.resend_gate is not None:
            self.resend_gate.wait(10)
        answer = (self.resend_answers.pop(0) if self.resend_answers
                  else Ack("repeating_snapshot", "id", "Snapshot snap is already running"))
        if isinstance(answer, Exception):
            raise answer
        return answer

    def get(self, timeout: float | None = None) -> Any:
        try:
            item = self.events.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None
        if item is None:
            self.ended = True
        return item

    def lag(self, timeout: float = 2.0) -> int | None:
        return None if self.ended else 5

    @property
    def pending(self) -> int:
        return self.events.qsize()

    def skipped(self) -> dict[str, int]:
        return dict(self.skips)

    def stop(self, timeout: float | None = None, *, final_timeout_s: float | None = None,
             keep_backpressure: bool = False) -> StopResult:
        self.stopped = True
        if self.stop_fails:
            raise GatewayTimeoutError("repeating_snapshot_stop", "x", 0.1)
        final = IterationClosed(self.topic, "snap", 99, IterationStatus.COMPLETE, None, 1, 2,
                                offset=30)
        self.events.put(IterationOpened(self.topic, "snap", 99, 1, offset=28))
        self.events.put(final)
        self.events.put(None)
        return StopResult("snap", self.topic, "", True, final)


class FakeClient:
    def __init__(self, failures: int = 0, stop_fails: bool = False) -> None:
        self.failures = failures
        self.stop_fails = stop_fails
        self.trigger_errors: list[Exception] = []
        self.starts: list[Any] = []
        self.primes: list[Any] = []  # the prime_until of each start
        self.triggers: list[Mapping[str, str] | None] = []
        self.sub: FakeSub | None = None
        self.unsubscribed: list[FakeSub] = []
        self.stopped_by_name: list[str] = []
        self.kafka_unreachable_since: float | None = None
        self.receive_limit_exceeded: tuple[int, int] | None = None
        self.offsets_reset = 0  # partitions of topics found created again, read from 0

    def snapshot_recurring(self, props: Any, start: Any = None, max_pending: int = 0,
                           prime_until: Any = None) -> FakeSub:
        self.starts.append(start)
        self.primes.append(prime_until)
        if self.failures:
            self.failures -= 1
            raise GatewayTimeoutError("repeating_snapshot", "x", 0.1)
        before = self.skipped(props.topic)
        self.sub = FakeSub(props.topic, self.stop_fails)
        self.sub.skips = before  # as K2egClient: counted per topic since the client started
        return self.sub

    def skipped(self, topic: str) -> dict[str, int]:
        sub = self.sub
        return dict(sub.skips) if sub is not None and sub.topic == topic else {}

    def snapshot_trigger(self, name: str, timeout: float | None = None,
                         *, tags: Mapping[str, str] | None = None) -> Ack:
        self.triggers.append(tags)
        if self.trigger_errors:
            raise self.trigger_errors.pop(0)
        return Ack("repeating_snapshot_trigger", "id", "")

    def unsubscribe(self, sub: FakeSub, timeout: float = 5.0) -> None:
        self.unsubscribed.append(sub)
        sub.ended = True

    def snapshot_stop(self, name: str, timeout: float | None = None, *,
                      final_timeout_s: float | None = None) -> StopResult:
        self.stopped_by_name.append(name)
        return StopResult(name, name, "", False)


class FakeRecording:
    def __init__(self, path: Path) -> None:
        self.status = "recording"
        self.reason = ""
        self.current_path: Path | None = path.with_name(path.name + ".partial")
        self.paths: Newest[Path] = Newest()
        self.counters = {"flushes": 0, "values": 0, "segments": 1}
        self.last_flush_seconds = 0.001
        self.flush_seconds: deque[float] = deque(maxlen=256)
        self.uid = "uid-1"
        self.events: list[Any] = []
        self.tags: list[tuple[int, Mapping[str, str]]] = []
        self._durable: dict[tuple[str, int], int] = {}
        self._final = path

    @property
    def last_durable_offset(self) -> dict[tuple[str, int], int]:
        return dict(self._durable)

    def handle(self, event: Any) -> None:
        self.events.append(event)

    def maybe_flush(self, now: float | None = None, *, idle: bool = False) -> bool:
        self.flush()
        return True

    def flush(self) -> None:
        if self.events and self.events[-1].offset >= 0:
            self._durable[(self.events[-1].topic, 0)] = self.events[-1].offset
        self.counters["flushes"] += 1
        self.flush_seconds.append(self.last_flush_seconds)
        self.counters["values"] = sum(isinstance(e, ValuesReceived) for e in self.events)

    def close(self, status: str = "complete", reason: str = "") -> list[Path]:
        self.flush()
        self.status = status
        self.paths.append(self._final)  # the segments finalized before, and the last
        self.current_path = None
        return list(self.paths)

    def tag_iteration(self, iter_index: int, tags: Mapping[str, str]) -> None:
        self.tags.append((iter_index, tags))


def _controller(tmp_path: Path, client: FakeClient, *, triggered: bool = False,
                bridge: dict[str, Any] | None = None, bridge_factory: Any = None,
                metrics: RecorderMetrics | None = None, time_window: int = 1000,
                silence_after_s: float | None = None,
                room_for: Callable[[Path, float | None], bool] | None = None,
                on_file: Callable[[RunDefinition, Path], None] | None = None,
                ) -> tuple[RunController, list[FakeRecording]]:
    made: list[FakeRecording] = []
    extra: dict[str, Any] = {} if bridge_factory is None else {"bridge_factory": bridge_factory}
    if room_for is not None:
        extra["room_for"] = room_for
    if on_file is not None:
        extra["on_file"] = on_file
    if metrics is not None:
        extra["metrics"] = metrics
    if silence_after_s is not None:
        extra["silence_after_s"] = silence_after_s

    def factory(definition: RunDefinition, *, seq: int, recording_uid: str | None,
                first_segment: int = 0, start_ns: int | None = None) -> FakeRecording:
        rec = FakeRecording(tmp_path / f"r_{seq}.h5")
        made.append(rec)
        return rec

    c = RunController(
        _definition(tmp_path, triggered=triggered, bridge=bridge, time_window=time_window),
        client,  # type: ignore[arg-type]
        ResumeStore(tmp_path / "state"), recording_factory=factory,  # type: ignore[arg-type]
        backoff=Backoff(initial_s=0.05, factor=2, max_s=0.2, jitter=0), **extra,
    )
    return c, made


def _started(c: RunController, client: FakeClient) -> FakeSub:
    """Start the run and return the subscription its start made."""
    c.start().result(5)
    sub = client.sub
    assert sub is not None
    return sub


def _wait(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_start_retries_with_backoff_then_records_and_stops(tmp_path: Path) -> None:
    client = FakeClient(failures=2)
    c, made = _controller(tmp_path, client)
    try:
        first = c.start().result(5)
        assert "retrying" in first and c.state is RunState.RETRYING
        assert c.status().errors == 1 and "snapshot start failed" in str(c.status().last_error)
        _wait(lambda: c.state is RunState.RECORDING)
        assert len(client.starts) == 3 and client.starts[-1] is None
        assert c.status().last_error is None
        stored = json.loads((tmp_path / "state" / "r.json").read_text())
        assert stored["active"]["offsets"] == {"0": 9}  # start offset 10 - 1
        sub = client.sub
        assert sub is not None
        sub.events.put(IterationOpened(sub.topic, "snap", 1, 1, offset=11))
        sub.events.put(IterationClosed(sub.topic, "snap", 1, IterationStatus.COMPLETE, None, 1,
                                       2, offset=13))
        _wait(lambda: c.status().iterations_complete == 1)
        _wait(lambda: json.loads((tmp_path / "state" / "r.json").read_text())["active"]
              ["offsets"] == {"0": 13})
        _wait(lambda: c.status().lag == 5)  # RecurringSnapshot.lag(), after the first pump
        result = c.stop().result(5)
        assert "stopped (complete)" in result
        assert c.state is RunState.IDLE and c.status().last_iteration == 99
        assert made[0].status == "complete" and list(c.files()) == [str(made[0]._final)]
        assert json.loads((tmp_path / "state" / "r.json").read_text())["active"] is None
        with pytest.raises(AdminCommandError) as err:
            c.stop().result(5)
        assert err.value.code == "not_running"
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_a_stop_the_gateway_answers_already_stopped_says_so_not_a_late_final_iteration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A gateway restarted (or a snapshot stopped by another client) before the run's stop
    answers "is already stopped" and publishes no final iteration: the recording's reason
    and the stop's answer say so, not that the final iteration did not arrive in time (which
    sends an operator after a slow gateway or a short stop timeout)."""
    client = FakeClient()
    c, made = _controller(tmp_path, client)
    reasons: list[str] = []
    try:
        c.start().result(5)
        sub = client.sub
        assert sub is not None

        def stop(timeout: float | None = None, *, final_timeout_s: float | None = None,
                 keep_backpressure: bool = False) -> StopResult:
            sub.events.put(None)
            return StopResult("snap", sub.topic, "Snapshot 'snap' is already stopped", False)

        monkeypatch.setattr(sub, "stop", stop)
        close = made[0].close
        monkeypatch.setattr(made[0], "close", lambda status="complete", reason="": (
            reasons.append(reason), close(status, reason))[1])
        result = c.stop().result(5)
        assert reasons and "did not arrive in time" not in reasons[0], reasons
        assert "already stopped" in reasons[0]
        assert "stopped (aborted)" in result
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_a_state_file_that_cannot_be_saved_is_logged_once_a_minute(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unwritable state directory: every failed save is counted (errors, last_error),
    but the log says so once a minute, not after every flush (~5 lines a second a run)."""
    client = FakeClient()
    c, _made = _controller(tmp_path, client)
    try:
        c.start().result(5)
        _wait(lambda: c.state is RunState.RECORDING)
        errors_before = c.status().errors

        def refuse(self: ResumeStore, *args: Any, **kwargs: Any) -> Any:
            raise RecorderError("cannot write /state/r.json: read-only file system")

        monkeypatch.setattr(ResumeStore, "update", refuse)
        sub = client.sub
        assert sub is not None
        with capture_logs() as logs:
            for i in range(1, 6):
                sub.events.put(IterationOpened(sub.topic, "snap", i, i, offset=10 + 3 * i))
                sub.events.put(IterationClosed(sub.topic, "snap", i, IterationStatus.COMPLETE,
                                               None, i, i, offset=12 + 3 * i))
                _wait(lambda i=i: c.status().iterations_complete == i)
                _wait(lambda i=i: c.status().errors >= errors_before + i)
        lines = [e for e in logs if e["event"].startswith("run state not saved")]
        assert len(lines) == 1, lines
        assert lines[0]["repeats_held_back"] == 0 and "read-only" in lines[0]["error"]
        assert "read-only" in str(c.status().last_error)
    finally:
        monkeypatch.undo()
        c.shutdown().result(5)
        assert c.join(5)


def test_a_state_file_that_cannot_be_saved_at_the_start_is_the_last_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The state file cannot be written when the recording begins (a read-only state
    directory): the status counted the error but showed ``last_error: null`` (the successful
    start cleared it right after), so an operator saw 1 error and not what it was, until the
    next flush failed too. The start clears the error of an earlier attempt, not its own."""
    def refuse(self: ResumeStore, *args: Any, **kwargs: Any) -> Any:
        raise RecorderError("cannot write /state/r.json: read-only file system")

    monkeypatch.setattr(ResumeStore, "begin", refuse)
    client = FakeClient(failures=1)  # an earlier attempt failed: its error is cleared
    c, _made = _controller(tmp_path, client)
    try:
        c.start().result(5)
        _wait(lambda: c.state is RunState.RECORDING)
        status = c.status()
        assert status.errors == 2, status
        assert status.last_error == "cannot write /state/r.json: read-only file system"
    finally:
        monkeypatch.undo()
        c.shutdown().result(5)
        assert c.join(5)


def test_incomplete_iterations_are_counted_and_logged_once_by_the_client(
    tmp_path: Path,
) -> None:
    """A gateway whose every tail carries an error (or a header lost each time) at 10 Hz:
    each one is counted (status, metrics). The line that tells it (once a minute per reason)
    is the client subscription's, with run=, the missing messages and the gateway's error
    (test_client_api); the run controller logged a second "iteration incomplete" line of its
    own for the same iteration, with less in it."""
    from recorder.client import IncompleteReason

    client = FakeClient()
    c, _made = _controller(tmp_path, client)
    try:
        sub = _started(c, client)
        _wait(lambda: c.state is RunState.RECORDING)
        with capture_logs() as logs:
            for i in range(1, 21):
                reason = (IncompleteReason.GATEWAY_ERROR if i < 20
                          else IncompleteReason.NO_HEADER)
                sub.events.put(IterationOpened(sub.topic, "snap", i, i, offset=10 + 2 * i))
                sub.events.put(IterationClosed(sub.topic, "snap", i,
                                               IterationStatus.INCOMPLETE, reason, i, i,
                                               offset=11 + 2 * i))
            _wait(lambda: c.status().iterations_incomplete == 20)
        assert [e for e in logs if e["event"] == "iteration incomplete"] == []
        assert c.status().iterations_complete == 0
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_start_resumes_from_the_durable_offset(tmp_path: Path) -> None:
    store = ResumeStore(tmp_path / "state")
    store.begin("r", ActiveRecording("old-uid", 7, "snap", "snap", {0: 41}, None))
    client = FakeClient()
    c, _made = _controller(tmp_path, client)
    try:
        c.start().result(5)
        start = client.starts[0]
        assert start is not None and start.offsets == {0: 42}
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_the_state_file_says_where_the_oldest_iteration_open_at_the_durable_offset_began(
        tmp_path: Path) -> None:
    """A resume reads from there (below the durable offset only priming the duplicate check):
    a producer's copy of a message written before a crash, lying after the durable offset,
    is then known as one. An iteration closed at an offset not durable yet counts too; with
    none open, one past the durable offset (a leftover file that holds more is primed)."""
    client = FakeClient()
    c, _made = _controller(tmp_path, client)
    path = tmp_path / "state" / "r.json"

    def saved() -> Any:
        return json.loads(path.read_text())["active"]

    try:
        sub = _started(c, client)
        sub.events.put(IterationOpened(sub.topic, "snap", 1, 1, offset=11))
        sub.events.put(ValuesReceived(sub.topic, 1, 1, 1, (), offset=13))
        _wait(lambda: saved()["offsets"] == {"0": 13})
        assert saved()["open_offsets"] == {"0": 11}
        sub.events.put(IterationClosed(sub.topic, "snap", 1, IterationStatus.COMPLETE, None, 1,
                                       2, offset=14))
        sub.events.put(IterationOpened(sub.topic, "snap", 2, 1, offset=15))
        sub.events.put(ValuesReceived(sub.topic, 2, 1, 1, (), offset=16))
        _wait(lambda: saved()["offsets"] == {"0": 16})
        assert saved()["open_offsets"] == {"0": 15}
        sub.events.put(IterationClosed(sub.topic, "snap", 2, IterationStatus.COMPLETE, None, 1,
                                       2, offset=17))
        _wait(lambda: saved()["offsets"] == {"0": 17})
        assert saved()["open_offsets"] == {"0": 18}  # nothing open: a resume reads from 18
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_a_resume_reads_from_the_oldest_open_iteration_and_primes_up_to_the_durable_offset(
        tmp_path: Path) -> None:
    store = ResumeStore(tmp_path / "state")
    store.begin("r", ActiveRecording("old-uid", 7, "snap", "snap", {0: 41}, None,
                                     open_offsets={0: 37}))
    assert json.loads(store.path("r").read_text())["active"]["open_offsets"] == {"0": 37}
    client = FakeClient()
    c, _made = _controller(tmp_path, client)
    try:
        c.start().result(5)
        assert client.starts[0].offsets == {0: 37} and client.primes[0] == {0: 42}
        # durable offsets never go back because of the earlier start; a crash before the
        # first flush primes as this start did
        active = json.loads(store.path("r").read_text())["active"]
        assert active["offsets"] == {"0": 41} and active["open_offsets"] == {"0": 37}
    finally:
        c.shutdown().result(5)
        assert c.join(5)
    # a state file written before open_offsets existed resumes as it did
    store.begin("r", ActiveRecording("old-uid", 7, "snap", "snap", {0: 41}, None))
    assert "open_offsets" not in store.path("r").read_text()
    loaded = store.load("r").active
    assert loaded is not None and loaded.read_offsets() == loaded.resume_offsets() == {0: 42}


def test_the_first_flush_after_a_resume_keeps_where_the_iterations_open_at_the_crash_began(
        tmp_path: Path) -> None:
    """Resumed with iterations open at the crash on both partitions (open_offsets below the
    durable offsets): the first flush after it, moved by new data of partition 0 alone, kept
    partition 1's open offset, so a second crash still primes partition 1 (a producer's copy
    right after its durable offset is not recorded again); and the iteration open at the
    crash on partition 0, reopened by its data after the durable offset, began at 37."""
    store = ResumeStore(tmp_path / "state")
    store.begin("r", ActiveRecording("old-uid", 7, "snap", "snap", {0: 41, 1: 20}, None,
                                     open_offsets={0: 37, 1: 18}))
    client = FakeClient()
    c, _made = _controller(tmp_path, client)

    def saved() -> Any:
        return json.loads(store.path("r").read_text())["active"]

    try:
        sub = _started(c, client)
        assert client.starts[0].offsets == {0: 37, 1: 18}
        # the rest of iteration 1, open at the crash: opened by its data (no header)
        sub.events.put(IterationOpened(sub.topic, None, 1, None, offset=42))
        sub.events.put(ValuesReceived(sub.topic, 1, 1, 1, (), offset=43))
        _wait(lambda: saved()["offsets"] == {"0": 43, "1": 20})
        assert saved()["open_offsets"] == {"0": 37, "1": 18}
        # a new iteration with its header: the one open at the crash is over once closed
        sub.events.put(IterationClosed(sub.topic, None, 1, IterationStatus.INCOMPLETE, None,
                                       1, 2, offset=44))
        sub.events.put(IterationOpened(sub.topic, "snap", 2, 1, offset=45))
        sub.events.put(ValuesReceived(sub.topic, 2, 1, 1, (), offset=46))
        _wait(lambda: saved()["offsets"] == {"0": 46, "1": 20})
        assert saved()["open_offsets"] == {"0": 45, "1": 18}
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_a_resume_reads_a_partition_its_offsets_do_not_name_from_its_beginning(
        tmp_path: Path) -> None:
    """The run state names the partitions the recording read (a partition added to the
    snapshot topic while the daemon was down, or before the recording flushed anything of it,
    is not among them). Such a partition started at its end: the gateway's messages written
    to it before the restart were never recorded. Everything it holds came after the saved
    offsets: it is read from its beginning."""
    from recorder.client.kafka import KafkaAdapter
    from recorder.settings import KafkaSettings

    class Watermarks:
        def get_watermark_offsets(self, tp: Any, timeout: float, cached: bool
                                  ) -> tuple[int, int]:
            return (3, 50)

    store = ResumeStore(tmp_path / "state")
    store.begin("r", ActiveRecording("old-uid", 7, "snap", "snap", {0: 41}, None))
    client = FakeClient()
    c, _made = _controller(tmp_path, client)
    adapter = KafkaAdapter(KafkaSettings(bootstrap_servers="127.0.0.1:1", app_name="r"),
                           lambda records, drained: None)
    try:
        c.start().result(5)
        start = client.starts[0]
        assert adapter._resolve(Watermarks(), "snap", [0, 1], start, 1.0) == {  # type: ignore[arg-type]
            0: 42, 1: 3}
    finally:
        adapter.close(1.0)
        c.shutdown().result(5)
        assert c.join(5)


def test_segment_numbering_and_start_time_are_kept_across_resumes(tmp_path: Path) -> None:
    store = ResumeStore(tmp_path / "state")
    store.begin("r", ActiveRecording("old-uid", 7, "snap", "snap", {0: 41}, None, segments=3,
                                     started_at_ns=123))
    client = FakeClient()
    c, made = _controller(tmp_path, client)
    try:
        c.start().result(5)
        active = store.load("r").active
        assert active is not None and active.seq == 7
        assert active.segments == 4 and active.started_at_ns == 123  # one more file opened
        made[0].counters["segments"] = 2  # the resumed recording rotated once
        assert client.sub is not None
        _feed(client.sub, 1, 1)
        _wait(lambda: (store.load("r").active or active).segments == 5)
    finally:
        c.shutdown().result(5)
        assert c.join(5)
    fresh, _ = _controller(tmp_path / "fresh", FakeClient())
    try:
        before = time.time_ns()
        fresh.start().result(5)
        new = ResumeStore(tmp_path / "fresh" / "state").load("r").active
        assert new is not None and new.segments == 1 and new.started_at_ns >= before
    finally:
        fresh.shutdown().result(5)
        assert fresh.join(5)


def test_a_resumed_recording_reports_when_the_recording_started(tmp_path: Path) -> None:
    """A recording resumed after a crash (or once its disk had room again) is the same
    recording (uid, seq, the start time in its files' names and in `ls`), but the status said
    ``recording_started_at``: the moment of the resume."""
    started_ns = 1_700_000_000_123_456_789
    store = ResumeStore(tmp_path / "state")
    store.begin("r", ActiveRecording("old-uid", 7, "snap", "snap", {0: 41}, None, segments=3,
                                     started_at_ns=started_ns))
    client = FakeClient()
    c, _made = _controller(tmp_path, client)
    try:
        c.start().result(5)
        assert c.status().recording_started_at == started_ns // 1_000_000
    finally:
        c.shutdown().result(5)
        assert c.join(5)
    fresh, _ = _controller(tmp_path / "fresh", FakeClient())
    try:
        before = time.time_ns() // 1_000_000
        fresh.start().result(5)
        at = fresh.status().recording_started_at
        assert at is not None and before <= at <= time.time_ns() // 1_000_000
    finally:
        fresh.shutdown().result(5)
        assert fresh.join(5)


def test_trigger_rules_and_tags_go_with_the_next_iteration(tmp_path: Path) -> None:
    client = FakeClient()
    periodic, _ = _controller(tmp_path / "p", client)
    try:
        periodic.start().result(5)
        with pytest.raises(AdminCommandError) as err:
            periodic.trigger({"a": "b"}).result(5)
        assert err.value.code == "wrong_mode"
    finally:
        periodic.shutdown().result(5)
    client = FakeClient()
    c, made = _controller(tmp_path / "t", client, triggered=True)
    try:
        with pytest.raises(AdminCommandError) as err:
            c.trigger().result(5)
        assert err.value.code == "not_running"
        assert err.value.message == ("run 'r' is idle, not armed: start it first "
                                     "(k2eg-recorder start r)")  # says what to do
        c.start().result(5)
        assert c.trigger({"shot": "1"}).result(5) == "run 'r' triggered"
        assert client.triggers == [{"shot": "1"}]
        sub = client.sub
        assert sub is not None
        sub.events.put(IterationOpened(sub.topic, "snap", 5, 1, offset=11))
        _wait(lambda: c.tags_recorded == [(5, {"shot": "1"})])
        assert made[0].tags == [(5, {"shot": "1"})]
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def _resends(metrics: RecorderMetrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "k2eg_recorder_snapshot_resends_total", {"run": "r", "outcome": outcome})
    return value or 0.0


def test_a_silent_periodic_run_resends_its_start_with_backoff_and_reports_it(
    tmp_path: Path,
) -> None:
    """Nothing on the topic for the limit (0.5 s here): the start is re-sent; no answer
    (gateway down) backs off (0.5 s, then 1 s), a fresh start (restarted gateway) is
    counted, and the first message ends the silence."""
    client = FakeClient()
    metrics = RecorderMetrics()
    c, _made = _controller(tmp_path, client, time_window=10, silence_after_s=0.5,
                           metrics=metrics)
    try:
        started = time.monotonic()
        sub = _started(c, client)
        sub.resend_answers = [
            GatewayTimeoutError("repeating_snapshot", "x", 0.1),
            Ack("repeating_snapshot", "id", "started", publishing_topic=sub.topic),
        ]
        _wait(lambda: len(sub.resends) >= 1)
        assert sub.resends[0] - started >= 0.5
        _wait(lambda: c.status().silent_since is not None)
        _wait(lambda: "failed" in (c.status().last_error or ""))
        _wait(lambda: len(sub.resends) >= 2)
        assert sub.resends[1] - sub.resends[0] >= 0.45  # backoff, with its +-10 % jitter
        _wait(lambda: c.status().snapshot_restarts == 1)
        st = c.status()
        assert st.state is RunState.RECORDING and st.silent_since is not None
        assert "started it again" in (st.last_error or "")
        assert st.to_json_obj()["snapshot_restarts"] == 1
        assert _resends(metrics, "failed") == 1 and _resends(metrics, "restarted") == 1
        # still nothing: the next answer is "already running" (the PVs or the gateway itself
        # need a look), reported as such
        _wait(lambda: _resends(metrics, "already_running") == 1)
        assert "although the gateway says the snapshot runs" in (c.status().last_error or "")
        sub.events.put(IterationOpened(sub.topic, "snap", 1, 1, offset=11))
        _wait(lambda: c.status().silent_since is None)
        n = len(sub.resends)
        time.sleep(0.2)  # heard less than the limit ago: nothing more is sent
        assert len(sub.resends) == n
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_a_slow_flush_while_messages_wait_is_no_silence(tmp_path: Path) -> None:
    """A flush that outlasts the silence limit (a slow disk, a large segment finalized) while
    the gateway goes on publishing: the messages wait in the subscription, nothing is silent.
    The watch was asked right after the flush and re-sent the snapshot start, reported the run
    silent ("no data from the gateway", ``status --check`` exit 4) and counted
    ``snapshot_resends_total{outcome="already_running"}``, which the README says to alert on."""
    client = FakeClient()
    metrics = RecorderMetrics()
    c, made = _controller(tmp_path, client, time_window=10, silence_after_s=0.5,
                          metrics=metrics)
    try:
        sub = _started(c, client)
        rec = made[0]
        flush = rec.flush
        slow = threading.Event()

        def slow_flush() -> None:
            if slow.is_set():
                slow.clear()
                _feed(sub, 2, 3)  # published meanwhile: waiting in the subscription
                time.sleep(0.8)
            flush()

        rec.flush = slow_flush  # type: ignore[method-assign]
        _feed(sub, 1, 1)
        _wait(lambda: c.status().iterations_complete == 1)
        slow.set()
        _wait(lambda: c.status().iterations_complete == 4)
        assert sub.resends == []
        assert c.status().silent_since is None and c.status().last_error is None
        assert _resends(metrics, "already_running") == 0
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_kafka_unreachable_is_no_silence_of_the_gateway(tmp_path: Path) -> None:
    """Kafka unreachable for longer than the silence limit: nothing can arrive, and the
    gateway's messages wait in Kafka (README: reading resumes where it stopped). The run was
    reported silent ("no data from the gateway", ``status --check`` exit 4), its start re-sent
    (failing, counted in ``snapshot_resends_total{outcome="failed"}``) and its last error said
    so after Kafka was back. Once Kafka answers, a gateway still silent is reported after a
    full limit."""
    client = FakeClient()
    metrics = RecorderMetrics()
    c, _made = _controller(tmp_path, client, time_window=10, silence_after_s=0.5,
                           metrics=metrics)
    try:
        sub = _started(c, client)
        client.kafka_unreachable_since = time.time()
        time.sleep(1.5)
        assert sub.resends == []
        st = c.status()
        assert st.silent_since is None and st.last_error is None
        assert _resends(metrics, "failed") == 0
        client.kafka_unreachable_since = None
        back = time.monotonic()
        _wait(lambda: len(sub.resends) >= 1)
        assert sub.resends[0] - back >= 0.3  # the limit, from the last check while down
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def _topic_stats_controller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[RunController, FakeClient, RecorderMetrics]:
    """A controller with metrics whose topic statistics (lag, skips, back-pressure) are
    taken every 50 ms instead of every LAG_EVERY_S."""
    import recorder.daemon.controller as controller_module

    monkeypatch.setattr(controller_module, "LAG_EVERY_S", 0.05)
    client = FakeClient()
    metrics = RecorderMetrics()
    c, _made = _controller(tmp_path, client, metrics=metrics)
    return c, client, metrics


def _run_sample(metrics: RecorderMetrics, name: str) -> float | None:
    """Run "r"'s sample of metric ``name`` (None: no such series)."""
    return metrics.registry.get_sample_value(f"k2eg_recorder_{name}", {"run": "r"})


def test_a_run_whose_writing_falls_behind_says_so_in_status_and_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's topic paused by back-pressure (its queue reached its bound): the status says
    since when and how often, the metric counts the pauses, and it clears once read again."""
    c, client, metrics = _topic_stats_controller(tmp_path, monkeypatch)

    def pauses() -> float:
        return _run_sample(metrics, "backpressure_pauses_total") or 0.0

    try:
        sub = _started(c, client)
        assert c.status().writer_behind_since is None and pauses() == 0
        before = int(time.time() * 1000)
        sub.stats["backpressure_pauses"] = 2
        sub.backpressure_paused = True
        _feed(sub, 1, 1)  # the worker goes round its loop
        _wait(lambda: c.status().writer_behind_since is not None)
        since = c.status().writer_behind_since
        assert since is not None and since >= before
        assert c.status().backpressure_pauses == 2 and pauses() == 2
        assert c.status().to_json_obj()["writer_behind_since"] == since
        sub.stats["backpressure_pauses"] = 3
        sub.backpressure_paused = False
        _feed(sub, 2, 1)
        _wait(lambda: c.status().writer_behind_since is None)
        _wait(lambda: c.status().backpressure_pauses == 3)
        assert pauses() == 3
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_backpressure_pauses_just_before_a_stop_are_counted(tmp_path: Path) -> None:
    """The subscription's pauses are looked at every LAG_EVERY_S while recording; those since
    the last look when the run stopped (or its recording failed) were never counted in the
    status nor in backpressure_pauses_total: the next subscription counts from 0."""
    client = FakeClient()
    metrics = RecorderMetrics()
    c, made = _controller(tmp_path, client, metrics=metrics)
    try:
        sub = _started(c, client)
        _feed(sub, 1, 1)  # the first pump takes the topic's statistics
        _wait(lambda: c.status().lag == 5)
        sub.stats["backpressure_pauses"] = 2
        assert "stopped" in c.stop().result(5)
        assert c.status().backpressure_pauses == 2
        assert _run_sample(metrics, "backpressure_pauses_total") == 2
        sub = _started(c, client)
        _feed(sub, 2, 1)
        _wait(lambda: c.status().lag == 5)
        sub.stats["backpressure_pauses"] = 1
        made[1].status, made[1].reason = "failed", "OSError: [Errno 5] Input/output error"
        _wait(lambda: c.state is RunState.FAILED)
        assert c.status().backpressure_pauses == 3
        assert _run_sample(metrics, "backpressure_pauses_total") == 3
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def _lag_gauge(metrics: RecorderMetrics) -> float | None:
    """The run's ``consumer_lag_messages`` sample (None: no series)."""
    return _run_sample(metrics, "consumer_lag_messages")


def test_a_stopped_run_reports_no_lag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lag (status and gauge) is that of a run reading its topic; once it stops it is
    gone, not its last value for ever (an alert on a growing lag kept firing)."""
    c, client, metrics = _topic_stats_controller(tmp_path, monkeypatch)

    try:
        sub = _started(c, client)
        _feed(sub, 1, 1)
        _wait(lambda: c.status().lag == 5)
        assert _lag_gauge(metrics) == 5
        c.stop().result(5)
        assert c.status().lag is None and _lag_gauge(metrics) is None
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_the_lag_is_not_its_value_from_before_kafka_went_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While Kafka is unreachable the lag cannot be asked for: the gauge and the status kept
    the value from before the outage (0 for a run that had caught up, while its messages
    pile up in Kafka). They have no lag now until Kafka answers again."""
    c, client, metrics = _topic_stats_controller(tmp_path, monkeypatch)

    try:
        sub = _started(c, client)
        _feed(sub, 1, 1)
        _wait(lambda: c.status().lag == 5)
        client.kafka_unreachable_since = time.time() - 3
        monkeypatch.setattr(sub, "lag", lambda timeout=2.0: None)  # no answer from Kafka
        _wait(lambda: c.status().lag is None)
        assert _lag_gauge(metrics) is None
        client.kafka_unreachable_since = None
        monkeypatch.setattr(sub, "lag", lambda timeout=2.0: 7)
        _wait(lambda: c.status().lag == 7)
        assert _lag_gauge(metrics) == 7
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_an_answer_to_a_resend_of_an_earlier_recording_is_not_applied_later(
    tmp_path: Path,
) -> None:
    client = FakeClient()
    c, _made = _controller(tmp_path, client, time_window=10, silence_after_s=1.0)
    try:
        c.start().result(5)
        first = client.sub
        assert first is not None
        gate = threading.Event()
        first.resend_gate = gate
        first.resend_answers = [Ack("repeating_snapshot", "id", "ok", publishing_topic="t")]
        _wait(lambda: len(first.resends) == 1)  # in flight, answer held back
        c.stop().result(5)
        c.start().result(5)
        second = client.sub
        assert second is not None and second is not first
        second.events.put(IterationOpened(second.topic, "snap", 1, 1, offset=11))
        gate.set()  # the old answer ("started anew") arrives now
        time.sleep(0.15)
        st = c.status()
        assert st.snapshot_restarts == 0 and st.silent_since is None
        assert "started it again" not in (st.last_error or "")
    finally:
        c.shutdown().result(5)


def test_trigger_tags_kept_in_memory_are_bounded(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The controller keeps the newest TAGS_KEPT trigger tags, not one entry per trigger for
    as long as the daemon runs (the recording has them all)."""
    import recorder.daemon.controller as controller_mod

    monkeypatch.setattr(controller_mod, "TAGS_KEPT", 2)
    client = FakeClient()
    c, made = _controller(tmp_path, client, triggered=True)
    try:
        sub = _started(c, client)
        for shot in range(1, 4):
            assert c.trigger({"shot": str(shot)}).result(5) == "run 'r' triggered"
            sub.events.put(IterationOpened(sub.topic, "snap", shot, 1, offset=10 + shot))
            _wait(lambda shot=shot: len(made[0].tags) == shot)
        assert c.tags_recorded == [(2, {"shot": "2"}), (3, {"shot": "3"})]
        assert [i for i, _t in made[0].tags] == [1, 2, 3]  # the recording got every one
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_files_of_earlier_recordings_are_not_kept_in_memory(tmp_path: Path) -> None:
    """A run started and stopped again and again keeps the files of its last recording (what
    a stop reply lists), not every file it ever finalized: that list grew by each
    recording's files for as long as the daemon ran, and the "daemon stopped" log line
    listed them all."""
    client = FakeClient()
    c, made = _controller(tmp_path, client)
    try:
        for n in range(30):
            _started(c, client)
            assert "stopped (complete)" in c.stop().result(5)
            assert c.recording_files() == [str(made[n]._final)]
        assert list(c.files()) == [str(made[-1]._final)]
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_triggered_runs_are_not_watched_and_periodic_watch_can_be_off(tmp_path: Path) -> None:
    client = FakeClient()
    trig, _ = _controller(tmp_path / "t", client, triggered=True, time_window=10,
                          silence_after_s=0.1)
    off_client = FakeClient()
    off, _ = _controller(tmp_path / "o", off_client, time_window=10, silence_after_s=0)
    try:
        trig.start().result(5)
        off.start().result(5)
        time.sleep(0.5)
        assert client.sub is not None and client.sub.resends == []
        assert off_client.sub is not None and off_client.sub.resends == []
        assert trig.status().silent_since is None and off.status().silent_since is None
    finally:
        for c in (trig, off):
            c.shutdown().result(5)


def test_a_trigger_the_gateway_does_not_know_restarts_the_snapshot_then_triggers(
    tmp_path: Path,
) -> None:
    """A restarted gateway forgot the snapshot: -2 "has not been found" on trigger; the
    start is re-sent and the trigger repeated, and its tags go with the new iteration 1."""
    client = FakeClient()
    metrics = RecorderMetrics()
    c, made = _controller(tmp_path, client, triggered=True, metrics=metrics)
    try:
        sub = _started(c, client)
        sub.events.put(IterationOpened(sub.topic, "snap", 7, 1, offset=11))  # before
        _wait(lambda: len(made[0].events) == 1)
        client.trigger_errors = [
            GatewayError("repeating_snapshot_trigger", -2, "Snapshot 'snap' has not been found")
        ]
        sub.resend_answers = [Ack("repeating_snapshot", "id", "ok", publishing_topic=sub.topic)]
        assert c.trigger({"shot": "9"}).result(5) == "run 'r' triggered"
        assert client.triggers == [{"shot": "9"}, {"shot": "9"}] and len(sub.resends) == 1
        assert c.status().snapshot_restarts == 1 and _resends(metrics, "restarted") == 1
        sub.events.put(IterationOpened(sub.topic, "snap", 1, 2, offset=40))  # the new one
        _wait(lambda: made[0].tags == [(1, {"shot": "9"})])
        client.trigger_errors = [GatewayError("repeating_snapshot_trigger", -1, "bad name")]
        with pytest.raises(AdminCommandError, match="trigger failed"):
            c.trigger().result(5)
        assert len(sub.resends) == 1  # other gateway errors are only reported
    finally:
        c.shutdown().result(5)


def test_tags_of_triggers_a_restarted_gateway_never_published_do_not_shift_later_tags(
    tmp_path: Path,
) -> None:
    """The gateway acked a trigger and was restarted before it published the iteration. Its
    tags stayed first in line: the next trigger (answered "has not been found", so the start
    was re-sent) got them on its iteration, and every later iteration the tags of the trigger
    before it, until the run was started again."""
    client = FakeClient()
    c, made = _controller(tmp_path, client, triggered=True)
    try:
        sub = _started(c, client)
        assert c.trigger({"shot": "1"}).result(5) == "run 'r' triggered"  # never published
        client.trigger_errors = [
            GatewayError("repeating_snapshot_trigger", -2, "Snapshot 'snap' has not been found")
        ]
        sub.resend_answers = [Ack("repeating_snapshot", "id", "ok", publishing_topic=sub.topic)]
        c.trigger({"shot": "2"}).result(5)
        sub.events.put(IterationOpened(sub.topic, "snap", 1, 2, offset=40))
        c.trigger({"shot": "3"}).result(5)
        sub.events.put(IterationOpened(sub.topic, "snap", 2, 3, offset=50))
        _wait(lambda: len(made[0].tags) == 2)
        assert made[0].tags == [(1, {"shot": "2"}), (2, {"shot": "3"})]
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_every_start_a_trigger_re_sends_is_counted_by_its_outcome(tmp_path: Path) -> None:
    """A trigger the gateway answers "has not been found" re-sends the snapshot start; the
    gateway may answer that start "already running", or not at all. Those re-sends were not
    counted in snapshot_resends_total (only a fresh start was), so the alert on any increase
    of it missed them, although the metric's help names this case."""
    client = FakeClient()
    metrics = RecorderMetrics()
    c, _made = _controller(tmp_path, client, triggered=True, metrics=metrics)
    not_found = GatewayError("repeating_snapshot_trigger", -2,
                             "Snapshot 'snap' has not been found")
    try:
        sub = _started(c, client)
        client.trigger_errors = [not_found]
        sub.resend_answers = [Ack("repeating_snapshot", "id", "Snapshot snap is already running")]
        c.trigger().result(5)
        assert len(sub.resends) == 1
        assert _resends(metrics, "already_running") == 1 and _resends(metrics, "restarted") == 0
        client.trigger_errors = [not_found]
        sub.resend_answers = [GatewayTimeoutError("repeating_snapshot", "x", 0.1)]
        with pytest.raises(AdminCommandError, match="trigger failed"):
            c.trigger().result(5)
        assert len(sub.resends) == 2 and _resends(metrics, "failed") == 1
        assert c.status().snapshot_restarts == 0
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_a_failed_recording_stops_the_run_and_keeps_the_resume_state(tmp_path: Path) -> None:
    client = FakeClient()
    c, made = _controller(tmp_path, client)
    try:
        c.start().result(5)
        made[0].status, made[0].reason = "failed", "OSError: disk full"
        _wait(lambda: c.state is RunState.FAILED)
        assert "disk full" in str(c.status().last_error)
        assert json.loads((tmp_path / "state" / "r.json").read_text())["active"] is not None
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_a_failed_recording_is_one_error_in_the_status(tmp_path: Path) -> None:
    """One write failure is one error: the status counted it twice (the close of the failed
    recording and the run's failure each added one), while write_errors_total counted 1."""
    client = FakeClient()
    metrics = RecorderMetrics()
    c, made = _controller(tmp_path, client, metrics=metrics)
    try:
        c.start().result(5)
        made[0].status, made[0].reason = "failed", "OSError: [Errno 5] Input/output error"
        _wait(lambda: c.state is RunState.FAILED)
        assert metrics.registry.get_sample_value(
            "k2eg_recorder_write_errors_total", {"run": "r"}) == 1
        status = c.status()
        assert status.errors == 1, status
        assert status.last_error == "recording failed: OSError: [Errno 5] Input/output error"
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_iterations_re_read_after_a_failure_are_counted_once(tmp_path: Path) -> None:
    """The status counted each closed iteration when it arrived; a recording that failed
    resumes from its last durable offset, so the iterations after it were read (and
    counted) again: 2 + 3 iterations recorded showed as 8. Those a failure leaves undurable
    are no longer counted (the resume counts them when it records them). Prometheus's
    ``iterations_total`` cannot go down: it counts an iteration once its close is durable."""
    client = FakeClient()
    metrics = RecorderMetrics()
    c, made = _controller(tmp_path, client, metrics=metrics)

    def counted() -> tuple[float | None, float | None]:
        return tuple(metrics.registry.get_sample_value(  # type: ignore[return-value]
            "k2eg_recorder_iterations_total", {"run": "r", "status": s})
            for s in ("complete", "incomplete"))
    try:
        sub = _started(c, client)
        rec = made[0]
        _feed(sub, 1, 2)  # flushed: durable
        _wait(lambda: rec.last_durable_offset == {(sub.topic, 0): 18})
        rec.flush = lambda: None  # type: ignore[method-assign]  # nothing durable after
        sub.events.put(IterationOpened(sub.topic, "snap", 3, 1, offset=19))
        sub.events.put(IterationClosed(sub.topic, "snap", 3, IterationStatus.INCOMPLETE,
                                       None, 1, 2, offset=21))
        _feed(sub, 4, 2)
        _wait(lambda: (c.status().iterations_complete, c.status().iterations_incomplete)
              == (4, 1))
        rec.status, rec.reason = "failed", "OSError: [Errno 5] Input/output error"
        _wait(lambda: c.state is RunState.FAILED)
        status = c.status()
        assert (status.iterations_complete, status.iterations_incomplete) == (2, 0), status
        assert counted() == (2, None)
        c.start().result(5)
        again = client.sub
        assert again is not None and again is not sub
        assert client.starts[-1] is not None and client.starts[-1].offsets == {0: 19}
        again.events.put(IterationOpened(again.topic, "snap", 3, 1, offset=19))
        again.events.put(IterationClosed(again.topic, "snap", 3, IterationStatus.INCOMPLETE,
                                         None, 1, 2, offset=21))
        _feed(again, 4, 2)
        _wait(lambda: len(made) == 2 and len(made[1].events) == 8)
        _wait(lambda: (c.status().iterations_complete, c.status().iterations_incomplete)
              == (4, 1))
        time.sleep(0.2)  # and no more
        status = c.status()
        assert (status.iterations_complete, status.iterations_incomplete) == (4, 1), status
        _wait(lambda: counted() == (4, 1))
        c.stop().result(5)
        status = c.status()
        assert counted() == (status.iterations_complete, status.iterations_incomplete), status
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_a_stop_of_a_failed_run_ends_its_recording_and_leaves_the_run_idle(
    tmp_path: Path,
) -> None:
    """``stop`` of a failed run was answered ``not_running``: an operator who had seen the
    failure and wanted the run left alone had no way to say so, and ``status --check`` kept
    exiting 4 until the run was started or its definition changed. The stop now ends the
    failed recording (no later start resumes it) and leaves the run idle; the error stays in
    its status."""
    client = FakeClient()
    c, made = _controller(tmp_path, client)
    try:
        sub = _started(c, client)
        _feed(sub, 1, 2)
        _wait(lambda: made[0].last_durable_offset == {(sub.topic, 0): 18})
        made[0].status, made[0].reason = "failed", "OSError: [Errno 5] Input/output error"
        _wait(lambda: c.state is RunState.FAILED)
        state_file = tmp_path / "state" / "r.json"
        assert json.loads(state_file.read_text())["active"] is not None
        assert c.stop().result(5) == ("run 'r' stopped: its failed recording is ended (a "
                                      "start begins a new one)")
        assert c.state is RunState.IDLE
        assert json.loads(state_file.read_text())["active"] is None
        assert "Input/output error" in str(c.status().last_error)
        with pytest.raises(AdminCommandError) as err:  # stopped now: a second stop is refused
            c.stop().result(5)
        assert err.value.code == "not_running"
        c.start().result(5)  # a new recording, not the failed one resumed
        assert client.starts[-1] is None  # from the topic's end, not from saved offsets
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_a_file_that_cannot_be_finalized_at_the_stop_fails_the_stop(tmp_path: Path) -> None:
    """A close that fails (the file cannot be finalized: e.g. a compression whose plugin the
    writer cannot load) was answered "stopped (complete); files: none", left the run idle
    and counted no write error, so status --check and the alert on write_errors_total
    missed a recording left .partial (found by the README walkthrough)."""
    client = FakeClient()
    metrics = RecorderMetrics()
    c, made = _controller(tmp_path, client, metrics=metrics)
    try:
        c.start().result(5)

        def failing_close(status: str = "complete", reason: str = "") -> list[Path]:
            made[0].status = "failed"
            made[0].reason = "SinkError: compression 'zstd' needs the hdf5plugin package"
            return []

        made[0].close = failing_close  # type: ignore[method-assign]
        with pytest.raises(AdminCommandError) as err:
            c.stop().result(5)
        assert err.value.code == "internal"
        assert err.value.message == (
            "run 'r' stopped, but its recording failed: SinkError: compression 'zstd' needs "
            "the hdf5plugin package; files: none")
        assert c.state is RunState.FAILED
        assert "hdf5plugin" in str(c.status().last_error)
        assert metrics.registry.get_sample_value(
            "k2eg_recorder_write_errors_total", {"run": "r"}) == 1
        # the resume state stays: a start resumes from the last durable offset
        assert json.loads((tmp_path / "state" / "r.json").read_text())["active"] is not None
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_offsets_flushed_before_a_failure_are_saved_with_it(tmp_path: Path) -> None:
    """A writer reply can say both: a flush made offset 41 durable, and then a write failed.
    The failure was handled first and the offset never saved, so the resume re-read data the
    failed file holds (found as a race in test_a_recording_whose_disk_ran_out_...)."""
    client = FakeClient()
    c, made = _controller(tmp_path, client)
    try:
        c.start().result(5)
        rec = made[0]
        flush = rec.flush

        def flush_then_fail() -> None:
            flush()
            if rec._durable:
                rec.status, rec.reason = "failed", "OSError: [Errno 5] Input/output error"

        rec.flush = flush_then_fail  # type: ignore[method-assign]
        sub = client.sub
        assert sub is not None
        sub.events.put(IterationOpened(sub.topic, "snap", 1, 1, offset=41))
        _wait(lambda: c.state is RunState.FAILED)
        state = json.loads((tmp_path / "state" / "r.json").read_text())
        assert state["active"]["offsets"] == {"0": 41}
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_a_recording_whose_disk_ran_out_resumes_once_there_is_room(tmp_path: Path) -> None:
    client = FakeClient()
    room = [True]
    asked: list[Path] = []
    sinces: list[float | None] = []

    def room_for(directory: Path, since: float | None) -> bool:
        asked.append(directory)
        sinces.append(since)
        return room[0]

    c, made = _controller(tmp_path, client, room_for=room_for)
    try:
        sub = _started(c, client)
        sub.events.put(IterationOpened(sub.topic, "snap", 1, 1, offset=41))
        _wait(lambda: made[0].last_durable_offset == {(sub.topic, 0): 41})
        room[0] = False  # the disk filled up
        ran_out = time.monotonic()
        made[0].status = "failed"
        made[0].reason = "OSError: [Errno 28] No space left on device"
        _wait(lambda: c.state is RunState.RETRYING)
        # reading stopped, the gateway snapshot left running: its data waits in Kafka
        assert client.unsubscribed == [sub] and not sub.stopped
        status = c.status()
        assert "No space left on device" in str(status.last_error)
        assert "resumes when its disk has room again" in str(status.last_error)
        assert json.loads((tmp_path / "state" / "r.json").read_text())["active"] is not None
        time.sleep(0.5)  # backoff 0.05 s long past: no attempt while there is no room
        assert len(made) == 1 and len(client.starts) == 1
        # an operator's start is answered at once (waiting for room may take hours)
        assert "waits for room on its disk" in c.start().result(1)
        assert c.state is RunState.RETRYING and len(made) == 1
        assert asked and asked[-1] == c.definition.output.directory
        # judged on a disk check taken after the disk ran out, not an older one
        assert sinces[-1] is not None and sinces[-1] >= ran_out
        room[0] = True  # an operator freed space
        _wait(lambda: c.state is RunState.RECORDING, timeout=5)
        assert len(made) == 2 and c.status().current_file == str(made[1].current_path)
        assert client.starts[-1] is not None  # resumed from the durable offset
        # read from where iteration 1, open at it, began (only priming up to the offset)
        assert client.starts[-1].offsets == {0: 41} and client.primes[-1] == {0: 42}
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_no_room_for_a_new_file_waits_for_room_too(tmp_path: Path) -> None:
    """Without disk checks (room_for always yes), a recording that cannot even create its
    file for want of space retries with backoff instead of failing for good."""
    client = FakeClient()
    c, made = _controller(tmp_path, client)
    real = c._factory
    attempts = [0]

    def full_then_fine(*args: Any, **kwargs: Any) -> Any:
        attempts[0] += 1
        if attempts[0] == 1:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    c._factory = full_then_fine  # type: ignore[assignment]
    try:
        reply = c.start().result(5)
        assert "accepted but not recording yet" in reply and "No space left" in reply
        first = client.unsubscribed[0]
        assert not first.stopped  # the gateway snapshot was left running
        _wait(lambda: c.state is RunState.RECORDING)
        assert attempts[0] == 2 and len(made) == 1
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_each_finalized_file_is_told_once(tmp_path: Path) -> None:
    told: list[tuple[str, Path]] = []
    client = FakeClient()
    c, made = _controller(tmp_path, client,
                          on_file=lambda d, p: told.append((d.name, p)))
    try:
        sub = _started(c, client)
        made[0].paths.append(tmp_path / "r_0.h5")  # a segment rotation
        sub.events.put(IterationOpened(sub.topic, "snap", 1, 1, offset=3))
        _wait(lambda: len(told) == 1)
        time.sleep(0.3)  # later pump cycles: not told again
        assert told == [("r", tmp_path / "r_0.h5")]
        made[0]._final = tmp_path / "r_0_s0001.h5"
        c.stop().result(5)
        assert told == [("r", tmp_path / "r_0.h5"), ("r", tmp_path / "r_0_s0001.h5")]
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_a_failure_while_the_disk_has_no_room_waits_for_room_too(tmp_path: Path) -> None:
    """The writer may die without saying why (HDF5 after ENOSPC): no room is reason enough."""
    client = FakeClient()
    room = [True]
    c, made = _controller(tmp_path, client, room_for=lambda _d, _since: room[0])
    try:
        c.start().result(5)
        room[0] = False
        made[0].status, made[0].reason = "failed", "writer process exited (signal 11)"
        _wait(lambda: c.state is RunState.RETRYING)
        assert client.stopped_by_name == []
        assert c.stop().result(5) == "run 'r' stopped before it started recording"
        assert client.stopped_by_name == [c.definition.snapshot.snapshot_name]
        room[0] = True
        time.sleep(0.3)
        assert c.state is RunState.IDLE and len(made) == 1  # a stop ends the waiting
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_a_failed_k2eg_stop_unsubscribes_through_the_public_api(tmp_path: Path) -> None:
    client = FakeClient(stop_fails=True)
    c, made = _controller(tmp_path, client)
    try:
        sub = _started(c, client)
        _wait(lambda: c.status().lag == 5)  # RecurringSnapshot.lag()
        result = c.stop().result(5)
        assert "stopped (aborted)" in result
        assert client.unsubscribed == [sub] and sub.ended
        assert made[0].status == "aborted"
        assert "k2eg stop failed" in str(c.status().last_error)
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_a_run_whose_worker_hit_a_bug_can_be_started_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in the run's worker (here: the recording raises on an event) fails the run with
    the reason in its status; an admin start then tries again, as for any failed run. The
    worker thread ended instead: every later start was answered "run 'r' is shut down" and
    the run stayed dead until the daemon was restarted."""
    client = FakeClient()
    c, made = _controller(tmp_path, client)
    try:
        sub = _started(c, client)

        def bug(event: Any) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(made[0], "handle", bug)
        sub.events.put(IterationOpened(sub.topic, "snap", 1, 1, offset=11))
        _wait(lambda: c.state is RunState.FAILED)
        assert "internal error" in str(c.status().last_error)
        assert "recording" in c.start().result(5)
        assert c.state is RunState.RECORDING and len(made) == 2
        again = client.sub
        assert again is not None and again is not sub
        again.events.put(IterationOpened(again.topic, "snap", 2, 1, offset=12))
        _wait(lambda: len(made[1].events) == 1)
        assert "stopped (complete)" in c.stop().result(5)
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_metrics_bytes_skips_and_lag_per_run(tmp_path: Path) -> None:
    metrics = RecorderMetrics()
    reg = metrics.registry

    def value(name: str, **labels: str) -> float | None:
        return reg.get_sample_value(f"k2eg_recorder_{name}", {"run": "r", **labels})

    client = FakeClient()
    c, made = _controller(tmp_path, client, metrics=metrics)
    try:
        sub = _started(c, client)
        sub.skips = {"malformed.not_msgpack": 2}  # before the run's first pump: counted
        made[0].counters["bytes"] = 1000
        _feed(sub, 1, 2)
        _wait(lambda: value("iterations_total", status="complete") == 2)
        _wait(lambda: value("bytes_written_total") == 1000)
        _wait(lambda: value("consumer_lag_messages") == 5)
        _wait(lambda: value("values_written_total") == 2)
        assert (value("flush_duration_seconds_count") or 0) >= 1
        sub.skips = {"malformed.not_msgpack": 5, "late.data": 1}
        made[0].counters["bytes"] = 1500
        _feed(sub, 3, 1)
        _wait(lambda: value("bytes_written_total") == 1500)
        assert "stopped (complete)" in c.stop().result(5)  # the stop counts the last skips
        assert value("messages_skipped_total", reason="malformed.not_msgpack") == 5
        assert value("messages_skipped_total", reason="late.data") == 1
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_messages_lost_to_retention_before_a_resume_are_reported(tmp_path: Path) -> None:
    """The client charges a resume's deleted offsets to the topic with its first fetch, which
    may come before the run's first look at the counters: still this recording's."""
    metrics = RecorderMetrics()

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(f"k2eg_recorder_{name}", {"run": "r", **labels})

    client = FakeClient()
    c, _made = _controller(tmp_path, client, metrics=metrics)
    try:
        c.start().result(5)
        first = client.sub
        assert first is not None
        first.skips = {"late.data": 1}
        _feed(first, 1, 2)
        assert "stopped" in c.stop().result(5)
        assert value("messages_skipped_total", reason="late.data") == 1
        assert c.status().last_error is None
        c.start().result(5)
        sub = client.sub
        assert sub is not None and sub is not first
        sub.skips = {"late.data": 1, "lost.retention": 42}  # the earlier one's, and the gap
        _feed(sub, 3, 1)
        _wait(lambda: value("messages_skipped_total", reason="lost.retention") == 42)
        status = c.status()
        assert status.last_error is not None and "42 message(s)" in status.last_error
        assert "retention" in status.last_error and status.errors == 1
        assert value("messages_skipped_total", reason="late.data") == 1  # not counted again
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_messages_skipped_just_before_a_recording_failed_are_counted(tmp_path: Path) -> None:
    """The topic's skip counters are looked at every LAG_EVERY_S while recording; those the
    client charged to the topic since the last look, when the recording then failed, were
    never counted (the next start takes the client's totals as its baseline): a resume's
    messages lost to retention went unreported when its recording failed within 2 s."""
    metrics = RecorderMetrics()
    client = FakeClient()
    c, made = _controller(tmp_path, client, metrics=metrics)
    try:
        sub = _started(c, client)
        _feed(sub, 1, 1)  # the first pump takes the topic's statistics
        _wait(lambda: c.status().lag == 5)
        sub.skips = {"malformed.not_msgpack": 3, "lost.retention": 7}
        made[0].status, made[0].reason = "failed", "OSError: [Errno 5] Input/output error"
        _wait(lambda: c.state is RunState.FAILED)
        assert metrics.registry.get_sample_value(
            "k2eg_recorder_messages_skipped_total",
            {"run": "r", "reason": "malformed.not_msgpack"}) == 3
        assert metrics.registry.get_sample_value(
            "k2eg_recorder_messages_skipped_total", {"run": "r", "reason": "lost.retention"}) == 7
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_bytes_written_falls_back_to_file_growth(tmp_path: Path) -> None:
    metrics = RecorderMetrics()
    client = FakeClient()
    c, made = _controller(tmp_path, client, metrics=metrics)
    try:
        c.start().result(5)
        rec, sub = made[0], client.sub
        assert sub is not None and rec.current_path is not None
        rec.current_path.write_bytes(b"x" * 4096)
        _feed(sub, 1, 1)
        _wait(lambda: metrics.registry.get_sample_value(
            "k2eg_recorder_bytes_written_total", {"run": "r"}) == 4096)
        with rec.current_path.open("ab") as f:
            f.write(b"y" * 1000)
        _feed(sub, 2, 1)
        _wait(lambda: metrics.registry.get_sample_value(
            "k2eg_recorder_bytes_written_total", {"run": "r"}) == 5096)
    finally:
        c.shutdown().result(5)
        assert c.join(5)


class FakeBridge:
    def __init__(self, options: Any, *, run_name: str, snapshot: Any,
                 fail_on: int | None = None) -> None:
        self.options = options
        self.run_name = run_name
        self.snapshot = snapshot
        self.status = "serving"
        self.reason = ""
        self.endpoints = {"rep": "tcp://127.0.0.1:1234"}
        self.counters: dict[str, int] = {"iterations": 0, "served": 0}
        self.has_subscribers = False
        self.events: list[Any] = []
        self.closed: tuple[str, str] | None = None
        self.fail_on = fail_on
        self.tags: list[tuple[int, dict[str, str]]] = []
        self.ended = self.begun = 0

    def handle(self, event: Any) -> None:
        if self.fail_on is not None and len(self.events) >= self.fail_on:
            raise RuntimeError("bridge bug")
        self.events.append(event)
        if isinstance(event, IterationClosed):
            self.counters["iterations"] += 1

    def tag_iteration(self, iter_index: int, tags: Mapping[str, str]) -> None:
        self.tags.append((iter_index, dict(tags)))

    def end_recording(self) -> None:
        self.ended += 1

    def begin_recording(self, snapshot: Any) -> None:
        self.snapshot = snapshot
        self.begun += 1

    def close(self, status: str = "complete", reason: str = "") -> None:
        self.closed = (status, reason)
        self.status = status


def _feed(sub: FakeSub, first: int, n: int) -> None:
    for i in range(first, first + n):
        sub.events.put(IterationOpened(sub.topic, "snap", i, 1, offset=10 + 3 * i))
        sub.events.put(ValuesReceived(sub.topic, i, 1, 1, (), offset=11 + 3 * i))
        sub.events.put(IterationClosed(sub.topic, "snap", i, IterationStatus.COMPLETE, None,
                                       1, 2, offset=12 + 3 * i))


def test_bridge_gets_every_event_of_the_recording_and_its_final_status(tmp_path: Path) -> None:
    bridges: list[FakeBridge] = []

    def factory(options: Any, *, run_name: str, snapshot: Any) -> FakeBridge:
        bridges.append(FakeBridge(options, run_name=run_name, snapshot=snapshot))
        return bridges[-1]

    client = FakeClient()
    c, made = _controller(tmp_path, client, bridge={"rep": 0}, bridge_factory=factory)
    try:
        c.start().result(5)
        (bridge,) = bridges
        assert bridge.options.rep == "tcp://127.0.0.1:0" and bridge.run_name == "r"
        assert bridge.snapshot.snapshot_name == "snap"
        doc = c.status().to_json_obj()["bridge"]
        assert doc["status"] == "serving" and doc["endpoints"] == bridge.endpoints
        assert client.sub is not None
        _feed(client.sub, 1, 3)
        _wait(lambda: c.status().iterations_complete == 3)
        _wait(lambda: (c.status().bridge or {}).get("iterations") == 3)
        assert "stopped (complete)" in c.stop().result(5)
        assert bridge.events == made[0].events  # same events, same order
        # the recording ended, the run's endpoints stay bound (a REQ client waiting now is
        # answered by the next recording, not left waiting for ever by an endpoint bound anew)
        assert bridge.ended == 1 and bridge.closed is None
        assert (c.status().bridge or {})["status"] == "serving"
        served = bridge.counters["iterations"]
        c.start().result(5)
        assert bridges == [bridge] and bridge.begun == 1
        assert client.sub is not None
        _feed(client.sub, 1, 2)
        _wait(lambda: len(made) == 2 and len(made[1].events) == 6)
        _wait(lambda: (c.status().bridge or {}).get("iterations") == served + 2)
        assert bridge.events[len(made[0].events):] == made[1].events
    finally:
        c.shutdown().result(5)
        assert c.join(5)
    assert bridge.closed is not None and bridge.closed[0] == "complete"  # the worker ended
    assert (c.status().bridge or {})["status"] == "complete"


def test_trigger_tags_go_to_the_bridge_as_to_the_recording(tmp_path: Path) -> None:
    """A triggered run's tags reach its live bridge with the same iteration as its file
    (they were recorded in the file only, and the bridge served `tags: {}`)."""
    bridges: list[FakeBridge] = []

    def factory(options: Any, *, run_name: str, snapshot: Any) -> FakeBridge:
        bridges.append(FakeBridge(options, run_name=run_name, snapshot=snapshot))
        return bridges[-1]

    client = FakeClient()
    c, made = _controller(tmp_path, client, triggered=True, bridge={"rep": 0},
                          bridge_factory=factory)
    try:
        c.start().result(5)
        assert c.trigger({"shot": "1"}).result(5) == "run 'r' triggered"
        sub = client.sub
        assert sub is not None
        sub.events.put(IterationOpened(sub.topic, "snap", 5, 1, offset=11))
        _wait(lambda: bool(made[0].tags))
        (bridge,) = bridges
        _wait(lambda: bool(bridge.tags))
        assert bridge.tags == [(5, {"shot": "1"})]
        assert [(i, dict(t)) for i, t in made[0].tags] == bridge.tags
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_the_bridge_has_an_iteration_open_before_its_trigger_tags(tmp_path: Path) -> None:
    """The bridge gets the opening of a triggered iteration before its tags: after a snapshot
    restart (iter_index begins again) the opening tells it the index is a new iteration, so
    the tags are not taken as late tags of the old one (the bridge served `tags: {}`)."""
    calls: list[tuple[str, int]] = []

    class OrderBridge(FakeBridge):
        def handle(self, event: Any) -> None:
            calls.append((type(event).__name__, event.iter_index))
            super().handle(event)

        def tag_iteration(self, iter_index: int, tags: Mapping[str, str]) -> None:
            calls.append(("tags", iter_index))
            super().tag_iteration(iter_index, tags)

    def factory(options: Any, *, run_name: str, snapshot: Any) -> FakeBridge:
        return OrderBridge(options, run_name=run_name, snapshot=snapshot)

    client = FakeClient()
    c, _made = _controller(tmp_path, client, triggered=True, bridge={"rep": 0},
                           bridge_factory=factory)
    try:
        sub = _started(c, client)
        assert c.trigger({"shot": "1"}).result(5) == "run 'r' triggered"
        sub.events.put(IterationOpened(sub.topic, "snap", 1, 1, offset=11))
        _wait(lambda: ("tags", 1) in calls)
        assert calls == [("IterationOpened", 1), ("tags", 1)]
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_a_failing_bridge_never_affects_recording(tmp_path: Path) -> None:
    bridges: list[FakeBridge] = []

    def factory(options: Any, *, run_name: str, snapshot: Any) -> FakeBridge:
        bridges.append(FakeBridge(options, run_name=run_name, snapshot=snapshot, fail_on=4))
        return bridges[-1]

    client = FakeClient()
    c, made = _controller(tmp_path, client, bridge={"pub": 0}, bridge_factory=factory)
    try:
        c.start().result(5)
        assert client.sub is not None
        _feed(client.sub, 1, 5)
        _wait(lambda: c.status().iterations_complete == 5)
        st = c.status()
        assert st.state is RunState.RECORDING and len(made[0].events) == 15
        assert st.bridge is not None and st.bridge["status"] == "failed"
        assert "bridge bug" in st.bridge["reason"] and st.errors == 1
        assert bridges[0].closed is not None and bridges[0].closed[0] == "failed"
        assert len(bridges[0].events) == 4  # nothing more after the failure
        assert "stopped (complete)" in c.stop().result(5)
        assert made[0].status == "complete"
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_a_bridge_that_cannot_start_does_not_stop_the_recording(tmp_path: Path) -> None:
    def factory(options: Any, *, run_name: str, snapshot: Any) -> FakeBridge:
        raise SinkError("output.bridge needs the optional extra")

    client = FakeClient()
    c, made = _controller(tmp_path, client, bridge={"rep": 0}, bridge_factory=factory)
    try:
        assert "recording" in c.start().result(5)
        assert client.sub is not None
        _feed(client.sub, 1, 2)
        _wait(lambda: c.status().iterations_complete == 2)
        st = c.status()
        assert st.state is RunState.RECORDING and len(made[0].events) == 6
        assert st.bridge is not None and st.bridge["status"] == "failed"
        assert "optional extra" in st.bridge["reason"]
        assert "karabo bridge not started" in str(st.last_error)
    finally:
        c.shutdown().result(5)
        assert c.join(5)


# ------------------------------------------------------------------ admin handler
class FakeHandle:
    def __init__(self) -> None:
        self.stop_future: Future[str] = Future()

    def start(self) -> Future[str]:
        f: Future[str] = Future()
        f.set_exception(AdminCommandError("already_running", "busy"))
        return f

    def stop(self, reason: str = "") -> Future[str]:
        return self.stop_future

    def trigger(self, tags: Mapping[str, str] | None = None) -> Future[str]:
        f: Future[str] = Future()
        f.set_result(f"triggered {dict(tags or {})}")
        return f

    def files(self) -> Newest[str]:
        return Newest(["/earlier.h5", "/x.h5"])

    def recording_files(self) -> list[str]:
        return ["/x.h5"]


class FakeTarget:
    def __init__(self) -> None:
        self.handle = FakeHandle()
        self.reloads = 0

    def run_handle(self, name: str) -> FakeHandle | None:
        return self.handle if name == "r" else None

    def status_document(self, kind: str = "status") -> StatusDocument:
        return StatusDocument("i", DaemonState.RUNNING, 1, 0, kind=kind)

    def reload(self, origin: str) -> tuple[bool, str, dict[str, Any]]:
        self.reloads += 1
        return False, "bad yaml", {"problems": ["f.yaml:3: x: bad"]}


NOW = 1_700_000_000_000


def _record(payload: bytes, ts: int | None = NOW) -> Record:
    return Record("admin", 0, 0, payload, None, ts)


def _handler(secret: bytes | None = None) -> tuple[AdminHandler, list[tuple[str, dict[str, Any]]]]:
    sent: list[tuple[str, dict[str, Any]]] = []
    h = AdminHandler(CommandPolicy(max_age_s=30, secret=secret), "default-replies",
                     lambda topic, payload: sent.append((topic, json.loads(payload))),
                     clock_ms=lambda: NOW)
    return h, sent


def _cmd(kind: str, run: str | None = None, secret: bytes | None = None, **kw: Any) -> bytes:
    return encode_command(build_command(kind, run=run, issued_at_ms=NOW, secret=secret,
                                        reply_topic="mine", **kw))


@pytest.mark.parametrize(
    ("payload", "code", "topic"),
    [
        (b"\x00garbage", "malformed", "default-replies"),
        (b'{"command": "start", "request_id": "a", "reply_topic": "mine"}', "malformed", "mine"),
        (_cmd("trigger", "nope"), "unknown_run", "mine"),
        (_cmd("start", "r"), "already_running", "mine"),
        (_cmd("trigger", "r", tags={"k": "v"}), "ok", "mine"),
        (_cmd("reload"), "invalid_config", "mine"),
        (encode_command(build_command("status", issued_at_ms=NOW - 31_000)), "expired",
         "default-replies"),
    ],
)
def test_every_command_gets_exactly_one_reply(payload: bytes, code: str, topic: str) -> None:
    h, sent = _handler()
    h.handle(_record(payload), FakeTarget())  # type: ignore[arg-type]
    assert len(sent) == 1
    assert sent[0][0] == topic and sent[0][1]["code"] == code, sent


def test_an_unknown_run_is_answered_with_the_runs_there_are() -> None:
    """`k2eg-recorder start bpm-10Hz` should say which runs the daemon has (and which one
    was meant), not only that there is no such run."""
    from recorder.admin.status import RunState, RunStatus

    class Target(FakeTarget):
        def __init__(self, names: list[str]) -> None:
            super().__init__()
            self.names = names

        def status_document(self, kind: str = "status") -> StatusDocument:
            runs = tuple(RunStatus(n, RunState.IDLE, n, n, "periodic normal", True)
                         for n in self.names)
            return StatusDocument("i", DaemonState.RUNNING, 1, 0, kind=kind, runs=runs,
                                  config_path="/etc/k2eg-recorder/runs.d")

    h, sent = _handler()
    h.handle(_record(_cmd("start", "bpm-10Hz")), Target(["bpm-10hz", "r", "wf"]))  # type: ignore[arg-type]
    h.handle(_record(_cmd("status", "nope")), Target(["r"]))  # type: ignore[arg-type]
    h.handle(_record(_cmd("trigger", "x")), Target([]))  # type: ignore[arg-type]
    assert [(m[1]["code"], m[1]["message"]) for m in sent] == [
        ("unknown_run", "no run named 'bpm-10Hz' (did you mean 'bpm-10hz'?); its runs: "
                        "bpm-10hz, r, wf"),
        ("unknown_run", "no run named 'nope'; its runs: r"),
        ("unknown_run", "no run named 'x'; the daemon has no runs (its run definitions: "
                        "/etc/k2eg-recorder/runs.d)"),
    ]


def test_a_status_of_one_run_answers_with_that_run_and_one_of_many_runs_fits_a_message(
) -> None:
    """``k2eg-recorder status RUN`` got the whole document (the CLI showed one run of it),
    so with too many runs for one Kafka message it got no reply either."""
    from recorder.admin.status import STATUS_MAX_BYTES, RunState, RunStatus

    class Target(FakeTarget):
        def status_document(self, kind: str = "status") -> StatusDocument:
            runs = tuple(RunStatus(f"run-{i:04d}", RunState.RECORDING, "s", "s",
                                   "periodic normal", True, current_file="/data/" + "f" * 500)
                         for i in range(3_000))
            return StatusDocument("i", DaemonState.RUNNING, 1, 0, kind=kind, runs=runs)

    h, sent = _handler()
    h.handle(_record(_cmd("status", "run-0042")), Target())  # type: ignore[arg-type]
    h.handle(_record(_cmd("status")), Target())  # type: ignore[arg-type]
    one, every = sent[0][1], sent[1][1]
    assert list(one["data"]["runs"]) == ["run-0042"] and one["data"]["runs_left_out"] is None
    assert one["message"] == "1 run(s), daemon running"
    left = every["data"]["runs_left_out"]["count"]
    assert len(every["data"]["runs"]) + left == 3_000 and left > 0
    assert every["message"] == (f"3000 run(s), daemon running; {left} left out to fit one "
                                "Kafka message (k2eg-recorder status RUN shows one)")
    assert len(json.dumps(every["data"], separators=(",", ":"))) <= STATUS_MAX_BYTES


def test_status_queries_are_logged_at_debug_commands_that_act_at_info() -> None:
    """Dashboards poll status every few seconds: those lines would swamp the journal."""
    h, sent = _handler()
    target = FakeTarget()
    with capture_logs() as logs:
        h.handle(_record(_cmd("status")), target)  # type: ignore[arg-type]
        h.handle(_record(_cmd("trigger", "r", tags={"k": "v"})), target)  # type: ignore[arg-type]
        h.handle(_record(_cmd("start", "r")), target)  # type: ignore[arg-type]  # an error
    assert [m[1]["code"] for m in sent] == ["ok", "ok", "already_running"]
    levels = [(e["event"], e.get("command"), e["log_level"]) for e in logs
              if e["event"] in ("admin command", "admin reply")]
    assert levels == [  # at INFO (the daemon's default and these tests'): no status lines
        ("admin command", "trigger", "info"), ("admin reply", "trigger", "info"),
        ("admin command", "start", "info"), ("admin reply", "start", "info"),
    ]


def test_a_flood_of_rejected_commands_is_logged_once_a_minute() -> None:
    """Something producing garbage to the admin topic (a misdirected producer, a client
    with the wrong secret in a loop): every record was a warning and an info line, 2,000
    lines a second at a record a millisecond. Each still gets its reply and is counted;
    the log has the first of each kind, the rest summed up a minute later."""
    h, sent = _handler()
    target = FakeTarget()
    with capture_logs() as logs:
        for i in range(100):
            h.handle(Record("admin", 0, i, b"\x00garbage", None, NOW), target)  # type: ignore[arg-type]
        h.handle(_record(encode_command(build_command("status", issued_at_ms=NOW - 31_000))),
                 target)  # type: ignore[arg-type]
    assert len(sent) == 101 and {m[1]["code"] for m in sent} == {"malformed", "expired"}
    rejected = [e["code"] for e in logs if e["event"] == "admin command rejected"]
    assert rejected == ["malformed", "expired"]
    assert len([e for e in logs if e["event"] == "admin reply"]) <= 2


def test_unsigned_commands_are_unauthorized_when_a_secret_is_set() -> None:
    secret = b"0123456789abcdef0123"
    h, sent = _handler(secret)
    target = FakeTarget()
    h.handle(_record(_cmd("status")), target)  # type: ignore[arg-type]
    h.handle(_record(_cmd("status", secret=b"another-secret-0000")), target)  # type: ignore[arg-type]
    h.handle(_record(_cmd("status", secret=secret)), target)  # type: ignore[arg-type]
    assert [s[1]["code"] for s in sent] == ["unauthorized", "unauthorized", "ok"]


def test_stop_is_answered_when_the_run_has_stopped() -> None:
    h, sent = _handler()
    target = FakeTarget()
    h.handle(_record(_cmd("stop", "r")), target)  # type: ignore[arg-type]
    h.poll()
    assert sent == [] and h.pending == 1
    target.handle.stop_future.set_result("stopped")
    h.poll()
    assert len(sent) == 1 and sent[0][1]["code"] == "ok"
    assert sent[0][1]["data"] == {"files": ["/x.h5"]}
    h.poll()
    assert len(sent) == 1


def test_duplicate_request_ids_are_not_acted_on_twice() -> None:
    h, sent = _handler()
    target = FakeTarget()
    payload = _cmd("reload")
    h.handle(_record(payload), target)  # type: ignore[arg-type]
    h.handle(_record(payload), target)  # type: ignore[arg-type]
    assert target.reloads == 1
    assert [s[1]["code"] for s in sent] == ["invalid_config", "duplicate"]


def test_controller_threads_end(tmp_path: Path) -> None:
    before = threading.active_count()
    c, _ = _controller(tmp_path, FakeClient())
    c.shutdown().result(5)
    assert c.join(5)
    assert threading.active_count() <= before


# ------------------------------------------------------------------ service start-up
def test_writers_of_the_runs_that_autostart_are_started_before_connecting(
    tmp_path: Path,
) -> None:
    """The writer processes of the runs started at start-up (an interpreter and h5py each,
    0.5-1 s) start before Kafka is connected, so their start-up overlaps connecting and
    subscribing instead of delaying the first write."""
    from recorder.config.daemon import DaemonSettings
    from recorder.service import Service
    from recorder.settings import KafkaSettings

    runs = tmp_path / "runs.yaml"
    runs.write_text(
        "runs:\n"
        + "".join(
            f"  - name: {name}\n    autostart: {auto}\n    snapshot:\n"
            f"      snapshot_name: {name}\n      pv_uri_list: [pva://A]\n"
            f"    output: {{directory: {tmp_path / 'data'}, isolate: {iso}}}\n"
            for name, auto, iso in (("one", "true", "true"), ("two", "true", "false"),
                                    ("armed", "false", "true"))
        )
    )
    seen: list[list[str]] = []

    class Factory:
        def __call__(self, *a: Any, **k: Any) -> Any:
            raise AssertionError("no recording is created before Kafka is connected")

        def prewarm(self, *definitions: RunDefinition) -> None:
            seen.append(sorted(d.name for d in definitions))
            service.request_stop()  # leave before connecting

    service = Service(DaemonSettings(config_path=runs), KafkaSettings(),
                      state_dir=tmp_path / "state", recording_factory=Factory(),
                      gc_tuning=False)
    guard = threading.Timer(20.0, service.request_stop)  # a regression fails, never hangs
    guard.start()
    try:
        assert service.run() == 0
    finally:
        guard.cancel()
    assert seen == [["one", "two"]]  # the autostart runs; the factory counts isolated ones
    assert service._client is None  # stopped before connecting


def test_prewarm_counts_the_runs_that_isolate_their_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from recorder.daemon.recording import HDF5RecordingFactory
    from recorder.sinks import process

    counts: list[int] = []
    monkeypatch.setattr(process, "prewarm_writer", counts.append)
    a = _definition(tmp_path)
    b = a.model_copy(update={"output": a.output.model_copy(update={"isolate": False})})
    HDF5RecordingFactory.prewarm(a, b, a)
    HDF5RecordingFactory.prewarm(b)
    assert counts == [2]


def test_a_recording_that_cannot_be_created_answers_start_failed(tmp_path: Path) -> None:
    """A start whose recording cannot be created (its directory cannot be made) is answered
    ``start_failed`` with the sink's reason, not ``internal``; the run is failed."""
    client = FakeClient()
    reason = "output directory /proc/x cannot be created: No such file or directory (...)"

    def factory(definition: RunDefinition, *, seq: int, recording_uid: str | None,
                first_segment: int = 0, start_ns: int | None = None) -> FakeRecording:
        rec = FakeRecording(tmp_path / "never.h5")
        rec.status, rec.reason = "failed", reason
        return rec

    c = RunController(
        _definition(tmp_path), client,  # type: ignore[arg-type]
        ResumeStore(tmp_path / "state"), recording_factory=factory,  # type: ignore[arg-type]
        backoff=Backoff(initial_s=0.05, factor=2, max_s=0.2, jitter=0),
    )
    try:
        with pytest.raises(AdminCommandError) as info:
            c.start().result(5)
        assert info.value.code == ReplyCode.START_FAILED.value
        assert info.value.message == f"run 'r' could not start recording: {reason}"
        assert c.state is RunState.FAILED
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_the_iteration_a_triggered_stop_publishes_is_tagged_as_such(tmp_path: Path) -> None:
    """The gateway publishes one last iteration when a snapshot stops, triggered or not; in
    a triggered run it is tagged ``k2eg-recorder.cause: stop``, not counted as a trigger's.
    A trigger whose iteration never came does not tag the next recording's first one."""
    from recorder.daemon.controller import STOP_ITERATION_TAGS

    client = FakeClient()
    c, made = _controller(tmp_path, client, triggered=True)
    try:
        c.start().result(5)
        c.trigger({"shot": "1"}).result(5)
        sub = client.sub
        assert sub is not None
        sub.events.put(IterationOpened(sub.topic, "snap", 5, 1, offset=11))
        _wait(lambda: len(made[0].tags) == 1)
        c.trigger({"shot": "2"}).result(5)  # its iteration never comes
        c.stop().result(5)
        # FakeSub.stop publishes iteration 99, the stop's; it got the trigger's pending tag
        # (FIFO, as iterations follow triggers in order), the stop's own stays pending
        assert made[0].tags == [(5, {"shot": "1"}), (99, {"shot": "2"})]
        sub = _started(c, client)
        sub.events.put(IterationOpened(sub.topic, "snap", 1, 1, offset=40))
        c.stop().result(5)
        assert made[1].tags == [(99, STOP_ITERATION_TAGS)], made[1].tags
    finally:
        c.shutdown().result(5)
        assert c.join(5)


SIGNAL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from recorder.config.daemon import DaemonSettings
from recorder.service import Service
from recorder.settings import KafkaSettings

service = Service(DaemonSettings(config_path=Path(sys.argv[1])), KafkaSettings(),
                  state_dir=Path(sys.argv[2]))
service.install_signal_handlers()
with service._wake._cond:  # where the main loop is while in the Event's clear() or wait()
    os.kill(os.getpid(), signal.SIGTERM)  # the handlers run here, between two bytecodes
    os.kill(os.getpid(), signal.SIGHUP)
    for _ in range(10_000):
        pass
assert service._stopping() and service._reload.is_set()
print("stopping")
"""


def test_a_signal_while_the_main_loop_holds_its_wake_lock_still_stops_the_daemon(
        tmp_path: Path) -> None:
    """The signal handlers take no lock: one that called Event.set() while the main thread
    was inside the same Event (the main loop clears and waits on it every 0.1 s) waited for
    itself for ever, and the daemon ignored SIGTERM (a CI run saw it: no "shutting down"
    in 60 s). In a child process, so the old behaviour is a timeout, not a hung suite."""
    import subprocess
    import sys

    runs = tmp_path / "runs.d"
    runs.mkdir()
    got = subprocess.run([sys.executable, "-c", SIGNAL_SCRIPT, str(runs), str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert got.returncode == 0 and got.stdout == "stopping\n", got.stderr


CHECK_SIGNAL_SCRIPT = """
import os, signal, sys
import recorder.config.loader as loader
from recorder.cli import main

checked = loader.check_runs
def check_runs(*args, **kwargs):  # `k2eg-recorder run`'s first check (20,000 PVs: ~2 s)
    check_runs.calls += 1
    if check_runs.calls == 1:
        os.kill(os.getpid(), signal.SIGHUP)  # a reload (`systemctl kill -s HUP`)
        os.kill(os.getpid(), signal.SIGTERM)  # `systemctl stop`
    return checked(*args, **kwargs)
check_runs.calls = 0
loader.check_runs = check_runs
sys.exit(main(["run", "--config", sys.argv[1], "--state-dir", sys.argv[2],
               "--bootstrap", "127.0.0.1:1"]))
"""


def test_a_signal_while_run_checks_the_definitions_does_not_kill_the_daemon(
        tmp_path: Path) -> None:
    """``k2eg-recorder run`` checked the run definitions (seconds for a large file) before it
    installed its signal handlers: a SIGHUP then killed the daemon (SIGHUP's default
    action; systemd counts that a clean exit, so ``Restart=on-failure`` did not start it
    again), a SIGTERM too (exit -15 and not a word, for the documented 0). Both are now
    acted on as at any later moment: the reload noted, the stop exits 0 before any run
    starts."""
    import subprocess
    import sys

    runs = tmp_path / "runs.yaml"
    runs.write_text(f"""
name: r
snapshot: {{snapshot_name: r, pv_uri_list: [pva://A], time_window: 100}}
output: {{directory: {tmp_path / "data"}}}
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECORDER_")}
    env["RECORDER_LOG_FORMAT"] = "json"
    got = subprocess.run([sys.executable, "-c", CHECK_SIGNAL_SCRIPT, str(runs),
                          str(tmp_path / "s")], capture_output=True, text=True, timeout=60,
                         check=False, env=env)
    assert got.returncode == 0, (got.returncode, got.stdout[-2000:], got.stderr[-2000:])
    assert "run definitions loaded" in got.stdout and "daemon ready" not in got.stdout


def test_a_run_a_reload_is_restarting_answers_for_itself(tmp_path: Path) -> None:
    """Between a reload that changed a run and the end of its old recording's stop, the
    run has no controller: admin commands for it were answered ``unknown_run`` ("no run
    named 'r' (did you mean 'r'?)") while status listed it (seen in a soak test). A trigger
    is now refused ``not_running``; start/stop decide whether the new controller starts; a
    stop lists the files of the recording being stopped."""
    from recorder.config.daemon import DaemonSettings
    from recorder.service import Service, _Deferred
    from recorder.settings import KafkaSettings

    class Stopping:
        alive = True

        def recording_files(self) -> list[str]:
            return ["/data/r_0000.h5"]

    service = Service(DaemonSettings(config_path=tmp_path / "none.yaml"), KafkaSettings(),
                      state_dir=tmp_path / "state", gc_tuning=False)
    deferred = _Deferred(_definition(tmp_path, triggered=True), True, [Stopping()])  # type: ignore[list-item]
    service._deferred.append(deferred)
    assert service.run_handle("other") is None
    handle = service.run_handle("r")
    assert handle is not None
    error = handle.trigger({"shot": "1"}).exception()
    assert isinstance(error, AdminCommandError) and error.code == "not_running"
    assert "restarting after a reload" in error.message
    assert "stays stopped" in handle.stop().result(0)
    assert deferred.start is False and handle.recording_files() == ["/data/r_0000.h5"]
    assert "starts once its previous recording has stopped" in handle.start().result(0)
    assert deferred.start is True


def test_a_disk_full_failure_while_stopping_does_not_resume_the_stopped_run(
        tmp_path: Path) -> None:
    """A stop was asked, and while the worker drained the last events (the gateway's final
    iteration takes a while) the recording failed for want of space: the run waited for
    room and then resumed recording by itself, as if the stop had never been asked (and a
    daemon shutting down kept its worker thread alive)."""
    client = FakeClient()
    c, made = _controller(tmp_path, client)
    try:
        sub = _started(c, client)
        gate = threading.Event()
        stop = sub.stop

        def slow_stop(timeout: float | None = None, *, final_timeout_s: float | None = None,
                      keep_backpressure: bool = False) -> StopResult:
            gate.wait(10)
            return stop(timeout, final_timeout_s=final_timeout_s,
                        keep_backpressure=keep_backpressure)

        sub.stop = slow_stop  # type: ignore[method-assign]
        stopped = c.stop()
        _wait(lambda: c.state is RunState.STOPPING)
        made[0].status, made[0].reason = "failed", "OSError: [Errno 28] No space left on device"
        with pytest.raises(AdminCommandError):
            stopped.result(5)
        gate.set()
        time.sleep(0.5)  # backoff 0.05 s long past, and there is room
        assert len(made) == 1 and c.state is RunState.FAILED
        assert json.loads((tmp_path / "state" / "r.json").read_text())["active"] is not None
    finally:
        gate.set()
        c.shutdown().result(5)
        assert c.join(5)


def test_a_start_after_a_failure_while_stopping_waits_for_that_stop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recording failed while its stop was still under way (the stop's helper thread
    waiting on the gateway): an operator's start right after began the new subscription at
    once, and the old stop went out after it, so the gateway stopped the snapshot the new
    recording had just started (and the client ended the new subscription with the old
    one's). The start now waits for that stop to be done."""
    client = FakeClient()
    c, made = _controller(tmp_path, client)
    order: list[str] = []
    try:
        sub = _started(c, client)
        gate = threading.Event()
        stop = sub.stop

        def slow_stop(timeout: float | None = None, *, final_timeout_s: float | None = None,
                      keep_backpressure: bool = False) -> StopResult:
            gate.wait(10)
            order.append("stop")
            return stop(timeout, final_timeout_s=final_timeout_s,
                        keep_backpressure=keep_backpressure)

        sub.stop = slow_stop  # type: ignore[method-assign]
        subscribe = client.snapshot_recurring

        def start(props: Any, start: Any = None, max_pending: int = 0,
                  prime_until: Any = None) -> FakeSub:
            order.append("start")
            return subscribe(props, start=start, max_pending=max_pending,
                             prime_until=prime_until)

        monkeypatch.setattr(client, "snapshot_recurring", start)
        stopped = c.stop()
        _wait(lambda: c.state is RunState.STOPPING)
        made[0].status, made[0].reason = "failed", "the writer process was killed by SIGKILL"
        with pytest.raises(AdminCommandError):
            stopped.result(5)
        assert c.state is RunState.FAILED
        again = c.start()
        time.sleep(0.3)
        gate.set()
        assert "recording" in again.result(5)
        assert order == ["stop", "start"]
        assert c.state is RunState.RECORDING and len(made) == 2
    finally:
        gate.set()
        c.shutdown().result(5)
        assert c.join(5)


def test_a_close_that_raises_keeps_the_resume_state_and_fails_the_stop(tmp_path: Path) -> None:
    """A recording's close that raised (an unexpected error: in-process, finalize's
    SinkError for a compression filter it cannot load escapes HDF5Recording.close) left its
    file .partial, yet the stop answered "stopped", the run went idle and the resume state
    was cleared: a start began a new recording instead of resuming after the file's data,
    and the file's offsets were never read back."""
    client = FakeClient()
    c, made = _controller(tmp_path, client)
    try:
        c.start().result(5)

        def raising_close(status: str = "complete", reason: str = "") -> list[Path]:
            raise RuntimeError("finalize blew up")

        made[0].close = raising_close  # type: ignore[method-assign]
        with pytest.raises(AdminCommandError) as err:
            c.stop().result(5)
        assert err.value.code == "internal" and "finalize blew up" in err.value.message
        assert c.state is RunState.FAILED
        assert json.loads((tmp_path / "state" / "r.json").read_text())["active"] is not None
    finally:
        c.shutdown().result(5)
        assert c.join(5)


ROTATING_WRITER = """
import json, os, sys
from recorder.client import IterationClosed, IterationOpened, IterationStatus, ValuesReceived
from recorder.client.values import PVSample
from recorder.config.models import RunDefinition
from recorder.sinks.hdf5 import HDF5Recording

d = RunDefinition.model_validate_json(sys.argv[1])
props = d.snapshot.to_properties()
rec = HDF5Recording(d.output, run_name=d.name, snapshot=props, pv_uris=props.pv_uri_list,
                    seq=0, start_wall=1.7e9)
saved = {}
for i in range(1, int(sys.argv[2]) + 1):
    o = 10 * i
    rec.handle(IterationOpened(props.topic, "snap", i, i, offset=o))
    rec.handle(ValuesReceived(props.topic, i, 1, i, (PVSample("A:B", {"value": float(i)}),),
                              offset=o + 1))
    rec.handle(IterationClosed(props.topic, "snap", i, IterationStatus.COMPLETE, None, i, i,
                               offset=o + 2))
    rec.flush()
    if i == 1:  # what the daemon saved after this flush; it dies before it saves again
        saved = {"current_file": str(rec.current_path), "segments": rec.counters["segments"],
                 "offsets": rec.last_durable_offset[(props.topic, 0)], "uid": rec.uid}
print(json.dumps(saved), flush=True)
os._exit(0)  # killed: no close, the segment being written is left .partial
"""


def _resumed_from(tmp_path: Path, d: RunDefinition, saved: dict[str, Any]
                  ) -> tuple[RunController, FakeClient, list[Path]]:
    """A controller of ``d`` whose state file holds what ROTATING_WRITER's daemon saved
    (``saved``) before it died, with an in-process HDF5 recording: (it, its client, the files
    it told of)."""
    from recorder.daemon.recording import hdf5_recording

    store = ResumeStore(tmp_path / "state")
    store.begin("r", ActiveRecording(
        saved["uid"], 0, d.snapshot.topic, d.snapshot.snapshot_name, {0: saved["offsets"]},
        saved["current_file"], saved["segments"], started_at_ns=int(1.7e18)))
    client = FakeClient()
    told: list[Path] = []
    c = RunController(d, client, store, recording_factory=hdf5_recording,  # type: ignore[arg-type]
                      backoff=Backoff(initial_s=0.05, factor=2, max_s=0.2, jitter=0),
                      on_file=lambda _d, path: told.append(path))
    return c, client, told


@pytest.mark.parametrize("iterations", [2, 3])
def test_a_resume_recovers_the_segment_a_rotation_opened_after_the_last_state_save(
        tmp_path: Path, iterations: int) -> None:
    """The state file names the .partial being written; it is rewritten after a flush, so
    a segment rotation (in the writer process, or in handle() in-process) is saved some time
    later. A daemon killed in between left a state file naming the previous segment (since
    finalized): the restart recovered that one, resumed after the offsets it holds and
    never looked at the next segment, which stayed .partial and whose iterations the
    resumed recording read and wrote again. With 3 iterations the segment after the saved
    one was rotated out (finalized) too, and the one after it left .partial."""
    import subprocess
    import sys


    d = RunDefinition.model_validate({
        "name": "r",
        "snapshot": {"snapshot_name": "snap", "pv_uri_list": ["pva://A:B"]},
        "output": {"directory": str(tmp_path / "out"), "isolate": False,
                   "segment": {"max_iterations": 1}},
    })
    got = subprocess.run([sys.executable, "-c", ROTATING_WRITER, d.model_dump_json(),
                          str(iterations)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert got.returncode == 0, got.stderr
    saved = json.loads(got.stdout.splitlines()[-1])
    partials = sorted((tmp_path / "out").glob("*.partial"))
    assert len(partials) == 1 and str(partials[0]) != saved["current_file"]  # rotated
    c, client, told = _resumed_from(tmp_path, d, saved)
    try:
        c.start().result(60)
        assert client.starts[-1] is not None
        # after the last iteration, in the last segment
        assert client.starts[-1].offsets == {0: 10 * iterations + 3}
        assert not partials[0].exists()  # recovered
        finals = sorted((tmp_path / "out").glob("*.h5"))
        assert len(finals) == iterations and sorted(c.files()) == [str(f) for f in finals]
        # the crashed writer finalized (rotated out) all but the last without the daemon
        # telling of them: each one's file event goes out at the restart
        assert sorted(told) == finals
    finally:
        c.shutdown().result(60)
        assert c.join(60)


def test_a_resume_does_not_take_an_earlier_recordings_segments_for_its_own(
        tmp_path: Path) -> None:
    """A file_template without {seq} or {start} ("{run}.h5") gives each recording's segments
    the names of the one before, so they get a counter ("r-1.h5", "r_s0001-1.h5"): files are
    never overwritten. A resume looked for the later segments by the plain names only: it
    took the earlier recording's "r_s0001.h5" (and those after it) for its own, told of them
    again as this recording's files, and never found its own "r_s0001-1.h5.partial", whose
    iterations it recorded a second time and which stayed .partial."""
    import subprocess
    import sys

    from recorder.client.values import PVSample
    from recorder.sinks.hdf5 import HDF5Recording

    d = RunDefinition.model_validate({
        "name": "r",
        "snapshot": {"snapshot_name": "snap", "pv_uri_list": ["pva://A:B"]},
        "output": {"directory": str(tmp_path / "out"), "isolate": False,
                   "file_template": "{run}.h5", "segment": {"max_iterations": 1}},
    })
    props = d.snapshot.to_properties()
    earlier = HDF5Recording(d.output, run_name="r", snapshot=props, seq=0, start_wall=1.6e9)
    for i in range(1, 4):  # an earlier recording of r: r.h5, r_s0001.h5, r_s0002.h5
        earlier.handle(IterationOpened(props.topic, "snap", i, i, offset=i))
        earlier.handle(IterationClosed(props.topic, "snap", i, IterationStatus.COMPLETE,
                                       None, i, i, offset=i))
        earlier.handle(ValuesReceived(props.topic, i, 1, i,
                                      (PVSample("A:B", {"value": 0.0}),), offset=i))
    theirs = earlier.close()
    assert [p.name for p in theirs] == ["r.h5", "r_s0001.h5", "r_s0002.h5"]
    got = subprocess.run([sys.executable, "-c", ROTATING_WRITER, d.model_dump_json(), "2"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert got.returncode == 0, got.stderr
    saved = json.loads(got.stdout.splitlines()[-1])
    partials = sorted((tmp_path / "out").glob("*.partial"))
    assert [p.name for p in partials] == ["r_s0001-1.h5.partial"]
    c, client, told = _resumed_from(tmp_path, d, saved)
    try:
        c.start().result(60)
        assert client.starts[-1] is not None
        assert client.starts[-1].offsets == {0: 23}  # after its 2nd iteration, not again
        assert not partials[0].exists()  # recovered
        ours = [tmp_path / "out" / "r-1.h5", tmp_path / "out" / "r_s0001-1.h5"]
        assert sorted(told) == ours and sorted(c.files()) == [str(p) for p in ours]
    finally:
        c.shutdown().result(60)
        assert c.join(60)


@pytest.mark.parametrize("left", ["empty", "superblock"])
def test_a_resume_recovers_the_segment_the_daemon_killed_during_the_last_resume_opened(
        tmp_path: Path, left: str) -> None:
    """A daemon killed, then the next one killed too while it resumed: it had recovered the
    leftover (the state file then names no file, and the next segment number) and its new
    recording had created its first segment, not yet saved in the state file. The third
    start looked for later segments only after recovering a file the state file names, so
    that segment's .partial (empty, or only its superblock: no data reaches it before the
    state file names it) stayed for good, and the resumed recording went on beside it
    ("..._s0001-1.h5"). It is now found and removed (it holds nothing)."""
    import datetime as dt

    from recorder.sinks.options import partial_path, render_file_name

    d = RunDefinition.model_validate({
        "name": "r",
        "snapshot": {"snapshot_name": "snap", "pv_uri_list": ["pva://A:B"]},
        "output": {"directory": str(tmp_path / "out"), "isolate": False},
    })
    started = int(1.7e18)
    name = render_file_name(d.output, run="r", snapshot="snap", seq=0, segment=1,
                            start=dt.datetime.fromtimestamp(started / 1e9, dt.UTC))
    leftover = partial_path(name)
    leftover.parent.mkdir(parents=True)
    if left == "empty":
        leftover.touch()
    else:  # a writer killed after HDF5 wrote the superblock
        import h5py

        h5py.File(leftover, "x", libver=("v110", "v110")).close()
        whole = leftover.read_bytes()
        leftover.write_bytes(whole[:48])
    c, client, _told = _resumed_from(tmp_path, d, {
        "uid": "uid", "offsets": 41, "current_file": None, "segments": 1})
    try:
        c.start().result(60)
        assert client.starts[-1] is not None and client.starts[-1].offsets == {0: 42}
        assert not leftover.exists()
        (current,) = (tmp_path / "out").glob("*.partial")
        assert "-1." not in current.name, current
    finally:
        c.shutdown().result(60)
        assert c.join(60)
    # the same left by a recording an admin stop ended (the daemon's budget ran out): the
    # next start ends that recording, its files finalized, this one removed
    shutil.rmtree(tmp_path / "out")
    shutil.rmtree(tmp_path / "state")
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"")
    store = ResumeStore(tmp_path / "state")
    store.begin("r", ActiveRecording("uid", 0, d.snapshot.topic, "snap", {0: 41}, None, 1,
                                     started_at_ns=started, stopped=True))
    c = RunController(d, FakeClient(), store,  # type: ignore[arg-type]
                      backoff=Backoff(initial_s=0.05, factor=2, max_s=0.2, jitter=0))
    try:
        wait_until = time.monotonic() + 30
        while store.load("r").active is not None and time.monotonic() < wait_until:
            time.sleep(0.05)
        assert store.load("r").active is None
        assert not leftover.exists()
    finally:
        c.shutdown().result(60)
        assert c.join(60)


@pytest.mark.timeout(120)
def test_a_resume_with_file_names_too_long_to_keep_whole_ends(tmp_path: Path) -> None:
    """A file name longer than 200 bytes is shortened; it was cut at its end, taking the
    segment number (and ``{start}``, ``{seq}``) with it, so every segment of a recording got
    the same name (told apart only by unique_path's -1, -2, ...). At a restart after a crash,
    the search for the segments opened after the last state save rendered that one name for
    segment after segment, found it each time (the first segment) and never ended: the run
    never started, its first file's event went out again and again."""
    import subprocess
    import sys


    snapshot = "s" * 190
    d = RunDefinition.model_validate({
        "name": "r",
        "snapshot": {"snapshot_name": snapshot, "pv_uri_list": ["pva://A:B"]},
        "output": {"directory": str(tmp_path / "out"), "isolate": False,
                   "file_template": "{run}_{snapshot}_{start:%Y%m%dT%H%M%SZ}_{seq:04d}.h5",
                   "segment": {"max_iterations": 1}},
    })
    got = subprocess.run([sys.executable, "-c", ROTATING_WRITER, d.model_dump_json(), "3"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert got.returncode == 0, got.stderr
    saved = json.loads(got.stdout.splitlines()[-1])
    (partial,) = (tmp_path / "out").glob("*.partial")
    c, client, told = _resumed_from(tmp_path, d, saved)
    try:
        c.start().result(60)
        assert client.starts[-1] is not None
        assert client.starts[-1].offsets == {0: 33}  # after the last iteration
        finals = sorted((tmp_path / "out").glob("*.h5"))
        assert len(finals) == 3 and sorted(told) == finals
        assert not partial.exists()  # recovered
    finally:
        c.shutdown().result(60)
        assert c.join(60)


def test_a_command_the_codec_chokes_on_is_answered_and_the_loop_goes_on() -> None:
    """``"issued_at": 10**400`` raised OverflowError out of AdminHandler.handle, i.e. out of
    the daemon's main loop (the daemon exited, and read the same record again at each
    restart); the commands after it are still answered."""
    h, sent = _handler()
    target = FakeTarget()
    poison = json.dumps({"command": "status", "request_id": "p", "reply_topic": "mine",
                         "issued_at": 10**400}).encode()
    h.handle(_record(poison), target)  # type: ignore[arg-type]
    h.handle(_record(_cmd("status")), target)  # type: ignore[arg-type]
    assert [(topic, reply["request_id"], reply["code"]) for topic, reply in sent] == [
        ("mine", "p", "malformed"), ("mine", sent[1][1]["request_id"], "ok")]


def test_a_start_queued_behind_the_shutdown_does_not_start_the_run(tmp_path: Path) -> None:
    """The daemon's shutdown asks each controller to exit, then its loop still answers admin
    commands: a start for an idle run queued right behind the exit request was served
    before the worker checked that it should end, so the run started recording while the
    daemon shut down (the shutdown waited its whole budget, the file stayed .partial and
    the next daemon resumed the run)."""
    client = FakeClient()
    c, _made = _controller(tmp_path, client)
    try:
        with c._lock:  # the worker is held while both requests are queued
            exiting = c.shutdown()
            start = c.start()
        assert "shut down" in exiting.result(5)
        error = start.exception(5)
        assert isinstance(error, AdminCommandError), start.result()
        assert c.join(5) and client.starts == [] and c.state is RunState.IDLE
    finally:
        c.shutdown()
        if c.state is RunState.RECORDING:
            c.stop().result(5)
        c.join(5)


def test_a_reload_while_the_daemon_shuts_down_is_refused(tmp_path: Path) -> None:
    """The shutdown's loop still answers admin commands: a ``reload`` then created the
    controllers of added (autostart) or changed runs, which the shutdown, waiting only for
    the controllers it had told to stop, left recording when it closed the Kafka client
    (their files .partial, the runs resumed by the next daemon); and it told systemd
    RELOADING=1/READY=1 in the middle of STOPPING=1."""
    from recorder.config.daemon import DaemonSettings
    from recorder.service import Service
    from recorder.settings import KafkaSettings

    runs = tmp_path / "runs.yaml"
    runs.write_text("runs:\n  - name: late\n    autostart: true\n    snapshot:\n"
                    "      snapshot_name: late\n      pv_uri_list: [pva://A]\n"
                    f"    output: {{directory: {tmp_path / 'data'}}}\n")

    def factory(definition: RunDefinition, *, seq: int, recording_uid: str | None,
                first_segment: int = 0, start_ns: int | None = None) -> FakeRecording:
        return FakeRecording(tmp_path / f"late_{seq}.h5")

    service = Service(DaemonSettings(config_path=runs), KafkaSettings(),
                      state_dir=tmp_path / "state", recording_factory=factory,  # type: ignore[arg-type]
                      gc_tuning=False)
    client = FakeClient()
    client.kafka_unreachable_since = None  # type: ignore[attr-defined]
    service._client = client
    service._state = DaemonState.STOPPING  # as _shutdown sets it
    h, sent = _handler()
    try:
        h.handle(_record(_cmd("reload")), service)
        assert [s[1]["code"] for s in sent] == ["internal"], sent
        assert "shutting down" in sent[0][1]["message"]
        assert service.controllers == {} and service._deferred == []
        assert service._state is DaemonState.STOPPING
    finally:
        for c in service.controllers.values():
            c.shutdown()
            c.join(5)


class _AdminRun(FakeHandle):
    """A recording run "r" as the service's admin handling sees it (triggers counted)."""

    name = "r"
    alive = True
    triggered = 0

    def shutdown(self, reason: str = "", *, resumable: bool = False,
                 restarting: bool = False) -> None:
        self.alive = False

    def trigger(self, tags: Mapping[str, str] | None = None) -> Future[str]:
        self.triggered += 1
        return super().trigger(tags)

    def status(self) -> Any:
        from recorder.admin.status import RunStatus

        return RunStatus("r", RunState.RECORDING, "snap", "t", "periodic normal", False)


class _QueuedLink:
    """The admin link's ``take``: the records queued by the test."""

    def __init__(self) -> None:
        self.queued: list[Record] = []
        self.running = True  # its consumer thread is alive

    def take(self, limit: int = 100) -> list[Record]:
        out, self.queued = self.queued, []
        return out


def _admin_service(tmp_path: Path) -> tuple[Any, _AdminRun, _QueuedLink, list[Any],
                                           dict[int, int] | None]:
    """A Service with run "r", a queued admin link and the admin position of ``tmp_path``'s
    state directory loaded (and its answered request_ids remembered) as ``_connect`` does:
    (service, run, link, replies sent, the saved position)."""
    from recorder.config.daemon import DaemonSettings
    from recorder.service import Service
    from recorder.settings import KafkaSettings

    service = Service(DaemonSettings(config_path=tmp_path / "none.yaml"), KafkaSettings(),
                      state_dir=tmp_path / "state", gc_tuning=False)
    run = _AdminRun()
    service._controllers["r"] = run  # type: ignore[assignment]
    link = _QueuedLink()
    service._link = link  # type: ignore[assignment]
    cursor = AdminCursor(tmp_path / "state", "admin")
    start = cursor.load()
    service._cursor = cursor
    service._admin, sent = _handler()
    service._admin.remember(cursor.answered)
    return service, run, link, sent, start


def test_the_saved_admin_offset_stays_at_a_command_not_answered_yet(tmp_path: Path) -> None:
    """The admin offset was saved past a stop as soon as it was handed to its run, before it
    was answered (its files are finalized first): a daemon that crashed meanwhile never
    answered it, and the next one, resuming past it, neither stopped the (resumed) run nor
    answered. The position now stays at the first command not answered, so it is read
    again after a crash (at-least-once); a shutdown that answers it moves past it."""
    service, run, link, sent, _start = _admin_service(tmp_path)

    def saved() -> dict[int, int] | None:
        return AdminCursor(tmp_path / "state", "admin").load()

    link.queued = [Record("admin", 0, offset, payload, None, NOW) for offset, payload in
                   enumerate([_cmd("status"), _cmd("stop", "r"), _cmd("status")])]
    service._pass()
    assert [s[1]["command"] for s in sent] == ["status", "status"]  # the stop is pending
    assert saved() == {0: 1}  # read again after a crash: the stop, then the status again
    run.stop_future.set_result("stopped")
    service._pass()
    assert [s[1]["command"] for s in sent] == ["status", "status", "stop"]
    assert saved() == {0: 3}

    link.queued = [Record("admin", 0, 3, _cmd("stop", "r"), None, NOW)]
    run.stop_future = Future()
    service._pass()
    assert saved() == {0: 3}
    service._shutdown()  # answers it ("the daemon is shutting down"): not read again
    assert [s[1]["code"] for s in sent][-1] == "internal" and saved() == {0: 4}


def test_commands_read_again_after_a_crash_are_not_carried_out_twice(tmp_path: Path) -> None:
    """After a crash the admin topic is read again from a stop that was still waiting for its
    files; a trigger after it had been answered: read again, it is answered ``duplicate`` and
    not fired twice (the answered request_ids are saved with the position), while the stop
    is carried out and answered."""
    records = [Record("admin", 0, 0, _cmd("stop", "r"), None, NOW),
               Record("admin", 0, 1, _cmd("trigger", "r"), None, NOW)]

    def daemon() -> tuple[Any, _AdminRun, _QueuedLink, list[Any]]:
        service, run, link, sent, start = _admin_service(tmp_path)
        link.queued = [r for r in records if start is None or r.offset >= start.get(0, 0)]
        return service, run, link, sent

    first, run, _link, sent = daemon()
    first._pass()
    assert [(m[1]["command"], m[1]["code"]) for m in sent] == [("trigger", "ok")]
    assert run.triggered == 1  # the stop still waits for its files: then the daemon dies

    second, run, _link, sent = daemon()
    second._pass()  # read again from the stop
    run.stop_future.set_result("stopped")
    second._pass()
    assert sorted((m[1]["command"], m[1]["code"]) for m in sent) == [
        ("stop", "ok"), ("trigger", "duplicate")]
    assert run.triggered == 0  # not fired twice


@pytest.mark.parametrize("change", ["changed", "removed"])
def test_a_reload_while_a_run_is_restarting_after_a_reload(tmp_path: Path, change: str) -> None:
    """A reload that changed a run leaves it without a controller until its old recording
    has stopped; a second reload in that time that changed or removed it again looked its
    controller up (``self._controllers[name]``) and raised KeyError: half applied, answered
    ``internal`` to an admin reload, and a SIGHUP took the daemon's main loop down."""
    from recorder.config.daemon import DaemonSettings
    from recorder.service import Service, _Deferred
    from recorder.settings import KafkaSettings

    class Stopping:
        alive = True
        definition = _definition(tmp_path)

        def recording_files(self) -> list[str]:
            return []

    runs = tmp_path / "runs.yaml"
    runs.write_text("runs: []\n" if change == "removed" else
                    "runs:\n  - name: r\n    snapshot:\n      snapshot_name: snap\n"
                    "      pv_uri_list: ['pva://A:B']\n      time_window: 2000\n"
                    f"    output: {{directory: {tmp_path / 'out'}}}\n")
    service = Service(DaemonSettings(config_path=runs), KafkaSettings(),
                      state_dir=tmp_path / "state", gc_tuning=False)
    first = _definition(tmp_path, time_window=1500)  # what the first reload brought
    service._definitions = {"r": first}
    service._deferred.append(_Deferred(first, True, [Stopping()]))  # type: ignore[list-item]
    ok, message, _data = service.reload("SIGHUP")
    assert ok, message
    assert service.controllers == {}
    if change == "removed":
        assert service._deferred == [] and service.run_handle("r") is None
    else:
        [deferred] = service._deferred
        assert deferred.definition.snapshot.time_window == 2000 and deferred.start
        assert service.run_handle("r") is not None


def test_runs_that_swap_snapshots_in_a_reload_wait_for_each_other(tmp_path: Path) -> None:
    """A reload that gives run a the snapshot of run b (and b that of a, or b removed) made
    a's new controller wait only for a's old one: once that had stopped, a started on b's
    snapshot while b's old recording was still stopping it — two runs on one k2eg snapshot,
    and b's stop then stopped the snapshot a had just started."""
    from recorder.config.daemon import DaemonSettings
    from recorder.service import Service
    from recorder.settings import KafkaSettings

    def definition(name: str, snap: str) -> RunDefinition:
        return RunDefinition.model_validate({
            "name": name, "snapshot": {"snapshot_name": snap, "pv_uri_list": ["pva://A:B"]},
            "output": {"directory": str(tmp_path / "out")}})

    class Old:
        state = RunState.RECORDING
        recording_wanted = True

        def __init__(self, d: RunDefinition) -> None:
            self.definition = d
            self.name = d.name
            self.alive = True

        def shutdown(self, reason: str = "", *, resumable: bool = False,
                     restarting: bool = False) -> None:
            pass

        def status(self) -> RunStatus:
            return RunStatus(self.name, RunState.STOPPING, "s", "s", "periodic normal", True)

        def recording_files(self) -> list[str]:
            return []

    runs = tmp_path / "runs.yaml"
    runs.write_text(
        "runs:\n"
        f"  - {{name: a, snapshot: {{snapshot_name: snap_b, pv_uri_list: ['pva://A:B']}}, "
        f"output: {{directory: {tmp_path / 'out'}}}}}\n"
        f"  - {{name: b, snapshot: {{snapshot_name: snap_a, pv_uri_list: ['pva://A:B']}}, "
        f"output: {{directory: {tmp_path / 'out'}}}}}\n")
    service = Service(DaemonSettings(config_path=runs), KafkaSettings(),
                      state_dir=tmp_path / "state", gc_tuning=False)
    service._definitions = {"a": definition("a", "snap_a"), "b": definition("b", "snap_b")}
    old = {name: Old(d) for name, d in service._definitions.items()}
    service._controllers = dict(old)  # type: ignore[arg-type]
    made: list[str] = []
    service._add_controller = lambda d, *, start, **_kw: made.append(d.name)  # type: ignore[method-assign,assignment,return-value]
    ok, message, _data = service.reload("SIGHUP")
    assert ok, message
    assert made == []
    old["a"].alive = False  # a's old recording has stopped, b's is still stopping snap_b
    service._apply_deferred()
    assert made == []  # a (now on snap_b) waits for b's old recording too
    old["b"].alive = False
    service._apply_deferred()
    assert sorted(made) == ["a", "b"]


def test_the_metrics_of_a_run_a_reload_removed_are_gone_once_it_has_stopped(
    tmp_path: Path,
) -> None:
    """A reload that removes a run dropped its series at once, then stopped it: the stop set
    ``run_recording`` to 0 and counted the final iteration and file, which made the series
    again, for ever (``run_recording{run=...} 0`` of a run that no longer exists: an alert
    on runs that stopped recording fired for it until the daemon restarted)."""
    from recorder.config.daemon import DaemonSettings
    from recorder.service import Service
    from recorder.settings import KafkaSettings

    metrics = RecorderMetrics()
    runs = tmp_path / "runs.yaml"
    runs.write_text("runs: []\n")

    def factory(definition: RunDefinition, *, seq: int, recording_uid: str | None,
                first_segment: int = 0, start_ns: int | None = None) -> FakeRecording:
        return FakeRecording(tmp_path / f"r_{seq}.h5")

    service = Service(DaemonSettings(config_path=runs, disk_check_interval_s=0), KafkaSettings(),
                      state_dir=tmp_path / "state", metrics=metrics,
                      recording_factory=factory,  # type: ignore[arg-type]
                      gc_tuning=False)
    client = FakeClient()
    client.kafka_unreachable_since = None  # type: ignore[attr-defined]
    service._client = client
    definition = _definition(tmp_path)
    service._definitions = {"r": definition}
    controller = service._add_controller(definition, start=False)
    sub = _started(controller, client)
    _feed(sub, 1, 2)

    def series_of_r() -> list[str]:
        return sorted({f"{m.name}:{s.name}" for m in metrics.registry.collect()
                       for s in m.samples if s.labels.get("run") == "r"})

    _wait(lambda: metrics.registry.get_sample_value(
        "k2eg_recorder_iterations_total", {"run": "r", "status": "complete"}) == 2)
    ok, message, _data = service.reload("SIGHUP")
    assert ok, message
    assert controller.join(5)
    service._apply_deferred()
    assert series_of_r() == []
    assert service._retiring == []


def test_topics_found_created_again_are_counted_in_the_metrics(tmp_path: Path) -> None:
    """A resume whose snapshot topic was deleted and created again is logged and counted
    (``kafka.offsets_reset``, as the README says), but that counter was in the k2eg client
    only: no metric, no status field showed it to an operator. It is
    ``kafka_offsets_reset_total`` now, and it never goes down."""
    from recorder.config.daemon import DaemonSettings
    from recorder.service import Service
    from recorder.settings import KafkaSettings

    metrics = RecorderMetrics()
    service = Service(DaemonSettings(config_path=tmp_path / "none.yaml",
                                     disk_check_interval_s=0), KafkaSettings(),
                      state_dir=tmp_path / "state", metrics=metrics, gc_tuning=False)
    client = FakeClient()
    service._client = client

    def counted() -> float | None:
        return metrics.registry.get_sample_value("k2eg_recorder_kafka_offsets_reset_total")

    service._pass()
    assert counted() == 0
    client.offsets_reset = 2  # two partitions read from their beginning
    service._pass()
    service._pass()
    assert counted() == 2
    client.offsets_reset = 3
    service._pass()
    assert counted() == 3


def test_a_run_a_reload_added_that_waits_for_another_to_stop_is_in_the_status(
    tmp_path: Path,
) -> None:
    """A run renamed in the run definitions (the new name takes over the old one's snapshot)
    is created once the old recording has stopped; until then it took start/stop commands
    but was missing from the status document: `k2eg-recorder status NEW` answered
    ``unknown_run`` and the heartbeats did not list it."""
    from recorder.config.daemon import DaemonSettings
    from recorder.service import Service
    from recorder.settings import KafkaSettings

    def definition(name: str) -> RunDefinition:
        return RunDefinition.model_validate({
            "name": name, "snapshot": {"snapshot_name": "snap_a", "pv_uri_list": ["pva://A:B"]},
            "output": {"directory": str(tmp_path / "out")}})

    class Old:
        state = RunState.RECORDING
        alive = True

        def __init__(self, d: RunDefinition) -> None:
            self.definition = d
            self.name = d.name

        def shutdown(self, reason: str = "", *, resumable: bool = False,
                     restarting: bool = False) -> None:
            self.state = RunState.STOPPING

        def status(self) -> RunStatus:
            return RunStatus(self.name, self.state, "snap_a", "snap_a", "periodic normal", True)

        def recording_files(self) -> list[str]:
            return []

    runs = tmp_path / "runs.yaml"
    runs.write_text(
        f"runs:\n  - {{name: b, snapshot: {{snapshot_name: snap_a, pv_uri_list: ['pva://A:B']}},"
        f" output: {{directory: {tmp_path / 'out'}}}}}\n")
    service = Service(DaemonSettings(config_path=runs, disk_check_interval_s=0), KafkaSettings(),
                      state_dir=tmp_path / "state", gc_tuning=False)
    service._definitions = {"a": definition("a")}
    old = Old(definition("a"))
    service._controllers = {"a": old}  # type: ignore[dict-item]
    ok, message, _data = service.reload("SIGHUP")
    assert ok, message
    assert service.run_handle("b") is not None  # b takes commands...
    doc = service.status_document("status")
    assert doc.run("a") is not None and doc.run("a").state is RunState.STOPPING  # type: ignore[union-attr]
    b = doc.run("b")  # ...and is in the status
    assert b is not None, [r.name for r in doc.runs]
    assert b.state is RunState.STARTING and b.snapshot == "snap_a" and b.autostart
    service._state = DaemonState.RUNNING
    assert service._status_line().startswith("running: 1 starting, 1 stopping;")


def test_a_run_added_again_while_its_removed_recording_stops_waits_for_it(
    tmp_path: Path,
) -> None:
    """A reload removed run r (its recording being finalized), a later reload added r again
    on another snapshot: the new r started at once, while the old one was still stopping.
    Both wrote r's state file; the old one's end of recording, written last, cleared the new
    recording from it, so a crash then neither resumed r nor recovered its .partial file.
    The new r now waits for the old one, as a run taking over a snapshot does."""
    from recorder.config.daemon import DaemonSettings
    from recorder.service import Service
    from recorder.settings import KafkaSettings

    gate = threading.Event()

    class SlowClose(FakeRecording):
        def close(self, status: str = "complete", reason: str = "") -> list[Path]:
            gate.wait(10)  # a large segment being finalized
            return super().close(status, reason)

    def factory(definition: RunDefinition, *, seq: int, recording_uid: str | None,
                first_segment: int = 0, start_ns: int | None = None) -> FakeRecording:
        return (SlowClose if seq == 0 else FakeRecording)(tmp_path / f"r_{seq}.h5")

    runs = tmp_path / "runs.yaml"
    runs.write_text("runs: []\n")
    service = Service(DaemonSettings(config_path=runs, disk_check_interval_s=0), KafkaSettings(),
                      state_dir=tmp_path / "state", recording_factory=factory,  # type: ignore[arg-type]
                      gc_tuning=False)
    client = FakeClient()
    client.kafka_unreachable_since = None  # type: ignore[attr-defined]
    service._client = client
    first = _definition(tmp_path)
    service._definitions = {"r": first}
    old = service._add_controller(first, start=False)
    _started(old, client)
    try:
        ok, message, _data = service.reload("SIGHUP")  # r removed: its recording stops
        assert ok, message
        _wait(lambda: old.state is RunState.STOPPING)
        runs.write_text(
            "runs:\n  - {name: r, autostart: true, snapshot: {snapshot_name: other, "
            f"pv_uri_list: ['pva://A:B']}}, output: {{directory: {tmp_path / 'out'}}}}}\n")
        ok, message, _data = service.reload("SIGHUP")  # r again, on another snapshot
        assert ok, message
        gate.set()
        assert old.join(5)
        service._apply_deferred()
        new = service.controllers["r"]
        _wait(lambda: new.state is RunState.RECORDING)
        active = ResumeStore(tmp_path / "state").load("r").active
        assert active is not None and active.topic == "other", active
    finally:
        gate.set()
        for c in service.controllers.values():
            c.shutdown()
            c.join(5)


@pytest.mark.parametrize("saved", [None, {0: 3}])
def test_an_admin_topic_kafka_is_slow_to_assign_is_a_transport_error(
    monkeypatch: pytest.MonkeyPatch, saved: dict[int, int] | None,
) -> None:
    """Kafka slow to answer the admin topic's assignment (or its watermarks, when reading
    resumes from a saved position) while the daemon connects: the admin link raised the bare
    ``TimeoutError`` of its future, which the daemon's connect loop (retrying
    :class:`RecorderError`) did not catch: the daemon died with a traceback instead of
    retrying as it does when Kafka is down. It is a TransportError now, the adapter closed."""
    from recorder.daemon import adminlink
    from recorder.errors import TransportError
    from recorder.settings import KafkaSettings

    closed: list[bool] = []

    class SlowAdapter:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def ensure_topic(self, topic: str, **kwargs: Any) -> None:
            pass

        def start(self, timeout_s: float) -> None:
            pass

        def watermarks(self, topic: str, **kwargs: Any) -> Future[Any]:
            return Future()  # never answered in time

        def add_topic(self, topic: str, start: Any, **kwargs: Any) -> Future[Any]:
            return Future()

        def close(self, timeout_s: float = 5.0) -> None:
            closed.append(True)

    monkeypatch.setattr(adminlink, "KafkaAdapter", SlowAdapter)
    with pytest.raises(TransportError, match="did not answer"):
        adminlink.AdminLink(KafkaSettings(), "admin", start=saved, timeout_s=0.05)
    assert closed == [True]


def test_a_start_on_another_snapshot_still_finalizes_the_file_a_crash_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The daemon crashed while run r recorded snapshot "old"; r's definition now names
    another snapshot. Its start (rightly) did not resume the old recording, but it did not
    finalize the .partial file that recording left either, and then replaced the state file
    that named it: the file stayed .partial for good, no file event, nothing in the log
    saying where it is. It is now recovered as any leftover is (and told), then r starts
    afresh on its new snapshot."""
    from recorder.daemon import controller as controller_module

    out = tmp_path / "out"
    out.mkdir()
    partial = out / "r_old_0000.h5.partial"
    partial.write_bytes(b"left by a crash")
    recovered: list[Path] = []

    def finalize(path: Path, run: str, *, timeout_s: float = 0.0) -> Path | None:
        if not path.exists():
            return None
        final = path.with_name(path.name.removesuffix(".partial"))
        path.rename(final)
        recovered.append(path)
        return final

    monkeypatch.setattr(controller_module, "finalize_leftover", finalize)
    store = ResumeStore(tmp_path / "state")
    store.begin("r", ActiveRecording("old-uid", 4, "old", "old", {0: 41}, str(partial),
                                     segments=1, started_at_ns=int(1.7e18)))
    client = FakeClient()
    told: list[Path] = []
    c, _made = _controller(tmp_path, client, on_file=lambda _d, path: told.append(path))
    try:
        c.start().result(5)
        assert client.starts == [None]  # not resumed: another topic
        assert recovered == [partial] and not partial.exists()
        assert told == [out / "r_old_0000.h5"] and list(c.files()) == [str(out / "r_old_0000.h5")]
        active = store.load("r").active
        assert active is not None and active.topic == "snap" and active.seq == 5
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_sigusr1_to_a_leftover_recovery_dumps_its_stacks_and_it_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
) -> None:
    """`systemctl kill -s USR1 k2eg-recorder` (every process of the unit) asks each process
    for its stacks and lets it go on (README). The child that recovers a leftover at a
    restart, what a daemon that seems stuck at its start is often busy with, was killed by
    it (SIGUSR1's default action): the leftover was then left .partial, "could not recover".
    It now writes its stacks to the daemon's stderr (the journal) and goes on."""
    import os
    import signal

    from recorder.daemon import leftovers

    partial = tmp_path / "r_0000.h5.partial"
    os.mkfifo(partial)  # opening it blocks: a recovery that takes its time
    monkeypatch.setattr(leftovers, "superblock_bytes", lambda path: b"")
    outcome: list[BaseException | Path] = []

    def recover() -> None:
        try:
            outcome.append(leftovers.recover_in_child(partial, timeout_s=60))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=recover, daemon=True)
    thread.start()

    def child() -> int | None:
        for proc in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if (proc.name.isdigit() and str(partial).encode()
                        in (proc / "cmdline").read_bytes()
                        and (proc / "wchan").read_text() == "wait_for_partner"):
                    return int(proc.name)  # opening the FIFO
        return None

    deadline = time.monotonic() + 60
    while (pid := child()) is None:
        assert thread.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGUSR1)
        time.sleep(1.0)
        assert thread.is_alive() and child() == pid, f"the recovery child died: {outcome}"
        assert "leftovers.py" in capfd.readouterr().err
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        thread.join(30)


def _recording_service_whose_stop_the_client_ends(
    tmp_path: Path, recording: type[FakeRecording],
) -> tuple[Any, RunController]:
    """A service (shutdown budget 0.3 s) with run ``r`` recording into ``recording``s, whose
    k2eg stop waits until the client is closed, which then ends it (ClientClosedError)."""
    from recorder.config.daemon import DaemonSettings
    from recorder.errors import ClientClosedError
    from recorder.service import Service
    from recorder.settings import KafkaSettings

    closed = threading.Event()

    class SlowStopSub(FakeSub):
        def stop(self, timeout: float | None = None, *, final_timeout_s: float | None = None,
                 keep_backpressure: bool = False) -> StopResult:
            closed.wait(10)  # the final iteration is behind the backlog
            raise ClientClosedError("the k2eg client is closed")

    class Client(FakeClient):
        def snapshot_recurring(self, props: Any, start: Any = None,
                               max_pending: int = 0, prime_until: Any = None) -> FakeSub:
            self.starts.append(start)
            self.sub = SlowStopSub(props.topic)
            return self.sub

        def close(self, timeout_s: float = 10.0) -> None:
            closed.set()

    runs = tmp_path / "runs.yaml"
    runs.write_text("runs: []\n")
    service = Service(DaemonSettings(config_path=runs, disk_check_interval_s=0,
                                     shutdown_timeout_s=0.3), KafkaSettings(),
                      state_dir=tmp_path / "state",
                      recording_factory=lambda d, **kw: recording(  # type: ignore[arg-type]
                          tmp_path / f"r_{kw['seq']}.h5"),
                      gc_tuning=False)
    client = Client()
    client.kafka_unreachable_since = None  # type: ignore[attr-defined]
    service._client = client
    definition = _definition(tmp_path)
    service._definitions = {"r": definition}
    c = service._add_controller(definition, start=True)
    _wait(lambda: c.state is RunState.RECORDING)
    return service, c


@pytest.mark.parametrize("stopped_by", ["shutdown", "admin", "reload"])
def test_a_run_late_at_the_end_of_the_shutdown_budget_resumes_at_the_next_start(
    tmp_path: Path, stopped_by: str,
) -> None:
    """The shutdown budget ran out while a run was still stopping (its final iteration
    behind a backlog its slow writer had not read yet): the daemon logged that its file
    "resumes at the next start", then closed the Kafka client, which ended the stop; the
    run's worker then closed its recording as aborted and cleared its state file, so the
    next daemon did not resume it and what it had not read yet was never recorded. The
    state file now keeps the recording: the next start resumes it. A run an admin ``stop``
    was stopping is not resumed: that stop stands; nor one a reload removed."""
    service, c = _recording_service_whose_stop_the_client_ends(tmp_path, FakeRecording)
    if stopped_by == "admin":
        c.stop()
        _wait(lambda: c.state is RunState.STOPPING)
    elif stopped_by == "reload":
        ok, message, _data = service.reload("SIGHUP")  # runs: []
        assert ok and service._retiring == [c], message
        _wait(lambda: c.state is RunState.STOPPING)
    with capture_logs() as logs:
        service._shutdown()
    assert any(e["event"].startswith("runs did not stop within the shutdown budget")
               for e in logs), logs
    service._close()
    assert c.join(5)
    active = ResumeStore(tmp_path / "state").load("r").active
    if stopped_by != "shutdown":
        assert active is None
    else:
        assert active is not None and active.topic == "snap"


def test_exiting_waits_for_the_runs_the_shutdown_budget_left_closing_their_recordings(
    tmp_path: Path,
) -> None:
    """A stop cut short by the shutdown budget ends once the client is closed, and its run
    then closes its recording (here: finalizes its file, 1 s). The daemon returned from
    ``run()`` meanwhile and Python finalized the interpreter under that thread: its first
    import of h5py (the file's event) came too late for h5py's atexit handler, and HDF5's exit
    handler crashed the daemon with SIGSEGV (exit -11, seen in CI). Exiting now waits for
    those threads (``RUN_THREADS_EXIT_S``), and their file events are still published."""
    finalized: list[str] = []

    class SlowRecording(FakeRecording):
        def close(self, status: str = "complete", reason: str = "") -> list[Path]:
            time.sleep(1.0)  # a large file's finalization
            finalized.append(status)
            return super().close(status, reason)

    service, c = _recording_service_whose_stop_the_client_ends(tmp_path, SlowRecording)
    c.stop()
    _wait(lambda: c.state is RunState.STOPPING)
    service._shutdown()
    assert c.alive and not finalized
    service._close()  # what run() does last
    assert not c.alive and finalized == ["aborted"]


def test_a_command_for_a_run_a_reload_removed_while_it_stops_says_so(tmp_path: Path) -> None:
    """A reload removed run r; while its recording is being finalized r is still in the
    status (stopping), so a ``stop r`` or ``trigger r`` then was answered "no run named 'r'
    (did you mean 'r'?); its runs: r": the run the operator named, offered as the one meant.
    The answer now says what happened to it."""
    from recorder.config.daemon import DaemonSettings
    from recorder.service import Service
    from recorder.settings import KafkaSettings

    class Retiring:
        alive = True
        definition = _definition(tmp_path)
        name = "r"

        def status(self) -> RunStatus:
            return RunStatus("r", RunState.STOPPING, "snap", "snap", "periodic normal", True)

    service = Service(DaemonSettings(config_path=tmp_path / "runs.yaml", disk_check_interval_s=0),
                      KafkaSettings(), state_dir=tmp_path / "state", gc_tuning=False)
    service._retiring = [Retiring()]  # type: ignore[list-item]
    h, sent = _handler()
    h.handle(_record(_cmd("stop", "r")), service)
    h.handle(_record(_cmd("trigger", "r")), service)
    for _topic, reply in sent:
        assert reply["code"] == "unknown_run", reply
        assert "did you mean 'r'" not in reply["message"], reply["message"]
        assert "removed from the run definitions by a reload" in reply["message"], reply


def test_a_sighup_while_connecting_starts_the_runs_as_then_defined(tmp_path: Path) -> None:
    """Kafka was down at start; meanwhile the operator removed a run (say, one hammering
    the wrong PVs) and reloaded (SIGHUP). Once Kafka answered, the daemon started the runs
    of the definitions read at its start, the removed one too (a snapshot start at the
    gateway, a new file), and only then applied the reload, stopping it again. The
    definitions are now read again before any run starts."""
    from recorder.config.daemon import DaemonSettings
    from recorder.service import Service
    from recorder.settings import KafkaSettings

    def run_yaml(*names: str) -> str:
        return "runs:\n" + "".join(
            f"  - {{name: {n}, autostart: true, snapshot: {{snapshot_name: {n}, "
            f"pv_uri_list: ['pva://A:B']}}, output: {{directory: {tmp_path / 'out'}}}}}\n"
            for n in names)

    runs = tmp_path / "runs.yaml"
    runs.write_text(run_yaml("keep", "wrong"))
    service = Service(DaemonSettings(config_path=runs, disk_check_interval_s=0), KafkaSettings(),
                      state_dir=tmp_path / "state", gc_tuning=False,
                      recording_factory=lambda d, **kw: FakeRecording(  # type: ignore[arg-type]
                          tmp_path / f"{d.name}_{kw['seq']}.h5"))
    made: list[tuple[str, bool]] = []

    def connect() -> bool:  # Kafka answers after the operator's edit and SIGHUP
        runs.write_text(run_yaml("keep"))
        service.request_reload()
        service._client = FakeClient()
        service._client.kafka_unreachable_since = None
        return True

    def add(definition: RunDefinition, *, start: bool) -> Any:
        made.append((definition.name, start))
        service.request_stop()
        return None

    service._connect = connect  # type: ignore[method-assign]
    service._add_controller = add  # type: ignore[method-assign,assignment]
    assert service.run() == 0
    assert made == [("keep", True)]


def test_a_sigterm_while_connecting_starts_no_run(tmp_path: Path) -> None:
    """SIGTERM came during the connection attempt that then succeeded: the daemon started
    every autostart run (a snapshot start at the gateway, a new file each) only to stop them
    again at once. It now exits without starting any."""
    from recorder.config.daemon import DaemonSettings
    from recorder.service import Service
    from recorder.settings import KafkaSettings

    runs = tmp_path / "runs.yaml"
    runs.write_text("runs:\n  - {name: r, autostart: true, snapshot: {snapshot_name: snap, "
                    f"pv_uri_list: ['pva://A:B']}}, output: {{directory: {tmp_path / 'out'}}}}}\n")
    service = Service(DaemonSettings(config_path=runs, disk_check_interval_s=0), KafkaSettings(),
                      state_dir=tmp_path / "state", gc_tuning=False)
    made: list[str] = []

    def connect() -> bool:
        service._stop_signalled = True  # as the SIGTERM handler does
        service._client = FakeClient()
        service._client.kafka_unreachable_since = None
        return True

    def add(definition: RunDefinition, *, start: bool) -> Any:
        made.append(definition.name)
        return None

    service._connect = connect  # type: ignore[method-assign]
    service._add_controller = add  # type: ignore[method-assign,assignment]
    assert service.run() == 0
    assert made == []


def test_the_leftover_of_a_run_no_longer_defined_is_named_at_start(tmp_path: Path) -> None:
    """The daemon crashed while run "gone" recorded, and "gone" was taken out of the run
    definitions before the restart: no run resumes it, so its .partial file stayed as it was
    without a word (the promise is that a restart finalizes the file each run was writing).
    The start now says which file was left and how to finalize it."""
    from recorder.config.daemon import DaemonSettings
    from recorder.service import Service
    from recorder.settings import KafkaSettings

    runs = tmp_path / "runs.yaml"
    runs.write_text("runs: []\n")
    partial = tmp_path / "out" / "gone_0000.h5.partial"
    partial.parent.mkdir()
    partial.write_bytes(b"left by a crash")
    ResumeStore(tmp_path / "state").begin("gone", ActiveRecording(
        "uid", 0, "snap", "snap", {0: 41}, str(partial)))
    service = Service(DaemonSettings(config_path=runs, disk_check_interval_s=0), KafkaSettings(),
                      state_dir=tmp_path / "state", gc_tuning=False)
    service._connect = lambda: False  # type: ignore[method-assign]  # stopped while connecting
    with capture_logs() as logs:
        assert service.run() == 0
    [warning] = [e for e in logs if e.get("run") == "gone"]
    assert warning["log_level"] == "warning" and warning["path"] == str(partial), warning
    assert "k2eg-recorder recover" in warning["event"], warning


@pytest.mark.parametrize("when", ["in a retry", "in the last attempt"])
def test_a_stop_while_connecting_to_kafka_tells_systemd_it_is_stopping(
    tmp_path: Path, when: str
) -> None:
    """SIGTERM while the daemon still waited for Kafka (READY=1 already sent) exited without
    STOPPING=1: ``systemctl status`` kept showing "waiting for Kafka" as the service went."""
    from recorder.config.daemon import DaemonSettings
    from recorder.notify import Notifier
    from recorder.service import Service
    from recorder.settings import KafkaSettings

    class Recorded(Notifier):
        def __init__(self) -> None:
            super().__init__(None)
            self.sent: list[tuple[str, ...]] = []

        def notify(self, *assignments: str) -> bool:
            self.sent.append(assignments)
            return True

    runs = tmp_path / "runs.yaml"
    runs.write_text("runs: []\n")
    notifier = Recorded()
    service = Service(DaemonSettings(config_path=runs, disk_check_interval_s=0), KafkaSettings(),
                      state_dir=tmp_path / "state", gc_tuning=False, notifier=notifier)

    def connect() -> bool:
        service.request_stop()
        return when == "in the last attempt"

    service._connect = connect  # type: ignore[method-assign]
    assert service.run() == 0
    assert notifier.sent[0][0] == "READY=1", notifier.sent
    stopping = [a for a in notifier.sent if a[0] == "STOPPING=1"]
    assert stopping == [("STOPPING=1",
                         "STATUS=stopped while connecting to Kafka; no run started")], notifier.sent


def test_the_stop_reply_of_a_recording_with_many_segments_fits_in_a_kafka_message(
    tmp_path: Path,
) -> None:
    """A long recording (one-minute segments for weeks, or many snapshot restarts) has tens
    of thousands of files. The stop reply listed every one twice (its message and its
    ``files``): over Kafka's 1 MB message limit, the producer refused it and the operator's
    ``k2eg-recorder stop`` got no answer. It lists the newest files and says how many."""
    client = FakeClient()
    c, made = _controller(tmp_path, client)
    sent: list[bytes] = []
    h = AdminHandler(CommandPolicy(max_age_s=30), "default-replies",
                     lambda topic, payload: sent.append(payload), clock_ms=lambda: NOW)

    class Target(FakeTarget):
        def run_handle(self, name: str) -> Any:
            return c if name == "r" else None

    try:
        _started(c, client)
        earlier = [tmp_path / f"r_0_seg{i:06d}_a_long_descriptive_run_name.h5"
                   for i in range(20_000)]
        made[0].paths = Newest(earlier)
        h.handle(_record(_cmd("stop", "r")), Target())  # type: ignore[arg-type]
        _wait(lambda: (h.poll(), bool(sent))[1])
        assert len(sent[0]) < 1_000_000  # librdkafka's default message.max.bytes
        reply = json.loads(sent[0])
        assert reply["code"] == "ok"
        files = reply["data"]["files"]
        assert files and files[-1] == str(made[0]._final)  # the newest are listed
        assert "20001 files" in reply["message"]
        assert reply["message"].endswith("; files: " + ", ".join(files))  # as the CLI prints
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_a_dead_kafka_consumer_thread_stops_the_watchdog_pings(tmp_path: Path) -> None:
    """The admin link's (or the client's) consumer thread died: the daemon read neither
    commands nor data, yet pinged the watchdog from its main loop for ever, so systemd never
    restarted it. The pings now stop (and it says why), so the watchdog restarts it."""
    import socket

    from recorder.notify import Notifier, WatchdogPinger

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    try:
        service, _run, link, _sent, _start = _admin_service(tmp_path)
        service.notifier = Notifier(str(tmp_path / "notify.sock"))
        service._watchdog = WatchdogPinger(service.notifier, 0.01)  # WatchdogSec=20ms
        service._state = DaemonState.RUNNING

        def datagrams() -> list[str]:
            out = []
            sock.setblocking(False)
            try:
                while True:
                    out.append(sock.recv(4096).decode())
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
            return out

        service._pass()
        time.sleep(0.05)
        service._pass()
        assert any("WATCHDOG=1" in d for d in datagrams())
        link.running = False  # its consumer thread died
        with capture_logs() as logs:
            service._pass()
            time.sleep(0.05)
            service._pass()
        got = datagrams()
        assert not any("WATCHDOG=1" in d for d in got), got
        assert any("admin link died" in d for d in got), got
        assert [e["consumers"] for e in logs if e["log_level"] == "critical"] == [["admin link"]]
    finally:
        sock.close()


def test_a_dead_kafka_consumer_stays_in_the_systemd_status_until_the_restart(
    tmp_path: Path,
) -> None:
    """The STATUS= line saying a Kafka consumer thread died was sent once, then replaced by
    the next ordinary line (at the next iteration recorded: the client records on when only
    the admin link died), so ``systemctl status`` looked healthy until the watchdog killed
    the daemon. The status line now keeps saying it."""
    import socket

    from recorder.admin.status import RunStatus
    from recorder.notify import Notifier

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(2)
    try:
        service, run, link, _sent, _start = _admin_service(tmp_path)
        service.notifier = Notifier(str(tmp_path / "notify.sock"))
        service._state = DaemonState.RUNNING
        service._pass()
        assert "died" not in sock.recv(4096).decode()
        link.running = False  # its consumer thread died
        service._pass()
        run.status = lambda: RunStatus(  # type: ignore[method-assign]
            "r", RunState.RECORDING, "snap", "t", "periodic normal", False,
            iterations_complete=7)
        service._pass()  # another iteration recorded: the line changes
        sock.setblocking(False)
        lines = []
        with contextlib.suppress(BlockingIOError):
            while True:
                lines.append(sock.recv(4096).decode())
        assert lines and "admin link died" in lines[-1], lines
        assert "7 iterations recorded" in lines[-1], lines
    finally:
        sock.close()
        service.notifier.close()


def test_a_status_line_systemd_did_not_get_is_sent_again(tmp_path: Path) -> None:
    """A STATUS= datagram that failed (systemd re-executing, a full socket buffer) was
    remembered as sent: ``systemctl status`` kept the old line until the status changed."""
    import socket

    from recorder.notify import Notifier

    service, _run, _link, _sent, _start = _admin_service(tmp_path)
    path = tmp_path / "notify.sock"
    service.notifier = Notifier(str(path))  # nobody listens yet: the send fails
    service._pass()
    assert service.notifier.last_error is not None
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        listener.bind(str(path))
        listener.settimeout(2)
        service._pass()  # the same line: sent now
        got = listener.recv(4096).decode()
        assert got.startswith("STATUS=")
        listener.setblocking(False)
        service._pass()  # sent once, not again
        with pytest.raises(BlockingIOError):
            listener.recv(4096)
    finally:
        listener.close()
        service.notifier.close()


def test_the_flush_inside_close_counts_in_the_bytes_and_flush_metrics(tmp_path: Path) -> None:
    """A recording's close() flushes its last data: its values were counted, its bytes
    (``bytes_written_total``) and the flush itself (``flush_duration_seconds``) were not."""
    client = FakeClient()
    metrics = RecorderMetrics()
    c, made = _controller(tmp_path, client, metrics=metrics)
    try:
        _started(c, client)
        rec = made[0]
        rec.counters["bytes"] = 0
        plain_close = rec.close

        def close(status: str = "complete", reason: str = "") -> list[Path]:
            rec.counters["bytes"] += 4096  # what the last flush wrote
            return plain_close(status, reason)

        rec.close = close  # type: ignore[method-assign]
        _wait(lambda: rec.counters["flushes"] > 0)
        flushes_before = rec.counters["flushes"]
        _wait(lambda: metrics.registry.get_sample_value(
            "k2eg_recorder_flush_duration_seconds_count", {"run": "r"}) == flushes_before)
        c.stop().result(5)

        def sample(name: str) -> float:
            return metrics.registry.get_sample_value(name, {"run": "r"}) or 0.0

        assert sample("k2eg_recorder_bytes_written_total") == 4096
        assert sample("k2eg_recorder_flush_duration_seconds_count") == rec.counters["flushes"]
    finally:
        c.shutdown().result(5)
        assert c.join(5)


@pytest.mark.parametrize("isolate", [False, True])
def test_every_flush_of_the_recording_is_in_the_flush_histogram(tmp_path: Path,
                                                                isolate: bool) -> None:
    """flush_duration_seconds observed one flush per pump cycle (or writer reply), however
    many the recording made meanwhile: a segment rotation flushes inside handle(), then the
    cycle's own flush; with short segments its _count and _sum were a fraction of the
    flushes made."""
    from recorder.client.values import PVSample
    from recorder.daemon.recording import hdf5_recording

    d = RunDefinition.model_validate({
        "name": "r",
        "snapshot": {"snapshot_name": "snap", "pv_uri_list": ["pva://A:B"]},
        "output": {"directory": str(tmp_path / "out"), "isolate": isolate,
                   "segment": {"max_iterations": 1}},
    })
    client = FakeClient()
    metrics = RecorderMetrics()
    recordings: list[Any] = []

    def factory(*args: Any, **kwargs: Any) -> Any:
        recordings.append(hdf5_recording(*args, **kwargs))
        return recordings[-1]

    c = RunController(d, client, ResumeStore(tmp_path / "state"),  # type: ignore[arg-type]
                      recording_factory=factory, metrics=metrics,
                      backoff=Backoff(initial_s=0.05, factor=2, max_s=0.2, jitter=0))
    try:
        sub = _started(c, client)
        for i in range(1, 7):  # queued at once: handled in one pump cycle or a few
            o = 10 + 3 * i
            sub.events.put(IterationOpened(sub.topic, "snap", i, i, offset=o))
            sub.events.put(ValuesReceived(sub.topic, i, 1, i,
                                          (PVSample("A:B", {"value": float(i)}),),
                                          offset=o + 1))
            sub.events.put(IterationClosed(sub.topic, "snap", i, IterationStatus.COMPLETE,
                                           None, i, i, offset=o + 2))
        assert "stopped" in c.stop().result(30)
        flushes = recordings[0].counters["flushes"]
        assert flushes >= 6
        assert metrics.registry.get_sample_value(
            "k2eg_recorder_flush_duration_seconds_count", {"run": "r"}) == flushes
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_a_reply_topic_naming_one_of_the_daemons_own_topics_is_not_written_to() -> None:
    """A command (signed or not, any sender with write access to the admin topic) names the
    status topic, the files topic, the admin topic or the gateway's command topic as its
    reply_topic: its reply went there, into streams dashboards, catalogs and the gateway read
    for something else. It now goes to the default reply topic."""
    sent: list[tuple[str, dict[str, Any]]] = []
    h = AdminHandler(CommandPolicy(max_age_s=30), "default-replies",
                     lambda topic, payload: sent.append((topic, json.loads(payload))),
                     clock_ms=lambda: NOW,
                     protected_topics=("admin", "status", "files", "cmd-in-topic"))
    target = FakeTarget()
    for topic in ("status", "files", "admin", "cmd-in-topic", "mine"):
        payload = encode_command(build_command("status", issued_at_ms=NOW, reply_topic=topic))
        h.handle(_record(payload), target)  # type: ignore[arg-type]
    h.handle(_record(b'{"command": "nope", "reply_topic": "status"}'), target)  # type: ignore[arg-type]
    assert [topic for topic, _ in sent] == ["default-replies"] * 4 + ["mine", "default-replies"]


def test_a_metrics_port_in_use_is_said_in_the_systemd_status(tmp_path: Path) -> None:
    """The metrics endpoint could not start (its port held by another process): only a log
    line said so, and a Prometheus scrape of that port reached whatever holds it. The
    ``STATUS=`` line (``systemctl status``) now says it too."""
    import socket

    from recorder.config.daemon import DaemonSettings
    from recorder.service import Service
    from recorder.settings import KafkaSettings

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        port = holder.getsockname()[1]
        service = Service(DaemonSettings(config_path=tmp_path / "none.yaml", metrics_port=port,
                                         metrics_addr="127.0.0.1"),
                          KafkaSettings(), state_dir=tmp_path / "state", gc_tuning=False)
        service._start_metrics()
        assert f"metrics endpoint not started (port {port}" in service._status_line()
    finally:
        holder.close()


def test_a_refused_reload_of_many_problems_keeps_status_and_replies_within_a_kafka_message(
    tmp_path: Path,
) -> None:
    """A run of 10,000 PVs whose generated list got a wrong prefix ("pva//") is 10,000
    problems. A refused reload kept every one in ``config_errors``: each heartbeat and every
    status reply carried them (over 2 MB, past Kafka's 1 MB message limit), so the producer
    refused them all: no heartbeat, ``k2eg-recorder status`` and the reload itself got no
    answer, while the daemon recorded on. The status and the reply now list the first
    problems and say how many there are."""
    from recorder.config.daemon import DaemonSettings
    from recorder.service import Service
    from recorder.settings import KafkaSettings

    def run_yaml(prefix: str) -> str:
        pvs = ", ".join(f"{prefix}SECTOR:{i // 100}:BPM:{i % 100}:X" for i in range(10_000))
        return (f"runs:\n  - name: bpms\n    autostart: false\n    snapshot: {{snapshot_name: "
                f"bpms, pv_uri_list: [{pvs}]}}\n    output: {{directory: {tmp_path / 'o'}}}\n")

    runs = tmp_path / "runs.yaml"
    runs.write_text(run_yaml("pva://"))
    service = Service(DaemonSettings(config_path=runs, disk_check_interval_s=0), KafkaSettings(),
                      state_dir=tmp_path / "state", gc_tuning=False)
    service._client = FakeClient()
    service._client.kafka_unreachable_since = None  # type: ignore[attr-defined]
    runs.write_text(run_yaml("pva//"))
    sent: list[bytes] = []
    h = AdminHandler(CommandPolicy(max_age_s=30), "default-replies",
                     lambda topic, payload: sent.append(payload), clock_ms=lambda: NOW)
    h.handle(_record(_cmd("reload")), service)
    h.handle(_record(_cmd("status")), service)
    heartbeat = service.status_document("heartbeat", 1).encode()
    assert [len(p) < 1_000_000 for p in (*sent, heartbeat)] == [True, True, True]
    reload, status = (json.loads(p) for p in sent)
    assert reload["code"] == "invalid_config" and "10000 problem(s)" in reload["message"]
    errors = status["data"]["daemon"]["config_errors"]
    assert errors[0].endswith("runs.0.snapshot.pv_uri_list.0: 'pva//SECTOR:0:BPM:0:X' is not "
                              "a valid PV URI: expected pva://NAME, ca://NAME or pv://NAME with"
                              " NAME made of [A-Za-z0-9-_] parts joined by ':' and an optional "
                              ".field")
    assert "10000" in errors[-1] and "k2eg-recorder validate" in errors[-1]
    assert service._status_line().endswith("reload refused (10000 problem(s))")


@pytest.mark.parametrize("snapshot_name", ["K2EG-Recorder-Admin", "k2eg-recorder-status",
                                           "k2eg-recorder-files", "cmd-in-topic",
                                           "K2EG-Recorder-Reply"])
def test_a_snapshot_whose_topic_is_one_of_the_daemons_own_is_refused(
    tmp_path: Path, snapshot_name: str,
) -> None:
    """k2eg publishes a snapshot on its normalized name ([^A-Za-z0-9-] -> '_', lower case):
    a run of snapshot "K2EG-Recorder-Admin" had the gateway write its data into the daemon's
    admin topic (each message answered 'malformed'), and likewise into its status, files or
    reply topic, or the gateway's own command topic. Such a run is now refused, at the start
    and by a reload, naming the topic it would share."""
    from recorder.config.daemon import DaemonSettings
    from recorder.service import EXIT_CONFIG, Service
    from recorder.settings import KafkaSettings

    def run_yaml(snapshot: str) -> str:
        return ("runs:\n  - {name: ok, snapshot: {snapshot_name: fine, pv_uri_list: ['pva://A']},"
                f" output: {{directory: {tmp_path / 'out'}}}}}\n"
                f"  - {{name: bad, snapshot: {{snapshot_name: {snapshot}, pv_uri_list: "
                f"['pva://A']}}, output: {{directory: {tmp_path / 'out'}}}}}\n")

    runs = tmp_path / "runs.yaml"
    runs.write_text(run_yaml(snapshot_name))
    settings = DaemonSettings(config_path=runs, disk_check_interval_s=0)
    kafka = KafkaSettings(app_name="k2eg-recorder")
    service = Service(settings, kafka, state_dir=tmp_path / "state", gc_tuning=False)
    connected: list[bool] = []
    service._connect = lambda: connected.append(True) or False  # type: ignore[method-assign]
    topic = snapshot_name.lower()
    with capture_logs() as logs:
        assert service.run() == EXIT_CONFIG
    assert connected == []
    problems = [e["problem"] for e in logs if e["event"] == "invalid run definition"]
    assert len(problems) == 1 and "runs.1.snapshot.snapshot_name" in problems[0], problems
    assert f"topic {topic!r}" in problems[0], problems

    runs.write_text(run_yaml("other"))  # valid: the daemon starts; then a reload brings it
    service = Service(settings, kafka, state_dir=tmp_path / "state", gc_tuning=False)
    service._client = FakeClient()
    service._client.kafka_unreachable_since = None  # type: ignore[attr-defined]
    runs.write_text(run_yaml(snapshot_name))
    ok, message, _data = service.reload("SIGHUP")
    assert not ok and f"topic {topic!r}" in message, message
    assert service.controllers == {} and service._deferred == []


def _service_with_run_r(tmp_path: Path, recording: type[FakeRecording], *, autostart: bool
                        ) -> tuple[Any, FakeClient, RunController]:
    """A Service whose runs file (read by a reload) has run r with a time window of 500 ms,
    and its controller of r as the daemon had it before (``_definition``), not started."""
    from recorder.config.daemon import DaemonSettings
    from recorder.service import Service
    from recorder.settings import KafkaSettings

    runs = tmp_path / "runs.yaml"
    runs.write_text(
        f"runs:\n  - {{name: r, autostart: {str(autostart).lower()}, snapshot: {{snapshot_name: "
        "snap, pv_uri_list: ['pva://A:B'], time_window: 500}, output: {directory: "
        f"{tmp_path / 'out'}}}}}\n")
    service = Service(DaemonSettings(config_path=runs, disk_check_interval_s=0), KafkaSettings(),
                      state_dir=tmp_path / "state", gc_tuning=False,
                      recording_factory=lambda d, **kw: recording(tmp_path / f"r_{kw['seq']}.h5"))
    client = FakeClient()
    client.kafka_unreachable_since = None  # type: ignore[attr-defined]
    service._client = client
    first = _definition(tmp_path)
    service._definitions = {"r": first}
    return service, client, service._add_controller(first, start=False)


def test_a_start_handed_to_an_idle_run_before_a_reload_changes_it_stands(
    tmp_path: Path,
) -> None:
    """An admin start handed to idle run r, then a reload that changed r, before r's worker
    had taken the start: the reload took r for idle, shut it down with the start queued
    (answered "stopped before it started") and the new r stayed idle. The start stands: it
    is answered ok and the new r records."""
    service, client, old = _service_with_run_r(tmp_path, FakeRecording, autostart=False)
    held, gate = threading.Event(), threading.Event()
    take = old._requests.get

    def slow_get(*args: Any, **kwargs: Any) -> Any:
        if not gate.is_set():  # the worker has not come round to its queue yet
            held.set()
            gate.wait(10)
        return take(*args, **kwargs)

    old._requests.get = slow_get  # type: ignore[method-assign]
    try:
        assert held.wait(5) and old.state is RunState.IDLE
        started = old.start()
        ok, message, _data = service.reload("admin command")
        assert ok, message
        gate.set()
        assert "starts with its new definition" in started.result(5)
        assert old.join(5)
        service._apply_deferred()
        new = service.controllers["r"]
        assert new.definition.snapshot.time_window == 500
        _wait(lambda: new.state is RunState.RECORDING)
        assert len(client.starts) == 1
    finally:
        gate.set()
        for c in service.controllers.values():
            c.shutdown()
            c.join(5)


def test_a_stop_handed_to_a_run_before_a_reload_changes_it_stands(tmp_path: Path) -> None:
    """An admin stop handed to run r, then (the same batch of admin records, or a SIGHUP
    within the worker's 0.1 s pump) a reload that changed r, before r's worker had acted on
    the stop: the reload took r for recording (its state still said so) and started the new
    r once the old one had stopped, so the stop was answered "stopped" and r recorded on."""
    entered, gate = threading.Event(), threading.Event()

    class Busy(FakeRecording):
        def handle(self, event: Any) -> None:
            entered.set()
            gate.wait(10)  # the worker is busy with an event (a slow write)
            super().handle(event)

    service, client, old = _service_with_run_r(tmp_path, Busy, autostart=True)
    try:
        sub = _started(old, client)
        sub.events.put(IterationOpened(sub.topic, "snap", 1, 1, offset=11))
        assert entered.wait(5)
        stopped = old.stop()
        ok, message, _data = service.reload("admin command")
        assert ok, message
        gate.set()
        assert "stopped" in stopped.result(5)
        assert old.join(5)
        service._apply_deferred()
        new = service.controllers["r"]
        assert new.definition.snapshot.time_window == 500
        time.sleep(0.3)
        assert new.state is RunState.IDLE and len(client.starts) == 1
    finally:
        gate.set()
        for c in service.controllers.values():
            c.shutdown()
            c.join(5)


def test_a_failed_run_a_reload_changes_stays_failed_with_its_error(tmp_path: Path) -> None:
    """A run whose recording had failed (its resume state kept, waiting for an operator's
    start) came back from a reload that changed it as ``idle``, ``errors: 0`` and
    ``last_error: null``: the failure vanished from the status and ``status --check``. It
    stays failed, with its error, until it is started."""
    from recorder.config.daemon import DaemonSettings
    from recorder.service import Service
    from recorder.settings import KafkaSettings

    runs = tmp_path / "runs.yaml"
    runs.write_text(
        "runs:\n  - {name: r, snapshot: {snapshot_name: snap, pv_uri_list: ['pva://A:B'], "
        f"time_window: 500}}, output: {{directory: {tmp_path / 'out'}}}}}\n")
    made: list[FakeRecording] = []

    def factory(d: RunDefinition, **kw: Any) -> FakeRecording:
        made.append(FakeRecording(tmp_path / f"r_{kw['seq']}.h5"))
        return made[-1]

    service = Service(DaemonSettings(config_path=runs, disk_check_interval_s=0), KafkaSettings(),
                      state_dir=tmp_path / "state", gc_tuning=False,
                      recording_factory=factory)  # type: ignore[arg-type]
    client = FakeClient()
    service._client = client
    first = _definition(tmp_path)
    service._definitions = {"r": first}
    old = service._add_controller(first, start=False)
    try:
        _started(old, client)
        made[0].status, made[0].reason = "failed", "OSError: [Errno 5] Input/output error"
        _wait(lambda: old.state is RunState.FAILED)
        ok, message, _data = service.reload("admin command")
        assert ok, message
        assert old.join(5)
        service._apply_deferred()
        new = service.controllers["r"]
        assert new is not old and new.definition.snapshot.time_window == 500
        status = service.status_document().run("r")
        assert status is not None and status.state is RunState.FAILED, status
        assert status.errors == 1
        assert status.last_error == "recording failed: OSError: [Errno 5] Input/output error"
        new.start().result(5)  # an operator's start tries again
        _wait(lambda: new.state is RunState.RECORDING)
        status = new.status()
        assert status.last_error is None and status.state is RunState.RECORDING
    finally:
        for c in service.controllers.values():
            c.shutdown()
            c.join(5)


def _waiting_for_room(tmp_path: Path, client: FakeClient
                      ) -> tuple[RunController, list[FakeRecording], list[bool]]:
    """A run whose recording failed on a full disk: retrying, its recording in the state
    file for the resume."""
    room = [True]
    c, made = _controller(tmp_path, client, room_for=lambda _d, _since: room[0])
    sub = _started(c, client)
    sub.events.put(IterationOpened(sub.topic, "snap", 1, 1, offset=41))
    _wait(lambda: made[0].last_durable_offset == {(sub.topic, 0): 41})
    room[0] = False
    made[0].status = "failed"
    made[0].reason = "OSError: [Errno 28] No space left on device"
    _wait(lambda: c.state is RunState.RETRYING)
    assert json.loads((tmp_path / "state" / "r.json").read_text())["active"] is not None
    return c, made, room


@pytest.mark.parametrize("how", ["admin stop", "removed by a reload"])
def test_a_run_stopped_while_it_waits_for_room_ends_its_recording(
        tmp_path: Path, how: str) -> None:
    """The stop of a run waiting for room on its disk (or a reload removing it) was
    answered "stopped", but the state file kept its recording: the next daemon start
    resumed it (an admin-started run too, which the README says stays stopped) and its
    .partial was never finalized, even with room again."""
    client = FakeClient()
    c, made, room = _waiting_for_room(tmp_path, client)
    try:
        with capture_logs() as logs:
            if how == "admin stop":
                assert "stopped before it started" in c.stop().result(5)
            else:
                c.shutdown("run removed by a reload").result(5)
        assert json.loads((tmp_path / "state" / "r.json").read_text())["active"] is None
        assert any(e["event"] == "the interrupted recording ended with the run"
                   for e in logs), logs
        room[0] = True
        time.sleep(0.3)  # room again: nothing resumes a stopped run
        assert len(made) == 1 and len(client.starts) == 1
    finally:
        if c.alive:
            c.shutdown().result(5)
        assert c.join(5)


def test_the_daemons_own_shutdown_leaves_a_run_waiting_for_room_to_resume(
        tmp_path: Path) -> None:
    """SIGTERM is not an operator's stop: the interrupted recording stays in the state file
    and the next start resumes it from its durable offset."""
    client = FakeClient()
    c, _made, _room = _waiting_for_room(tmp_path, client)
    c.shutdown("daemon shutdown", resumable=True).result(5)
    assert c.join(5)
    active = json.loads((tmp_path / "state" / "r.json").read_text())["active"]
    assert active is not None and active["offsets"] == {"0": 41}


def test_the_k2eg_reply_topic_is_one_of_the_daemons_protected_topics(tmp_path: Path) -> None:
    """A command naming the gateway's reply topic (where our k2eg client reads the
    gateway's answers) as its reply_topic had its admin reply written there: the client
    then counted a malformed gateway reply. The admin handler protects every topic the
    snapshot names are checked against."""
    from recorder.config.daemon import DaemonSettings
    from recorder.service import Service
    from recorder.settings import KafkaSettings

    kafka = KafkaSettings(reply_topic="k2eg-replies-here")
    service = Service(DaemonSettings(config_path=tmp_path / "none.yaml"), kafka,
                      state_dir=tmp_path / "state", gc_tuning=False)
    own = service._own_topics()
    assert kafka.effective_reply_topic == "k2eg-replies-here"
    assert {"k2eg-replies-here", kafka.cmd_topic, service.settings.status_topic,
            service.settings.files_topic, service.settings.admin_topic} <= set(own)
    assert service._admin_handler(lambda topic, payload: None).protected_topics == (
        set(own) - {service.settings.admin_reply_topic})


def test_a_recording_that_cannot_create_its_file_is_a_write_error(tmp_path: Path) -> None:
    """Its directory not writable: the run failed, but write_errors_total (what the README
    says to alert on) stayed 0, as if nothing had gone wrong with the disk."""
    client = FakeClient()
    metrics = RecorderMetrics()

    def factory(definition: RunDefinition, **_kw: Any) -> FakeRecording:
        raise OSError(13, "Permission denied", str(definition.output.directory))

    c = RunController(_definition(tmp_path), client,  # type: ignore[arg-type]
                      ResumeStore(tmp_path / "state"), recording_factory=factory,  # type: ignore[arg-type]
                      backoff=Backoff(initial_s=0.05, factor=2, max_s=0.2, jitter=0),
                      metrics=metrics)
    try:
        with pytest.raises(AdminCommandError, match="Permission denied"):
            c.start().result(5)
        assert c.state is RunState.FAILED
        assert metrics.registry.get_sample_value(
            "k2eg_recorder_write_errors_total", {"run": "r"}) == 1
    finally:
        c.shutdown().result(5)
        assert c.join(5)


class _BehindRecording(FakeRecording):
    """A recording whose writer process is behind (finalizing a large segment) until
    ``room`` is set: what :meth:`IsolatedRecording.wait_for_room` says."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.room = threading.Event()

    def wait_for_room(self, timeout_s: float) -> bool:
        return self.room.wait(timeout_s)


@pytest.fixture
def behind(monkeypatch: pytest.MonkeyPatch) -> list[_BehindRecording]:
    """The recordings the controllers make are writers behind (until ``room`` is set)."""
    made: list[_BehindRecording] = []

    def make(path: Path) -> FakeRecording:
        rec = _BehindRecording(path)
        made.append(rec)
        return rec

    monkeypatch.setattr(sys.modules[__name__], "FakeRecording", make)
    return made


def test_events_wait_in_the_subscription_while_the_writer_is_behind(
        tmp_path: Path, behind: list[_BehindRecording]) -> None:
    """A writer behind (finalizing a large segment, a slow disk): the run handed it an event
    every 0.5 s anyway (the writer process's bounded blocking), so with large values (a
    batch of images is tens of MB) the daemon's memory grew by that much every 0.5 s for as
    long as the writer was behind. The events now stay in the subscription, whose bounded
    queue pauses the topic (the messages wait in Kafka), until the writer has room."""
    client = FakeClient()
    c, _ = _controller(tmp_path, client)
    try:
        sub = _started(c, client)
        [rec] = behind
        _feed(sub, 1, 4)
        time.sleep(1.0)  # a few pump rounds
        assert rec.events == [] and sub.pending == 12
        rec.room.set()
        _wait(lambda: len(rec.events) == 12)
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_a_stop_takes_events_while_the_writer_is_behind(
        tmp_path: Path, behind: list[_BehindRecording]) -> None:
    """Waiting for the writer's room is not for a stop: the stop waits for its final
    iteration, which the subscription reads only when its queue is taken down."""
    client = FakeClient()
    c, _ = _controller(tmp_path, client)
    try:
        sub = _started(c, client)
        _feed(sub, 1, 2)
        assert "stopped" in c.stop().result(10)
        assert sub.stopped and len(behind[0].events) == 8  # 2 iterations and the final one
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_the_uptime_in_the_status_is_not_moved_by_a_wall_clock_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The daemon's uptime (`status`: "up N s") was its wall clock now minus its wall clock at
    start: chrony stepping the clock back by an hour (a host booted with its RTC ahead) showed
    a daemon up for 100 s as up 0 s, a step forward added the step to it. It is now measured
    on the monotonic clock; ``started_at`` stays the wall-clock start."""
    import types

    from recorder import service as service_module
    from recorder.config.daemon import DaemonSettings
    from recorder.service import Service
    from recorder.settings import KafkaSettings

    clock = {"wall_ns": 1_800_000_000_000_000_000, "mono": 1000.0}
    fake = types.SimpleNamespace(
        time_ns=lambda: clock["wall_ns"], monotonic=lambda: clock["mono"],
        time=lambda: clock["wall_ns"] / 1e9, sleep=time.sleep)
    monkeypatch.setattr(service_module, "time", fake)
    runs = tmp_path / "runs.yaml"
    runs.write_text("runs: []\n")
    service = Service(DaemonSettings(config_path=runs, disk_check_interval_s=0), KafkaSettings(),
                      state_dir=tmp_path / "state", gc_tuning=False)
    started = service.status_document("status").started_at
    clock["mono"] += 100.0
    clock["wall_ns"] += 100 * 10**9 - 3600 * 10**9  # 100 s later, stepped back an hour
    doc = service.status_document("status")
    assert doc.uptime_s == pytest.approx(100.0)
    assert json.loads(doc.encode())["daemon"]["uptime_s"] == pytest.approx(100.0)
    assert StatusDocument.decode(doc.encode()).uptime_s == pytest.approx(100.0)
    assert doc.started_at == started
    clock["mono"] += 10.0
    clock["wall_ns"] += 10 * 10**9 + 7200 * 10**9  # then stepped forward two hours
    assert service.status_document("status").uptime_s == pytest.approx(110.0)


def test_a_reload_whose_check_hangs_is_refused_in_time_and_the_watchdog_pinged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reload checks the run definitions on the main loop, and the check resolves each
    output directory: on a hung NFS mount it never returned, the main loop stopped pinging
    the watchdog and systemd killed the daemon. The check now runs in a thread of its own;
    past RELOAD_CHECK_TIMEOUT_S the reload is refused (the definitions in force stay) and a
    reload while it still hangs is refused at once."""
    import recorder.service as service_module
    from recorder.config.daemon import DaemonSettings
    from recorder.service import Service
    from recorder.settings import KafkaSettings

    runs = tmp_path / "runs.yaml"
    runs.write_text("runs: []\n")
    service = Service(DaemonSettings(config_path=runs, disk_check_interval_s=0), KafkaSettings(),
                      state_dir=tmp_path / "state", gc_tuning=False)
    service._client = FakeClient()
    service._client.kafka_unreachable_since = None  # type: ignore[attr-defined]
    hung = threading.Event()
    check = service._check_runs

    def hanging() -> Any:
        hung.wait(20)
        return check()

    service._check_runs = hanging  # type: ignore[method-assign]
    pings: list[float] = []
    monkeypatch.setattr(service._watchdog, "maybe_ping", pings.append)
    monkeypatch.setattr(service_module, "RELOAD_CHECK_TIMEOUT_S", 0.5)
    sent: list[bytes] = []
    h = AdminHandler(CommandPolicy(max_age_s=30), "default-replies",
                     lambda topic, payload: sent.append(payload), clock_ms=lambda: NOW)
    started = time.monotonic()
    h.handle(_record(_cmd("reload")), service)
    assert time.monotonic() - started < 5
    assert len(pings) >= 3  # the main thread went on pinging while it waited
    h.handle(_record(_cmd("reload")), service)  # the first check still hangs
    first, second = (json.loads(p) for p in sent)
    assert first["code"] == "invalid_config" and "did not end within 0.5 s" in first["message"]
    assert second["code"] == "invalid_config" and "still not ended" in second["message"]
    hung.set()
    _wait(lambda: service._reload_check is not None and service._reload_check.done())
    sent.clear()
    h.handle(_record(_cmd("reload")), service)
    assert json.loads(sent[0])["ok"] is True, sent
    hung.clear()  # hangs again; a SIGTERM comes: the shutdown does not wait for the check
    threading.Timer(0.1, service.request_stop).start()
    sent.clear()
    monkeypatch.setattr(service_module, "RELOAD_CHECK_TIMEOUT_S", 10.0)
    started = time.monotonic()
    assert service._reload_now("SIGHUP")[0] is False
    assert time.monotonic() - started < 5
    hung.set()


def test_the_stop_of_a_failed_recording_keeps_back_pressure_on_its_unread_backlog(
    tmp_path: Path,
) -> None:
    """A recording fails while its subscription is far behind (a stalled or slow writer is
    what makes it fall behind). The run stops its snapshot from its worker thread, which takes
    no more events: a k2eg stop without back-pressure reads the whole backlog into memory (it
    reads on while reading progresses, see ``K2egClient._drain_final``), gigabytes of events
    nobody takes, so the daemon of every run could be OOM-killed. The stop keeps the topic
    paused: it reads no backlog into memory."""
    backlog = 5000  # events waiting in Kafka behind the paused topic

    class BehindSub(FakeSub):
        def stop(self, timeout: float | None = None, *, final_timeout_s: float | None = None,
                 keep_backpressure: bool = False) -> StopResult:
            if not keep_backpressure:  # the client reads the backlog, whoever takes it
                for i in range(backlog):
                    self.events.put(ValuesReceived(self.topic, 5, 1, 0, (), offset=100 + i))
            return super().stop(timeout, final_timeout_s=final_timeout_s,
                                keep_backpressure=keep_backpressure)

    class BehindClient(FakeClient):
        def snapshot_recurring(self, props: Any, start: Any = None, max_pending: int = 0,
                               prime_until: Any = None) -> FakeSub:
            sub = super().snapshot_recurring(props, start, max_pending, prime_until)
            self.sub = BehindSub(sub.topic)
            return self.sub

    client = BehindClient()
    c, made = _controller(tmp_path, client)
    try:
        sub = _started(c, client)
        made[0].status, made[0].reason = "failed", "writer process (pid 1) stalled"
        _wait(lambda: c.state is RunState.FAILED)
        assert sub.stopped
        assert sub.pending < 100, f"{sub.pending} events of the backlog read into memory"
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_the_log_lines_of_a_recording_with_many_segments_stay_short(tmp_path: Path) -> None:
    """A recording of one-minute segments has tens of thousands of files after a few weeks.
    The "recording closed" line listed every one (and so did "daemon stopped"): a JSON log
    line of megabytes, which journald (LineMax=48K) cuts into pieces that ``jq`` cannot
    read. They list the newest files and say how many there are."""
    client = FakeClient()
    c, made = _controller(tmp_path, client)
    try:
        _started(c, client)
        made[0].paths = Newest(tmp_path / f"r_0_seg{i:06d}_a_long_descriptive_run_name.h5"
                               for i in range(20_000))
        with capture_logs() as logs:
            assert "20001 files" in c.stop().result(5)
        [closed] = [e for e in logs if e["event"] == "recording closed"]
        assert len(json.dumps(closed, default=str)) < 8_000, len(json.dumps(closed, default=str))
        assert closed["files"][-1] == str(made[0]._final)  # the newest
        assert closed["files_total"] == 20_001
        assert c.files().total == 20_001  # how many; the newest are kept (FILES_KEPT)
        assert c.files().held == FILES_KEPT
    finally:
        c.shutdown().result(5)
        assert c.join(5)


def test_a_run_of_thousands_of_segments_holds_its_newest_files_and_tells_each_once(
    tmp_path: Path,
) -> None:
    """A recording of 60 s segments has 43,200 files after a month: the run (files(), the
    stop reply's list) and its recording (``paths``) held every path for as long as it ran
    (~35 MB a run, ~20 MB of it in the daemon). They hold the newest (FILES_KEPT) and how
    many; every file is still told once and in order (its file event), also thousands of
    tiny segments finalized between two looks; the stop reply and the log say how many."""
    told: list[Path] = []
    client = FakeClient()
    c, made = _controller(tmp_path, client, on_file=lambda _d, p: told.append(p))
    try:
        sub = _started(c, client)
        rec = made[0]
        names = [tmp_path / f"r_0_s{i:05d}.h5" for i in range(5_000)]
        bursts = iter([names[:2_500], names[2_500:]])

        def rotate(event: Any) -> None:  # in the run's thread, as a writer's rotations
            FakeRecording.handle(rec, event)
            rec.paths.extend(next(bursts, []))

        rec.handle = rotate  # type: ignore[method-assign]
        for offset, seen in ((3, 2_500), (4, 5_000)):
            sub.events.put(IterationOpened(sub.topic, "snap", offset, offset, offset=offset))
            _wait(lambda seen=seen: len(told) >= seen)  # type: ignore[misc]
            assert len(list(rec.paths)) <= FILES_KEPT  # told: only the newest stay
        with capture_logs() as logs:
            text = c.stop().result(5)
        every = [*names, rec._final]
        assert told == every  # each once, in order
        assert len(list(rec.paths)) == FILES_KEPT and rec.paths.total == 5_001
        held = [str(p) for p in every[-FILES_KEPT:]]
        assert list(c.files()) == held and c.files().total == 5_001
        assert c.recording_files() == held
        assert f"; 5001 files, the last {FILES_KEPT} listed; files: {', '.join(held)}" in text
        [closed] = [e for e in logs if e["event"] == "recording closed"]
        assert closed["files_total"] == 5_001 and closed["files"] == held[-10:]
    finally:
        c.shutdown().result(5)
        assert c.join(5)
