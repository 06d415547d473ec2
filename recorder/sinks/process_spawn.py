"""Writer processes seen from the parent: :func:`_spawn_writer` starts one (``spawn`` context,
pipes widened by :func:`_widen_pipe`), :func:`prewarm_writer` keeps a few started ahead of
time for the next recordings (:func:`_take_warm`, :func:`release_warm_writers`), the
:func:`_sender` thread writes the frames so the caller never blocks on a full pipe,
:class:`_Reaper` stops and reaps one, :func:`_reap_all` every one at interpreter exit, and
:func:`_describe_exit` says how one ended. Imports neither h5py nor the HDF5 sink.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import multiprocessing
import multiprocessing.util  # registers its atexit hook before ours (ours must run first)
import os
import queue
import signal
import threading
import time
import weakref
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Final

import structlog

from recorder.sinks.process_child import STARTUP_BLOCKED, _child_main

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from recorder.sinks.process import IsolatedRecording

log = structlog.get_logger("recorder.sinks.process")

# Proxies not closed by the program are torn down at exit *before* multiprocessing's own hook
# (atexit is LIFO and multiprocessing.util is imported above), which would otherwise join a
# writer that waits for EOF on a pipe we still hold.
_LIVE: weakref.WeakSet[IsolatedRecording] = weakref.WeakSet()


REAP_GRACE_S = 10.0  # a writer that got EOF has this long to exit before SIGKILL


@atexit.register
def _reap_all() -> None:
    """Every writer gets EOF first, then they share one grace period: one by one, each busy
    writer (finalizing when the shutdown budget ran out) waited out a grace of its own."""
    live = list(_LIVE)
    for rec in live:
        if rec._reaper is not None:
            rec._reaper.eof()
    deadline = time.monotonic() + REAP_GRACE_S
    for rec in live:
        rec._teardown(deadline)
    _release_warm()


START_METHOD: Final = "spawn"  # never "fork": the daemon has librdkafka threads


def _sender(out: queue.SimpleQueue[bytes | None], tx: Connection,
            broken: threading.Event) -> None:
    """Writes frames to the child; the only user of ``tx``. Closes it at the end (EOF)."""
    try:
        while True:
            frame = out.get()
            if frame is None:
                break
            if broken.is_set():
                continue
            try:
                tx.send_bytes(frame)
            except (OSError, ValueError):
                broken.set()  # the child is gone; the reader side reports how
    finally:
        tx.close()


class _Reaper:
    """Stop the sender (EOF to the child), reap the child (kill after ``grace_s``). Holds no
    reference to the proxy, so it can run from a weakref finalizer; idempotent."""

    def __init__(self, proc: BaseProcess, out: queue.SimpleQueue[bytes | None],
                 rx: Connection, sender: threading.Thread, grace_s: float) -> None:
        self.proc, self.out, self.rx, self.sender, self.grace_s = proc, out, rx, sender, grace_s
        self.done = False
        self.eof_sent = False

    def eof(self) -> None:
        """Have the sender close the pipe (EOF to the child) after the frames queued."""
        if not self.eof_sent:
            self.eof_sent = True
            self.out.put(None)

    def __call__(self, deadline: float | None = None) -> None:
        """EOF, then reap the child, killed if still running at ``deadline`` (default:
        ``grace_s`` from now)."""
        if self.done:
            return
        self.done = True
        self.eof()
        if deadline is None:
            deadline = time.monotonic() + self.grace_s
        self.sender.join(max(0.0, deadline - time.monotonic()))
        self.proc.join(max(0.0, deadline - time.monotonic()))
        if self.proc.exitcode is None:
            self.proc.kill()
            self.proc.join(5)
        self.rx.close()


@dataclasses.dataclass(slots=True)
class _WarmWriter:
    """A started writer process that waits for its init (the first frame on ``tx``)."""

    proc: BaseProcess
    tx: Connection  # parent -> child
    rx: Connection  # child -> parent


_WARM: list[_WarmWriter] = []
_WARM_LOCK = threading.Lock()
MAX_WARM: Final = 4  # writers started ahead of time at most (each an idle interpreter)


MAX_STARTING: Final = max(2, os.cpu_count() or 2)
"""Writer processes starting at once, at most (an interpreter, numpy and h5py to load: ~0.4 s
of CPU each). A recording waits for a place (:data:`STARTING`) before its writer's start-up,
and its ``start_timeout_s`` counts from then: 200 runs starting together (a daemon start, a
reload) each had their writer start at once, sharing the CPU, and on 2 cores none was ready
within the 60 s timeout, so every one of them was killed and its run failed."""
STARTING = threading.BoundedSemaphore(MAX_STARTING)


_F_SETPIPE_SZ: Final = 1031  # fcntl.F_SETPIPE_SZ (Linux; in the fcntl module from 3.10)
PIPE_BYTES = 1 << 20  # the pipe to a writer (benchmarks/bench_isolation.py --pipe-bytes)


def _widen_pipe(conn: Connection) -> None:
    """Give the pipe to the writer :data:`PIPE_BYTES` (1 MiB, Linux's default
    ``pipe-max-size`` for unprivileged processes) instead of the default 64 KiB: a batch of
    events (``DEFAULT_BATCH_BYTES``) then crosses in one write instead of four, each waiting
    for the child to read (measured with waveforms: the child spent more time in ``recv``
    than writing; 1.4x the durable rate). Best effort: the default pipe works, slower."""
    import fcntl

    with contextlib.suppress(OSError, ValueError):
        fcntl.fcntl(conn.fileno(), getattr(fcntl, "F_SETPIPE_SZ", _F_SETPIPE_SZ), PIPE_BYTES)


def _spawn_writer(init_blob: bytes | None, name: str) -> _WarmWriter:
    ctx = multiprocessing.get_context(START_METHOD)
    to_child_r, to_child_w = ctx.Pipe(duplex=False)
    _widen_pipe(to_child_w)
    from_child_r, from_child_w = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_child_main,
        args=(to_child_r, from_child_w, init_blob),
        name=name,
        daemon=False,  # reaped by our own finalizer (closes the pipe first, then joins)
    )
    # the child starts with the signals it handles blocked (the mask survives exec) and
    # unblocks them once it has its handlers: until then their default action (exit) would end
    # a writer still starting on `systemctl kill -s USR1` or a terminal's Ctrl-C
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STARTUP_BLOCKED)
    try:
        proc.start()
    except BaseException:
        to_child_w.close()
        from_child_r.close()
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        to_child_r.close()  # the child's ends: only the child may hold them (EOF detection)
        from_child_w.close()
    return _WarmWriter(proc, to_child_w, from_child_r)


def _close_writer(w: _WarmWriter, grace_s: float = 5.0) -> None:
    w.tx.close()  # EOF: a warm writer exits
    w.proc.join(grace_s)
    if w.proc.exitcode is None:
        w.proc.kill()
        w.proc.join(5)
    w.rx.close()


def prewarm_writer(count: int = 1) -> None:
    """Have ``count`` writer processes waiting (at most :data:`MAX_WARM`), so that the next
    :class:`~recorder.sinks.process.IsolatedRecording` finds its interpreter started and h5py
    imported instead of waiting for that (0.5-1 s): call it before slow work that precedes
    creating recordings (the daemon does at start-up for the runs it starts, and before each
    subscription). An unused warm writer costs an idle process; it exits at EOF
    (:func:`release_warm_writers`, interpreter exit). Never raises: a writer that cannot be
    started now is started by the recording as usual."""
    with _WARM_LOCK:
        for w in list(_WARM):
            if not w.proc.is_alive():
                _WARM.remove(w)
                _close_writer(w, 0.0)
        while len(_WARM) < min(count, MAX_WARM):
            try:
                _WARM.append(_spawn_writer(None, "k2eg-writer-warm"))
            except OSError as exc:
                log.warning("cannot start a writer process ahead of time", error=str(exc))
                return


def _take_warm() -> _WarmWriter | None:
    with _WARM_LOCK:
        while _WARM:
            w = _WARM.pop()
            if w.proc.is_alive():
                return w
            _close_writer(w, 0.0)
    return None


def _release_warm() -> None:
    with _WARM_LOCK:
        warm, _WARM[:] = list(_WARM), []
    for w in warm:
        _close_writer(w)


def release_warm_writers() -> None:
    """End the writer processes :func:`prewarm_writer` started and no recording took."""
    _release_warm()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (signal {-code})"
    return f"exited with code {code}"
