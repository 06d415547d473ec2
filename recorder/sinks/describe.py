"""What a finalized file says about itself, for the file event: its root attributes and the
span of the gateway's timestamps in its iteration table.

Besides the attributes only the table's two timestamp columns are read (16 bytes an
iteration: 14 MB for a day at 10 Hz). The file is finalized: closed by its writer and
read-only.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from recorder.sinks.filters import register_plugins

__all__ = ["data_span_ns", "file_event_fields", "iso_ns", "plain", "utc"]


def plain(value: Any) -> Any:
    """An HDF5 attribute (or table cell) as plain Python: bytes decoded, numpy scalars and
    object arrays unwrapped."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def data_span_ns(iterations: Any, n_iterations: int) -> tuple[int, int] | None:
    """(earliest, latest) gateway timestamp, ns since the epoch, over the header and tail
    timestamps of the first ``n_iterations`` rows of an ``/iterations`` group; None when none
    is set (0 stands for a header or tail that never came)."""
    if n_iterations <= 0:
        return None
    stamps = np.concatenate([iterations["header_timestamp"][:n_iterations],
                             iterations["tail_timestamp"][:n_iterations]])
    stamps = stamps[stamps > 0]
    if not len(stamps):
        return None
    return int(stamps.min()), int(stamps.max())


def utc(ns: int) -> dt.datetime:
    """ns since the epoch as an aware UTC datetime (microseconds)."""
    return dt.datetime.fromtimestamp(ns // 1000 / 1e6, dt.UTC)


def iso_ns(ns: int) -> str:
    """ns since the epoch as ISO 8601 UTC with milliseconds (``...T13:00:02.100Z``)."""
    return utc(ns).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def file_event_fields(path: Path) -> dict[str, Any]:
    """``bytes``, ``recording_uid``, ``segment``, ``status``, ``reason``, ``start_time``,
    ``end_time``, ``segment_start_time``, ``data_start_time``, ``data_end_time``,
    ``iterations``, ``values``, ``format_version`` of the finalized file at
    ``path`` (the :class:`recorder.admin.files.FileEvent` fields). Raises OSError when the
    file cannot be read."""
    size = path.stat().st_size
    with h5py.File(path, "r") as f:
        register_plugins(f.attrs.get("required_plugins"))  # compression zstd / blosc2
        a = {k: plain(v) for k, v in f.attrs.items()
             if k in ("recording_uid", "segment", "status", "status_reason", "start_time",
                      "segment_start_time", "end_time", "n_iterations", "n_values",
                      "format_version")}
        n_iterations = a.get("n_iterations")
        span = (data_span_ns(f["iterations"], int(n_iterations))
                if isinstance(n_iterations, int) and "iterations" in f else None)
    return {
        "bytes": size,
        "recording_uid": a.get("recording_uid"),
        "segment": a.get("segment"),
        "status": a.get("status"),
        "reason": a.get("status_reason"),
        "start_time": a.get("start_time"),
        "end_time": a.get("end_time"),
        "segment_start_time": a.get("segment_start_time"),
        "data_start_time": None if span is None else iso_ns(span[0]),
        "data_end_time": None if span is None else iso_ns(span[1]),
        "iterations": a.get("n_iterations"),
        "values": a.get("n_values"),
        "format_version": a.get("format_version"),
    }
