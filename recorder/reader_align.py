"""PVs aligned by iteration: one value per /iterations row picked out of a PV's values by the
XFEL-style first/count index (masked where the iteration has none), and the columns of
``table()`` (``aligned_table``, ``SCALAR_KINDS``).
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

import numpy as np
import numpy.typing as npt

from recorder.client.values import ValueKind
from recorder.reader_values import exact_in_float64

SCALAR_KINDS = (ValueKind.SCALAR.value, ValueKind.BOOL.value, ValueKind.ENUM.value)
"""The kinds of PV (``summary()["kind"]``) ``table()`` takes by default."""


def _scalar_pvs(summary: list[dict[str, Any]]) -> list[str]:
    return [row["pv"] for row in summary if row["kind"] in SCALAR_KINDS]


def _fill_value(dtype: np.dtype[Any]) -> Any:
    if dtype.kind in "fc":
        return np.nan
    return None if dtype.kind == "O" else 0


def _pick(values: npt.NDArray[Any], first: npt.NDArray[np.int64],
          count: npt.NDArray[np.int64], pick: str) -> np.ma.MaskedArray:
    """One value per iteration row out of ``values`` by the XFEL-style index."""
    if pick not in ("first", "last"):
        raise ValueError(f"pick must be 'first' or 'last', not {pick!r}")
    missing = np.asarray(count) <= 0
    if not len(values):  # never a value: all masked
        data = np.full(len(count), np.nan)
        return np.ma.MaskedArray(data, mask=np.ones(len(count), dtype=bool))
    if values.ndim > 1 and 0 in values.shape[1:]:
        # rows of no element (empty waveforms) cannot carry a mask: one object per row, so
        # that an empty array is a value and only iterations without one are masked
        rows_of = np.empty(len(values), dtype=object)
        for i in range(len(values)):
            rows_of[i] = values[i]
        values = rows_of
    rows = np.asarray(first) + (np.asarray(count) - 1 if pick == "last" else 0)
    rows = np.where(missing, 0, rows)
    data = values[rows].copy()
    if missing.any():
        data[missing] = _fill_value(data.dtype)
    mask = np.broadcast_to(missing.reshape((-1,) + (1,) * (data.ndim - 1)), data.shape)
    return np.ma.MaskedArray(data, mask=mask.copy())


def _object_rows(m: np.ma.MaskedArray) -> np.ma.MaskedArray:
    """One object per row (an array, or None where masked; a 1-D column's rows are its
    values as they are, not 0-d arrays: a float, a str)."""
    rows = np.asarray(np.ma.getmaskarray(m).reshape(len(m), -1).all(axis=1))
    out = np.empty(len(m), dtype=object)
    for i in range(len(m)):
        out[i] = None if rows[i] else m.data[i] if m.ndim == 1 else np.asarray(m.data[i])
    return np.ma.MaskedArray(out, mask=rows)


def pv_column(pv: str, fixed: Container[str], pvs: Container[str]) -> str:
    """The table column of PV ``pv``: its name, unless that is one of the ``fixed`` columns
    (``iter_index``, ``status``, ...); then ``pv:`` before it, as often as it takes to name
    neither a fixed column nor one of the other ``pvs`` (so the name does not depend on the
    order of the PVs).

    >>> pv_column("SIM:AI:1", {"status"}, set()), pv_column("status", {"status"}, set())
    ('SIM:AI:1', 'pv:status')
    >>> pv_column("status", {"status"}, {"pv:status"})
    'pv:pv:status'
    """
    name = pv
    while name in fixed or (name != pv and name in pvs):
        name = "pv:" + name
    return name


def aligned_table(iterations: dict[str, npt.NDArray[Any]],
                  columns: dict[str, np.ma.MaskedArray]) -> dict[str, npt.NDArray[Any]]:
    """Columns for a table with one row per iteration: ``iter_index`` (``segment`` too when
    the iterations carry it), ``status``, ``header_timestamp`` (ns), then one column per PV,
    named as the PV; a PV named as one of those columns (``status``, say) is named
    ``pv:status`` instead (:func:`pv_column`), so no column replaces another. A scalar
    column keeps its dtype when every iteration has a value. With gaps (iterations without
    a value of the PV):

    * floats hold NaN there, in their dtype (float32 stays float32);
    * integers become float64 with NaN (as pandas does), exact up to 2**53; a column with an
      integer beyond that (float64 would round it) holds Python ints and None instead;
    * enum indices are integers: float64 with NaN; -1 (:data:`ENUM_NO_INDEX`) stays -1, a
      sample without an index, not a gap;
    * booleans become float64 0.0 / 1.0 with NaN (pandas would make them an object column;
      float64 keeps them numbers: the mean is the fraction of True);
    * strings, waveforms and other values are object columns with None.

    Nothing is lost: every value comes back exactly (``bool(x)``, ``int(x)``). A PV with a
    sample without a value (None in :meth:`RecordingFile.values`: a disconnected scalar,
    say) is an object column, None there and in the gaps."""
    out: dict[str, npt.NDArray[Any]] = {"iter_index": iterations["iter_index"]}
    for key in ("segment", "status", "header_timestamp"):
        if key in iterations:
            out[key] = iterations[key]
    fixed = set(out)
    for name, m in columns.items():
        pv = pv_column(name, fixed, columns)
        missing = np.ma.getmaskarray(m).reshape(len(m), -1).all(axis=1) if len(m) else \
            np.zeros(0, dtype=bool)
        if m.ndim > 1:
            out[pv] = _object_rows(m).data
        elif not missing.any():
            out[pv] = np.asarray(m.data)
        elif m.dtype.kind in "iu" and not exact_in_float64(m.data[~missing]):
            # integers beyond 2**53 would not survive float64: Python ints, None for gaps
            col = np.empty(len(m), dtype=object)
            col[~missing] = [int(v) for v in m.data[~missing]]
            out[pv] = col
        elif m.dtype.kind in "fiub":
            # floats keep their dtype (float32 stays float32); integers (up to 2**53) and
            # booleans become float64 to hold NaN
            numbers = np.array(m.data, dtype=m.dtype if m.dtype.kind == "f" else np.float64)
            numbers[missing] = np.nan
            out[pv] = numbers
        else:
            col = np.asarray(m.data).astype(object)
            col[missing] = None
            out[pv] = col
    return out
