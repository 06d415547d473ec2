"""What the final layout takes from a PV's metadata entry (the PV structure around its value,
as JSON): the display / control / valueAlarm fields and enum choices, as attributes of ``value``
and as ``/pv_info`` columns, and the shape of NTNDArray images.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from recorder.client.values import replace_surrogates
from recorder.sinks.codec import decode_rest
from recorder.sinks.final_layout import META_ATTRS

INFO_STR = ("units", "description", "format")  # /pv_info string columns from META_ATTRS


def _attr_value(value: Any) -> Any:
    if isinstance(value, str):
        return hdf5_text(value)
    if isinstance(value, (bool, int, float)):
        return value
    return json.dumps(value, default=str)


def hdf5_text(value: str) -> str:
    """``value`` as an HDF5 UTF-8 string can hold it, for the descriptive copies of metadata
    text (attributes, ``/pv_info`` columns): bytes that were not UTF-8 (the client keeps them
    as lone surrogates, e.g. a Latin-1 ``°C``) and NUL, where HDF5 strings end, become
    U+FFFD. The metadata JSON keeps the text exactly."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    return replace_surrogates(value)


def first_metadata(raw: bytes) -> dict[str, Any]:
    """The structure (``d``) of a metadata entry, enough to read units, limits and choices
    (plain JSON: tagged values are decoded only where they are used)."""
    try:
        top = json.loads(raw.decode("utf-8"))
    except ValueError:
        return {}
    d = top.get("d") if isinstance(top, dict) else None
    if not isinstance(d, dict):
        return {}
    if "__map__" in d:  # keys that JSON cannot hold: decode the tags
        d = decode_rest(raw).get("d", {})
    return d if isinstance(d, dict) else {}


def _untag(value: Any) -> Any:
    if isinstance(value, dict) and len(value) == 1 and "__float__" in value:
        return float(value["__float__"])
    return value


def _metadata_fields(d: Mapping[str, Any]) -> dict[str, Any]:
    """META_ATTRS present in a structure, and enum choices."""
    out: dict[str, Any] = {}
    for attr, (group, key) in META_ATTRS.items():
        sub = d.get(group)
        if type(sub) is dict and sub.get(key) is not None:  # (decoded JSON: plain dicts)
            out[attr] = _untag(sub[key])
    value = d.get("value")
    if type(value) is dict and isinstance(value.get("choices"), list):
        out["choices"] = [str(c) for c in value["choices"]]  # exact: /pv_info's JSON
    return out


def value_attrs(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes of the ``value`` dataset (from :func:`_metadata_fields`): ``units`` and
    (enums) ``choices``."""
    out: dict[str, Any] = {}
    if "units" in fields:
        out["units"] = str(_attr_value(fields["units"]))
    if "choices" in fields:
        out["choices"] = [hdf5_text(c) for c in fields["choices"]]
    return out


def info_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The /pv_info columns from the first metadata (:func:`_metadata_fields`): strings
    ``""`` and numbers NaN when absent (non-numbers too; the JSON keeps them exactly)."""
    out: dict[str, Any] = {}
    for attr in META_ATTRS:
        v = fields.get(attr)
        if attr in INFO_STR:
            out[attr] = "" if v is None else str(_attr_value(v))
        elif isinstance(v, (int, float)):
            try:
                out[attr] = float(v)
            except OverflowError:
                out[attr] = float("nan")
        else:
            out[attr] = float("nan")
    choices = fields.get("choices")
    out["choices"] = json.dumps(choices) if choices is not None else ""
    return out


def _image_shape(rest: Mapping[str, Any], size: int) -> tuple[int, ...]:
    dims = rest["d"].get("dimension")
    sizes: list[int] = []
    if isinstance(dims, list):
        for dim in dims:
            if isinstance(dim, Mapping):
                s = dim.get("size", 0)
                sizes.append(int(s) if isinstance(s, int) else 0)
    shape = tuple(reversed(sizes))
    if shape and int(np.prod(shape)) == size:
        return shape
    return (size,)
