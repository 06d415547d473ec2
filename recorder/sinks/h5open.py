"""Open a recorder file for reading, finalized or live, without ever hanging on a bad one.

A file being written (or left by a crashed writer) still carries HDF5's "open for write"
flags and opens only in SWMR read mode. In that mode HDF5 re-reads any metadata whose
checksum fails, in case a writer was caught half-way through writing it: 100 attempts by
default, sleeping 1 ns, 2 ns, 4 ns ... between them, so that one *damaged* metadata block
(zeroed or overwritten bytes) stalls the read for 2**100 ns, that is for good. Two guards:

* Every SWMR open here sets the number of attempts to :data:`METADATA_READ_ATTEMPTS`
  (``H5Pset_metadata_read_attempts``, which h5py does not wrap, called on the libhdf5 h5py
  itself loaded): the back-off then adds up to about a second per damaged block, still a
  million times longer than a writer takes to write one.
* A *truncated* file (a copy cut short, a disk that filled up) would fail every read too,
  so before a SWMR open its length is checked against the end-of-file address in the
  superblock, the check HDF5 makes itself in normal mode; a writer can be caught between
  writing the superblock and extending the file, so a short file gets a few looks before it
  is called truncated.

A third guard is not HDF5's doing: HDF5 2.0 loops for ever, holding the GIL, on a global-heap
collection a power loss zero-filled. Before a file no writer holds opens in SWMR mode (a file
left by a crash), :func:`check_heap` scans it for such collections
(:mod:`recorder.sinks.globalheap`, ~0.6 s per GB) and refuses it with
:class:`~recorder.errors.HeapLoopError`; ``verify`` scans finalized files too.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import os
import re
import time
from pathlib import Path
from typing import Any

import h5py
from h5py import h5f

from recorder.errors import HeapLoopError
from recorder.sinks.globalheap import looping_collections
from recorder.sinks.superblock import stored_eof
from recorder.sinks.writelock import writer_active

__all__ = ["METADATA_READ_ATTEMPTS", "check_heap", "open_for_reading", "open_live",
           "truncation"]

LOOKS = 5
LOOK_INTERVAL_S = 0.05
METADATA_READ_ATTEMPTS = 30  # back-off 2**30 ns ~ 1.1 s in all per damaged metadata block

# h5py.File's defaults for make_fapl's parameters, which have none before h5py 3.13
_FAPL_DEFAULTS: dict[str, Any] = {
    "libver": None, "rdcc_nslots": None, "rdcc_nbytes": None, "rdcc_w0": None,
    "locking": None, "page_buf_size": None, "min_meta_keep": 0, "min_raw_keep": 0,
    "alignment_threshold": 1, "alignment_interval": 1, "meta_block_size": None,
}

_LIBHDF5 = re.compile(r"/libhdf5(?:_serial|_openmpi|_mpich)?(?:-[0-9a-f]+)?\.so[.0-9]*$")


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


def open_for_reading(path: str | os.PathLike[str], *, live_first: bool = False,
                     **kwargs: Any) -> h5py.File:
    """``path`` opened read-only: normally, or in SWMR read mode when it is being written
    (``live_first``: try that first, for ``.partial`` files). ``kwargs`` go to
    :class:`h5py.File` (``rdcc_nbytes`` ...). Raises OSError when it cannot be opened,
    also (at once) when it is truncated."""
    path = Path(path)
    if live_first:
        try:
            return open_live(path, **kwargs)
        except HeapLoopError:
            raise
        except OSError as exc:
            if "truncated file" in str(exc):
                raise
            return h5py.File(path, "r", **kwargs)
    try:
        return h5py.File(path, "r", **kwargs)
    except OSError as exc:
        if "truncated file" in str(exc):  # HDF5 checks the length before the flags
            raise
        return open_live(path, **kwargs)


def open_live(path: str | os.PathLike[str], *, scan_heap: bool = True,
              **kwargs: Any) -> h5py.File:
    """``path`` opened in SWMR read mode with a bounded number of metadata read attempts
    (see the module's docstring); refuses a truncated file at once (OSError), and a file no
    writer holds whose global heap HDF5 would loop on (:class:`HeapLoopError`; not looked
    for with ``scan_heap=False``, when the caller has just run :func:`check_heap`)."""
    path = Path(path)
    why = truncation(path)
    if why is not None:
        raise OSError(f"Unable to open {path} ({why})")
    if scan_heap:
        check_heap(path)
    return _open_swmr(path, **kwargs)


def _open_swmr(path: Path, **kwargs: Any) -> h5py.File:
    set_attempts = _set_metadata_read_attempts()
    if set_attempts is None:  # not the libhdf5 we know how to reach: HDF5's own default
        return h5py.File(path, "r", swmr=True, **kwargs)
    with h5py._objects.phil:  # h5py serializes every call into HDF5 with this lock
        fapl = h5py._hl.files.make_fapl(None, **{**_FAPL_DEFAULTS, **kwargs})
        if set_attempts(fapl.id, METADATA_READ_ATTEMPTS) < 0:
            raise OSError(f"Unable to open {path} (cannot set the metadata read attempts)")
        fid = h5f.open(os.fsencode(path), h5f.ACC_RDONLY | h5f.ACC_SWMR_READ, fapl=fapl)
    return h5py.File(fid)


def check_heap(path: str | os.PathLike[str]) -> None:
    """Raise :class:`~recorder.errors.HeapLoopError` when the file at ``path`` has a
    global-heap collection HDF5 would loop on for ever. Files a writer holds (its writer
    lock) are not scanned: they are being written, so a collection may be caught half-way,
    and a healthy writer does not leave zeros. What the byte scan finds inside a dataset's
    stored data (a string PV's bytes in a live file's pool) is data, not a collection.
    OSError when it cannot be read."""
    path = Path(path)
    if writer_active(path):
        return
    loops = looping_collections(path)
    if loops:
        stored = _stored_data(path)
        starts = [start for start, _end in stored]
        loops = [loop for loop in loops
                 if not (i := bisect.bisect_right(starts, loop.collection))
                 or loop.collection >= stored[i - 1][1]]
    if loops:
        more = f" (and {len(loops) - 1} more)" if len(loops) > 1 else ""
        raise HeapLoopError(f"Unable to open {path} ({loops[0].describe()}{more})")


def _stored_data(path: Path) -> list[tuple[int, int]]:
    """(start, end) byte ranges of every dataset's stored data (chunks, contiguous blocks),
    sorted; read from the file's metadata only (checksummed, and never the global heap).
    ``[]`` when the file cannot be opened (then every collection found counts)."""
    ranges: list[tuple[int, int]] = []

    def visit(_name: str, obj: Any) -> None:
        if not isinstance(obj, h5py.Dataset):
            return
        dsid = obj.id
        if obj.chunks is not None:
            dsid.chunk_iter(lambda c: ranges.append((c.byte_offset, c.byte_offset + c.size)))
        else:
            offset = dsid.get_offset()
            if offset is not None:  # contiguous (compact data is in its object header)
                ranges.append((offset, offset + dsid.get_storage_size()))

    try:
        try:
            f = h5py.File(path, "r")
        except OSError:
            f = _open_swmr(path)
        with f:
            f.visititems(visit)
    except (OSError, KeyError, ValueError, RuntimeError):
        pass  # damaged metadata: the ranges read so far (a hit they miss is still refused)
    return sorted(ranges)


@functools.cache
def libhdf5() -> ctypes.CDLL | None:
    """The libhdf5 loaded in this process (the one h5py was built on), or None when it
    cannot be found (no ``/proc``, a name we do not know, no such symbol)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split(None, 5)[-1].strip() for line in maps
                     if _LIBHDF5.search(line.rstrip("\n"))}
    except OSError:
        return None
    for lib in sorted(paths):
        try:
            handle = ctypes.CDLL(lib, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            handle.H5Pset_metadata_read_attempts  # noqa: B018 (the symbol must be there)
        except (OSError, AttributeError):
            continue
        return handle
    return None


@functools.cache
def _set_metadata_read_attempts() -> Any:
    """``H5Pset_metadata_read_attempts`` of :func:`libhdf5`, or None."""
    lib = libhdf5()
    if lib is None:
        return None
    func = lib.H5Pset_metadata_read_attempts
    func.argtypes = [ctypes.c_int64, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func
