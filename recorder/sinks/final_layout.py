"""What the final layout is made of (docs/file-format.md): its format version, the live kind
codes it gives typed columns, its enum and string dtypes, the attributes of its groups and time
columns, the per-sample columns of flagged fields, and the columns of ``/pv_info``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt

from recorder.client.values import ValueKind
from recorder.sinks.buffer import ITERATION_REASONS, ITERATION_STATUS
from recorder.sinks.codec import F_FRAME, F_USER_TAG, F_VALUE, KIND_CODES

STATUS_ENUM = h5py.enum_dtype(ITERATION_STATUS, basetype="u1")
REASON_ENUM = h5py.enum_dtype(
    {(k or "none"): v for k, v in ITERATION_REASONS.items()}, basetype="u1"
)
STR = h5py.string_dtype("utf-8")

K_SCALAR, K_BOOL, K_STRING, K_ENUM = (
    KIND_CODES[ValueKind.SCALAR],
    KIND_CODES[ValueKind.BOOL],
    KIND_CODES[ValueKind.STRING],
    KIND_CODES[ValueKind.ENUM],
)
K_ARRAY, K_NDARRAY = KIND_CODES[ValueKind.ARRAY], KIND_CODES[ValueKind.NDARRAY]
K_STRING_ARRAY, K_TABLE = KIND_CODES[ValueKind.STRING_ARRAY], KIND_CODES[ValueKind.TABLE]
EXTRACTED_AT_FINALIZE = (K_STRING_ARRAY, K_TABLE)  # typed only in the final layout


def typing_rows(flags: npt.NDArray[Any], kinds: npt.NDArray[Any], sizes: npt.NDArray[Any],
                ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Which live sample rows can give a PV its kind and dtype (docs/file-format.md):
    (preferred, typed). Typed rows have a typed value (flag 8) or one typed only at
    finalization (string arrays, tables); preferred are the typed ones that are not an empty
    waveform (how the client types ``[]``). A PV takes its first preferred row, else its first
    typed row, else its first row."""
    typed = ((flags & F_VALUE) != 0) | np.isin(kinds, EXTRACTED_AT_FINALIZE)
    return typed & ~((kinds == K_ARRAY) & (sizes == 0)), typed


# display / control / valueAlarm fields copied to PV attributes
META_ATTRS: dict[str, tuple[str, str]] = {
    "units": ("display", "units"),
    "precision": ("display", "precision"),
    "description": ("display", "description"),
    "format": ("display", "format"),
    "display_limit_low": ("display", "limitLow"),
    "display_limit_high": ("display", "limitHigh"),
    "control_limit_low": ("control", "limitLow"),
    "control_limit_high": ("control", "limitHigh"),
    "control_min_step": ("control", "minStep"),
    "alarm_low_alarm_limit": ("valueAlarm", "lowAlarmLimit"),
    "alarm_low_warning_limit": ("valueAlarm", "lowWarningLimit"),
    "alarm_high_warning_limit": ("valueAlarm", "highWarningLimit"),
    "alarm_high_alarm_limit": ("valueAlarm", "highAlarmLimit"),
    "alarm_hysteresis": ("valueAlarm", "hysteresis"),
}
TIME_ATTRS = {"units": "ns", "start": "1970-01-01T00:00:00Z"}
FORMAT_VERSION = "5.1"
"""format_version of both layouts (docs/file-format.md; 3.0 changed the final layout only,
4.0 added the per-sample columns of user tags and NTNDArray frame ids and times, decision
0009; 5.0 made the PV groups plain NXlogs, decision 0011: final layout only; 5.1 gave
/kafka/time its units and the /kafka columns the storage rule of the others)."""
FORMAT_MAJOR = int(FORMAT_VERSION.split(".", 1)[0])
"""The newest major ``format_version`` this version writes, reads, verifies and recovers."""


def format_major(version: str) -> int | None:
    """The major number of a ``format_version`` ("5.1" -> 5); None when it is not
    MAJOR.MINOR with ASCII digits (the reader, ``verify`` and ``recover`` refuse it alike)."""
    major, dot, minor = version.partition(".")
    if not (dot and major.isascii() and major.isdigit() and minor.isascii()
            and minor.isdigit()):
        return None
    return int(major)


FLAGGED_COLUMNS: dict[int, tuple[tuple[str, np.dtype[Any], Mapping[str, Any] | None], ...]] = {
    F_USER_TAG: (("user_tag", np.dtype(np.int32), None),),
    F_FRAME: (("unique_id", np.dtype(np.int32), None),
              ("data_timestamp", np.dtype(np.int64), TIME_ATTRS)),
}
"""Per-row columns of fields taken out under a flag (format 4.0, decision 0009): the flag
-> (dataset, dtype, attributes) each, in the order of the live columns that feed them."""
# /pv_info columns: (name, "s" = vlen UTF-8 string, else a numpy dtype)
PV_INFO_FIELDS: tuple[tuple[str, str], ...] = (
    ("pv_name", "s"), ("group", "s"), ("source", "s"), ("protocol", "s"), ("kind", "s"),
    ("storage_dtype", "s"), ("count", "<i8"), ("flags", "<i2"),
    *((a, "s" if a in ("units", "description", "format") else "<f8") for a in META_ATTRS),
    ("choices", "s"), ("metadata", "s"), ("metadata_entries", "<i8"),
)

NXLOG = {"NX_class": "NXlog"}
