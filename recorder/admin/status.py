"""The status document: the daemon's heartbeat on the status topic and the ``data`` of a
``status`` reply (pure code).

JSON form (``schema`` names the layout; readers ignore fields they do not know)::

    {"schema": "k2eg-recorder/status/1",
     "kind": "heartbeat",                 # heartbeat (periodic) | status (a status reply)
     "seq": 42,                           # heartbeat counter since the daemon started
     "time": 1732212345678,               # ms since the Unix epoch
     "daemon": {"instance": "daq-3", "state": "running", "pid": 1234, "version": "0.1.0",
                "started_at": 1732210000000, "uptime_s": 2345.7,
                "config_path": "/etc/k2eg-recorder/runs.d",
                "config_errors": [],       # why the last reload was refused, if it was
                "disks": [{"path": "/data",            # a filesystem the runs write to
                           "directories": ["/data/k2eg-recorder/bpm"],
                           "runs": ["bpm-10hz"],
                           "free_bytes": 812345678912, "total_bytes": 1000204886016,
                           "min_free_bytes": 50010244300,
                           "full_in_s": 81234.5,       # at the recent rate; null: not filling
                           "warning": null,            # why it needs a look, else null
                           "checked_at": 1732212345000}]},
     "runs": {"bpm-10hz": {"state": "recording", "snapshot": "bpm_10hz", "topic": "bpm_10hz",
                           "mode": "periodic normal", "autostart": true,
                           "current_file": "/data/k2eg-recorder/bpm/bpm-10hz_....h5.partial",
                           "recording_started_at": 1732210000500,
                           "last_iteration": 23456, "last_iteration_at": 1732212345600,
                           "iterations": {"complete": 23450, "incomplete": 6},
                           "values_written": 70350, "lag": 0,
                           "errors": 0, "last_error": null,
                           "bridge": null,
                           "silent_since": null,  # ms: a periodic run gets no data since
                           "snapshot_restarts": 0,  # the gateway had lost the snapshot
                           "writer_behind_since": null,  # ms: topic paused, writing behind
                           "backpressure_pauses": 0}}}  # times its topic was paused so

``silent_since`` and ``snapshot_restarts`` were added on 2026-11-22 (a document without them
reads as null / 0), ``daemon.disks`` on 2026-11-22 too (absent: empty; see
:mod:`recorder.daemon.diskspace`), ``writer_behind_since`` and ``backpressure_pauses`` on
2026-11-24 (null / 0): the run's queue reached its bound (200,000 values or 64 MiB of
messages) because writing falls behind, so its topic is paused, since then (null: it is read);
``backpressure_pauses`` counts such pauses in this daemon process (a few during long flushes
are normal; a run that stays behind shows its lag growing).

``runs_left_out`` (added on 2026-11-25) is null unless the document would pass
:data:`STATUS_MAX_BYTES` (one Kafka message; ~1,500 runs of ~600 bytes each): then it holds the
details of as many runs as fit, those that need a look (failed, retrying, silent) first, then
those with a ``last_error``, then by name, and ``{"count": n, "needing_a_look": m, "why":
"..."}`` says how many runs are left out (and how many of those need a look); a ``status`` of
one run (``k2eg-recorder status RUN``) answers with that run only. A run's ``last_error``, its
bridge's ``reason`` and each of ``config_errors`` are cut to :data:`MAX_TEXT_CHARS` characters
(the log has them whole).

``bridge`` is null unless the run's ``output.bridge`` is set; then (for the current or last
recording of this daemon process) ``{"status": "serving" | "complete" | "aborted" | "failed",
"reason": "...", "endpoints": {"rep": "tcp://127.0.0.1:4545", "pub": ...}, "subscribers": true,
"iterations": n, "served": n, "published": n, "replies": n, "dropped_iterations": n,
"skipped_incomplete": n, "late_tags": n}`` (the counters of docs/bridge.md; ``replies``,
``skipped_incomplete`` and ``late_tags`` were added on 2026-11-24: absent reads as 0).
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from recorder.errors import AdminCommandError

__all__ = [
    "MAX_TEXT_CHARS",
    "STATUS_MAX_BYTES",
    "STATUS_SCHEMA",
    "DaemonState",
    "DiskStatus",
    "RunState",
    "RunStatus",
    "StatusDocument",
]

STATUS_SCHEMA = "k2eg-recorder/status/1"
STATUS_MAX_BYTES = 900_000
"""A status document (a heartbeat, the ``data`` of a ``status`` reply) is kept to at most this
many bytes of JSON: it is one Kafka message, and librdkafka's producers and Kafka's brokers
refuse one over ~1 MB by default (``message.max.bytes``); the rest is room for a reply's
envelope. A larger one was refused: no heartbeat, and no reply to ``status`` at all."""
MAX_TEXT_CHARS = 1_000
"""A run's ``last_error``, its bridge's ``reason`` and each reload problem are cut to this many
characters in the document (the daemon's log has them whole)."""


class DaemonState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    RELOADING = "reloading"
    STOPPING = "stopping"


class RunState(enum.StrEnum):
    IDLE = "idle"  # defined, not recording (autostart false, or stopped by an admin)
    STARTING = "starting"  # waiting for the gateway to start the snapshot
    RETRYING = "retrying"  # a start failed (gateway/Kafka unreachable); next try after a backoff
    RECORDING = "recording"
    STOPPING = "stopping"  # final iteration and flush in progress
    FAILED = "failed"  # gave up (see last_error); an admin start tries again


@dataclass(frozen=True, slots=True)
class RunStatus:
    name: str
    state: RunState
    snapshot: str
    topic: str
    mode: str
    autostart: bool
    current_file: str | None = None
    recording_started_at: int | None = None  # ms
    last_iteration: int | None = None  # the gateway's iteration index
    last_iteration_at: int | None = None  # ms
    iterations_complete: int = 0
    iterations_incomplete: int = 0
    values_written: int = 0
    lag: int | None = None  # messages behind the end of the snapshot topic
    errors: int = 0
    last_error: str | None = None
    bridge: Mapping[str, Any] | None = None  # the Karabo bridge sink, if the run has one
    silent_since: int | None = None  # ms: a periodic run's topic has gone silent since then
    snapshot_restarts: int = 0  # times the gateway had lost the snapshot and started it again
    writer_behind_since: int | None = None  # ms: its topic is paused, writing falls behind
    backpressure_pauses: int = 0  # times its topic was paused so (this daemon process)

    @property
    def needs_a_look(self) -> bool:
        """Failed, retrying its start or silent: what ``status --check`` reports."""
        return self.state in (RunState.FAILED, RunState.RETRYING) or self.silent_since is not None

    def to_json_obj(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "snapshot": self.snapshot,
            "topic": self.topic,
            "mode": self.mode,
            "autostart": self.autostart,
            "current_file": self.current_file,
            "recording_started_at": self.recording_started_at,
            "last_iteration": self.last_iteration,
            "last_iteration_at": self.last_iteration_at,
            "iterations": {
                "complete": self.iterations_complete,
                "incomplete": self.iterations_incomplete,
            },
            "values_written": self.values_written,
            "lag": self.lag,
            "errors": self.errors,
            "last_error": _bounded(self.last_error),
            "bridge": _bridge_obj(self.bridge),
            "silent_since": self.silent_since,
            "snapshot_restarts": self.snapshot_restarts,
            "writer_behind_since": self.writer_behind_since,
            "backpressure_pauses": self.backpressure_pauses,
        }

    @classmethod
    def from_json_obj(cls, name: str, obj: Mapping[str, Any]) -> RunStatus:
        iterations = obj.get("iterations") or {}
        return cls(
            name=name,
            state=RunState(obj["state"]),
            snapshot=_str(obj["snapshot"]),
            topic=_str(obj["topic"]),
            mode=_str(obj["mode"]),
            autostart=bool(obj["autostart"]),
            current_file=_opt_str(obj.get("current_file")),
            recording_started_at=_opt_int(obj.get("recording_started_at")),
            last_iteration=_opt_int(obj.get("last_iteration")),
            last_iteration_at=_opt_int(obj.get("last_iteration_at")),
            iterations_complete=_int(iterations.get("complete", 0)),
            iterations_incomplete=_int(iterations.get("incomplete", 0)),
            values_written=_int(obj.get("values_written", 0)),
            lag=_opt_int(obj.get("lag")),
            errors=_int(obj.get("errors", 0)),
            last_error=_opt_str(obj.get("last_error")),
            bridge=_opt_mapping(obj.get("bridge")),
            silent_since=_opt_int(obj.get("silent_since")),
            snapshot_restarts=_int(obj.get("snapshot_restarts", 0)),
            writer_behind_since=_opt_int(obj.get("writer_behind_since")),
            backpressure_pauses=_int(obj.get("backpressure_pauses", 0)),
        )


@dataclass(frozen=True, slots=True)
class DiskStatus:
    """A filesystem the runs write to (see :mod:`recorder.daemon.diskspace`)."""

    path: str  # its mount point
    directories: tuple[str, ...] = ()  # the runs' output directories on it
    runs: tuple[str, ...] = ()
    free_bytes: int | None = None  # for unprivileged users (statvfs f_bavail); None: unknown
    total_bytes: int | None = None
    min_free_bytes: int | None = None
    full_in_s: float | None = None  # at the rate free space fell recently; None: not falling
    warning: str | None = None  # why it needs an operator's look
    checked_at: int | None = None  # ms, the last check that returned

    def to_json_obj(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "directories": list(self.directories),
            "runs": list(self.runs),
            "free_bytes": self.free_bytes,
            "total_bytes": self.total_bytes,
            "min_free_bytes": self.min_free_bytes,
            "full_in_s": None if self.full_in_s is None else round(self.full_in_s, 1),
            "warning": self.warning,
            "checked_at": self.checked_at,
        }

    @classmethod
    def from_json_obj(cls, obj: Mapping[str, Any]) -> DiskStatus:
        full_in = obj.get("full_in_s")
        if full_in is not None and (isinstance(full_in, bool)
                                    or not isinstance(full_in, int | float)):
            raise TypeError(f"expected a number, got {full_in!r}")
        return cls(
            path=_str(obj["path"]),
            directories=tuple(_str(d) for d in obj.get("directories") or ()),
            runs=tuple(_str(r) for r in obj.get("runs") or ()),
            free_bytes=_opt_int(obj.get("free_bytes")),
            total_bytes=_opt_int(obj.get("total_bytes")),
            min_free_bytes=_opt_int(obj.get("min_free_bytes")),
            full_in_s=None if full_in is None else float(full_in),
            warning=_opt_str(obj.get("warning")),
            checked_at=_opt_int(obj.get("checked_at")),
        )


@dataclass(frozen=True, slots=True)
class StatusDocument:
    instance: str
    state: DaemonState
    time: int  # ms
    started_at: int  # ms
    runs: Sequence[RunStatus] = ()
    pid: int = 0
    version: str = ""
    config_path: str | None = None
    config_errors: Sequence[str] = ()
    seq: int = 0
    kind: str = "heartbeat"
    disks: Sequence[DiskStatus] = ()
    # seconds the daemon has run, on its monotonic clock (a wall-clock step does not move
    # it); None: from ``time - started_at``
    uptime: float | None = field(default=None, compare=False)
    # runs whose details were left out to keep it under STATUS_MAX_BYTES (see fitted()), and
    # how many of those need a look
    runs_left_out: int = 0
    runs_left_out_needing_a_look: int = 0

    @property
    def uptime_s(self) -> float:
        if self.uptime is not None:
            return max(0.0, self.uptime)
        return max(0.0, (self.time - self.started_at) / 1000)

    def run(self, name: str) -> RunStatus | None:
        return next((r for r in self.runs if r.name == name), None)

    def only(self, name: str) -> StatusDocument:
        """This document with the run ``name`` only (none when it has no such run)."""
        return replace(self, runs=tuple(r for r in self.runs if r.name == name),
                       runs_left_out=0, runs_left_out_needing_a_look=0)

    def fitted(self, max_bytes: int = STATUS_MAX_BYTES) -> StatusDocument:
        """This document, or one that encodes to at most ``max_bytes``: the details of as many
        runs as fit (those that need a look first, then those with a ``last_error``, then by
        name) and ``runs_left_out`` saying how many others there are. The daemon's part (its
        disks, the reload problems) is always kept."""
        if len(self.encode()) <= max_bytes:
            return self
        order = sorted(self.runs, key=lambda r: (not r.needs_a_look, r.last_error is None,
                                                 r.name))
        # the document without runs, with the largest left-out counts it may get
        budget = max_bytes - len(replace(
            self, runs=(), runs_left_out=len(order),
            runs_left_out_needing_a_look=len(order)).encode())
        kept: set[str] = set()
        for r in order:
            entry = len(_dumps({r.name: r.to_json_obj()})) - 1  # "name":{...} and a comma
            if entry > budget:
                break
            budget -= entry
            kept.add(r.name)
        left = [r for r in order if r.name not in kept]
        return replace(self, runs=tuple(r for r in self.runs if r.name in kept),
                       runs_left_out=len(left),
                       runs_left_out_needing_a_look=sum(r.needs_a_look for r in left))

    def to_json_obj(self) -> dict[str, Any]:
        return {
            "schema": STATUS_SCHEMA,
            "kind": self.kind,
            "seq": self.seq,
            "time": self.time,
            "daemon": {
                "instance": self.instance,
                "state": self.state.value,
                "pid": self.pid,
                "version": self.version,
                "started_at": self.started_at,
                "uptime_s": round(self.uptime_s, 3),
                "config_path": self.config_path,
                "config_errors": [_bounded(e) for e in self.config_errors],
                "disks": [d.to_json_obj() for d in self.disks],
            },
            "runs": {r.name: r.to_json_obj() for r in self.runs},
            "runs_left_out": None if not self.runs_left_out else {
                "count": self.runs_left_out,
                "needing_a_look": self.runs_left_out_needing_a_look,
                "why": f"the status is kept under {STATUS_MAX_BYTES:,} bytes (one Kafka "
                       "message): ask for one run with k2eg-recorder status RUN",
            },
        }

    def encode(self) -> bytes:
        return _dumps(self.to_json_obj())

    @classmethod
    def from_json_obj(cls, obj: Mapping[str, Any]) -> StatusDocument:
        """Inverse of :meth:`to_json_obj`; raises AdminCommandError (malformed) on bad input."""
        try:
            if obj.get("schema") != STATUS_SCHEMA:
                raise ValueError(f"unknown schema {obj.get('schema')!r}")
            daemon = obj["daemon"]
            runs = obj.get("runs", {})
            if not isinstance(runs, Mapping) or not isinstance(daemon, Mapping):
                raise TypeError("daemon and runs must be objects")
            left_out = obj.get("runs_left_out") or {}
            if not isinstance(left_out, Mapping):
                raise TypeError("runs_left_out must be an object")
            return cls(
                instance=_str(daemon["instance"]),
                state=DaemonState(daemon["state"]),
                time=_int(obj["time"]),
                started_at=_int(daemon["started_at"]),
                runs=tuple(RunStatus.from_json_obj(str(n), r) for n, r in runs.items()),
                pid=_int(daemon.get("pid", 0)),
                version=_str(daemon.get("version", "")),
                config_path=_opt_str(daemon.get("config_path")),
                config_errors=tuple(_str(e) for e in daemon.get("config_errors") or ()),
                seq=_int(obj.get("seq", 0)),
                kind=_str(obj.get("kind", "heartbeat")),
                disks=tuple(DiskStatus.from_json_obj(d) for d in daemon.get("disks") or ()),
                uptime=_opt_float(daemon.get("uptime_s")),
                runs_left_out=_int(left_out.get("count", 0)),
                runs_left_out_needing_a_look=_int(left_out.get("needing_a_look", 0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise AdminCommandError("malformed", f"bad status document: {exc!r}") from None

    @classmethod
    def decode(cls, payload: bytes) -> StatusDocument:
        try:
            obj = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise AdminCommandError("malformed", f"status is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise AdminCommandError("malformed", "status document is not a JSON object")
        return cls.from_json_obj(obj)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def _bounded(text: str | None) -> str | None:
    """``text`` cut to :data:`MAX_TEXT_CHARS`, saying how much was cut."""
    if text is None or len(text) <= MAX_TEXT_CHARS:
        return text
    return (f"{text[:MAX_TEXT_CHARS]}... ({len(text) - MAX_TEXT_CHARS:,} more characters in "
            "the daemon's log)")


def _bridge_obj(bridge: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if bridge is None:
        return None
    out = dict(bridge)
    if isinstance(out.get("reason"), str):
        out["reason"] = _bounded(out["reason"])
    return out


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _opt_str(value: Any) -> str | None:
    return None if value is None else _str(value)


def _opt_mapping(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"expected an object, got {value!r}")
    return dict(value)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _opt_int(value: Any) -> int | None:
    return None if value is None else _int(value)


def _opt_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)
