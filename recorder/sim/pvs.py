"""Simulated EPICS PVs: deterministic values in normative-type (NT) structures.

Pure code (no I/O): a PV's value is a function of its update counter ``k`` and of the time of
that update, so the same PV gives the same sample in the simulator and in a test that
recomputes it. Every PV starts with update ``k = 0`` when the simulator starts (like an IOC that
is already running) and then updates every ``period`` seconds.

PV names (the base name, i.e. the URI without ``pva://``/``ca://`` and ``.field``)::

    SIM:<FAMILY>[:<TYPE>][:<ID>][:<OPTION>...]

Families (``<TYPE>`` in brackets is the default):

=================  ==========================================================================
``AI:<T>``         NTScalar number; T = DOUBLE, FLOAT (float32 on the wire), LONG, INT, SHORT,
                   BYTE, ULONG, UINT, USHORT, UBYTE [DOUBLE]. value, alarm (MINOR/MAJOR from
                   valueAlarm limits for DOUBLE/FLOAT), timeStamp, display, control, valueAlarm.
``BI:BOOL``        NTScalar boolean (value, alarm, timeStamp); toggles.
``SI:STRING``      NTScalar string (value, alarm, timeStamp, display); ``"msg-<k>"``.
``MBBI:ENUM``      NTEnum ``value{index, choices}``; index cycles over 4 choices.
``WF:<T>``         NTScalarArray waveform of fixed length (option ``N<len>``, default 16);
                   T = DOUBLE, FLOAT, INT, and any AI type, or STRING [DOUBLE].
``WFVAR:<T>``      waveform whose length changes every update: 1 + k % N (``N<len>``, def. 16).
``TABLE``          NTTable ``{labels, value{index:int[], position:double[], name:string[]},
                   descriptor, alarm, timeStamp}``; 3..5 rows.
``IMG:<T>``        NTNDArray image; T = UBYTE, BYTE, USHORT, SHORT, INT, UINT, FLOAT, DOUBLE
                   [UBYTE]; size option ``S<w>x<h>`` (default 8x6); union value
                   ``{"ubyteValue": [...]}``, codec, sizes, dimension, uniqueId, dataTimeStamp,
                   attribute, descriptor, alarm, timeStamp.
``QUIET:<T>``      like ``AI:<T>`` but stops updating ``Q<ms>`` after the simulator started
                   (default 500 ms): a PV that goes quiet.
``NEVER``          never connects: absent from every iteration, ``get`` times out.
=================  ==========================================================================

Options: ``P<ms>`` update period (default: the simulator's, 100 ms; ``P0`` = one value, never
updates), ``N<len>`` waveform length, ``Q<ms>`` quiet-after, ``S<w>x<h>`` image size,
``U<n>`` ``timeStamp.userTag`` = n + the update number (a pulse id, as EPICS 7 records carry
in UTAG; default 0, as most IOCs send). Any other
part is an identifier (``1``, ``X``, ...) that only makes the name (and its value phase) unique.
Names outside ``SIM:`` and unknown families never connect, like a PV no IOC serves.

Examples: ``pva://SIM:AI:DOUBLE:1``, ``pva://SIM:AI:FLOAT:2:P20``, ``pva://SIM:WF:FLOAT:1``,
``pva://SIM:WFVAR:DOUBLE:1:N32``, ``pva://SIM:IMG:UBYTE:1:S64x48``, ``pva://SIM:NEVER:1``,
``pva://SIM:QUIET:DOUBLE:1:Q300``.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from recorder.sim.encoding import Float32, Float32Array

# numeric pvData scalar types: name -> (min, max) for integers, None for floating point
INT_RANGES: dict[str, tuple[int, int]] = {
    "BYTE": (-(2**7), 2**7 - 1),
    "SHORT": (-(2**15), 2**15 - 1),
    "INT": (-(2**31), 2**31 - 1),
    "LONG": (-(2**63), 2**63 - 1),
    "UBYTE": (0, 2**8 - 1),
    "USHORT": (0, 2**16 - 1),
    "UINT": (0, 2**32 - 1),
    "ULONG": (0, 2**64 - 1),
}
FLOAT_TYPES = ("DOUBLE", "FLOAT")
NUMERIC_TYPES = (*FLOAT_TYPES, *INT_RANGES)
FAMILIES = ("AI", "BI", "SI", "MBBI", "WF", "WFVAR", "TABLE", "IMG", "QUIET", "NEVER")
TYPE_WORDS = frozenset((*NUMERIC_TYPES, "BOOL", "STRING", "ENUM"))
ENUM_CHOICES = ("ZERO", "ONE", "TWO", "THREE")
IMG_UNION = {
    "UBYTE": "ubyteValue",
    "BYTE": "byteValue",
    "USHORT": "ushortValue",
    "SHORT": "shortValue",
    "INT": "intValue",
    "UINT": "uintValue",
    "FLOAT": "floatValue",
    "DOUBLE": "doubleValue",
}
_OPTION_RE = re.compile(r"^(?:(?P<key>[PNQU])(?P<num>\d+)|S(?P<w>\d+)x(?P<h>\d+))$")
DEFAULT_TYPES = {"AI": "DOUBLE", "QUIET": "DOUBLE", "WF": "DOUBLE", "WFVAR": "DOUBLE",
                 "IMG": "UBYTE", "BI": "BOOL", "SI": "STRING", "MBBI": "ENUM"}
DOUBLE_AMPLITUDE = 10.0
HIGH_WARNING, HIGH_ALARM = 8.0, 9.5
NO_ALARM, MINOR, MAJOR = 0, 1, 2
RECORD_STATUS = 3


@dataclass(frozen=True, slots=True)
class PVSpec:
    """What a simulated PV is, parsed from its base name."""

    name: str
    family: str  # one of FAMILIES, or "" for a PV that never connects
    type: str
    period_s: float  # 0: a single value, never updated
    length: int = 16
    quiet_after_s: float | None = None
    width: int = 8
    height: int = 6
    user_tag: int | None = None  # U<n>: timeStamp.userTag = n + update number

    @property
    def connects(self) -> bool:
        return self.family not in ("", "NEVER")

    @property
    def phase(self) -> int:
        """A per-name offset so that two PVs of the same kind do not carry the same values."""
        return zlib.crc32(self.name.encode()) % 1000

    def last_update(self) -> int | None:
        """Index of the last update this PV ever makes (None: it updates forever)."""
        if self.period_s <= 0:
            return 0
        if self.quiet_after_s is not None:
            return int(self.quiet_after_s / self.period_s)
        return None

    def update_index(self, elapsed_s: float) -> int:
        """The update counter ``k`` current ``elapsed_s`` after the simulator started (-1: none)."""
        if not self.connects or elapsed_s < 0:
            return -1
        k = 0 if self.period_s <= 0 else math.floor(elapsed_s / self.period_s + 1e-9)
        last = self.last_update()
        return k if last is None else min(k, last)

    def update_time(self, k: int) -> float:
        """Seconds after the simulator start at which update ``k`` happens."""
        return k * self.period_s


def parse_pv(name: str, default_period_ms: int = 100) -> PVSpec:
    """The :class:`PVSpec` for a base PV name (unknown names give a never-connecting PV)."""
    parts = name.split(":")
    never = PVSpec(name, "", "", 0.0)
    if len(parts) < 2 or parts[0] != "SIM" or parts[1] not in FAMILIES:
        return never
    family = parts[1]
    typ = DEFAULT_TYPES.get(family, "")
    period_ms = default_period_ms
    length, quiet_ms, width, height = 16, 500, 8, 6
    user_tag: int | None = None
    for part in parts[2:]:
        if part in TYPE_WORDS:
            typ = part
            continue
        match = _OPTION_RE.match(part)
        if match is None:
            continue  # an identifier
        if match["w"] is not None:
            width, height = max(1, int(match["w"])), max(1, int(match["h"]))
        elif match["key"] == "P":
            period_ms = int(match["num"])
        elif match["key"] == "N":
            length = max(1, int(match["num"]))
        elif match["key"] == "U":
            user_tag = int(match["num"])
        else:
            quiet_ms = int(match["num"])
    if family in ("AI", "QUIET") and typ not in NUMERIC_TYPES:
        return never
    if family in ("WF", "WFVAR") and typ not in (*NUMERIC_TYPES, "STRING"):
        return never
    if family == "IMG" and typ not in IMG_UNION:
        return never
    return PVSpec(
        name=name,
        family=family,
        type=typ,
        period_s=period_ms / 1000.0,
        length=length,
        quiet_after_s=quiet_ms / 1000.0 if family == "QUIET" else None,
        width=width,
        height=height,
        user_tag=user_tag,
    )


# --- values -------------------------------------------------------------------------------
# multiplier per integer type: values walk through the whole range, crossing zero and the
# extremes of big types (LONG / ULONG: beyond 32 bits)
_INT_STEP = {"BYTE": 7, "UBYTE": 7, "SHORT": 1_999, "USHORT": 1_999, "INT": 104_729_113,
             "UINT": 104_729_113, "LONG": 1_000_000_007_919, "ULONG": 1_000_000_007_919}


def _int_in_range(typ: str, seed: int) -> int:
    low, high = INT_RANGES[typ]
    return low + (seed * _INT_STEP[typ]) % (high - low + 1)


# floating-point values follow a sine of period 40 updates (and 40 waveform elements, whose
# phase steps by 3: 3 and 40 are coprime, so one cycle of a waveform holds every value once)
SINE_PERIOD = 40
_SINE = tuple(round(DOUBLE_AMPLITUDE * math.sin(2 * math.pi * m / SINE_PERIOD), 6)
              for m in range(SINE_PERIOD))


def numeric_value(typ: str, k: int, phase: int, index: int = 0) -> Any:
    """The value of a numeric PV (or waveform element ``index``) at update ``k``."""
    if typ in FLOAT_TYPES:
        x = _SINE[(k + phase + index * 3) % SINE_PERIOD]
        return Float32(x) if typ == "FLOAT" else x
    return _int_in_range(typ, k + phase + index * 13)


def _alarm(severity: int = NO_ALARM, message: str = "NO_ALARM") -> dict[str, Any]:
    return {
        "severity": severity,
        "status": RECORD_STATUS if severity else 0,
        "message": message,
    }


def _time_stamp(wall_ns: int) -> dict[str, Any]:
    return {
        "secondsPastEpoch": wall_ns // 1_000_000_000,
        "nanoseconds": wall_ns % 1_000_000_000,
        "userTag": 0,
    }


def _scalar_alarm(typ: str, value: Any) -> dict[str, Any]:
    if typ not in FLOAT_TYPES:
        return _alarm()
    if value >= HIGH_ALARM:
        return _alarm(MAJOR, "HIHI")
    if value <= -HIGH_ALARM:
        return _alarm(MAJOR, "LOLO")
    if value >= HIGH_WARNING:
        return _alarm(MINOR, "HIGH")
    if value <= -HIGH_WARNING:
        return _alarm(MINOR, "LOW")
    return _alarm()


def _typed(typ: str, x: float) -> Any:
    if typ == "FLOAT":
        return Float32(x)
    if typ == "DOUBLE":
        return float(x)
    low, high = INT_RANGES[typ]
    return max(low, min(high, int(x)))


def _limits(typ: str) -> tuple[float, float]:
    if typ in FLOAT_TYPES:
        return -DOUBLE_AMPLITUDE, DOUBLE_AMPLITUDE
    low, high = INT_RANGES[typ]
    return float(low), float(high)


def _nt_scalar(spec: PVSpec, value: Any, wall_ns: int) -> dict[str, Any]:
    typ = spec.type
    low, high = _limits(typ)
    return {
        "value": value,
        "alarm": _scalar_alarm(typ, value),
        "timeStamp": _time_stamp(wall_ns),
        "display": {
            "limitLow": low,
            "limitHigh": high,
            "description": f"simulated {typ.lower()} {spec.name}",
            "units": "mm" if typ in FLOAT_TYPES else "counts",
            "precision": 4 if typ in FLOAT_TYPES else 0,
            "form": {"index": 0, "choices": ["Default", "String", "Binary", "Decimal", "Hex",
                                             "Exponential", "Engineering"]},
        },
        "control": {"limitLow": low, "limitHigh": high, "minStep": 0.0},
        "valueAlarm": {
            "active": typ in FLOAT_TYPES,
            "lowAlarmLimit": _typed(typ, -HIGH_ALARM if typ in FLOAT_TYPES else low),
            "lowWarningLimit": _typed(typ, -HIGH_WARNING if typ in FLOAT_TYPES else low),
            "highWarningLimit": _typed(typ, HIGH_WARNING if typ in FLOAT_TYPES else high),
            "highAlarmLimit": _typed(typ, HIGH_ALARM if typ in FLOAT_TYPES else high),
            "lowAlarmSeverity": MAJOR,
            "lowWarningSeverity": MINOR,
            "highWarningSeverity": MINOR,
            "highAlarmSeverity": MAJOR,
            "hysteresis": _typed(typ, 0.0),
        },
    }


def _array(typ: str, k: int, phase: int, length: int) -> list[Any]:
    """Waveform ``[numeric_value(typ, k, phase, i) for i in range(length)]``, built per cycle
    (floats) or with numpy (integers that fit int64 arithmetic) rather than element by element:
    a 20,000-point waveform at 20 Hz is 4*10^5 elements per second."""
    if typ == "STRING":
        return [f"s{k}-{i}" for i in range(length)]
    if typ in FLOAT_TYPES:
        cycle = [_SINE[(k + phase + i * 3) % SINE_PERIOD] for i in range(SINE_PERIOD)]
        values: list[Any] = (cycle * (length // SINE_PERIOD + 1))[:length]
        return Float32Array(values) if typ == "FLOAT" else values
    low, high = INT_RANGES[typ]
    if typ in ("LONG", "ULONG") or (k + phase + 13 * length) * _INT_STEP[typ] >= 2**62:
        return [_int_in_range(typ, k + phase + i * 13) for i in range(length)]
    seeds = np.arange(length, dtype=np.int64) * 13 + (k + phase)
    ints: list[Any] = (low + (seeds * _INT_STEP[typ]) % (high - low + 1)).tolist()
    return ints


def _waveform(spec: PVSpec, k: int, wall_ns: int) -> dict[str, Any]:
    length = spec.length if spec.family == "WF" else 1 + k % spec.length
    out: dict[str, Any] = {
        "value": _array(spec.type, k, spec.phase, length),
        "alarm": _alarm(),
        "timeStamp": _time_stamp(wall_ns),
    }
    if spec.type != "STRING":
        low, high = _limits(spec.type)
        out["display"] = {
            "limitLow": low,
            "limitHigh": high,
            "description": f"simulated waveform {spec.name}",
            "units": "V",
            "precision": 3,
            "form": {"index": 0, "choices": ["Default"]},
        }
    return out


def _table(spec: PVSpec, k: int, wall_ns: int) -> dict[str, Any]:
    rows = 3 + k % 3
    return {
        "labels": ["Index", "Position", "Name"],
        "value": {
            "index": [k * 10 + r for r in range(rows)],
            "position": [numeric_value("DOUBLE", k, spec.phase, r) for r in range(rows)],
            "name": [f"dev{r}-{k}" for r in range(rows)],
        },
        "descriptor": f"simulated table {spec.name}",
        "alarm": _alarm(),
        "timeStamp": _time_stamp(wall_ns),
    }


def _image(spec: PVSpec, k: int, wall_ns: int) -> dict[str, Any]:
    w, h = spec.width, spec.height
    typ = spec.type
    # row-major pixel (x, y); built with numpy (a 128x128 image at 20 Hz is 3*10^5 pixels/s)
    xs, ys = np.arange(w, dtype=np.int64), np.arange(h, dtype=np.int64)[:, None]
    if typ in FLOAT_TYPES:
        # a pixel depends on x + y only: one value per diagonal
        diagonal = np.array([round(math.sin((d + k) / 5.0) * 100.0, 4) for d in range(w + h - 1)])
        pixels: list[Any] = diagonal[(xs + ys).ravel()].tolist()
        if typ == "FLOAT":
            pixels = Float32Array(pixels)
    else:
        low, high = INT_RANGES[typ]
        span = high - low + 1
        pixels = (low + (xs * 3 + ys * 5 + k) % min(span, 251)).ravel().tolist()
    itemsize = {"UBYTE": 1, "BYTE": 1, "USHORT": 2, "SHORT": 2, "INT": 4, "UINT": 4,
                "FLOAT": 4, "DOUBLE": 8}[typ]

    def dim(size: int) -> dict[str, Any]:
        return {"size": size, "offset": 0, "fullSize": size, "binning": 1, "reverse": False}

    return {
        "value": {IMG_UNION[typ]: pixels},
        "codec": {"name": "", "parameters": {"": None}},
        "compressedSize": w * h * itemsize,
        "uncompressedSize": w * h * itemsize,
        "dimension": [dim(w), dim(h)],
        "uniqueId": k + 1,
        "dataTimeStamp": _time_stamp(wall_ns),
        "attribute": [
            {
                "name": "ColorMode",
                "value": {"": 0},
                "tags": [],
                "descriptor": "Color mode",
                "alarm": _alarm(),
                # areaDetector's NTNDArrayConverter never sets an attribute's timeStamp
                "timeStamp": _time_stamp(0),
                "sourceType": 0,
                "source": "Driver",
            }
        ],
        "descriptor": f"simulated image {spec.name}",
        "alarm": _alarm(),
        "timeStamp": _time_stamp(wall_ns),
    }


def pv_structure(spec: PVSpec, k: int, wall_ns: int) -> dict[str, Any]:
    """The full pvData structure of ``spec`` at update ``k`` stamped ``wall_ns`` (ns)."""
    s = _structure(spec, k, wall_ns)
    if spec.user_tag is not None:
        s["timeStamp"]["userTag"] = (spec.user_tag + k) % 2**31  # an int32, as in pvData
    return s


def _structure(spec: PVSpec, k: int, wall_ns: int) -> dict[str, Any]:
    builders: dict[str, Callable[[PVSpec, int, int], dict[str, Any]]] = {
        "WF": _waveform,
        "WFVAR": _waveform,
        "TABLE": _table,
        "IMG": _image,
    }
    family = spec.family
    if family in builders:
        return builders[family](spec, k, wall_ns)
    if family in ("AI", "QUIET"):
        return _nt_scalar(spec, numeric_value(spec.type, k, spec.phase), wall_ns)
    if family == "BI":
        return {"value": (k + spec.phase) % 2 == 0, "alarm": _alarm(),
                "timeStamp": _time_stamp(wall_ns)}
    if family == "SI":
        return {"value": f"msg-{k}", "alarm": _alarm(), "timeStamp": _time_stamp(wall_ns),
                "display": {"description": f"simulated string {spec.name}"}}
    if family == "MBBI":
        return {"value": {"index": (k + spec.phase) % len(ENUM_CHOICES),
                          "choices": list(ENUM_CHOICES)},
                "alarm": _alarm(), "timeStamp": _time_stamp(wall_ns)}
    raise ValueError(f"PV {spec.name} never connects and has no value")
