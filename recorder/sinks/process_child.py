"""The writer process: :func:`_child_main`, the entry point that
:mod:`recorder.sinks.process_spawn` starts (``spawn``: the child imports this module, so it
stays as light as the parent's side; h5py and the HDF5 sink are imported inside the function),
runs a plain ``HDF5Recording`` and answers every frame with :func:`_state`. It ignores
SIGINT/SIGTERM/SIGHUP and SIGXFSZ, logs the way the parent does (:func:`_log_config`, taken in the
parent) and leaves with :func:`_exit` (no interpreter teardown). The process model is in
:mod:`recorder.sinks.process`.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import sys
import time
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, NoReturn

import msgpack
import structlog

from recorder.client.properties import SnapshotProperties
from recorder.sinks.options import OutputOptions
from recorder.sinks.process_codec import (
    _CLOSE,
    _EVENTS,
    _FLUSH,
    _TAGS,
    _decode_event,
    _unpack,
    protocol,
)

if TYPE_CHECKING:
    from recorder.sinks.hdf5 import HDF5Recording

log = structlog.get_logger("recorder.sinks.process")

# blocked while a writer starts (see process_spawn._spawn_writer), until _child_main has set
# what they do here
STARTUP_BLOCKED: frozenset[signal.Signals] = frozenset(
    {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1})


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


def _state(rec: HDF5Recording, broken: str | None, paths_from: int,
           flushes_from: int = 0) -> dict[str, Any]:
    """The recording's state for the parent; of its finalized files only those from position
    ``paths_from`` on (the parent has the ones before: a recording of 60 s segments has
    1,440 a day, and every reply carried them all; ``rec.paths`` holds them from there, see
    :func:`_child_main`), and the durations of its flushes after the first ``flushes_from``."""
    failed = broken is not None and rec.status == "recording"
    new_flushes = rec.counters["flushes"] - flushes_from
    return {
        "status": "failed" if failed else rec.status,
        "reason": broken if failed and broken else rec.reason,
        "current_path": None if rec.current_path is None else str(rec.current_path),
        "paths_from": max(paths_from, rec.paths.first),  # (where the ones it sends begin)
        "paths": [str(p) for p in rec.paths.since(paths_from)],
        "durable": [[t, p, o] for (t, p), o in rec.last_durable_offset.items()],
        "counters": dict(rec.counters),
        "last_flush_seconds": rec.last_flush_seconds,
        "flush_seconds": list(rec.flush_seconds)[-new_flushes:] if new_flushes > 0 else [],
    }


def _refusal(init: Any, theirs: Any) -> dict[str, Any]:
    """The reply of a writer that does not speak the daemon's pipe protocol: a failed state
    naming both versions. Its shape is the one every daemon since protocol 1 reads: keep it."""
    import recorder

    theirs_version = init.get("version") if isinstance(init, dict) else None
    daemon = (f"k2eg-recorder {theirs_version}" if isinstance(theirs_version, str)
              else "an older k2eg-recorder")
    ours = protocol()[0]
    their_number = theirs[0] if isinstance(theirs, list) and theirs else "unnamed"
    detail = (f"the daemon's writer protocol {their_number}, this writer's {ours}"
              if their_number != ours else f"writer protocol {ours}, with other event fields")
    return {
        "status": "failed",
        "reason": (f"the writer process runs k2eg-recorder {recorder.__version__}, installed "
                   f"after this daemon ({daemon}) started, and does not speak its pipe "
                   f"protocol ({detail}); restart the daemon (systemctl restart "
                   "k2eg-recorder) to record with the upgraded package"),
        "current_path": None,
        "paths_from": 0,
        "paths": [],
        "durable": [],
        "counters": {},
        "last_flush_seconds": 0.0,
        "flush_seconds": [],
    }


def _child_main(rx: Connection, tx: Connection, init_blob: bytes | None) -> None:
    """Entry point of the writer process (spawned; see :mod:`recorder.sinks.process`). A
    *warm* writer (``init_blob`` None, see :func:`~recorder.sinks.process_spawn.prewarm_writer`)
    imports what it needs, then waits for its init as the first frame; EOF instead means it
    was not needed."""
    # SIGHUP (the daemon's reload) too: `systemctl kill -s HUP` and a terminal's hangup reach
    # every process, and its default action (exit) failed every recording
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_IGN)
    # as the daemon: SIGUSR1 writes this writer's stacks to stderr (not its default: exit)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STARTUP_BLOCKED)  # one that came meanwhile: now
    if init_blob is None:
        import recorder.gctune
        import recorder.logging
        import recorder.sinks.hdf5  # noqa: F401 (the imports are the point)

        try:
            init_blob = rx.recv_bytes()
        except (EOFError, OSError):
            _exit(0)
    init = _unpack(init_blob)
    theirs = init.get("protocol") if isinstance(init, dict) else None
    if theirs != protocol():
        # the package was upgraded (or downgraded) under the running daemon: nothing else in
        # the init or the frames to come can be trusted to mean what this code reads in them
        with contextlib.suppress(OSError):
            tx.send_bytes(msgpack.packb([0, _refusal(init, theirs)], use_bin_type=True))
        _exit(0)
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
    from recorder.gctune import MemoryUpkeep, tune_gc
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

    paths_sent = flushes_sent = 0
    rec.paths.hold(0)  # a frame can finalize thousands of tiny segments: the parent gets all
    upkeep = MemoryUpkeep()

    def reply(seq: int) -> None:
        nonlocal paths_sent, flushes_sent
        try:
            tx.send_bytes(msgpack.packb([seq, _state(rec, broken, paths_sent, flushes_sent)],
                                        use_bin_type=True))
        except OSError:
            parent_gone()
        paths_sent = rec.paths.total
        rec.paths.hold(paths_sent)
        flushes_sent = rec.counters["flushes"]

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
        upkeep.maybe_run(time.monotonic())


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
