"""The HDF5 superblock, pure Python: clear its file-consistency flags (what ``h5clear -s``
does), read the end-of-file address it records.

A writer killed while a file is open for (SWMR) writing leaves "file is open for write"
flags in a version 2/3 superblock, and HDF5 then refuses a normal open ("may use <h5clear
file>"). ``recover`` clears them with this module so it needs neither h5clear nor a private
HDF5 property. The checksum is Bob Jenkins' lookup3 ``hashlittle`` as used by HDF5.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

SIGNATURE = b"\x89HDF\r\n\x1a\n"
_M = 0xFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M


def lookup3(data: bytes, initval: int = 0) -> int:
    """HDF5's ``H5_checksum_lookup3``."""
    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & _M
    i = 0
    while length > 12:
        a = (a + int.from_bytes(data[i : i + 4], "little")) & _M
        b = (b + int.from_bytes(data[i + 4 : i + 8], "little")) & _M
        c = (c + int.from_bytes(data[i + 8 : i + 12], "little")) & _M
        a = (a - c) & _M; a ^= _rot(c, 4); c = (c + b) & _M  # noqa: E702
        b = (b - a) & _M; b ^= _rot(a, 6); a = (a + c) & _M  # noqa: E702
        c = (c - b) & _M; c ^= _rot(b, 8); b = (b + a) & _M  # noqa: E702
        a = (a - c) & _M; a ^= _rot(c, 16); c = (c + b) & _M  # noqa: E702
        b = (b - a) & _M; b ^= _rot(a, 19); a = (a + c) & _M  # noqa: E702
        c = (c - b) & _M; c ^= _rot(b, 4); b = (b + a) & _M  # noqa: E702
        length -= 12
        i += 12
    if length == 0:
        return c
    for j, byte in enumerate(data[i : i + length]):
        if j < 4:
            a += byte << (8 * j)
        elif j < 8:
            b += byte << (8 * (j - 4))
        else:
            c += byte << (8 * (j - 8))
    a &= _M
    b &= _M
    c &= _M
    c ^= b; c = (c - _rot(b, 14)) & _M  # noqa: E702
    a ^= c; a = (a - _rot(c, 11)) & _M  # noqa: E702
    b ^= a; b = (b - _rot(a, 25)) & _M  # noqa: E702
    c ^= b; c = (c - _rot(b, 16)) & _M  # noqa: E702
    a ^= c; a = (a - _rot(c, 4)) & _M  # noqa: E702
    b ^= a; b = (b - _rot(a, 14)) & _M  # noqa: E702
    c ^= b; c = (c - _rot(b, 24)) & _M  # noqa: E702
    return c


def consistency_flags(path: Path) -> int:
    """The superblock's consistency flags (0 = clean); raises ValueError if not v2/v3."""
    with open(path, "rb") as fh:
        head = fh.read(12)
    if head[:8] != SIGNATURE or head[8] not in (2, 3):
        raise ValueError(f"{path}: not an HDF5 file with a version 2/3 superblock at offset 0")
    return head[11]


def stored_eof(path: Path) -> int | None:
    """The end-of-file address a version 2/3 superblock records (plus its base address):
    the size the file must at least have. None when the file has no such superblock."""
    with open(path, "rb") as fh:
        head = fh.read(12 + 3 * 8)
    if len(head) < 12 or head[:8] != SIGNATURE or head[8] not in (2, 3):
        return None
    size_off = head[9]
    if size_off not in (2, 4, 8) or len(head) < 12 + 3 * size_off:
        return None
    base = int.from_bytes(head[12 : 12 + size_off], "little")
    eof = int.from_bytes(head[12 + 2 * size_off : 12 + 3 * size_off], "little")
    return eof - base


def superblock_only(path: Path) -> bool:
    """Whether the file is a version 2/3 superblock (its checksum right) and nothing else,
    while the superblock names a larger file: what HDF5 writes when it creates a file,
    before anything else reaches the disk (a writer killed then left it)."""
    sb = superblock_bytes(path)
    if not sb or len(sb) != 16 + 4 * sb[9] or path.stat().st_size != len(sb):
        return False
    if not _checksum_ok(sb):
        return False
    need = stored_eof(path)
    return need is not None and need > len(sb)


def clear_consistency_flags(path: Path) -> bytes | None:
    """Set the flags to 0 and fix the checksum; returns the superblock as it was when
    something changed (for :func:`restore_superblock`), else None."""
    original = superblock_bytes(path)
    if not original:
        raise ValueError(f"{path}: not an HDF5 file with a version 2/3 superblock")
    if not _checksum_ok(original):
        raise ValueError(f"{path}: superblock checksum mismatch")
    body_len = len(original) - 4
    if original[11] == 0:
        return None
    body = bytearray(original)
    body[11] = 0
    body[body_len:] = struct.pack("<I", lookup3(bytes(body[:body_len])))
    restore_superblock(path, bytes(body))
    return original


def _checksum_ok(sb: bytes) -> bool:
    """Whether a version 2/3 superblock's last 4 bytes are the lookup3 of the rest."""
    body_len = len(sb) - 4
    (stored,) = struct.unpack("<I", sb[body_len:])
    return lookup3(sb[:body_len]) == int(stored)


def superblock_bytes(path: Path) -> bytes:
    """A version 2/3 superblock as it is on disk (what :func:`restore_superblock` takes), or
    ``b""`` when the file has none."""
    with open(path, "rb") as f:
        head = f.read(12)
        if head[:8] != SIGNATURE or len(head) < 12 or head[8] not in (2, 3):
            return b""
        return head + f.read(4 * head[9] + 4)


def restore_superblock(path: Path, original: bytes) -> None:
    """Write the superblock ``original`` at the start of the file and sync it: the cleared
    one, or the one :func:`clear_consistency_flags` returned (the file was not recovered:
    it stays byte for byte as it was)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, original, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
