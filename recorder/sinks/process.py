"""IsolatedRecording: an :class:`~recorder.sinks.hdf5.HDF5Recording` in its own writer process.

Why: after a real ENOSPC/EFBIG on one file the HDF5 library can crash the whole process
(SIGSEGV/SIGBUS) on later calls for *other* files (docs/decisions/0002). Recordings therefore
must not share an HDF5 library instance: each one gets a writer process, and a crash, a full
disk or a hung file system costs that recording only.

Same API and semantics as ``HDF5Recording`` (the daemon switches with :func:`open_recording`)::

    rec = IsolatedRecording(options, run_name="linac", snapshot=props, seq=3, ...)
    rec.handle(event); rec.tag_iteration(i, tags)
    rec.maybe_flush(now); rec.flush(); paths = rec.close("complete")
    rec.status, rec.reason, rec.current_path, rec.paths, rec.last_durable_offset, rec.counters

Process model
    One child per recording, started with the ``spawn`` context (never ``fork``: the daemon
    has librdkafka threads). The child imports h5py and runs a plain ``HDF5Recording``; this
    module imports neither h5py nor the HDF5 sink in the parent. The constructor waits for the
    child to open its first file (``start_timeout_s``), so ``status``/``current_path`` mean
    what they mean in-process; :func:`prewarm_writer` starts that child ahead of time (the
    daemon does before subscribing), and the recording then sends it its init as the first
    frame instead of waiting for an interpreter and h5py to start. ``clock``/``wall_clock``
    cannot cross the process boundary:
    the parent uses ``clock`` for the flush interval, and the child runs the system clocks
    shifted by the difference to ``clock()``/``wall_clock()`` observed at construction. The
    child ignores SIGINT/SIGTERM/SIGHUP (the daemon closes recordings
    in order on shutdown; the unit's ``KillMode=mixed`` signals the main process only) and
    SIGXFSZ (a file-size limit becomes a clean EFBIG failure). When the parent goes away
    without ``close`` (crash, proxy garbage-collected) the child sees EOF, flushes what it
    received and exits *without* finalizing: the ``.partial`` is left for
    ``k2eg-recorder recover`` exactly as after kill -9 of an in-process writer.

Serialization (no pickling of events)
    ``handle`` encodes each event at once into a msgpack list (the format, and how the child
    rebuilds the samples, is in :mod:`recorder.sinks.process_codec`).
    Encoded events are collected into a batch that is shipped when it reaches
    ``batch_bytes`` and on every ``maybe_flush``/``flush``/``close`` (the daemon calls
    ``maybe_flush`` every pump cycle, so the child works concurrently with the consumer).
    Frames go through a one-way pipe (widened to 1 MiB where Linux allows) written by a
    sender thread, so the caller never blocks on a full pipe; the child acknowledges every
    frame with a small state record (status, reason, paths, durable offsets, counters, last
    flush duration).

Back-pressure (choice: bounded blocking + an observable backlog)
    ``backlog_bytes`` counts encoded data accepted but not yet acknowledged by the child
    (batched + queued + in the pipe); ``congested`` is ``backlog_bytes > max_backlog_bytes``
    (default ``options.max_buffer_bytes``). While congested, ``handle`` waits for the child
    at most ``max_block_s`` (default 0.5 s) per call and then accepts the event anyway. So a
    slow writer (say, finalizing a large segment during rotation) slows the caller down to
    about one event per ``max_block_s``: the daemon's run thread stops draining its
    subscription, whose bounded queue then pauses the Kafka topic — nothing is dropped, memory
    grows by at most one event per ``max_block_s``, and the thread still gets to its control
    requests between events. The daemon does not rely on that (one event of large values
    can be tens of MB): before it takes an event from its subscription it calls
    :meth:`IsolatedRecording.wait_for_room`, so while the writer is behind the events wait
    in Kafka. ``maybe_flush`` never waits: it ships the batch, asks for an asynchronous
    flush when ``flush_interval_s`` has passed (at most one outstanding) and reads whatever
    replies are there; ``last_durable_offset``/``counters`` advance when the child's reply
    arrives (on a later call). ``flush`` and ``close`` are synchronous RPCs with timeouts
    (``reply_timeout_s``, ``close_timeout_s``: close finalizes, i.e. rewrites, the file).

Failure handling (never raises into the daemon for I/O problems)
    * The writer fails (ENOSPC, EFBIG, unwritable directory): the child's ``HDF5Recording``
      marks itself failed; the proxy reports the same ``status``/``reason``.
    * The child dies (segfault, OOM killer, kill -9): ``status = "failed"``, ``reason`` names
      the signal or exit code and the ``.partial`` left for ``recover``; later events are
      dropped (``counters["dropped_events"]``); ``close`` returns the files that exist.
    * The child stops answering: no reply for ``stall_timeout_s`` while work is outstanding
      and no I/O for at least half of it (a writer finalizing a large segment at a rotation
      answers only when done, but reads and writes meanwhile), ``flush`` exceeding its
      timeout, or ``close`` its timeout with no I/O during the last such stretch either: the
      child is killed (SIGKILL) and the recording failed with a reason saying so.
    * A bug in the child (an unexpected exception): recording failed, reason has the
      exception, the partial is kept (not finalized: its state is unknown).
    * The package was upgraded under the running daemon (``pip install -U`` before the
      restart): a writer, which imports the package from disk, that does not speak the
      daemon's pipe protocol (``process_codec.protocol``) refuses the init before opening a
      file; the recording fails at its start with a reason saying to restart the daemon.

Modules
    This one holds the proxy, :class:`IsolatedRecording`, and :func:`open_recording`;
    :mod:`recorder.sinks.process_codec` the encoding of what crosses the pipe,
    :mod:`recorder.sinks.process_child` the writer process's side and
    :mod:`recorder.sinks.process_spawn` starting, pre-starting and reaping writer processes.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import structlog

from recorder import __version__
from recorder.client.events import IterationEvent
from recorder.client.properties import SnapshotProperties
from recorder.newest import Newest
from recorder.sinks import process_spawn
from recorder.sinks.options import (
    FLUSHES_KEPT,
    PARTIAL_SUFFIX,
    OutputOptions,
    final_path,
    flush_due_after,
)
from recorder.sinks.process_child import _log_config
from recorder.sinks.process_codec import (
    _CLOSE,
    _EVENTS,
    _FLUSH,
    _TAGS,
    _Encoder,
    _snapshot_dict,
    _unpack,
    protocol,
)
from recorder.sinks.process_spawn import (
    _LIVE,
    _describe_exit,
    _Reaper,
    _sender,
    _spawn_writer,
    _take_warm,
    prewarm_writer,
    release_warm_writers,
)

if TYPE_CHECKING:
    from recorder.sinks.hdf5 import HDF5Recording

__all__ = ["IsolatedRecording", "open_recording", "prewarm_writer", "release_warm_writers"]

log = structlog.get_logger("recorder.sinks.process")

DEFAULT_BATCH_BYTES = 256 * 1024


# what happens to the .partial a writer that is gone left: the daemon's resume state names it
_LEFT_FOR = ("the run's next start finalizes it and resumes after it; "
             "`k2eg-recorder recover` finalizes it by hand")

class IsolatedRecording:
    """``HDF5Recording`` run in a writer process; see the module docstring."""

    def __init__(
        self,
        options: OutputOptions,
        *,
        run_name: str,
        snapshot: SnapshotProperties | None = None,
        run_definition_text: str = "",
        metadata: Mapping[str, Any] | None = None,
        pv_uris: Iterable[str] = (),
        seq: int = 0,
        recording_uid: str | None = None,
        first_segment: int = 0,
        start_wall: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        start_timeout_s: float = 60.0,
        reply_timeout_s: float = 120.0,
        close_timeout_s: float = 1800.0,
        stall_timeout_s: float = 300.0,
        max_block_s: float = 0.5,
        max_backlog_bytes: int | None = None,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
    ) -> None:
        self.options = options
        self.run_name = run_name
        self.snapshot = snapshot
        self.seq = seq
        self.uid = recording_uid or str(uuid.uuid4())
        self.clock = clock
        self.status = "recording"
        self.reason = ""
        self.paths: Newest[Path] = Newest()  # finalized files: the newest, and .total
        self.current_path: Path | None = None
        self.counters: dict[str, int] = {
            "events": 0,
            "values": 0,
            "iterations": 0,
            "flushes": 0,
            "segments": 0,
            "dropped_events": 0,
            "tags": 0,
        }
        self.last_flush_seconds = 0.0
        self.flush_seconds: deque[float] = deque(maxlen=FLUSHES_KEPT)  # newest last
        self.blocked_seconds = 0.0  # total time handle() waited for a congested writer
        self.reply_timeout_s = reply_timeout_s
        self.close_timeout_s = close_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.max_block_s = max(0.0, max_block_s)
        self.max_backlog_bytes = (
            options.max_buffer_bytes if max_backlog_bytes is None else max_backlog_bytes
        )
        self.batch_bytes = batch_bytes
        self._durable: dict[tuple[str, int], int] = {}
        self._child_counters: dict[str, int] = dict(self.counters)
        self._dropped_here = 0
        self._encoder = _Encoder()
        self._batch: list[list[Any]] = []
        self._batch_size = 0
        self._next_seq = 1
        self._inflight: dict[int, tuple[int, int]] = {}  # seq -> (bytes, events), in order
        self._inflight_bytes = 0
        self._acked = -1
        self._flush_pending: int | None = None  # seq of an outstanding asynchronous flush
        self._last_flush = clock()
        self._unflushed = False  # events handed over since the last flush request
        self._last_progress = time.monotonic()
        self._io_mark: tuple[float, int] | None = None  # (when, I/O bytes): last look
        self._closed = False
        self._gone = False  # the child is dead or was killed: nothing more to read
        self.pid: int | None = None
        self._reaper: _Reaper | None = None
        self._log = log.bind(
            run=run_name, snapshot=snapshot.snapshot_name if snapshot else None, seq=seq
        )

        init = {
            # checked by the writer before anything else (it may run an upgraded package)
            "protocol": protocol(),
            "version": __version__,
            "options": options.model_dump_json(),
            "run_name": run_name,
            "snapshot": None if snapshot is None else _snapshot_dict(snapshot),
            "run_definition_text": run_definition_text,
            # what HDF5Recording stores (json.dumps(..., default=str)), made msgpack-safe
            "metadata": json.loads(json.dumps(dict(metadata or {}), default=str)),
            "pv_uris": list(pv_uris),
            "seq": seq,
            "first_segment": first_segment,
            "start_wall": start_wall,
            "uid": self.uid,
            "clock_offset": clock() - time.monotonic(),
            "wall_offset": wall_clock() - time.time(),
            "log": _log_config(),
        }
        init_blob: bytes = msgpack.packb(init, use_bin_type=True)
        self._out: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        # a place among the writers starting (process_spawn.STARTING): the start timeout
        # counts the start of this one, not the wait for the others
        with process_spawn.STARTING:
            self._start_writer(init_blob, f"k2eg-writer-{run_name}-{seq}", start_timeout_s)

    def _start_writer(self, init_blob: bytes, name: str, start_timeout_s: float) -> None:
        writer = _take_warm()
        if writer is not None:  # started ahead of time (prewarm_writer): init is its 1st frame
            writer.proc.name = name
            self._out.put(init_blob)
        else:
            try:
                writer = _spawn_writer(init_blob, name)
            except OSError as exc:  # cannot fork/exec (EAGAIN, ENOMEM): fail like I/O errors
                self._gone = True
                self._closed = True
                self._fail(f"cannot start the writer process: {type(exc).__name__}: {exc}")
                return
        self._proc = writer.proc
        self._rx = writer.rx
        self._broken = threading.Event()
        self._sender = threading.Thread(
            target=_sender, args=(self._out, writer.tx, self._broken),
            name=f"k2eg-writer-send-{self.run_name}-{self.seq}", daemon=True,
        )
        self._sender.start()
        self.pid = self._proc.pid
        self._log = self._log.bind(writer_pid=self.pid)
        self._reaper = _Reaper(self._proc, self._out, self._rx, self._sender,
                               process_spawn.REAP_GRACE_S)
        # when garbage-collected without close(); at exit _reap_all does it, in the right order
        weakref.finalize(self, self._reaper).atexit = False
        _LIVE.add(self)
        self._inflight[0] = (0, 0)  # the child's "ready" reply acknowledges seq 0
        self._wait_for(0, start_timeout_s, "start")

    # --- public API ---------------------------------------------------------------------------
    @property
    def last_durable_offset(self) -> dict[tuple[str, int], int]:
        """(topic, partition) -> highest Kafka offset the writer confirmed durably written."""
        return dict(self._durable)

    @property
    def backlog_bytes(self) -> int:
        """Encoded data accepted by :meth:`handle` and not yet acknowledged by the writer."""
        return self._batch_size + self._inflight_bytes

    @property
    def congested(self) -> bool:
        """True while the writer is behind by more than ``max_backlog_bytes``."""
        return self.backlog_bytes > self.max_backlog_bytes

    @property
    def alive(self) -> bool:
        """True while the writer process runs."""
        return not self._gone and self._proc.is_alive()

    def handle(self, event: IterationEvent) -> None:
        if self.status != "recording" or self._closed:
            self._drop()
            return
        row, size = self._encoder.event(event)
        self._unflushed = True
        self._batch.append(row)
        self._batch_size += size
        if self._batch_size >= self.batch_bytes:
            self._ship()
        if self.congested:
            self._relieve()

    def tag_iteration(self, iter_index: int, tags: Mapping[str, str]) -> None:
        """Trigger tags for iteration ``iter_index`` (see ``HDF5Recording.tag_iteration``);
        sent in order with the events."""
        if self.status != "recording" or self._closed:
            self._drop()
            return
        clean = {str(k): str(v) for k, v in tags.items()}
        self._batch.append([_TAGS, int(iter_index), clean])
        self._batch_size += 32 + sum(len(k) + len(v) + 8 for k, v in clean.items())
        if self._batch_size >= self.batch_bytes:
            self._ship()

    def maybe_flush(self, now: float | None = None, *, idle: bool = False) -> bool:
        """Ship pending events; ask for a flush if ``flush_interval_s`` passed. Never waits."""
        if self._closed or self._gone:
            return False
        self._ship()
        self._poll(0.0)
        if self.status != "recording":
            return False
        now = self.clock() if now is None else now
        if self._stalled():
            return False
        due = flush_due_after(self.options.flush_interval_s, idle and self._unflushed)
        if self._flush_pending is None and now - self._last_flush >= due:
            self._flush_pending = self._send([_FLUSH, self._take_seq()])
            self._last_flush = now
            self._unflushed = False
            return True
        return False

    def flush(self) -> None:
        """Data handed to :meth:`handle` is durable on return (or the recording failed)."""
        if self._closed or self._gone or self.status != "recording":
            return
        self._ship()
        seq = self._send([_FLUSH, self._take_seq()])
        self._unflushed = False
        self._wait_for(seq, self.reply_timeout_s, "a flush")
        self._last_flush = self.clock()

    def close(self, status: str = "complete", reason: str = "") -> list[Path]:
        """Stop: flush, mark open iterations incomplete, finalize the files (in the writer)."""
        if status not in ("complete", "aborted", "failed"):
            raise ValueError(f"bad close status {status!r}")
        if self._closed:
            return list(self.paths)
        self._closed = True
        if not self._gone:
            self._ship()
            seq = self._send([_CLOSE, self._take_seq(), status, reason])
            self._wait_for(seq, self.close_timeout_s, "close (finalizing the files)",
                           while_busy=True)
        self._teardown()
        self._log.info("recording closed", status=self.status, reason=self.reason,
                       files=self.paths.total)
        return list(self.paths)

    def __enter__(self) -> IsolatedRecording:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.status == "recording":
            self.close("aborted" if exc[0] is not None else "complete")
        elif not self._closed:
            self.close()

    # --- internals ----------------------------------------------------------------------------
    def _teardown(self, deadline: float | None = None) -> None:
        self._gone = True
        if self._reaper is not None:
            self._reaper(deadline)
        _LIVE.discard(self)

    def _drop(self, n: int = 1) -> None:
        """Count events refused (failed recording) or lost with a dead writer."""
        self._dropped_here += n
        self.counters["dropped_events"] = (
            self._child_counters.get("dropped_events", 0) + self._dropped_here
        )

    def _take_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def _send(self, msg: list[Any], events: int = 0) -> int:
        frame: bytes = msgpack.packb(msg, use_bin_type=True, unicode_errors="surrogateescape")
        seq: int = msg[1]
        if not self._inflight:
            self._last_progress = time.monotonic()
        self._inflight[seq] = (len(frame), events)
        self._inflight_bytes += len(frame)
        self._out.put(frame)
        return seq

    def _ship(self) -> None:
        """Send the pending batch, if any."""
        if not self._batch or self._gone:
            return
        batch, self._batch, self._batch_size = self._batch, [], 0
        self._send([_EVENTS, self._take_seq(), batch], len(batch))
        self._poll(0.0)

    def wait_for_room(self, timeout_s: float) -> bool:
        """Whether the writer takes more events now: if it is behind by more than
        ``max_backlog_bytes``, ship what is batched and wait for it at most ``timeout_s``.
        False while it is still behind: a caller that can keep its next events (the daemon:
        in its Kafka subscription, whose bounded queue pauses the topic) keeps memory bounded
        whatever their size, where :meth:`handle` takes one per ``max_block_s`` anyway. True
        once the writer is gone (events are dropped then)."""
        if self.congested and not self._gone:
            self._relieve(timeout_s)
        return self._gone or not self.congested

    def _relieve(self, timeout_s: float | None = None) -> None:
        """Back-pressure: wait (at most ``timeout_s``, default ``max_block_s``) for the
        writer to catch up."""
        self._ship()
        start = time.monotonic()
        deadline = start + (self.max_block_s if timeout_s is None else timeout_s)
        while self.congested and not self._gone:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stalled():
                break
            self._poll(remaining)
        self.blocked_seconds += time.monotonic() - start

    def _stalled(self) -> bool:
        """Kill a writer that has not answered for ``stall_timeout_s`` with work pending, and
        has not read or written anything for half of it either. A writer finalizing a large
        segment at a rotation answers only when it is done (minutes for hundreds of millions
        of values), but reads and writes all along: in a silence longer than a tenth of the
        timeout its I/O counters are looked at, and a change counts as an answer."""
        if not self._inflight:
            return False
        now = time.monotonic()
        if now - self._last_progress <= self.stall_timeout_s / 10:
            return False
        io = _io_bytes(self.pid)
        if io is not None:
            mark = self._io_mark
            if mark is None or mark[0] < self._last_progress:  # first look in this silence
                self._io_mark = (now, io)
                return False
            if io != mark[1]:  # busy, not hung
                self._io_mark = (now, io)
                self._last_progress = now
                return False
            if now - mark[0] < self.stall_timeout_s / 2:  # not idle long enough to tell
                return False
        if now - self._last_progress > self.stall_timeout_s:
            self._kill(f"did not answer for {self.stall_timeout_s:g} s")
            return True
        return False

    def _poll(self, timeout: float) -> None:
        """Apply every reply that is there, waiting up to ``timeout`` for the first one."""
        wait = timeout
        while not self._gone:
            try:
                if not self._rx.poll(max(0.0, wait)):
                    return
                frame = self._rx.recv_bytes()
            except (EOFError, OSError):
                self._died()
                return
            self._apply(frame)
            wait = 0.0

    def _wait_for(self, seq: int, timeout: float, what: str, *, while_busy: bool = False
                  ) -> None:
        """Wait for the reply to ``seq``; kill the writer after ``timeout``, or with
        ``while_busy`` (finalizing) only after ``timeout`` without any I/O."""
        deadline = time.monotonic() + timeout
        io = _io_bytes(self.pid) if while_busy else None
        while not self._gone and self._acked < seq:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                now_io = _io_bytes(self.pid) if io is not None else None
                if now_io is not None and now_io != io:  # still reading and writing
                    io = now_io
                    deadline += timeout
                    self._log.info("writer process still busy; waiting", work=what,
                                   timeout_s=timeout)
                    continue
                self._kill(f"did not complete {what} within {timeout:g} s")
                return
            self._poll(min(remaining, 1.0))

    def _apply(self, frame: bytes) -> None:
        seq, state = _unpack(frame)
        self._last_progress = time.monotonic()
        self._acked = max(self._acked, seq)
        for done in [s for s in self._inflight if s <= seq]:
            self._inflight_bytes -= self._inflight.pop(done)[0]
        if self._flush_pending is not None and self._flush_pending <= seq:
            self._flush_pending = None
        self.current_path = None if state["current_path"] is None else Path(state["current_path"])
        self.paths.replace_from(state["paths_from"], map(Path, state["paths"]))  # the new ones
        self._durable = {(t, p): o for t, p, o in state["durable"]}
        self._child_counters = dict(state["counters"])
        counters = dict(self._child_counters)
        counters["dropped_events"] = counters.get("dropped_events", 0) + self._dropped_here
        counters["unserializable_values"] = self._encoder.unserializable
        self.counters = counters
        self.last_flush_seconds = float(state["last_flush_seconds"])
        self.flush_seconds.extend(float(s) for s in state["flush_seconds"])
        if self.status == "recording" and state["status"] != "recording":
            if state["status"] == "failed":
                self._fail(state["reason"])
            else:
                self.status, self.reason = state["status"], state["reason"]

    def _fail(self, reason: str) -> None:
        if self.status == "failed":
            return
        self.status = "failed"
        self.reason = reason
        if self._batch:  # never sent: the writer will not see them
            self._drop(len(self._batch))
        self._batch, self._batch_size = [], 0
        self._log.error("recording failed", reason=reason, path=str(self.current_path))

    def _gave_up(self, what: str) -> None:
        """The child is gone: forget what it did not acknowledge, fail the recording."""
        self._gone = True
        lost = sum(n for _size, n in self._inflight.values())
        if lost:  # sent, never acknowledged: died with the writer
            self._drop(lost)
        self._inflight.clear()
        self._inflight_bytes = 0
        self._flush_pending = None
        if self.status == "recording":
            self._fail(f"writer process (pid {self.pid}) {what}{self._never_ready()}"
                       f"{self._left_behind()}")
        else:  # already failed (e.g. disk full) or closed: keep that reason
            self._log.warning("writer process gone", problem=what, status=self.status)

    def _never_ready(self) -> str:
        """For the reason of a writer gone before its first reply: it never started, and its
        own error (an import error, say) went to its stderr, not through the pipe."""
        if self._acked >= 0:
            return ""
        return (" before it was ready (its error is in the daemon's log: its stderr or the "
                "journal); if k2eg-recorder was upgraded since the daemon started, restart "
                "the daemon")

    def _left_behind(self) -> str:
        """What a writer that is gone left, for the reason: the file it was writing, as it
        last said. It may have finalized that one at a rotation and not said so yet: the file
        is then one of the recording's (``paths``), and what it wrote after it is in the next
        segment's ``.partial``, if it got to open one."""
        partial = self.current_path
        if partial is None:
            return ""
        final = final_path(partial)
        if final != partial and not partial.exists() and final.exists():
            if final not in self.paths:
                self.paths.append(final)
            self.current_path = None  # which one it was writing then: not known
            return (f"; it had finalized {final}; a later segment it began is left as "
                    f"{PARTIAL_SUFFIX} in {partial.parent} ({_LEFT_FOR})")
        return f"; data up to the last flush is in {partial} ({_LEFT_FOR})"

    def _died(self) -> None:
        self._proc.join(5)
        code = self._proc.exitcode
        if code is None:  # closed its pipe but does not exit (dumping core?): do not leave it
            self._proc.kill()
            self._proc.join(5)
            self._gave_up("closed its pipe and did not exit within 5 s; killed with SIGKILL")
            return
        self._gave_up(_describe_exit(code))

    def _kill(self, what: str) -> None:
        self._log.error("writer process unresponsive; killing it", problem=what)
        if self._proc.exitcode is None:
            self._proc.kill()
            self._proc.join(5)
        self._gave_up(f"{what}; killed with SIGKILL")


def _io_bytes(pid: int | None) -> int | None:
    """Bytes process ``pid`` has read and written so far (Linux ``/proc/PID/io``: ``rchar``
    plus ``wchar``), or None where that cannot be read."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/io", encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    total = 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("rchar", "wchar"):
            total += int(value)
    return total


def open_recording(options: OutputOptions, **kwargs: Any) -> IsolatedRecording | HDF5Recording:
    """The recording the daemon should use: a writer process per recording when
    ``options.isolate`` (the default), else an in-process ``HDF5Recording``. ``kwargs`` are
    ``HDF5Recording``'s (``run_name``, ``snapshot``, ``seq``, ...)."""
    if options.isolate:
        return IsolatedRecording(options, **kwargs)
    from recorder.sinks.hdf5 import HDF5Recording

    return HDF5Recording(options, **kwargs)
