"""The writer lock: a healthy writer holds one on its ``.partial`` file until it is finalized.

Why: ``k2eg-recorder recover`` (and the daemon's recovery of leftovers at start-up) turns a
``.partial`` file into a finalized one. It must only touch files no writer is using. HDF5's
own file lock cannot say so: a writer in SWMR mode releases it (so readers can open the
file), and ``recover`` clears the superblock's "open for writing" flags itself. So each
writer takes an advisory open-file-description lock (Linux ``F_OFD_SETLK``, whole file,
exclusive) on a descriptor of its own, right after creating the file, and keeps it until
the file is finalized, or until the recording fails (the file is then abandoned, and
``recover`` may take it). The kernel drops the lock when the process dies however it dies,
so a file left by a crash (kill -9, OOM, power loss) is never locked. OFD locks are not
released when another descriptor of the same file is closed (h5py opens and closes several
while finalizing), unlike ``lockf``; they also work over NFS (as POSIX locks).

The writer also holds a *shared* BSD ``flock`` on a second descriptor: the lock HDF5 itself
takes when it opens a file (shared to read, exclusive to write). SWMR readers share it, but
whatever would open the live file for writing fails at once with HDF5's "unable to lock
file, errno = 11": ``h5clear -s`` (which HDF5's own error message suggests to whoever opens a
live file without SWMR), h5py's ``"a"``/``"r+"``, a second writer. Without it, ``h5clear``
rewrote the superblock of a file being written. Until SWMR starts HDF5 holds its lock
exclusively, so the writer takes this one then (:meth:`WriterLock.guard_hdf5`). Local file
systems keep ``flock`` and OFD
locks apart; on NFS, where ``flock`` is emulated with POSIX locks, the second lock would
conflict with the first, so it is not taken there.

Best effort: where the lock cannot be taken (not Linux, a file system without locks)
:func:`acquire` returns None and recovery falls back to what it did before (the file's
consistency flags); :func:`writer_active` then says None (cannot tell).
"""

from __future__ import annotations

import fcntl
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final

__all__ = ["WriterLock", "acquire", "writer_active"]

# struct flock on Linux (x86-64, aarch64, ...): short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid (+ padding); l_pid must be 0 for OFD locks
_FLOCK: Final = struct.Struct("hhqqi4x")
_F_OFD_GETLK: Final = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK: Final = getattr(fcntl, "F_OFD_SETLK", 37)


def _flock(kind: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, 0, 0, 0)


class WriterLock:
    """A held writer lock; :meth:`release` (idempotent) drops it."""

    def __init__(self, path: Path, fd: int, guard_fd: int | None = None) -> None:
        self.path = path
        self._fd: int | None = fd
        self._guard_fd = guard_fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    @property
    def guards_hdf5(self) -> bool:
        """Whether the shared ``flock`` that keeps HDF5 writers out is held too."""
        return self._guard_fd is not None

    def guard_hdf5(self) -> bool:
        """Take the shared ``flock`` if :func:`acquire` could not (HDF5 held its exclusive
        one: the file was still open for writing before SWMR started); whether it is held."""
        if self._fd is not None and self._guard_fd is None:
            self._guard_fd = _guard(self.path)
        return self._guard_fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        guard, self._guard_fd = self._guard_fd, None
        if guard is not None:
            os.close(guard)  # drops the flock
        if fd is not None:
            os.close(fd)  # closing the description drops its OFD lock

    def __del__(self) -> None:  # a lost reference must not keep the lock (or the fd)
        self.release()


def acquire(path: str | os.PathLike[str]) -> WriterLock | None:
    """Take the writer lock on ``path`` (which the caller just created), or None when this
    system cannot (see the module docstring) or someone else holds it."""
    path = Path(path)
    fd = _locked_descriptor(
        path, os.O_RDWR, lambda fd: fcntl.fcntl(fd, _F_OFD_SETLK, _flock(fcntl.F_WRLCK))
    )
    if fd is None:
        return None
    return WriterLock(path, fd, _guard(path))


def _guard(path: Path) -> int | None:
    """HDF5's own lock, shared, on a new descriptor: HDF5 writers (h5clear, "r+", "a") are
    kept out, readers not. None when it cannot be taken."""
    return _locked_descriptor(
        path, os.O_RDONLY, lambda fd: fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    )


def _locked_descriptor(path: Path, flags: int, lock: Callable[[int], object]) -> int | None:
    """A new descriptor of ``path`` on which ``lock`` succeeded, or None (nothing left open)."""
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        lock(fd)
    except OSError:
        os.close(fd)
        return None
    return fd


def writer_active(path: str | os.PathLike[str]) -> bool | None:
    """True when a writer holds ``path``'s writer lock, or HDF5's own exclusive lock (a
    program has it open for writing outside SWMR: a writer creating it, h5py's "r+"), False
    when nobody does, None when this cannot be told (the file cannot be opened, or the
    system has no OFD locks)."""
    if sys.platform != "linux":  # OFD locks (and the command numbers used here) are Linux's
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        got = fcntl.fcntl(fd, _F_OFD_GETLK, _flock(fcntl.F_WRLCK))
        if _FLOCK.unpack(got)[0] != fcntl.F_UNLCK:
            return True
        try:  # shared, as HDF5's readers take it: only an HDF5 writer's conflicts
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            pass  # no flock here: the writer lock alone tells
        return False
    except OSError:
        return None
    finally:
        os.close(fd)  # (drops the flock taken to test)
