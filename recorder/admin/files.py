"""The file event: one JSON message on the files topic per finalized file (pure code).

Downstream tools (a data catalog's ingestion, a copy-to-archive job) learn of each new file
here instead of watching directories, as kafka-to-nexus users do with its "write done"
messages. Key: the run name. Layout (``schema`` names it; fields are only ever added)::

    {"schema": "k2eg-recorder/file/1",
     "time": 1795291545012,                 # ms since the Unix epoch, when it was published
     "instance": "daq-3",                   # the daemon (RECORDER_INSTANCE)
     "run": "bpm-10hz", "snapshot": "bpm_10hz",
     "path": "/data/k2eg-recorder/bpm/bpm-10hz_20261122T130002Z_0000.h5",
     "bytes": 12345678,
     "recording_uid": "5c1f...", "segment": 0,
     "status": "complete",                  # complete | aborted | failed (the file's own)
     "reason": "",                          # status_reason when not complete
     "start_time": "2026-11-22T13:00:02Z",  # the recording's (the same in every segment)
     "end_time": "2026-11-22T14:00:02Z",    # this file's
     "segment_start_time": "2026-11-22T13:00:02Z",  # this file opened (wall clock)
     "data_start_time": "2026-11-22T13:00:01.900Z",  # the gateway's earliest and latest
     "data_end_time": "2026-11-22T14:00:01.950Z",    # timestamps in /iterations (or null)
     "iterations": 36000, "values": 108000,
     "format_version": "5.1",
     "error": null}                         # why the file could not be read, if so

Everything but ``schema``, ``time``, ``instance``, ``run``, ``snapshot`` and ``path`` comes
from the file itself (its root attributes) and is null when the file could not be read.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from recorder.errors import AdminCommandError

__all__ = ["FILE_SCHEMA", "FileEvent"]

FILE_SCHEMA = "k2eg-recorder/file/1"


@dataclass(frozen=True, slots=True)
class FileEvent:
    time: int
    instance: str
    run: str
    snapshot: str
    path: str
    bytes: int | None = None
    recording_uid: str | None = None
    segment: int | None = None
    status: str | None = None
    reason: str | None = None
    start_time: str | None = None
    end_time: str | None = None
    segment_start_time: str | None = None
    data_start_time: str | None = None
    data_end_time: str | None = None
    iterations: int | None = None
    values: int | None = None
    format_version: str | None = None
    error: str | None = None

    def to_json_obj(self) -> dict[str, Any]:
        return {"schema": FILE_SCHEMA, **asdict(self)}

    def encode(self) -> builtins.bytes:
        return json.dumps(self.to_json_obj(), separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_json_obj(cls, obj: Mapping[str, Any]) -> FileEvent:
        """Inverse of :meth:`to_json_obj` (unknown fields ignored); AdminCommandError
        (malformed) on bad input."""
        try:
            if obj.get("schema") != FILE_SCHEMA:
                raise ValueError(f"unknown schema {obj.get('schema')!r}")
            fields: dict[str, Any] = {name: obj.get(name) for name in cls.__dataclass_fields__}
            for name in ("time", "bytes", "segment", "iterations", "values"):
                value = fields[name]
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                    raise TypeError(f"{name}: expected an integer, got {value!r}")
            for name in ("instance", "run", "snapshot", "path"):
                if not isinstance(fields[name], str):
                    raise TypeError(f"{name}: expected a string, got {fields[name]!r}")
            for name in ("recording_uid", "status", "reason", "start_time", "end_time",
                         "segment_start_time", "data_start_time", "data_end_time",
                         "format_version", "error"):
                if fields[name] is not None and not isinstance(fields[name], str):
                    raise TypeError(f"{name}: expected a string, got {fields[name]!r}")
            return cls(**fields)
        except (TypeError, ValueError) as exc:
            raise AdminCommandError("malformed", f"bad file event: {exc}") from None

    @classmethod
    def decode(cls, payload: builtins.bytes) -> FileEvent:
        try:
            obj = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise AdminCommandError("malformed", f"file event is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise AdminCommandError("malformed", "file event is not a JSON object")
        return cls.from_json_obj(obj)
