"""Low-level HDF5 helpers of the final layout: every per-PV object goes through h5py's
low-level API (h5py's high-level calls cost 2x more per object). Property lists without object
timestamps (smaller, reproducible files), cached HDF5 types and dataspaces, groups and
attributes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np
from h5py import h5a, h5d, h5g, h5p, h5s, h5t

from recorder.sinks.final_layout import STR

_STR_TID = h5t.py_create(STR, logical=True)
_SCALAR_SPACE = h5s.create(h5s.SCALAR)


def _plist(cls: Any, layout: int | None = None) -> Any:
    plist = h5p.create(cls)
    plist.set_obj_track_times(False)  # no timestamps in object headers: smaller, reproducible
    if layout is not None:
        plist.set_layout(layout)
    return plist


_GCPL = _plist(h5p.GROUP_CREATE)
_DCPL_COMPACT = _plist(h5p.DATASET_CREATE, h5d.COMPACT)
_DCPL_CONTIGUOUS = _plist(h5p.DATASET_CREATE, h5d.CONTIGUOUS)
_OCPYPL = h5p.create(h5p.OBJECT_COPY)
_OBJ_MTID = h5t.py_create(np.dtype(object))  # memory type of str objects (vlen strings)
_TIDS: dict[str, Any] = {}


def _tid(dtype: np.dtype[Any], h5dtype: np.dtype[Any] | None = None) -> Any:
    """The HDF5 type of ``dtype`` (``h5dtype``: an enum or string type to store instead)."""
    if h5dtype is not None:
        return h5t.py_create(h5dtype, logical=True)
    if dtype.kind in "OST":
        return _STR_TID
    tid = _TIDS.get(dtype.str)
    if tid is None:
        tid = _TIDS[dtype.str] = h5t.py_create(dtype, logical=True)
    return tid


_SPACES: dict[tuple[int, ...], Any] = {}


def _space(shape: tuple[int, ...]) -> Any:
    """A simple dataspace of ``shape`` (cached: the same few shapes recur for every PV)."""
    sid = _SPACES.get(shape)
    if sid is None:
        if len(_SPACES) > 1024:
            _SPACES.clear()
        sid = _SPACES[shape] = h5s.create_simple(shape)
    return sid


def _hl(oid: Any) -> h5py.HLObject:
    return h5py.Dataset(oid) if isinstance(oid, h5d.DatasetID) else h5py.Group(oid)


def create_group(parent: Any, name: str) -> Any:
    """A group (low-level id) under the group id ``parent``, without object timestamps."""
    return h5g.create(parent, name.encode(), None, _GCPL)


def set_attrs(obj: Any, attrs: Mapping[str, Any]) -> None:
    """Write attributes on an object (h5py object or low-level id): str/int/float and lists of
    str through the low-level API, the rest through h5py."""
    oid = obj.id if isinstance(obj, h5py.HLObject) else obj
    for name, v in attrs.items():
        key = name.encode()
        if isinstance(v, str):
            h5a.create(oid, key, _STR_TID, _SCALAR_SPACE).write(np.array(v, dtype=STR))
        elif isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63:
            h5a.create(oid, key, h5t.STD_I64LE, _SCALAR_SPACE).write(np.array(v, np.int64))
        elif isinstance(v, float):
            h5a.create(oid, key, h5t.IEEE_F64LE, _SCALAR_SPACE).write(np.array(v, np.float64))
        elif isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            h5a.create(oid, key, _STR_TID, h5s.create_simple((len(v),))).write(
                np.array(v, dtype=STR))
        elif isinstance(v, list) and all(isinstance(x, str) for x in v):
            _hl(oid).attrs.create(name, v, dtype=STR)
        else:
            _hl(oid).attrs[name] = v
