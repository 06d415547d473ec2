"""recorder.sinks.globalheap: the global-heap collections HDF5 would loop on, from bytes.

The collections are built here as the HDF5 file format specification lays them out (version 1
collection, 8-byte lengths unless the superblock says otherwise); the real files' case (a
leftover's first collection zero-filled, each tool refusing it) is
tests/integration/test_catalog_ls.py::test_a_heap_hdf5_loops_on_is_refused_not_hung_on.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from recorder.sinks.globalheap import length_size, looping_collections

SUPERBLOCK_V2 = b"\x89HDF\r\n\x1a\n" + bytes([2, 8, 8, 0])  # version 2, offsets 8, lengths 8


def obj(idx: int, data: bytes, *, lsize: int = 8, size: int | None = None) -> bytes:
    """An object: index, references (1), reserved, size, data padded to 8."""
    n = len(data) if size is None else size
    pad = -len(data) % 8
    return struct.pack("<HH4x", idx, 1) + n.to_bytes(lsize, "little") + data + bytes(pad)


def collection(objects: list[bytes], total: int = 4096, *, lsize: int = 8,
               free: bool = True) -> bytes:
    """"GCOL", version 1, reserved, size, the objects, then the free-space object (index 0,
    its size counting its own header) filling the rest."""
    head = b"GCOL\x01\x00\x00\x00" + total.to_bytes(lsize, "little")
    body = b"".join(objects)
    rest = total - len(head) - len(body)
    if free and rest >= 8 + lsize:
        body += struct.pack("<HH4x", 0, 0) + rest.to_bytes(lsize, "little")
        body += bytes(rest - 8 - lsize)
    out = head + body
    return out + bytes(total - len(out))


def write(tmp_path: Path, *parts: bytes) -> Path:
    path = tmp_path / "f.h5"
    path.write_bytes(SUPERBLOCK_V2 + bytes(100) + b"".join(parts) + bytes(64))
    return path


def test_sound_collections_are_not_reported(tmp_path: Path) -> None:
    one = collection([obj(1, b"run name"), obj(2, b"x" * 13), obj(7, b"")])
    full = collection([obj(1, b"y" * (4096 - 16 - 16))], free=False)  # no free space
    tail = collection([obj(1, b"z" * (4096 - 16 - 16 - 8))])  # 8 bytes left: too small
    assert looping_collections(write(tmp_path, one, full, tail)) == []


def test_a_zero_filled_collection_is_found_with_its_position(tmp_path: Path) -> None:
    good = collection([obj(1, b"ok")])
    zeroed = b"GCOL\x01\x00\x00\x00" + (4096).to_bytes(8, "little") + bytes(4096 - 16)
    path = write(tmp_path, good, zeroed, good)
    at = 8 + 4 + 100 + 4096
    (loop,) = looping_collections(path)
    assert (loop.collection, loop.object, loop.size) == (at, at + 16, 0)
    assert loop.describe() == (f"damaged global-heap collection at byte {at}: its object at "
                               f"byte {at + 16} has size 0, on which HDF5 loops for ever")


def test_objects_zeroed_after_good_ones_and_a_wrapping_size_are_found(
    tmp_path: Path
) -> None:
    head = collection([obj(1, b"a" * 20), obj(2, b"b" * 3)])
    cut = 16 + len(obj(1, b"a" * 20))  # the second object's header onwards zeroed
    zero_mid = head[:cut] + bytes(len(head) - cut)
    wraps = collection([obj(1, b"c"), obj(0, b"", size=(1 << 64) - 32)])
    path = write(tmp_path, zero_mid, wraps)
    first, second = looping_collections(path)
    base = 8 + 4 + 100
    assert (first.collection, first.object, first.size) == (base, base + cut, 0)
    assert second.collection == base + 4096 and second.size == (1 << 64) - 32


@pytest.mark.parametrize("variant", ["version", "too-big", "too-small"])
def test_signatures_that_are_not_collections_are_ignored(tmp_path: Path,
                                                          variant: str) -> None:
    """"GCOL" in data (a string value, compressed bytes) is a collection only with version
    1 and a size that fits the file."""
    zeroed = bytearray(b"GCOL\x01\x00\x00\x00" + (4096).to_bytes(8, "little") + bytes(4080))
    if variant == "version":
        zeroed[4] = 2
    elif variant == "too-big":
        zeroed[8:16] = (1 << 40).to_bytes(8, "little")
    else:
        zeroed[8:16] = (16).to_bytes(8, "little")
    assert looping_collections(write(tmp_path, bytes(zeroed))) == []


def test_reserved_bytes_are_not_checked_as_hdf5_does_not(tmp_path: Path) -> None:
    """HDF5 reads a collection whatever its 3 reserved bytes hold: one changed byte there
    must not hide a zero-filled collection (it did)."""
    zeroed = bytearray(b"GCOL\x01\x00\x00\x00" + (4096).to_bytes(8, "little") + bytes(4080))
    zeroed[6] = 1
    (loop,) = looping_collections(write(tmp_path, bytes(zeroed)))
    assert loop.collection == 8 + 4 + 100 and not loop.backwards


def test_a_signature_inside_a_sound_collection_is_its_data(tmp_path: Path) -> None:
    """A string whose bytes look like a zero-filled collection, stored in a sound one (the
    way a finalized file keeps string values): not reported."""
    fake = b"GCOL\x01\x00\x00\x00" + (64).to_bytes(8, "little") + bytes(48)
    path = write(tmp_path, collection([obj(1, b"before"), obj(2, fake), obj(3, b"after")]))
    assert looping_collections(path) == []
    alone = write(tmp_path, fake + bytes(64))  # the same bytes outside any collection
    assert len(looping_collections(alone)) == 1


@pytest.mark.parametrize(("size", "found"), [
    ((1 << 64) - 20, True),  # wraps the pointer 20 bytes back: HDF5 walks in a circle
    ((1 << 64) - 1, True),  # wraps 1 byte back (HDF5 then reads a garbage header)
    (1 << 63, False),  # past the end: HDF5's "ran off end of input buffer" error
    (4096 * 4, False),  # past the end too
])
def test_free_space_sizes_that_step_backwards(tmp_path: Path, size: int, found: bool) -> None:
    heap = collection([obj(1, b"c"), obj(0, b"", size=size)])
    loops = looping_collections(write(tmp_path, heap))
    assert bool(loops) is found, loops
    if found:
        assert loops[0].backwards and "backwards" in loops[0].describe()


def test_lengths_of_4_bytes_from_the_superblock(tmp_path: Path) -> None:
    head = SUPERBLOCK_V2[:10] + bytes([4]) + SUPERBLOCK_V2[11:]
    assert length_size(head) == 4 and length_size(SUPERBLOCK_V2) == 8
    assert length_size(b"not hdf5 at all") == 8
    good = collection([obj(1, b"four", lsize=4)], lsize=4)
    zeroed = b"GCOL\x01\x00\x00\x00" + (4096).to_bytes(4, "little") + bytes(4084)
    path = tmp_path / "f4.h5"
    path.write_bytes(head + bytes(100) + good + zeroed)
    (loop,) = looping_collections(path)
    assert loop.collection == 12 + 100 + 4096 and loop.object == loop.collection + 12


def test_empty_and_tiny_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"GCOL")
    assert looping_collections(empty) == [] and looping_collections(tiny) == []
    with pytest.raises(OSError):
        looping_collections(tmp_path / "missing")


@pytest.mark.parametrize("window", [16, 37, 100, 4096, 5000])
def test_windows_of_any_size_find_the_same(tmp_path: Path, window: int,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is read in windows (not mapped): signatures across a window's edge and
    collections longer than a window are found as in one read."""
    from recorder.sinks import globalheap

    fake = b"GCOL\x01\x00\x00\x00" + (64).to_bytes(8, "little") + bytes(48)
    zeroed = b"GCOL\x01\x00\x00\x00" + (4096).to_bytes(8, "little") + bytes(4080)
    path = write(tmp_path, collection([obj(1, b"x" * 300), obj(2, fake)]), zeroed,
                 collection([obj(i, b"y" * 40) for i in range(1, 60)]), zeroed, fake)
    whole = looping_collections(path)
    assert [loop.collection for loop in whole] == [112 + 4096, 112 + 3 * 4096, 112 + 4 * 4096]
    monkeypatch.setattr(globalheap, "WINDOW", window)
    assert looping_collections(path) == whole
