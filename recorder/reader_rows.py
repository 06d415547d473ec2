"""A file's stored rows read back as the client decoded them: a live row's value
(``sample_value``), a final-layout row with the metadata entry in effect (``StoredRow``, which
rebuilds its PVSample), a stored string-array or table row as a list, the trigger tags of an
/iterations row, the name of an NTNDArray PV's frame-time dataset, and a live file's rows
grouped by PV.
"""

from __future__ import annotations

import json
from collections.abc import Container
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from recorder.client.values import PVSample, ValueKind
from recorder.sinks.codec import KINDS_BY_CODE, STRING_DTYPE_CODE, rebuild_data, typed_scalar
from recorder.sinks.livefile import LiveView


def sample_value(
    view: LiveView, s: dict[str, npt.NDArray[Any]], r: int, rest: dict[str, Any]
) -> Any:
    """The Python value of live row ``r`` (columns ``s``) as msgpack decoded it."""
    dcode = int(s["dtype"][r])
    kind = KINDS_BY_CODE[int(s["kind"][r])]
    if dcode == STRING_DTYPE_CODE:
        return view.text(int(s["offset"][r]), int(s["size"][r])).decode("utf-8")
    if kind in (ValueKind.ARRAY, ValueKind.NDARRAY):
        o, z = int(s["offset"][r]), int(s["size"][r])
        return view.pools[dcode][o : o + z].tolist()
    return typed_scalar(dcode, int(s["ival"][r]), float(s["fval"][r]))


class StoredRow(NamedTuple):
    """One stored row of a PV: the metadata entry in effect and the per-row columns."""

    rest: dict[str, Any]
    f32: frozenset[str]
    flags: int
    kind: int
    time: int
    severity: int
    status: int
    value: Any  # the Python value (F_VALUE), as msgpack gave it
    message: str | None  # alarm.message (F_MESSAGE)
    user_tag: int  # timeStamp.userTag (F_USER_TAG)
    unique_id: int  # NTNDArray uniqueId and dataTimeStamp (F_FRAME)
    data_time: int

    def sample(self, pv: str) -> PVSample:
        data = rebuild_data(self.rest, flags=self.flags, kind=self.kind, time_ns=self.time,
                            severity=self.severity, status=self.status, value=self.value,
                            message=self.message, user_tag=self.user_tag,
                            unique_id=self.unique_id, data_time_ns=self.data_time)
        return PVSample(pv, data, self.f32)


def frame_time_name(g: Container[str]) -> str:
    """The dataset of an NTNDArray PV's per-frame ``dataTimeStamp`` (``g``: its group, or
    the names in it): ``data_timestamp`` (5.0; a name ending in ``_time`` is an NXlog
    sub-log to NeXus loaders such as scippnexus, decision 0011), ``data_time`` in 4.x
    files."""
    return "data_timestamp" if "data_timestamp" in g else "data_time"


def _group_index(keys: npt.NDArray[Any], n: int) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """Rows grouped by ``keys`` (0..n-1), in order within a group: ``order[bounds[k] :
    bounds[k + 1]]`` are the rows of key ``k`` (one stable sort instead of a scan per key)."""
    order = np.argsort(keys, kind="stable")
    if len(order) < 2**31:
        order = order.astype(np.int32)
    return order, np.searchsorted(keys[order], np.arange(n + 1))


def _column_items(a: npt.NDArray[Any]) -> list[Any]:
    """A stored row (numeric or vlen UTF-8) as the Python list msgpack had decoded."""
    if a.dtype == object:
        return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in a.tolist()]
    return list(a.tolist())


def _decode_tags(raw: Any) -> dict[str, str]:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    if not text:
        return {}
    loaded = json.loads(text)
    return {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}
