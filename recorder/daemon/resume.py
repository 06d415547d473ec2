"""Per-run state files: what a restart needs to resume a recording without loss.

One JSON file per run in the state directory (``$STATE_DIRECTORY`` under systemd)::

    {"run": "bpm-10hz", "next_seq": 4,
     "active": {"recording_uid": "...", "seq": 3, "topic": "bpm_10hz",
                "snapshot_name": "bpm_10hz", "offsets": {"0": 12345},
                "open_offsets": {"0": 12301},
                "current_file": "/data/.../bpm-10hz_..._0003.h5.partial",
                "segments": 2, "started_at_ns": 1732210000500000000,
                "updated_at": 1732212345678}}

``active`` is set while a recording runs and rewritten after every flush that moved the
durable offsets; it is cleared when the recording ends cleanly (its files finalized). A daemon
that finds ``active`` at start resumes that recording from ``offset + 1`` into a new segment:
everything up to ``offset`` is in a file already, everything after it is still in Kafka.
``open_offsets`` (optional) is where the oldest iteration still open at ``offsets`` began
(else ``offset + 1``): the resume reads from there, but what lies below where it resumes
(``offset + 1``, or past what a leftover file holds) only primes the duplicate check (a
message the gateway's producer published twice, its first copy in the file already and its
second after ``offset``, is not recorded again).
``segments`` is the number of segment files the recording has opened so far, i.e. the number
its next segment file gets; ``started_at_ns`` the recording's original start (wall clock):
with them a resumed recording continues the segment numbering of the same recording.
Files are replaced atomically (write, fsync, rename, fsync of the directory), so a crash or a
power cut leaves the old or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from recorder.durability import make_directories, sync_directory, sync_fd
from recorder.errors import ServiceError

_log = structlog.get_logger("recorder.daemon.resume")


def write_json_atomic(path: Path, obj: Any, *, what: str = "state") -> None:
    """Replace ``path`` with ``obj`` as JSON: write a temporary file, fsync, rename (a crash
    leaves the old or the new file). Raises :class:`ServiceError`."""
    tmp = path.with_name(path.name + ".tmp")
    # no indent: json's C encoder (with indent the pure-Python one, whose closures are
    # cyclic garbage at every save, i.e. after every flush of a recording run)
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    try:
        make_directories(path.parent)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            view = memoryview(data)
            while view:  # a write may take less than asked (a disk filling up): the rest
                view = view[os.write(fd, view):]
            sync_fd(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        sync_directory(path.parent)  # the rename itself, or a power cut can undo it
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ServiceError(f"cannot write {what} {path}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class ActiveRecording:
    """A recording in progress, as last durably written."""

    recording_uid: str
    seq: int
    topic: str
    snapshot_name: str
    offsets: dict[int, int] = field(default_factory=dict)  # partition -> highest durable
    current_file: str | None = None
    segments: int = 0  # segment files opened so far = the next segment number
    started_at_ns: int = 0  # the recording's start (wall clock, ns since the epoch; 0 unknown)
    updated_at: int = 0  # ms
    # an admin stop was under way when the daemon exited (its shutdown budget ran out): the
    # next start finalizes what it left and does not resume it
    stopped: bool = False
    # partition -> offset of the first message of the oldest iteration still open at
    # ``offsets``, else one past them: a resume reads from there to know what that
    # iteration holds (a producer's copy after ``offsets`` is not recorded twice)
    open_offsets: dict[int, int] = field(default_factory=dict)

    def resume_offsets(self) -> dict[int, int]:
        """Where to read next: one past the highest durable offset of each partition."""
        return {p: o + 1 for p, o in self.offsets.items()}

    def read_offsets(self) -> dict[int, int]:
        """Where a resume starts reading: :meth:`resume_offsets`, or before them the first
        message of the oldest iteration open then (what is below them only primes the
        duplicate check)."""
        return {p: min(o, self.open_offsets.get(p, o)) for p, o in self.resume_offsets().items()}

    def to_json_obj(self) -> dict[str, Any]:
        return {
            "recording_uid": self.recording_uid,
            "seq": self.seq,
            "topic": self.topic,
            "snapshot_name": self.snapshot_name,
            "offsets": {str(p): o for p, o in sorted(self.offsets.items())},
            "current_file": self.current_file,
            "segments": self.segments,
            "started_at_ns": self.started_at_ns,
            "updated_at": self.updated_at,
            **({"stopped": True} if self.stopped else {}),
            **({"open_offsets": {str(p): o for p, o in sorted(self.open_offsets.items())}}
               if self.open_offsets else {}),
        }

    @classmethod
    def from_json_obj(cls, obj: dict[str, Any]) -> ActiveRecording:
        offsets = {int(p): int(o) for p, o in dict(obj.get("offsets") or {}).items()}
        current = obj.get("current_file")
        return cls(
            recording_uid=str(obj["recording_uid"]),
            seq=int(obj["seq"]),
            topic=str(obj["topic"]),
            snapshot_name=str(obj["snapshot_name"]),
            offsets=offsets,
            current_file=None if current is None else str(current),
            segments=int(obj.get("segments", 0)),
            started_at_ns=int(obj.get("started_at_ns", 0)),
            updated_at=int(obj.get("updated_at", 0)),
            stopped=obj.get("stopped") is True,
            open_offsets={int(p): int(o)
                          for p, o in dict(obj.get("open_offsets") or {}).items()},
        )


@dataclass(frozen=True, slots=True)
class RunState:
    run: str
    next_seq: int = 0
    active: ActiveRecording | None = None

    def to_json_obj(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "next_seq": self.next_seq,
            "active": None if self.active is None else self.active.to_json_obj(),
        }


class ResumeStore:
    """Reads and writes the per-run state files in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, run: str) -> Path:
        return self.directory / f"{run}.json"

    def load(self, run: str) -> RunState:
        """The run's state; a missing or unreadable file is a fresh state (logged)."""
        path = self.path(run)
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
            active = obj.get("active")
            return RunState(
                run=run,
                next_seq=int(obj.get("next_seq", 0)),
                active=None if active is None else ActiveRecording.from_json_obj(active),
            )
        except FileNotFoundError:
            return RunState(run)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            _log.error("unreadable run state file ignored", run=run, path=str(path),
                       error=str(exc))
            return RunState(run)

    def save(self, state: RunState) -> None:
        """Atomically replace the run's state file; raises :class:`ServiceError`."""
        write_json_atomic(self.path(state.run), state.to_json_obj(), what="run state")

    def begin(self, run: str, active: ActiveRecording) -> RunState:
        """A recording starts (or resumes): remember it and reserve its sequence number."""
        current = self.load(run)
        state = RunState(run, max(current.next_seq, active.seq + 1), active)
        self.save(state)
        return state

    def update(self, state: RunState, **changes: Any) -> RunState:
        """New durable offsets / current file of the active recording."""
        if state.active is None:
            return state
        active = replace(state.active, updated_at=time.time_ns() // 1_000_000, **changes)
        new = replace(state, active=active)
        self.save(new)
        return new

    def end(self, state: RunState) -> RunState:
        """The recording ended cleanly: nothing to resume."""
        new = replace(state, active=None)
        self.save(new)
        return new
