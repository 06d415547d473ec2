"""What a finalized file says about itself, from its root attributes (for the file event).

Only attributes are read (no dataset), so this stays quick for files of any size. The file
is finalized: closed by its writer and read-only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

__all__ = ["file_event_fields", "plain"]


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


def file_event_fields(path: Path) -> dict[str, Any]:
    """``bytes``, ``recording_uid``, ``segment``, ``status``, ``reason``, ``start_time``,
    ``end_time``, ``iterations``, ``values``, ``format_version`` of the finalized file at
    ``path`` (the :class:`recorder.admin.files.FileEvent` fields). Raises OSError when the
    file cannot be read."""
    size = path.stat().st_size
    with h5py.File(path, "r") as f:
        a = {k: plain(v) for k, v in f.attrs.items()
             if k in ("recording_uid", "segment", "status", "status_reason", "start_time",
                      "end_time", "n_iterations", "n_values", "format_version")}
    return {
        "bytes": size,
        "recording_uid": a.get("recording_uid"),
        "segment": a.get("segment"),
        "status": a.get("status"),
        "reason": a.get("status_reason"),
        "start_time": a.get("start_time"),
        "end_time": a.get("end_time"),
        "iterations": a.get("n_iterations"),
        "values": a.get("n_values"),
        "format_version": a.get("format_version"),
    }
