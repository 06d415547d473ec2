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
    child ignores SIGINT/SIGTERM (the daemon closes recordings
    in order on shutdown; the unit's ``KillMode=mixed`` signals the main process only) and
    SIGXFSZ (a file-size limit becomes a clean EFBIG failure). When the parent goes away
    without ``close`` (crash, proxy garbage-collected) the child sees EOF, flushes what it
    received and exits *without* finalizing: the ``.partial`` is left for
    ``k2eg-recorder recover`` exactly as after kill -9 of an in-process writer.

Serialization (no pickling of events)
    ``handle`` encodes each event at once into a msgpack list: the dataclass fields in order,
    enums as their value. The samples of a ``ValuesReceived`` travel as
    ``[pvs, blob, offsets, f32]``: the PV names, *one* blob (the concatenated message bytes
    the lazily-built samples were received as: one ``b"".join``, no per-sample slicing), the
    (start, end) position of each sample's PV map in it (int64 arrays) and ``f32`` (``None``,
    or ``{index: sorted float32 paths}`` for hand-built samples, whose ``data`` is packed
    with ``msgpack.packb`` into the blob). The child rebuilds
    ``PVSample.from_raw(pv, blob[start:end], 0)``: one small copy per sample, decoded lazily (so
    decoding moves off the daemon; float32 paths of received samples are read from the same
    bytes). Floats travel as float64 and are re-typed from float32_paths: values are
    bit-exact. A sample whose ``data`` msgpack cannot represent (only possible for hand-built
    samples) is dropped, logged and counted in ``counters["unserializable_values"]``.
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
    requests between events. A daemon that prefers to pause explicitly can watch
    ``congested``. ``maybe_flush`` never waits: it ships the batch, asks for an asynchronous
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
    * The child stops answering: no reply for ``stall_timeout_s`` while work is outstanding,
      or ``flush``/``close`` exceeding their timeout: the child is killed (SIGKILL) and the
      recording failed with a reason saying so.
    * A bug in the child (an unexpected exception): recording failed, reason has the
      exception, the partial is kept (not finalized: its state is unknown).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import enum
import json
import logging
import multiprocessing
import multiprocessing.util  # registers its atexit hook before ours (ours must run first)
import os
import queue
import signal
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import repeat
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn

import msgpack
import numpy as np
import structlog

from recorder.client.events import (
    IncompleteReason,
    IterationClosed,
    IterationEvent,
    IterationOpened,
    IterationStatus,
    ValuesReceived,
)
from recorder.client.properties import SnapshotProperties
from recorder.client.values import PVSample
from recorder.sinks.buffer import raw_messages
from recorder.sinks.options import OutputOptions, flush_due_after

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from recorder.sinks.hdf5 import HDF5Recording

__all__ = ["IsolatedRecording", "open_recording"]

log = structlog.get_logger("recorder.sinks.process")

# Proxies not closed by the program are torn down at exit *before* multiprocessing's own hook
# (atexit is LIFO and multiprocessing.util is imported above), which would otherwise join a
# writer that waits for EOF on a pipe we still hold.
_LIVE: weakref.WeakSet[IsolatedRecording] = weakref.WeakSet()


@atexit.register
def _reap_all() -> None:
    for rec in list(_LIVE):
        rec._teardown()
    _release_warm()

START_METHOD: Final = "spawn"  # never "fork": the daemon has librdkafka threads
DEFAULT_BATCH_BYTES = 256 * 1024

# parent -> child message kinds
_EVENTS, _FLUSH, _CLOSE = 0, 1, 2
# event tags (_TAGS: trigger tags, [_TAGS, iter_index, {key: value}], in order with events)
_OPENED, _VALUES, _CLOSED, _TAGS = 0, 1, 2, 3
_EVENT_TYPES: tuple[type[Any], ...] = (IterationOpened, ValuesReceived, IterationClosed)
_FIELDS: tuple[tuple[str, ...], ...] = tuple(
    tuple(f.name for f in dataclasses.fields(cls)) for cls in _EVENT_TYPES
)
_ENUM_FIELDS: dict[str, type[enum.Enum]] = {
    "status": IterationStatus,
    "reason": IncompleteReason,
}
_SAMPLE_OVERHEAD = 24  # bytes per sample beyond payload + name (msgpack framing)


# --------------------------------------------------------------------------------------------
# encoding (parent) / decoding (child)
# --------------------------------------------------------------------------------------------
def _pack_default(obj: Any) -> Any:
    """msgpack fallback for hand-built sample data (the client only produces msgpack types)."""
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    tolist = getattr(obj, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        return tolist()
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def _new_packer() -> msgpack.Packer:
    return msgpack.Packer(
        default=_pack_default, use_bin_type=True, unicode_errors="surrogateescape"
    )


def _unpack(frame: bytes) -> Any:
    return msgpack.unpackb(
        frame, raw=False, strict_map_key=False, unicode_errors="surrogateescape"
    )


class _Encoder:
    """Events -> compact msgpack-ready lists (see the module docstring)."""

    def __init__(self) -> None:
        self._packer = _new_packer()
        self.unserializable = 0

    def samples(self, samples: Sequence[PVSample]) -> tuple[list[Any], int]:
        """``[pvs, blob, offsets, f32]``: the PV names, one blob holding every sample's bytes,
        their (start, end) positions in it (int64 little-endian: every start, then every end)
        and ``{index: float32 paths}`` for samples whose bytes were packed here (``None``
        when there are none)."""
        try:
            # lazily-built samples (all the client produces): their message bytes as received
            samples, msgs = raw_messages(samples)
            if msgs.count(None):
                return self._samples_mixed(samples)
            starts = [s._start for s in samples]
            ends = [s._end for s in samples]
            pvs = [s.pv for s in samples]
        except AttributeError:  # not a PVSample (duck-typed)
            return self._samples_mixed(samples)
        return self._packed(pvs, msgs, starts, ends, None)  # type: ignore[arg-type] # no None

    def _samples_mixed(self, samples: Iterable[PVSample]) -> tuple[list[Any], int]:
        pvs: list[str] = []
        msgs: list[bytes] = []
        starts: list[int] = []
        ends: list[int | None] = []
        f32s: dict[int, list[str]] = {}
        pack = self._packer.pack
        for s in samples:
            msg = getattr(s, "_msg", None)
            if msg is not None:
                pvs.append(s.pv)
                msgs.append(msg)
                starts.append(s._start)
                ends.append(s._end)
                continue
            try:
                payload = pack(s.data)
            except (TypeError, ValueError, OverflowError) as exc:
                self._packer.reset()
                self.unserializable += 1
                log.error("PV sample cannot be sent to the writer process; dropped",
                          pv=s.pv, error=str(exc))
                continue
            f32s[len(pvs)] = sorted(s.float32_paths)
            pvs.append(s.pv)
            msgs.append(payload)
            starts.append(0)
            ends.append(None)
        return self._packed(pvs, msgs, starts, ends, f32s or None)

    @staticmethod
    def _packed(pvs: list[str], msgs: list[bytes], starts: list[int],
                ends: list[int | None], f32s: dict[int, list[str]] | None,
                ) -> tuple[list[Any], int]:
        n = len(msgs)
        lens = np.fromiter(map(len, msgs), dtype=np.int64, count=n)
        base = np.zeros(n, dtype=np.int64)
        if n > 1:
            np.cumsum(lens[:-1], out=base[1:])
        offsets = np.empty(2 * n, dtype="<i8")
        np.add(base, np.fromiter(starts, dtype=np.int64, count=n), out=offsets[:n])
        if ends.count(None) == n:
            np.add(base, lens, out=offsets[n:])
        else:
            np.add(base, np.fromiter((len(m) if e is None else e for m, e in
                                      zip(msgs, ends, strict=True)), dtype=np.int64, count=n),
                   out=offsets[n:])
        blob = b"".join(msgs)
        size = len(blob) + 16 * n + sum(map(len, pvs)) + _SAMPLE_OVERHEAD
        if f32s:
            size += 16 * len(f32s)
        return [pvs, blob, offsets.tobytes(), f32s], size

    def event(self, event: IterationEvent) -> tuple[list[Any], int]:
        if isinstance(event, ValuesReceived):
            tag, size = _VALUES, 64
        elif isinstance(event, IterationOpened):
            tag, size = _OPENED, 64
        elif isinstance(event, IterationClosed):
            tag, size = _CLOSED, 96 + len(event.error_message)
        else:
            raise TypeError(f"not an iteration event: {type(event).__name__}")
        row: list[Any] = [tag]
        for name in _FIELDS[tag]:
            value = getattr(event, name)
            if name == "samples":
                value, n = self.samples(value)
                size += n
            elif isinstance(value, enum.Enum):
                value = value.value
            row.append(value)
        return row, size


_from_raw: Final = PVSample.from_raw


def _rebuild_samples(packed: list[Any]) -> tuple[PVSample, ...]:
    """The samples of an encoded ``ValuesReceived``: each gets its own payload bytes (one
    small copy; nothing is decoded here). Not views into the shared blob: the sink accounts
    and joins samples by their message, and a message shared by every sample of the batch
    made that quadratic (measured: 11k instead of 260k values/s at 1,000 PVs)."""
    pvs, blob, offsets, f32s = packed
    n = len(pvs)
    if not n:
        return ()
    pos = np.frombuffer(offsets, dtype="<i8")
    pieces = list(map(blob.__getitem__, map(slice, pos[:n].tolist(), pos[n:].tolist())))
    samples = tuple(map(_from_raw, pvs, pieces, repeat(0, n)))
    if f32s:
        for i, paths in f32s.items():
            samples[int(i)].float32_paths = frozenset(paths)
    return samples


def _decode_event(row: list[Any]) -> IterationEvent:
    tag = row[0]
    kwargs = dict(zip(_FIELDS[tag], row[1:], strict=True))
    if tag == _VALUES:
        kwargs["samples"] = _rebuild_samples(kwargs["samples"])
    else:
        for name, cls in _ENUM_FIELDS.items():
            if name in kwargs and kwargs[name] is not None:
                kwargs[name] = cls(kwargs[name])
    event: IterationEvent = _EVENT_TYPES[tag](**kwargs)
    return event


def _snapshot_dict(snapshot: SnapshotProperties) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(snapshot):
        value = getattr(snapshot, f.name)
        if isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


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


def _log_config() -> dict[str, Any]:
    """How the parent's logging is configured, so the child logs the same way."""
    root = logging.getLogger()
    fmt: str | None = None
    path: str | None = None
    for handler in root.handlers:
        formatter = handler.formatter
        if isinstance(formatter, structlog.stdlib.ProcessorFormatter):
            for proc in formatter.processors:
                if isinstance(proc, structlog.processors.JSONRenderer):
                    fmt = "json"
                elif isinstance(proc, structlog.dev.ConsoleRenderer):
                    fmt = "console"
            # a log file (``demo`` writes the daemon's log to one): the child appends to it;
            # otherwise it writes to the stdout it inherited (the journal under systemd)
            stream = getattr(handler, "stream", None)
            name = getattr(stream, "name", None)
            if fmt is not None and isinstance(name, str) and os.path.isfile(name):
                path = os.path.abspath(name)
    return {"format": fmt, "level": root.getEffectiveLevel(), "path": path}


# --------------------------------------------------------------------------------------------
# the child
# --------------------------------------------------------------------------------------------
def _state(rec: HDF5Recording, broken: str | None) -> dict[str, Any]:
    failed = broken is not None and rec.status == "recording"
    return {
        "status": "failed" if failed else rec.status,
        "reason": broken if failed and broken else rec.reason,
        "current_path": None if rec.current_path is None else str(rec.current_path),
        "paths": [str(p) for p in rec.paths],
        "durable": [[t, p, o] for (t, p), o in rec.last_durable_offset.items()],
        "counters": dict(rec.counters),
        "last_flush_seconds": rec.last_flush_seconds,
    }


def _child_main(rx: Connection, tx: Connection, init_blob: bytes | None) -> None:
    """Entry point of the writer process (spawned; see the module docstring). A *warm*
    writer (``init_blob`` None, see :func:`prewarm_writer`) imports what it needs, then waits
    for its init as the first frame; EOF instead means it was not needed."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_IGN)
    if init_blob is None:
        import recorder.gctune
        import recorder.logging
        import recorder.sinks.hdf5  # noqa: F401 (the imports are the point)

        try:
            init_blob = rx.recv_bytes()
        except (EOFError, OSError):
            _exit(0)
    init = _unpack(init_blob)
    logcfg = init["log"]
    if logcfg["format"] is not None:
        from recorder.logging import configure_logging

        stream = None
        if logcfg.get("path"):
            with contextlib.suppress(OSError):
                stream = open(logcfg["path"], "a", encoding="utf-8")  # noqa: SIM115
        configure_logging(logcfg["format"], logcfg["level"], stream=stream)
    else:
        structlog.configure(
            wrapper_class=structlog.make_filtering_bound_logger(logcfg["level"])
        )
    from recorder.gctune import tune_gc
    from recorder.sinks.hdf5 import HDF5Recording

    _quiet_unraisable()
    tune_gc()  # the writer allocates per value like the daemon does; see recorder.gctune
    clock_offset = float(init["clock_offset"])
    wall_offset = float(init["wall_offset"])
    snap = init["snapshot"]
    rec = HDF5Recording(
        OutputOptions.model_validate_json(init["options"]),
        run_name=init["run_name"],
        snapshot=None if snap is None else SnapshotProperties(**snap),
        run_definition_text=init["run_definition_text"],
        metadata=init["metadata"],
        pv_uris=init["pv_uris"],
        seq=init["seq"],
        recording_uid=init["uid"],
        first_segment=init["first_segment"],
        start_wall=init["start_wall"],
        clock=lambda: time.monotonic() + clock_offset,
        wall_clock=lambda: time.time() + wall_offset,
    )
    clog = log.bind(run=init["run_name"], seq=init["seq"], writer_pid=os.getpid())
    broken: str | None = None

    def parent_gone() -> None:
        # the parent went away without close(): keep what we have, leave the .partial
        clog.warning("parent gone; flushing and leaving the file for recover",
                     path=str(rec.current_path))
        if broken is None:
            rec.flush()
        _exit(0)

    def reply(seq: int) -> None:
        try:
            tx.send_bytes(msgpack.packb([seq, _state(rec, broken)], use_bin_type=True))
        except OSError:
            parent_gone()

    reply(0)
    while True:
        try:
            frame = rx.recv_bytes()
        except (EOFError, OSError):
            parent_gone()
        msg = _unpack(frame)
        kind, seq = msg[0], msg[1]
        try:
            if kind == _EVENTS:
                if broken is None:
                    for row in msg[2]:
                        if row[0] == _TAGS:
                            rec.tag_iteration(row[1], row[2])
                        else:
                            rec.handle(_decode_event(row))
            elif kind == _FLUSH:
                if broken is None:
                    rec.flush()
            elif kind == _CLOSE:
                if broken is None:
                    rec.close(msg[2], msg[3])
                reply(seq)
                _exit(0)
        except Exception as exc:  # a bug, not I/O (HDF5Recording handles I/O): stop writing
            broken = f"writer process error: {type(exc).__name__}: {exc}"
            clog.exception("writer process error; recording failed, file left as is",
                           path=str(rec.current_path))
        reply(seq)


def _quiet_unraisable(keep: int = 3) -> None:
    """After a write failure h5py reports one "Can't decrement id ref count" per dropped
    HDF5 object (from ``__dealloc__``): log the first ``keep``, then only count them."""
    seen = 0

    def hook(info: Any) -> None:
        nonlocal seen
        seen += 1
        if seen <= keep:
            log.warning("ignored exception in a destructor", error=repr(info.exc_value),
                        object=repr(info.object)[:200], count=seen,
                        more="suppressed" if seen == keep else None)

    sys.unraisablehook = hook


def _exit(code: int) -> NoReturn:
    """Leave without interpreter teardown: a failed recording's parked HDF5 handle must never
    be closed (see HDF5Recording._fail), and everything else is already closed or flushed."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


# --------------------------------------------------------------------------------------------
# the parent-side proxy
# --------------------------------------------------------------------------------------------
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

    def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        self.out.put(None)
        self.sender.join(self.grace_s)
        self.proc.join(self.grace_s)
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
    try:
        proc.start()
    except BaseException:
        to_child_w.close()
        from_child_r.close()
        raise
    finally:
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
    :class:`IsolatedRecording` finds its interpreter started and h5py imported instead of
    waiting for that (0.5-1 s): call it before slow work that precedes creating recordings
    (the daemon does at start-up for the runs it starts, and before each subscription). An
    unused warm writer costs an idle process; it exits at EOF (:func:`release_warm_writers`,
    interpreter exit). Never raises: a writer that cannot be started now is started by the
    recording as usual."""
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
        self.paths: list[Path] = []
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
        self._closed = False
        self._gone = False  # the child is dead or was killed: nothing more to read
        self.pid: int | None = None
        self._reaper: _Reaper | None = None
        self._log = log.bind(
            run=run_name, snapshot=snapshot.snapshot_name if snapshot else None, seq=seq
        )

        init = {
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
        name = f"k2eg-writer-{run_name}-{seq}"
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
            name=f"k2eg-writer-send-{run_name}-{seq}", daemon=True,
        )
        self._sender.start()
        self.pid = self._proc.pid
        self._log = self._log.bind(writer_pid=self.pid)
        self._reaper = _Reaper(self._proc, self._out, self._rx, self._sender, 10.0)
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
            return self.paths
        self._closed = True
        if not self._gone:
            self._ship()
            seq = self._send([_CLOSE, self._take_seq(), status, reason])
            self._wait_for(seq, self.close_timeout_s, "close (finalizing the files)")
        self._teardown()
        self._log.info("recording closed", status=self.status, reason=self.reason,
                       files=len(self.paths))
        return self.paths

    def __enter__(self) -> IsolatedRecording:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.status == "recording":
            self.close("aborted" if exc[0] is not None else "complete")
        elif not self._closed:
            self.close()

    # --- internals ----------------------------------------------------------------------------
    def _teardown(self) -> None:
        self._gone = True
        if self._reaper is not None:
            self._reaper()
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

    def _relieve(self) -> None:
        """Back-pressure: wait (at most ``max_block_s``) for the writer to catch up."""
        self._ship()
        start = time.monotonic()
        deadline = start + self.max_block_s
        while self.congested and not self._gone:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stalled():
                break
            self._poll(remaining)
        self.blocked_seconds += time.monotonic() - start

    def _stalled(self) -> bool:
        """Kill a writer that has not answered for ``stall_timeout_s`` with work pending."""
        if self._inflight and time.monotonic() - self._last_progress > self.stall_timeout_s:
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

    def _wait_for(self, seq: int, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not self._gone and self._acked < seq:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
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
        self.paths = [Path(p) for p in state["paths"]]
        self._durable = {(t, p): o for t, p, o in state["durable"]}
        self._child_counters = dict(state["counters"])
        counters = dict(self._child_counters)
        counters["dropped_events"] = counters.get("dropped_events", 0) + self._dropped_here
        counters["unserializable_values"] = self._encoder.unserializable
        self.counters = counters
        self.last_flush_seconds = float(state["last_flush_seconds"])
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
            where = (
                f"; data up to the last flush is in {self.current_path} "
                "(finalize it with `k2eg-recorder recover`)"
                if self.current_path is not None else ""
            )
            self._fail(f"writer process (pid {self.pid}) {what}{where}")
        else:  # already failed (e.g. disk full) or closed: keep that reason
            self._log.warning("writer process gone", problem=what, status=self.status)

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


def open_recording(options: OutputOptions, **kwargs: Any) -> IsolatedRecording | HDF5Recording:
    """The recording the daemon should use: a writer process per recording when
    ``options.isolate`` (the default), else an in-process ``HDF5Recording``. ``kwargs`` are
    ``HDF5Recording``'s (``run_name``, ``snapshot``, ``seq``, ...)."""
    if options.isolate:
        return IsolatedRecording(options, **kwargs)
    from recorder.sinks.hdf5 import HDF5Recording

    return HDF5Recording(options, **kwargs)
