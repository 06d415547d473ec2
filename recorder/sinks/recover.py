"""Recovery of files left by a writer that died (kill -9, power loss, full disk)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import h5py

from recorder.durability import sync_directory
from recorder.errors import (
    DAMAGED_VALUE_ERRORS,
    DamagedFileError,
    FileBusyError,
    FileFormatError,
    HeapLoopError,
    NothingToRecoverError,
)
from recorder.sinks import writelock
from recorder.sinks.describe import plain
from recorder.sinks.final_layout import FORMAT_MAJOR, format_major
from recorder.sinks.finalize import FINAL_SUFFIX, finalize
from recorder.sinks.h5open import check_heap, open_live
from recorder.sinks.livefile import read_commit
from recorder.sinks.options import PARTIAL_SUFFIX, final_path
from recorder.sinks.superblock import (
    clear_consistency_flags,
    restore_superblock,
    superblock_only,
)
from recorder.sinks.writelock import writer_active


def find_partials(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(PARTIAL_SUFFIX))


def holds_nothing(path: Path) -> bool:
    """Whether ``path`` is what a writer killed while it created the file left: empty (HDF5
    had opened it, not yet written its superblock) or only its superblock. Not whether a
    writer holds it (see :func:`recover_file`)."""
    return path.stat().st_size == 0 or superblock_only(path)


def _finalized_already(path: Path) -> bool:
    """Whether ``path``'s final name holds the finalized file of the same recording segment
    (same ``recording_uid`` and ``segment``)."""
    final = final_path(path)
    if not final.exists():
        return False
    try:
        check_heap(final)
        with h5py.File(final, "r") as f:
            done = dict(f.attrs)
        with open_live(path, scan_heap=False) as f:
            left = dict(f.attrs)
    except (OSError, KeyError, ValueError, RuntimeError):
        return False
    keys = ("format", "recording_uid", "segment")
    return done.get("layout") == "final" and all(
        k in left and k in done and done[k] == left[k] for k in keys)


def _check_ours(path: Path) -> None:
    """Raise :class:`FileFormatError` unless ``path`` is a live k2eg-recorder file of a
    format this version knows (OSError when it cannot be opened: truncated ...). Read only:
    nothing is written to a file that is not ours."""
    try:
        f = open_live(path, scan_heap=False)  # its "open for write" flags may be set
    except HeapLoopError:
        raise
    except OSError as exc:
        if "truncated file" in str(exc):
            raise
        f = h5py.File(path, "r")  # not SWMR-readable (e.g. a version 0 superblock)
    with f:
        attrs = {k: plain(f.attrs[k]) for k in ("format", "format_version", "layout")
                 if k in f.attrs}
    if attrs.get("format") != "k2eg-recorder":
        raise FileFormatError(f"{path}: not a k2eg-recorder file (no root attribute "
                              "format='k2eg-recorder'): not touched")
    version = str(attrs.get("format_version", ""))
    major = format_major(version)
    if major is None:
        raise FileFormatError(f"{path}: format_version {version!r} is not MAJOR.MINOR: "
                              "not touched")
    if major > FORMAT_MAJOR:
        raise FileFormatError(f"{path}: format {version} is newer than this k2eg-recorder "
                              f"knows ({FORMAT_MAJOR}.x): recover it with a newer version; "
                              "not touched")
    if attrs.get("layout") != "live":
        raise FileFormatError(f"{path}: layout {attrs.get('layout')!r}, not a file being "
                              f"written (a finalized file named {PARTIAL_SUFFIX}?): not "
                              "touched")


def recover_file(path: Path, *, by: str = "k2eg-recorder recover",
                 check: Callable[[Path], Sequence[str]] | None = None,
                 heap_checked: bool = False) -> Path:
    """Finalize ``path`` (a ``*.partial`` file): clean, per-PV layout, read-only, marked.

    The recording status becomes ``aborted`` (``failed`` if the writer had recorded a
    failure) with a reason saying it was recovered; iterations that were open when the
    writer died are marked incomplete (``writer_crashed``); ``by`` completes the reason
    ("recovered by ..."). A ``.partial`` whose final name already holds the finalized file
    of the same segment (a writer killed after renaming it, before removing the ``.partial``)
    is removed, and that file, left as it is, returned. A file that is not a live
    k2eg-recorder file of a format this version knows (another program's, a newer
    version's, a finalized file named ``.partial``) raises :class:`FileFormatError`, and a
    truncated one OSError, before anything is written to it. Raises :class:`FileBusyError`
    while a running writer holds the file (:mod:`recorder.sinks.writelock`), and
    :class:`DamagedFileError` when what it holds does not read back (:class:`HeapLoopError`,
    an OSError too, for a global heap HDF5 would loop on; also when the finalized
    file would not pass ``check``, e.g. ``k2eg-recorder verify``): the file is then left as
    it was, byte for byte, and no final file is written. A ``.partial`` that is empty or
    only its superblock (its writer was killed while it created it: no data) is removed, and
    :class:`NothingToRecoverError` raised. ``heap_checked``: the caller has
    just scanned the file's global heap (:func:`~recorder.sinks.h5open.check_heap`, which
    ``k2eg-recorder verify`` runs), so it is not scanned again (~0.6 s per GB each time).
    """
    path = Path(path)
    if not path.name.endswith(PARTIAL_SUFFIX):
        raise ValueError(f"{path} is not a file being written (no {PARTIAL_SUFFIX} suffix)")
    if path.is_symlink():  # finalizing next to the link would leave the real file behind,
        # its flags cleared, to be recovered a second time (a duplicate recording file)
        raise ValueError(f"{path} is a symbolic link (to {path.resolve()}): recover the file "
                         "itself, in the directory its writer wrote it to")
    busy = FileBusyError(
        f"{path} is being written: a running writer holds its lock (not touched; "
        "stop the run, or wait until it is finalized)"
    )
    if writer_active(path):
        raise busy
    if not heap_checked:  # HeapLoopError: HDF5 would loop for ever reading it (untouched)
        check_heap(path)
    # held while recovering, as a writer's: another recover (the daemon's at its restart, an
    # operator's) leaves the file alone instead of finalizing it at the same time
    lock = writelock.acquire(path)
    if lock is None and writer_active(path):
        raise busy
    try:
        if lock is not None and lock.guards_hdf5 and holds_nothing(path):
            # no HDF5 writer has it open either (its exclusive flock, until SWMR starts)
            path.unlink()
            sync_directory(path.parent)  # gone for good, or a power cut brings it back
            raise NothingToRecoverError(
                f"{path}: removed: it holds nothing (its writer was killed while it "
                "created the file, before writing any data)")
        return _recover(path, by=by, check=check)
    finally:
        if lock is not None:
            lock.release()


def _recover(path: Path, *, by: str, check: Callable[[Path], Sequence[str]] | None) -> Path:
    """:func:`recover_file` of a file nobody else writes nor recovers."""
    _check_ours(path)
    if _finalized_already(path):
        # a writer (or recover) killed after the final file took its name, before it removed
        # the .partial: that finalization was complete (the file is checked and synced
        # before it is renamed), so the .partial is only a copy of what the file holds
        path.unlink()
        sync_directory(path.parent)  # gone for good, or a power cut brings it back
        return final_path(path)
    stale = path.with_name(final_path(path).name + FINAL_SUFFIX)
    stale.unlink(missing_ok=True)  # an interrupted finalization
    times = path.stat()  # its mtime too is put back with the flags
    original = clear_consistency_flags(path)  # put back if it cannot be recovered
    try:
        with h5py.File(path, "r") as f:
            commit = read_commit(f)  # only the commit records: memory does not grow with it
        status = "failed" if commit.status == "failed" else "aborted"
        last = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(commit.time_ns / 1e9))
        reason = (
            f"the writer stopped without finalizing the file (last commit {last}); "
            f"recovered by {by}"
        )
        return finalize(
            path,
            final_path(path),
            status=status,
            reason=reason,
            end_time=commit.time_ns / 1e9 if commit.time_ns else None,
            extra_attrs={"recovered": True, "recovered_at": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            check=check,
            heap_checked=True,  # above, or by the caller; clearing the flags left it alone
        )
    except BaseException as exc:
        # not recovered: the file stays as it was, byte for byte (flags included), for
        # another tool or a second look; h5py's errors of a damaged file are KeyErrors
        if original is not None and path.exists():
            restore_superblock(path, original)
            os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
        if isinstance(exc, DAMAGED_VALUE_ERRORS):
            # h5py's KeyError for damaged metadata; the others, damaged values (a PV or
            # iteration row out of range, text that does not decode)
            what = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise DamagedFileError(f"{path}: damaged: {what}") from exc
        raise
