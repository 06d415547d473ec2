"""PV structures packed as the gateway packs them, for ``k2eg-recorder replay`` (pure code).

:func:`pack_tree` packs any structure as the gateway's msgpack-c packer does (float32 fields
as float32). A finalized file's rows are packed faster by template (:func:`packed_rows`):
rows that share a metadata entry (the *rest*) and flags differ only in their per-row fields
(value, time, alarm, ...; :func:`~recorder.sinks.codec.row_field_paths`), so the bytes between
those fields are packed once, as a :class:`StructureTemplate`, and each row packs only its
own fields. A template is used only when it gives its first row's bytes exactly as
:func:`pack_tree` of the rebuilt structure does; otherwise (and for rows a template cannot
pack) the row is rebuilt and packed whole.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from recorder.client.values import PVSample
from recorder.reader_rows import StoredRow
from recorder.sim.encoding import Float32, Float32Array, pack
from recorder.sinks.codec import NS_PER_S, row_field_paths

_packb = msgpack.Packer(use_bin_type=True, unicode_errors="surrogateescape").pack


def packb(value: Any) -> bytes:
    """``value`` packed by msgpack-python, which packs as msgpack-c does (smallest integers,
    str8, float64), in C."""
    return bytes(_packb(value))


def map_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x80 | n,))
    if n < 0x10000:
        return b"\xde" + n.to_bytes(2, "big")
    return b"\xdf" + n.to_bytes(4, "big")


def relative_paths(paths: frozenset[str], key: str) -> frozenset[str]:
    """The float32 ``paths`` within the field ``key`` of their structure, relative to it
    (``""``: the field itself)."""
    prefix = f"{key}."
    return frozenset("" if p == key else p[len(prefix):] for p in paths
                     if p == key or p.startswith(prefix))


def pack_leaf(value: Any, float32: bool) -> bytes:
    """A field packed as the gateway packs it: as float32 when the gateway sent it so
    (``float32``: a float, or a list of floats), else by msgpack-python."""
    if float32:
        if isinstance(value, float):
            return pack(Float32(value))
        if isinstance(value, list) and value and all(type(x) is float for x in value):
            return pack(Float32Array(value))
    return packb(value)


def pack_tree(value: Any, paths: frozenset[str]) -> bytes:
    """``value`` packed as the gateway packs it, the float32 ``paths`` within it (relative,
    ``""`` = ``value`` itself) as float32. Only float32 needs our own packer."""
    if not paths:
        return packb(value)
    if "" in paths or not isinstance(value, Mapping):
        return pack_leaf(value, "" in paths)
    parts = [map_header(len(value))]
    for key, item in value.items():
        parts.append(packb(key))
        parts.append(pack_tree(item, relative_paths(paths, key)))
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class PackedStructure:
    """A PV's structure already packed (the bytes that follow its name in a data message)."""

    pv: str
    packed: bytes


_FIELD_OF: dict[str, Callable[[StoredRow], Any]] = {
    "seconds": lambda r: r.time // NS_PER_S,
    "nanoseconds": lambda r: r.time % NS_PER_S,
    "user_tag": lambda r: r.user_tag,
    "unique_id": lambda r: r.unique_id,
    "data_seconds": lambda r: r.data_time // NS_PER_S,
    "data_nanoseconds": lambda r: r.data_time % NS_PER_S,
    "severity": lambda r: r.severity,
    "status": lambda r: r.status,
    "message": lambda r: r.message,
    "value": lambda r: r.value,
}
"""Each per-row field from a stored row, as :func:`~recorder.sinks.codec.rebuild_data`
computes it (``divmod`` of the time)."""


@dataclass(frozen=True, slots=True)
class StructureTemplate:
    """The packed bytes of a structure around its per-row fields: ``segments[0]``, field 0,
    ``segments[1]``, field 1, ..., ``segments[-1]``."""

    segments: tuple[bytes, ...]
    fields: tuple[tuple[Callable[[StoredRow], Any], bool], ...]  # (getter, float32)

    def pack(self, row: StoredRow) -> bytes:
        segments = self.segments
        out = [segments[0]]
        for (get, float32), segment in zip(self.fields, segments[1:], strict=True):
            out.append(pack_leaf(get(row), float32) if float32 else packb(get(row)))
            out.append(segment)
        return b"".join(out)

    @classmethod
    def of(cls, row: StoredRow, data: Mapping[str, Any]) -> StructureTemplate | None:
        """The template of the rows sharing ``row``'s rest and flags (``data``: ``row``'s
        rebuilt structure), or None when it would not give ``row``'s bytes exactly."""
        fields = row_field_paths(row.rest, flags=row.flags, kind=row.kind)
        at = {path: i for i, (path, _name) in enumerate(fields)}
        for p in row.f32:  # float32 fields inside a per-row field (an NTTable's columns)
            parts = tuple(p.split("."))
            if any(parts[: len(path)] == path and parts != path for path in at):
                return None
        segments: list[bytes] = []
        order: list[tuple[Callable[[StoredRow], Any], bool]] = []
        current = bytearray()

        def walk(node: Mapping[str, Any], path: tuple[str, ...], paths: frozenset[str]) -> None:
            current.extend(map_header(len(node)))
            for key, item in node.items():
                current.extend(packb(key))
                sub = (*path, key)
                inner = relative_paths(paths, key)
                if sub in at:
                    segments.append(bytes(current))
                    current.clear()
                    order.append((_FIELD_OF[fields[at[sub]][1]], "" in inner))
                elif isinstance(item, Mapping) and any(p[: len(sub)] == sub for p in at):
                    walk(item, sub, inner)
                else:
                    current.extend(pack_tree(item, inner))

        try:
            walk(data, (), row.f32)
        except (TypeError, OverflowError, ValueError):  # the whole-structure path says how
            return None
        segments.append(bytes(current))
        if len(order) != len(fields):  # a field not where rebuild_data puts it
            return None
        template = cls(tuple(segments), tuple(order))
        try:
            exact = template.pack(row) == pack_tree(data, row.f32)
        except (TypeError, OverflowError, ValueError):
            return None
        return template if exact else None


_UNSEEN = object()


def packed_rows(rows: Sequence[StoredRow], pv: str) -> list[PVSample | PackedStructure]:
    """``rows`` of ``pv`` ready for a data message: packed by template where one fits (rows
    sharing a rest and flags), else the rebuilt sample (packed whole when sent)."""
    out: list[PVSample | PackedStructure] = []
    rest: Any = None
    templates: dict[tuple[int, int], Any] = {}  # by (flags, kind), for the rest in effect
    for row in rows:
        if row.rest is not rest:
            rest = row.rest
            templates = {}
        key = (row.flags, row.kind)
        template = templates.get(key, _UNSEEN)
        if template is _UNSEEN:
            sample = row.sample(pv)
            template = templates[key] = StructureTemplate.of(row, sample.data)
            out.append(sample if template is None else PackedStructure(pv, template.pack(row)))
            continue
        if template is not None:
            try:
                out.append(PackedStructure(pv, template.pack(row)))
                continue
            except (TypeError, OverflowError, ValueError):
                pass  # this row's value: packed whole (as the gateway could not have sent it)
        out.append(row.sample(pv))
    return out
