"""What :meth:`recorder.reader.RecordingFile.values` makes of a PV's samples: one numpy array,
one row per value (``values_of``; an enum's indices, ``ENUM_NO_INDEX`` where a sample has
none); the per-segment arrays of a recording joined into one (``join_rows``); a list as a 1-D
object array (``_object_array``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from recorder.client.values import PVSample, ValueKind


def join_rows(parts: list[npt.NDArray[Any]]) -> npt.NDArray[Any]:
    """Per-segment arrays of one PV as one: concatenated when their dtypes and row shapes
    agree (a segment without values does not count, so int64 stays int64), else an object
    array with one entry per row (as :meth:`RecordingFile.values` for varying shapes)."""
    filled = [p for p in parts if len(p)]
    if not filled:
        return parts[0] if parts else np.empty(0)
    if len(filled) == 1:
        return filled[0]
    first = filled[0]
    if first.dtype != object and all(
        p.dtype == first.dtype and p.shape[1:] == first.shape[1:] for p in filled
    ):
        return np.concatenate(filled)
    rows: list[Any] = [row for p in filled for row in p]
    out = np.empty(len(rows), dtype=object)
    for i, row in enumerate(rows):  # one by one: equal-shape rows would broadcast
        out[i] = row
    return out


ENUM_NO_INDEX = -1
"""An enum PV's value (:meth:`RecordingFile.values`, ``by_iteration``, ``table``) where its
sample has no index: no value at all, or an index that is not an integer. Not a valid index,
so it cannot be taken for a choice; the file's ``value`` dataset holds the format's fill, 0
(the first choice), in such a row, with flag 8 clear (docs/file-format.md)."""


def _enum_indices(samples: list[PVSample]) -> npt.NDArray[np.int64] | None:
    """The index of each sample of an enum PV, :data:`ENUM_NO_INDEX` where a sample has none
    (no value, or an NTEnum structure without an integer index: typed as a structure); None
    when a sample holds another kind of value (the PV's type changed)."""
    out = np.empty(len(samples), dtype=np.int64)
    for i, s in enumerate(samples):
        kind, value = s.kind, s.value
        if kind is ValueKind.ENUM:
            out[i] = value.index
        elif kind is ValueKind.NONE or (
                kind is ValueKind.STRUCT and isinstance(value, Mapping) and "index" in value):
            out[i] = ENUM_NO_INDEX
        else:
            return None
    return out


def values_of(samples: list[PVSample]) -> npt.NDArray[Any]:
    """The values of ``samples`` as :meth:`RecordingFile.values` returns them. An enum PV's
    are its indices (int64), :data:`ENUM_NO_INDEX` for a sample without one, whichever
    sample it is (the first one too)."""
    if not samples:
        return np.empty(0)
    kind = samples[0].kind
    vals = [s.value for s in samples]
    if any(s.kind is ValueKind.ENUM for s in samples):
        indices = _enum_indices(samples)
        if indices is not None:
            return indices
    if kind in (ValueKind.SCALAR, ValueKind.BOOL) and all(
        isinstance(v, np.generic) for v in vals
    ):
        out_scalars = np.array(vals)
        # int64 and uint64 (an unsigned PV crossing 2**63), or integers beside floats, meet
        # in float64: kept when it holds every integer exactly, else each value as it was
        # decoded (each integer kind checked in its own dtype: together they would be
        # float64 already)
        if out_scalars.dtype.kind != "f" or all(
                exact_in_float64(np.array([v for v in vals if v.dtype.kind == kind], dtype))
                for kind, dtype in (("i", np.int64), ("u", np.uint64))):
            return out_scalars
    # each image as an array in its shape, whatever the first sample was (no value, say)
    vals = [v.image() if s.kind is ValueKind.NDARRAY and hasattr(v, "image") else v
            for s, v in zip(samples, vals, strict=True)]
    if kind in (ValueKind.ARRAY, ValueKind.NDARRAY):
        shapes = {getattr(v, "shape", None) for v in vals}
        if len(shapes) == 1 and None not in shapes:
            return np.stack(vals)
    out = np.empty(len(vals), dtype=object)
    out[:] = vals
    return out


def _object_array(items: list[Any]) -> npt.NDArray[Any]:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def exact_in_float64(values: npt.NDArray[Any]) -> bool:
    """Whether every integer in ``values`` is exactly a float64 (|v| <= 2**53)."""
    if not len(values):
        return True
    if values.dtype.kind == "u":
        return bool(values.max() <= 2**53)
    return bool(values.max() <= 2**53 and values.min() >= -(2**53))
