"""What :meth:`recorder.reader.RecordingFile.summary` works out for a PV beyond what /pv_info
says: the EPICS times of its first and last rows, the live row that gives the kind and dtype
finalization will give it, the shape of a live string-array or table PV's values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from recorder.client.values import TableValue
from recorder.sinks.codec import F_TIME, F_VALUE
from recorder.sinks.final_layout import K_ARRAY, typing_rows
from recorder.sinks.final_metadata import _image_shape, first_metadata


def _first_last_time(times: Any, flags: Any, n: int) -> dict[str, int | None]:
    """``first_ns``/``last_ns`` of :meth:`RecordingFile.summary` from a PV's ``n`` rows:
    ``times`` and ``flags`` are its columns (arrays or datasets: only rows 0 and n - 1 are
    read; ``flags`` an int when every row has the same). A row's time is None when its flag 1
    is clear: the column holds 0 there, which is also the time of a record never processed."""

    def at(row: int) -> int | None:
        row_flags = flags if isinstance(flags, int) else int(flags[row])
        return int(times[row]) if row_flags & F_TIME else None

    return {"first_ns": at(0) if n else None, "last_ns": at(n - 1) if n else None}


def _type_row(s: Mapping[str, npt.NDArray[Any]], rows: npt.NDArray[Any]) -> int:
    """Which of a live PV's sample ``rows`` (in the columns ``s``) gives the PV's kind and
    dtype, as finalization decides them (docs/file-format.md): its first typed value, a
    non-empty one when there is one (an empty waveform is how the client types ``[]``); the
    first row when no row has a typed value. So a PV whose first sample had no value is still
    an enum (a scalar, ...) in :meth:`RecordingFile.summary` of the live file."""
    first = int(rows[0])
    flags, kind = int(s["flags"][first]), int(s["kind"][first])
    if flags & F_VALUE and not (kind == K_ARRAY and s["size"][first] == 0):
        return first  # the usual case: the first row is typed, read no other row
    for candidates in typing_rows(s["flags"][rows], s["kind"][rows], s["size"][rows]):
        hit = np.flatnonzero(candidates)
        if len(hit):
            return int(rows[hit[0]])
    return first


def _extracted_shape(values: npt.NDArray[Any]) -> tuple[int, ...] | None:
    """The shape of one value of a live string-array or table PV, as the final layout's
    ``shape`` dataset gives it: the length of each string array, the number of rows of each
    table (its columns' length); None when it varies."""
    lengths = {
        len(next(iter(v.columns.values()), ())) if isinstance(v, TableValue) else len(v)
        for v in values.tolist()
        if isinstance(v, (TableValue, tuple, list, np.ndarray))
    }
    return (lengths.pop(),) if len(lengths) == 1 else None


def _image_shape_of(s: Mapping[str, npt.NDArray[Any]], rows: npt.NDArray[Any],
                    rests: Iterable[bytes]) -> tuple[int, ...] | None:
    """The shape of every image of a live NTNDArray PV (its sample ``rows`` in the columns
    ``s``; ``rests``: the JSON of each of its metadata entries), as finalization gives it:
    from the ``dimension`` of the row's entry (docs/file-format.md); None when it varies or
    when a row holds no image of the PV's type (the final ``shape`` has zeros there)."""
    sizes = s["size"][rows]
    if not ((sizes == sizes[0]).all() and (s["flags"][rows] & F_VALUE).all()
            and (s["kind"][rows] == s["kind"][rows[0]]).all()
            and (s["dtype"][rows] == s["dtype"][rows[0]]).all()):
        return None
    shape: tuple[int, ...] | None = None
    for raw in rests:
        got = _image_shape({"d": first_metadata(raw)}, int(sizes[0]))
        if shape is not None and got != shape:
            return None
        shape = got
    return shape
