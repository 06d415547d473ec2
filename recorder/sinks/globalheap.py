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
0.4 s per GB from the page cache): every ``GCOL`` signature of version 1 with its reserved
bytes zero and a size that fits the file, walked as HDF5 walks it. It reports only the
collections on which that walk would not advance (size 0, or a size so large the pointer
would wrap): the hangs. Anything else HDF5 reports itself. Pure code: no h5py.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from recorder.sinks.superblock import SIGNATURE

__all__ = ["HeapLoop", "looping_collections"]

_COLLECTION: Final = b"GCOL\x01\x00\x00\x00"  # signature, version 1, 3 reserved bytes
_ALIGN: Final = 8  # H5HG_ALIGNMENT
_WRAPS: Final = 1 << 63  # an object size this large wraps HDF5's pointer (never valid)
# an object's header by the file's size of lengths: index, (references, reserved), size
_OBJECT_HEADERS: Final = {n: struct.Struct(f"<H6x{c}") for n, c in ((2, "H"), (4, "I"), (8, "Q"))}


@dataclass(frozen=True, slots=True)
class HeapLoop:
    """A collection HDF5 would loop on: where it starts and where its walk stops."""

    collection: int  # byte offset of its "GCOL" signature in the file
    object: int  # byte offset of the object header the walk cannot pass
    size: int  # that object's size field

    def describe(self) -> str:
        return (f"damaged global-heap collection at byte {self.collection}: its object at "
                f"byte {self.object} has size {self.size}, on which HDF5 loops for ever")


def length_size(head: bytes) -> int:
    """The "size of lengths" of a version 2/3 superblock (8 unless the file says otherwise)."""
    if head[:8] == SIGNATURE and len(head) >= 11 and head[8] in (2, 3) \
            and head[10] in (2, 4, 8):
        return head[10]
    return 8


def looping_collections(path: str | os.PathLike[str]) -> list[HeapLoop]:
    """The global-heap collections of the file at ``path`` that HDF5 would loop on for ever
    (see the module docstring); ``[]`` for a sound file. Raises OSError when it cannot be
    read."""
    with open(Path(path), "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < len(_COLLECTION):
            return []
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            if hasattr(mmap, "MADV_SEQUENTIAL"):
                mm.madvise(mmap.MADV_SEQUENTIAL)
            return _scan(mm, size, length_size(mm[:11]))


def _scan(mm: mmap.mmap, file_size: int, lsize: int) -> list[HeapLoop]:
    found: list[HeapLoop] = []
    at = mm.find(_COLLECTION)
    while at >= 0:
        csize = int.from_bytes(mm[at + 8 : at + 8 + lsize], "little")
        if 2 * (8 + lsize) <= csize <= file_size - at:  # a header and an object at least
            loop = _walk(mm, at, csize, lsize)
            if loop is not None:
                found.append(loop)
        at = mm.find(_COLLECTION, at + 1)
    return found


def _walk(mm: mmap.mmap, at: int, csize: int, lsize: int) -> HeapLoop | None:
    """The collection at ``at`` walked as HDF5 walks it: where it would stop advancing.
    The collection's header (H5HG_SIZEOF_HDR: signature, version, reserved, size) and an
    object's (H5HG_SIZEOF_OBJHDR: index, references, reserved, size) are both 8 + lsize."""
    obj_header = 8 + lsize
    unpack = _OBJECT_HEADERS[lsize].unpack_from
    p = at + obj_header
    end = at + csize
    while p < end:
        if p + obj_header > end:  # too small for a header: free space, the end
            return None
        idx, osize = unpack(mm, p)
        # the free space (index 0) counts its own header and is not padded
        need = obj_header + (osize + _ALIGN - 1) // _ALIGN * _ALIGN if idx > 0 else osize
        if need == 0 or need >= _WRAPS:
            return HeapLoop(at, p, osize)
        p += need
    return None
