"""HDF5Recording: one recording of a run (start to stop) written as HDF5 segment files.

The daemon's API::

    rec = HDF5Recording(options, run_name="linac", snapshot=props, run_definition_text=yaml,
                        metadata={"operator": "x"}, pv_uris=props.pv_uri_list, seq=3)
    rec.handle(event)          # every IterationOpened / ValuesReceived / IterationClosed
    rec.tag_iteration(42, {"shot": "7"})  # trigger tags of iteration 42 (before/while open)
    rec.maybe_flush(now)       # from the daemon's loop/timer; flushes every flush_interval_s
    rec.flush()                # force a flush (data durable on return)
    rec.close("complete")      # or "aborted"/"failed" with a reason; finalizes the files
    rec.status, rec.reason, rec.current_path, rec.paths, rec.last_durable_offset, rec.counters

``handle``/``flush``/``maybe_flush`` never raise for I/O problems: a full disk or an
unwritable directory marks the recording ``failed`` (``rec.reason``), keeps what is already
on disk (the ``.partial`` file stays recoverable) and drops later events; other recordings
are unaffected. Files being written are ``<name>.h5.partial`` (SWMR, log-structured layout);
``close`` rewrites each into ``<name>.h5`` (one NXlog group per PV, read-only).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import h5py
import structlog

from recorder import __version__
from recorder.client.events import IterationEvent, IterationOpened
from recorder.client.properties import PVUri, SnapshotProperties
from recorder.durability import make_directories, private_tmp_mount, sync_directory
from recorder.errors import SinkError
from recorder.newest import Newest
from recorder.sinks import writelock
from recorder.sinks.buffer import RecordingBuffer
from recorder.sinks.final_layout import FORMAT_VERSION
from recorder.sinks.finalize import finalize
from recorder.sinks.livefile import RECORDING_STATUS, LiveWriter, create_live_layout
from recorder.sinks.options import (
    FLUSHES_KEPT,
    OutputOptions,
    flush_due_after,
    partial_path,
    render_file_name,
    unique_path,
)

FORMAT_NAME = "k2eg-recorder"
# Chunk cache of each live dataset. The writer only appends, so only the last chunk of a
# dataset is ever touched again (the largest, a pool chunk, is 512 KiB). HDF5 2.0 (h5py 3.16)
# caches 8 MiB a dataset by default: the caches of the ~20 growing datasets filled up over the
# first tens of millions of values, ~70 MB more per writer at 2 M values and ~125 MB at 100 M
# (260 -> 309 MB against 158 -> 180 MB; benchmarks/bench_sink_memory.py).
LIVE_CHUNK_CACHE = 1024 * 1024

log = structlog.get_logger("recorder.sinks")
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
"""Why a new segment file cannot be created in an existing directory: said with what to do."""
_PARKED: list[h5py.File] = []  # files of failed recordings, never closed (see _fail)


class HDF5Recording:
    """See the module docstring."""

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
    ) -> None:
        self.options = options
        self.run_name = run_name
        self.snapshot = snapshot
        self.run_definition_text = run_definition_text
        self.metadata = dict(metadata or {})
        uris = list(pv_uris) or list(snapshot.pv_uri_list if snapshot else ())
        self.pv_uri_map: dict[str, str] = {}
        for uri in uris:
            try:
                self.pv_uri_map.setdefault(PVUri.parse(uri).name, uri)
            except ValueError:
                self.pv_uri_map.setdefault(uri, uri)
        self.seq = seq
        self.uid = recording_uid or str(uuid.uuid4())
        self.clock = clock
        self.wall_clock = wall_clock
        # a resumed recording keeps its start (file names, start_time) and segment numbering
        self.start_wall = wall_clock() if start_wall is None else start_wall
        self.status = "recording"
        self.reason = ""
        self.segment = first_segment - 1
        # finalized segment files: the newest (FILES_KEPT) and how many (paths.total)
        self.paths: Newest[Path] = Newest()
        self.current_path: Path | None = None  # the .partial file being written
        self.counters: dict[str, int] = {
            "events": 0,
            "values": 0,
            "iterations": 0,
            "flushes": 0,
            "segments": 0,
            "dropped_events": 0,
            "tags": 0,
            "snapshot_restarts": 0,
        }
        self.last_flush_seconds = 0.0
        self.flush_seconds: deque[float] = deque(maxlen=FLUSHES_KEPT)  # newest last
        self._final: Path | None = None
        self._file: h5py.File | None = None
        self._lock: writelock.WriterLock | None = None
        self._writer: LiveWriter | None = None
        self._buffer = RecordingBuffer(self.pv_uri_map)
        self._durable: dict[tuple[str, int], int] = {}
        self._last_flush = clock()
        self._events_at_flush = 0  # counters["events"] at the last flush (idle flushes)
        self._segment_start = clock()
        self._segment_iterations = 0
        self._log = log.bind(
            run=run_name, snapshot=snapshot.snapshot_name if snapshot else None, seq=seq
        )
        try:
            self._open_segment()
        except (OSError, ValueError, RuntimeError, SinkError) as exc:
            self._fail(exc)

    # --- public API ---------------------------------------------------------------------------
    @property
    def last_durable_offset(self) -> dict[tuple[str, int], int]:
        """(topic, partition) -> highest Kafka offset whose data is durably in a file."""
        return dict(self._durable)

    def handle(self, event: IterationEvent) -> None:
        if self.status != "recording":
            self.counters["dropped_events"] += 1
            return
        self.counters["events"] += 1
        if event.__class__ is IterationOpened:
            if self._buffer.repeats(event.iter_index):
                # iter_index began again (the snapshot was restarted): a file holds each
                # index once
                self.counters["snapshot_restarts"] += 1
                self._rotate("the snapshot was restarted (its iter_index began again); "
                             "continued in the next segment")
            elif self._segment_iterations and self._segment_due():
                # the next segment begins with the iteration that needs it, so a recording
                # stopped at a segment limit leaves no empty last file
                self._rotate("segment limit reached; continued in the next segment")
            if self.status != "recording":
                self.counters["dropped_events"] += 1
                return
        rows = self._buffer.handle(event)
        if rows:
            self.counters["iterations"] += len(rows)
            self._segment_iterations += len(rows)
            self._buffer.activate_oldest()
        if self._buffer_full():
            self.flush()

    def tag_iteration(self, iter_index: int, tags: Mapping[str, str]) -> None:
        """Store trigger ``tags`` with iteration ``iter_index``: before it opens or while it is
        open (also after it closed). They reach the file at the next flush, and end up in
        ``/iterations/tags`` of the file holding that iteration, or in the root attribute
        ``unmatched_tags`` of a file that does not hold it (see docs/file-format.md)."""
        if self.status != "recording":
            self.counters["dropped_events"] += 1
            return
        self.counters["tags"] += 1
        self._buffer.tag(iter_index, tags)
        if self._buffer_full():
            self.flush()

    def maybe_flush(self, now: float | None = None, *, idle: bool = False) -> bool:
        """Flush if ``flush_interval_s`` has passed, or, when ``idle`` (the caller's input is
        drained), :data:`IDLE_FLUSH_S` (see there)."""
        now = self.clock() if now is None else now
        if self.status != "recording":
            return False
        idle = idle and self.counters["events"] > self._events_at_flush  # only with new data
        if now - self._last_flush >= flush_due_after(self.options.flush_interval_s, idle):
            self.flush()
            return True
        return False

    def flush(self) -> None:
        if self.status != "recording" or self._writer is None:
            return
        start = time.perf_counter()
        flushes = self.counters["flushes"]
        try:
            batch = self._buffer.take()
            self._writer.write(batch, RECORDING_STATUS["recording"], self._now_ns())
            self.counters["values"] += len(batch.samples["pv"])
            self.counters["flushes"] += 1
            self._durable.update(batch.offsets)
        except (OSError, RuntimeError, ValueError, SinkError) as exc:
            self._fail(exc)
        self._last_flush = self.clock()
        self._events_at_flush = self.counters["events"]
        self.last_flush_seconds = time.perf_counter() - start
        if self.counters["flushes"] != flushes:
            self.flush_seconds.append(self.last_flush_seconds)

    def close(self, status: str = "complete", reason: str = "") -> list[Path]:
        """Stop: flush, mark open iterations incomplete, finalize the files. Returns the
        files finalized (the newest :data:`~recorder.newest.FILES_KEPT`: ``paths.total``
        counts them all)."""
        if status not in ("complete", "aborted", "failed"):
            raise ValueError(f"bad close status {status!r}")
        if self.status == "failed":
            self._close_file()
            return list(self.paths)
        if self.status != "recording":
            return list(self.paths)
        self._buffer.close_open("recording_stopped")
        self.flush()
        if self.status == "failed":
            self._close_file()
            return list(self.paths)
        self._finish_segment(status, reason)
        if self.status == "failed":  # finalization failed: the .partial stays for recover
            return list(self.paths)
        self.status = status
        self.reason = reason
        self._log.info("recording closed", status=status, reason=reason, files=self.paths.total)
        return list(self.paths)

    def _buffer_full(self) -> bool:
        """Flush early: the buffers hold ``max_buffer_bytes``, and a quarter of that at least
        can be written (samples of iterations waiting behind an older one still open cannot:
        past the limit they would have every event flush, nothing each time)."""
        buf, limit = self._buffer, self.options.max_buffer_bytes
        return (buf.buffered_bytes >= limit
                and buf.buffered_bytes - buf.pending_bytes >= limit // 4)

    # --- segments -----------------------------------------------------------------------------
    def _segment_due(self) -> bool:
        seg = self.options.segment
        if seg.max_iterations is not None and self._segment_iterations >= seg.max_iterations:
            return True
        if seg.max_seconds is not None and self.clock() - self._segment_start >= seg.max_seconds:
            return True
        if seg.max_bytes is not None and self.current_path is not None:
            try:
                size = self.current_path.stat().st_size + self._buffer.buffered_bytes
            except OSError:
                return False
            return size >= seg.max_bytes
        return False

    def _rotate(self, reason: str) -> None:
        self._buffer.end_segment()
        self.flush()
        if self.status != "recording":
            return
        nxt = self._buffer.carry_over()
        self._finish_segment("complete", reason)
        if self.status != "recording":
            return
        self._buffer = nxt
        try:
            self._open_segment()
        except (OSError, ValueError, RuntimeError, SinkError) as exc:
            self._fail(exc)

    def _open_segment(self) -> None:
        self.segment += 1
        private = private_tmp_mount(self.options.directory)
        if private is not None:
            raise SinkError(
                f"output directory {self.options.directory} is in the service's private "
                f"{private} (the unit's PrivateTmp=), which systemd deletes, with every file "
                "recorded there, when the service stops: record into a directory listed in "
                "the unit's ReadWritePaths="
            )
        try:
            make_directories(self.options.directory, sync=self.options.fsync)
        except OSError as exc:
            raise SinkError(
                f"output directory {self.options.directory} cannot be created: "
                f"{exc.strerror or exc} (create it, writable by the service user, and list it "
                "in the unit's ReadWritePaths=)"
            ) from exc
        start = dt.datetime.fromtimestamp(self.start_wall, dt.UTC)
        final = unique_path(
            render_file_name(
                self.options,
                run=self.run_name,
                snapshot=self.snapshot.snapshot_name if self.snapshot else "",
                start=start,
                seq=self.seq,
                segment=self.segment,
            )
        )
        partial = partial_path(final)
        try:
            f = h5py.File(partial, "x", libver=("v110", "v110"), rdcc_nbytes=LIVE_CHUNK_CACHE)
        except OSError as exc:
            if exc.errno not in _NOT_WRITABLE:  # a full disk stays HDF5's own (it resumes)
                # HDF5 created the file (unique_path: the name was free), then could not
                # write its superblock: the empty file was left, a broken .partial
                with contextlib.suppress(OSError):
                    if partial.stat().st_size == 0:
                        partial.unlink()
                raise
            raise SinkError(
                f"output directory {self.options.directory} is not writable: "
                f"{os.strerror(exc.errno)} (make it writable by the service user, and list it "
                "in the unit's ReadWritePaths=)"
            ) from exc
        # the writer lock from the file's creation (recover leaves it alone), the shared
        # flock once HDF5 has dropped its own exclusive one (SWMR); where the lock cannot
        # be taken beside HDF5's (NFS emulates flock with POSIX locks), once SWMR started
        lock = writelock.acquire(partial)
        try:
            self._root_attrs(f)
            plugins = create_live_layout(f, self.options)
            f.attrs.create("required_plugins", plugins, dtype=h5py.string_dtype())
            f.swmr_mode = True
        except BaseException:
            f.close()
            partial.unlink(missing_ok=True)
            if lock is not None:
                lock.release()
            raise
        if lock is None:
            lock = writelock.acquire(partial)
        else:
            lock.guard_hdf5()
        self._lock = lock  # until finalized
        self._file = f
        self._writer = LiveWriter(f, sync=self.options.fsync)
        self._final = final
        self.current_path = partial
        self._segment_start = self.clock()
        self._segment_iterations = 0
        self.counters["segments"] += 1
        # an empty commit so a reader sees a consistent (empty) file at once
        self._writer.commit(RECORDING_STATUS["recording"], self._now_ns())
        if self.options.fsync:  # the new file's name, so its flushed data can be found
            sync_directory(partial.parent)
        self._log.info("segment opened", path=str(partial), segment=self.segment)

    def _root_attrs(self, f: h5py.File) -> None:
        a = f.attrs
        a["format"] = FORMAT_NAME
        a["format_version"] = FORMAT_VERSION
        a["layout"] = "live"
        a["creator"] = "k2eg-recorder"
        a["creator_version"] = __version__
        a["hdf5_version"] = h5py.version.hdf5_version
        a["h5py_version"] = h5py.version.version
        a["run_name"] = self.run_name
        a["recording_uid"] = self.uid
        a["recording_seq"] = self.seq
        a["segment"] = self.segment
        a["host"] = socket.gethostname()
        a["start_time"] = _iso(self.start_wall)
        a["start_time_ns"] = int(self.start_wall * 1e9)
        a["segment_start_time"] = _iso(self.wall_clock())
        a["status"] = "recording"
        a["status_reason"] = ""
        a["run_definition"] = self.run_definition_text
        a["metadata"] = json.dumps(self.metadata, sort_keys=True, default=str)
        a["pv_uri_map"] = json.dumps(self.pv_uri_map, sort_keys=True)
        a["output_options"] = self.options.model_dump_json()
        if self.snapshot is not None:
            props = {
                "snapshot_name": self.snapshot.snapshot_name,
                "pv_uri_list": list(self.snapshot.pv_uri_list),
                "time_window": self.snapshot.time_window,
                "repeat_delay": self.snapshot.repeat_delay,
                "sub_push_delay_msec": self.snapshot.sub_push_delay_msec,
                "respect_push_order": self.snapshot.respect_push_order,
                "triggered": self.snapshot.triggered,
                "type": self.snapshot.type.value,
                "pv_field_filter_list": list(self.snapshot.pv_field_filter_list),
            }
            a["snapshot_name"] = self.snapshot.snapshot_name
            a["snapshot_topic"] = self.snapshot.topic
            a["snapshot_properties"] = json.dumps(props, sort_keys=True)
            for k, v in props.items():
                a[f"snapshot_{k}" if not k.startswith("snapshot_") else k] = (
                    json.dumps(v) if isinstance(v, list) else v
                )

    def _finish_segment(self, status: str, reason: str) -> None:
        partial, final = self.current_path, self._final
        self._close_file()
        if partial is None or final is None:
            return
        try:
            finalize(
                partial,
                final,
                status=status,
                reason=reason,
                options=self.options,
                end_time=self.wall_clock(),
            )
        except (OSError, RuntimeError, ValueError) as exc:
            self._fail(exc)
            return
        finally:
            self._release_lock()
        self.paths.append(final)
        self.current_path = None
        self._log.info("segment finalized", path=str(final), status=status)

    def _close_file(self) -> None:
        f, self._file, self._writer = self._file, None, None
        if f is not None:
            try:
                f.close()
            except (OSError, RuntimeError, ValueError) as exc:
                self._log.warning("closing the live file failed", error=str(exc))

    def _fail(self, exc: BaseException) -> None:
        self.status = "failed"
        # our own errors say what failed; a library's error is named by its type
        self.reason = str(exc) if isinstance(exc, SinkError) else f"{type(exc).__name__}: {exc}"
        self._log.error("recording failed", reason=self.reason, path=str(self.current_path))
        # Do not H5Fclose a file whose writes failed: HDF5 then tries to flush it again and
        # leaves the library in a state that crashes later calls on *other* files (seen with
        # EFBIG/ENOSPC). The handle is parked; what was committed before stays readable.
        if self._file is not None:
            _PARKED.append(self._file)
        self._file, self._writer = None, None
        self._release_lock()  # an abandoned file: `recover` may finalize it

    def _release_lock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def _now_ns(self) -> int:
        return int(self.wall_clock() * 1e9)

    def __enter__(self) -> HDF5Recording:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.status == "recording":
            self.close("aborted" if exc[0] is not None else "complete")


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z")


__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "HDF5Recording", "os"]
