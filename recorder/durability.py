"""Making writes survive a power cut or a kernel crash, not only a killed process.

A write that returned is in the kernel's page cache: it survives ``kill -9`` of the writer but
not a power cut, a kernel panic or a VM reset. Whatever the daemon tells someone else is on
disk (the Kafka offsets it resumes after, a finalized file) is made durable with these first:
the file's data with ``fsync``, and a file just created or renamed with an ``fsync`` of its
directory (the name is in the directory, not in the file).
"""

from __future__ import annotations

import os
from pathlib import Path


def sync_fd(fd: int) -> None:
    """Wait until everything written to the file behind ``fd`` is on disk. Raises OSError
    (EIO after a failed write-back: the data may be lost, and must not be counted as
    written)."""
    os.fsync(fd)


def sync_file(path: Path) -> None:
    """:func:`sync_fd` of the file at ``path`` (any descriptor of a file syncs all of it)."""
    _sync_path(path, os.O_RDONLY)


def sync_directory(directory: Path) -> None:
    """Make the names created, renamed or removed in ``directory`` durable."""
    _sync_path(directory, os.O_RDONLY | os.O_DIRECTORY)


def _sync_path(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_directories(directory: Path, *, sync: bool = True) -> None:
    """``mkdir -p directory``; with ``sync``, each directory it creates is made durable in its
    parent (a new directory's name is in its parent: until that is on disk, a power cut can
    take the directory and every file in it). Raises OSError."""
    created: list[Path] = []
    missing = directory
    while not missing.exists() and missing.parent != missing:
        created.append(missing)
        missing = missing.parent
    directory.mkdir(parents=True, exist_ok=True)
    if sync:
        for new in reversed(created):
            sync_directory(new.parent)


MOUNTINFO = "/proc/self/mountinfo"


def private_tmp_mount(directory: Path) -> str | None:
    """The mount point (``/tmp``, ``/var/tmp``) of systemd's ``PrivateTmp=`` that holds
    ``directory``, or None: systemd deletes that directory, with all in it, when the service
    stops. Found in :data:`MOUNTINFO`: the innermost mount holding ``directory`` has a
    ``systemd-private-*`` directory for its source."""
    try:
        with open(MOUNTINFO, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    path = os.path.abspath(directory)
    found: str | None = None
    depth = -1
    for line in lines:  # later lines are mounted over earlier ones
        fields = line.split()
        if len(fields) < 5:
            continue
        root, point = fields[3], fields[4].replace("\\040", " ")
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= depth:
            depth = len(point)
            found = point if "/systemd-private-" in root else None
    return found
