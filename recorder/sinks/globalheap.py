"""HDF5 global-heap collections HDF5 itself would loop on for ever, found before it reads them.

Variable-length data (strings, ragged arrays) lives in the file's *global heap*: collections
of at least 4 KiB, each ``"GCOL"``, version 1, 3 reserved bytes, the collection's size, then
objects, each a header (index: 2 bytes, reference count: 2, reserved: 4, size) and its bytes
padded to 8, the last one (index 0) the collection's free space. When HDF5 (2.0 included)
loads a collection it walks those headers (``H5HG__cache_heap_deserialize``) and advances by
each object's size: an index-0 object of size 0, which is what a zero-filled collection
holds, never advances it, and HDF5 spins for ever holding the GIL (no timeout, no signal
handler, no other Python thread runs). A power loss can leave such zeros in a file being
written; bit rot can put them anywhere.

:func:`looping_collections` finds such collections with a scan of the file's bytes (about
0.6 s per GB from the page cache): every ``GCOL`` signature of version 1 (HDF5 checks
nothing more) with a size that fits the file, walked as HDF5 walks it. It reports only the
collections on which that walk would not advance (an object of size 0) or would step
backwards (a size that wraps the pointer): the hangs. A walk that runs past the end is
HDF5's own error, and signatures inside a sound collection (in a string, say) are its
objects' bytes, not collections. Signatures in raw data (a string PV's bytes in a live
file's pool) cannot be told apart here; :func:`recorder.sinks.h5open.check_heap` drops
those that lie in a dataset's storage. Pure code: no h5py.
"""

from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from recorder.sinks.superblock import SIGNATURE

__all__ = ["HeapLoop", "looping_collections"]

WINDOW: Final = 1 << 20  # bytes read at a time
_COLLECTION: Final = b"GCOL\x01"  # signature, version 1 (HDF5 skips the 3 reserved bytes)
_ALIGN: Final = 8  # H5HG_ALIGNMENT
_SIZE_T: Final = 1 << 64
_BACKWARDS: Final = _SIZE_T - (1 << 48)  # a step this large wraps any user-space pointer
# an object's header by the file's size of lengths: index, (references, reserved), size
_OBJECT_HEADERS: Final = {n: struct.Struct(f"<H6x{c}") for n, c in ((2, "H"), (4, "I"), (8, "Q"))}


@dataclass(frozen=True, slots=True)
class HeapLoop:
    """A collection HDF5 would loop on: where it starts and where its walk stops."""

    collection: int  # byte offset of its "GCOL" signature in the file
    object: int  # byte offset of the object header the walk cannot pass
    size: int  # that object's size field
    backwards: bool = False  # the size wraps HDF5's pointer backwards (else: size 0)

    def describe(self) -> str:
        what = ("which sends HDF5's parser backwards (it loops for ever or reads outside the "
                "collection)" if self.backwards else "on which HDF5 loops for ever")
        return (f"damaged global-heap collection at byte {self.collection}: its object at "
                f"byte {self.object} has size {self.size}, {what}")


_OVERRUN: Final = HeapLoop(-1, -1, -1)  # _walk: the walk runs past the end (HDF5's error)


def length_size(head: bytes) -> int:
    """The "size of lengths" of a version 2/3 superblock (8 unless the file says otherwise)."""
    if head[:8] == SIGNATURE and len(head) >= 11 and head[8] in (2, 3) \
            and head[10] in (2, 4, 8):
        return head[10]
    return 8


def looping_collections(path: str | os.PathLike[str]) -> list[HeapLoop]:
    """The global-heap collections of the file at ``path`` that HDF5 would loop on for ever
    (see the module docstring); ``[]`` for a sound file. Raises OSError when it cannot be
    read. Reads the file in :data:`WINDOW` pieces (no mmap: mapped pages count in the
    process's memory, which finalizing a leftover keeps bounded)."""
    fd = os.open(Path(path), os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size < len(_COLLECTION):
            return []
        with contextlib.suppress(AttributeError, OSError):  # the kernel's read-ahead
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return _scan(fd, size, length_size(os.pread(fd, 11, 0)))
    finally:
        os.close(fd)


class _Reader:
    """Forward reads through one buffer of about :data:`WINDOW` bytes."""

    __slots__ = ("data", "fd", "start")

    def __init__(self, fd: int) -> None:
        self.fd, self.start, self.data = fd, 0, b""

    def at(self, offset: int, n: int) -> tuple[bytes, int]:
        """A buffer holding bytes ``offset .. offset + n`` (fewer at the end of the file)
        and the position of ``offset`` in it."""
        pos = offset - self.start
        if pos < 0 or pos + n > len(self.data):
            self.data = os.pread(self.fd, max(WINDOW, n), offset)
            self.start, pos = offset, 0
        return self.data, pos


def _scan(fd: int, file_size: int, lsize: int) -> list[HeapLoop]:
    found: list[HeapLoop] = []
    sound_until = 0  # the end of the last sound collection: what lies inside is its objects
    walker = _Reader(fd)
    step = WINDOW - len(_COLLECTION) + 1  # windows overlap by a signature less one byte
    for base in range(0, file_size, step):
        window = os.pread(fd, WINDOW, base)
        last = base + step >= file_size  # else hits past step are the next window's
        i = window.find(_COLLECTION)
        while i >= 0 and (i < step or last):
            at = base + i
            head, pos = walker.at(at, 8 + lsize)
            csize = int.from_bytes(head[pos + 8 : pos + 8 + lsize], "little")
            if at >= sound_until and 2 * (8 + lsize) <= csize <= file_size - at:
                loop = _walk(walker, at, csize, lsize)
                if loop is None:
                    sound_until = at + csize
                elif loop is not _OVERRUN:
                    found.append(loop)
            i = window.find(_COLLECTION, i + 1)
    return found


def _walk(reader: _Reader, at: int, csize: int, lsize: int) -> HeapLoop | None:
    """The collection at ``at`` walked as HDF5 walks it: None when the walk ends exactly at
    its end (a sound collection), :data:`_OVERRUN` when it runs past it (HDF5 reports an
    error), else where it steps by 0 or backwards. Arithmetic modulo 2**64, as C's size_t.
    The collection's header (H5HG_SIZEOF_HDR: signature, version, reserved, size) and an
    object's (H5HG_SIZEOF_OBJHDR: index, references, reserved, size) are both 8 + lsize."""
    obj_header = 8 + lsize
    unpack = _OBJECT_HEADERS[lsize].unpack_from
    p = at + obj_header
    end = at + csize
    data, start = b"", 0  # the reader's buffer: the file's bytes from start
    while p < end:
        if p + obj_header > end:  # too small for a header: free space, the end
            return None
        pos = p - start
        if pos < 0 or pos + obj_header > len(data):
            data, pos = reader.at(p, obj_header)
            start = p - pos
        idx, osize = unpack(data, pos)
        if idx > 0:  # header + size padded to 8; the free space (index 0) counts its header
            need = (obj_header + (osize + _ALIGN - 1) % _SIZE_T // _ALIGN * _ALIGN) % _SIZE_T
        else:
            need = osize
        if need == 0 or need >= _BACKWARDS:
            return HeapLoop(at, p, osize, backwards=need != 0)
        if p + need > end:
            return _OVERRUN
        p += need
    return None
