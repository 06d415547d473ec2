"""Open a recorder file for reading, finalized or live, without ever hanging on a bad one.

A file being written (or left by a crashed writer) still carries HDF5's "open for write"
flags and opens only in SWMR read mode. In that mode HDF5 does not check the file's length:
it retries every metadata read that fails, with a back-off that doubles up to an hour per
try, so a *truncated* file (a copy cut short, a disk that filled up) makes the open hang
for good (seen with h5py 3.16 / HDF5 2.0 on a finalized file cut to 4 KiB). So before a
SWMR open the length is checked against the end-of-file address in the superblock, the
check HDF5 makes itself in normal mode; a writer can be caught between writing the
superblock and extending the file, so a short file gets a few looks before it is called
truncated.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import h5py

from recorder.sinks.superblock import stored_eof

__all__ = ["open_for_reading", "truncation"]

LOOKS = 5
LOOK_INTERVAL_S = 0.05


def truncation(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is too short for what its superblock says, or None when it is not
    (or has no version 2/3 superblock to tell)."""
    path = Path(path)
    for look in range(LOOKS):
        need = stored_eof(path)
        size = path.stat().st_size
        if need is None or size >= need:
            return None
        if look < LOOKS - 1:
            time.sleep(LOOK_INTERVAL_S)
    return f"truncated file: {size} bytes, its superblock needs {need}"


def open_for_reading(path: str | os.PathLike[str], *, live_first: bool = False) -> h5py.File:
    """``path`` opened read-only: normally, or in SWMR read mode when it is being written
    (``live_first``: try that first, for ``.partial`` files). Raises OSError when it
    cannot be opened, also (at once) when it is truncated."""
    path = Path(path)
    if live_first:
        _refuse_truncated(path)
        try:
            return h5py.File(path, "r", swmr=True)
        except OSError:
            return h5py.File(path, "r")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        if "truncated file" in str(exc):  # HDF5 checks the length before the flags
            raise
        _refuse_truncated(path)
        return h5py.File(path, "r", swmr=True)


def _refuse_truncated(path: Path) -> None:
    why = truncation(path)
    if why is not None:
        raise OSError(f"Unable to open {path} ({why})")
