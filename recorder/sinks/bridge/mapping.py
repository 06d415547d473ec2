"""One iteration -> the Karabo bridge ``(data, metadata)`` container (pure code).

This module is the single definition of the container. The live sink
(:class:`recorder.sinks.bridge.sink.KaraboBridgeSink`) builds it from the client's iteration
events and the file reader (:meth:`recorder.reader.RecordingFile.trains`) builds it from the
samples stored in a file, both with :func:`build_train`, so code written against
``karabo_bridge.Client.next()`` runs unchanged on recorded files.

Shape (karabo-bridge conventions: two dicts keyed by source name, flat field names with dots)::

    data["SIM:AI:DOUBLE:1"] = {
        "value": 1.5,                           # typed: numpy scalar/array, str, ...
        "alarm.severity": 0, "alarm.status": 0, "alarm.message": "",
        "timeStamp.secondsPastEpoch": 1700000000, "timeStamp.nanoseconds": 5,
        "timeStamp.userTag": 0,
        "display.limitLow": 0.0, ...            # every field of the PV structure
    }
    metadata["SIM:AI:DOUBLE:1"] = {
        "source": "SIM:AI:DOUBLE:1",
        "timestamp": 1700000000.000000005,      # the PV's EPICS timeStamp, seconds (float)
        "timestamp.sec": "1700000000",          # seconds (str)
        "timestamp.frac": "000000005000000000", # attoseconds (str, 18 digits)
        "timestamp.tid": 42,                    # the k2eg iter_index ("train id")
    }
    data["k2eg-recorder/iteration"] = {"iter_index": 42, "status": "complete", ...}

Field rules (one sample):

* nested structures are flattened with dots (``alarm.severity``); empty structures vanish;
* numbers become numpy scalars (``float32`` where the gateway sent float32, ``int64``,
  ``uint64`` above int64's range, ``bool_``); numeric and boolean lists become 1-D numpy
  arrays typed the same way; string lists stay ``list[str]``; lists of structures (NTNDArray
  ``dimension``/``attribute``) stay lists of dicts;
* NTNDArray: ``value`` is the image as a numpy array in its exact dtype and numpy shape
  (``dimension[0]`` is x, the last axis);
* NTEnum: ``value.index`` and ``value.choices``; NTTable: ``labels`` and ``value.<column>``;
  no plain ``value`` key for them: the keys are a flattened tree (no key both a leaf and a
  node), as Karabo sends them and tools that map dots to HDF5 groups need (docs/bridge.md).

Several values of one PV in one iteration (timedbuffered snapshots) are *stacked along a new
first axis*, in arrival order: a scalar field becomes a 1-D array of length n, a waveform an
(n, len) array, an image (n, h, w). Stacking is decided per run, not per iteration, so the
type of a field does not change from one iteration to the next: every PV of a timedbuffered
run is stacked (n >= 1); a normal run serves the value itself (and stacks only in the
abnormal case of a PV sent twice in one iteration, rather than drop a value). A field that
cannot stack into one array (ragged waveforms, strings, a dtype or shape that changes
within the iteration, a field missing from some values) becomes a list with one plain Python
item per value (``None`` where missing).

The per-source ``timestamp`` is the EPICS timestamp of the PV's last value in the iteration
(the iteration's header time when that value has none). The recorder-level source
:data:`RECORDER_SOURCE` carries the iteration record (header/tail times, status, reason,
counts, trigger ``tags`` as a dict of str); its metadata timestamp is the iteration header
time (tail time without header).

Over the wire (protocol 2.2) ``karabo_bridge`` sends numpy arrays as typed buffers and turns
numpy scalars into Python ``int``/``float``/``bool``; the reader keeps the numpy scalars.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from recorder.client.events import IterationClosed, IterationStatus
from recorder.client.values import PVSample, ValueKind, typed_array, typed_value

RECORDER_SOURCE = "k2eg-recorder/iteration"
"""Source name of the recorder-level entry (one per iteration)."""

NS_PER_S = 1_000_000_000
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1
RECORDING_STOPPED = "recording_stopped"
TIMEDBUFFERED = "timedbuffered"

Train = tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]
"""``(data, metadata)``: each keyed by source name (karabo_bridge.Client.next())."""


@dataclass(frozen=True, slots=True)
class IterationInfo:
    """The iteration record served as the recorder-level source (the /iterations row)."""

    iter_index: int
    status: str  # "complete" | "incomplete"
    reason: str = ""  # IncompleteReason value, "recording_stopped", ...
    header_timestamp_ns: int = 0  # 0 = no header
    tail_timestamp_ns: int = 0  # 0 = no tail
    error_code: int = 0
    error_message: str = ""
    n_values: int = 0  # as counted by the client
    n_pvs: int = 0
    n_batches: int = 0
    expected_messages: int = -1  # -1 = not a sequenced stream
    missing_messages: int = -1
    duplicates: int = 0
    tags: tuple[tuple[str, str], ...] = ()  # trigger tags recorded with the iteration

    @property
    def complete(self) -> bool:
        return self.status == IterationStatus.COMPLETE.value

    @classmethod
    def from_closed(cls, event: IterationClosed, header_timestamp_ns: int | None) -> IterationInfo:
        """From the close event (``header_timestamp_ns``: the open event's, if any)."""
        return cls(
            iter_index=event.iter_index,
            status=event.status.value,
            reason=event.reason.value if event.reason is not None else "",
            header_timestamp_ns=event.header_timestamp_ns or header_timestamp_ns or 0,
            tail_timestamp_ns=event.tail_timestamp_ns or 0,
            error_code=event.error_code,
            error_message=event.error_message,
            n_values=event.n_values,
            n_pvs=event.n_pvs,
            n_batches=event.n_batches,
            expected_messages=-1 if event.expected_messages is None else event.expected_messages,
            missing_messages=-1 if event.missing_messages is None else event.missing_messages,
            duplicates=event.duplicates,
        )

    @classmethod
    def stopped(
        cls, iter_index: int, header_timestamp_ns: int | None, reason: str = RECORDING_STOPPED
    ) -> IterationInfo:
        """An iteration still open when the recording stopped."""
        return cls(
            iter_index=iter_index,
            status=IterationStatus.INCOMPLETE.value,
            reason=reason,
            header_timestamp_ns=header_timestamp_ns or 0,
        )

    @classmethod
    def from_columns(cls, columns: Mapping[str, Any], row: int) -> IterationInfo:
        """From row ``row`` of the reader's ``iterations()`` columns."""

        def num(name: str, default: int) -> int:
            col = columns.get(name)
            return int(col[row]) if col is not None else default

        message = columns["error_message"][row] if "error_message" in columns else ""
        return cls(
            iter_index=num("iter_index", 0),
            status=str(columns["status"][row]),
            reason=str(columns["reason"][row]),
            header_timestamp_ns=num("header_timestamp", 0),
            tail_timestamp_ns=num("tail_timestamp", 0),
            error_code=num("error_code", 0),
            error_message=str(message or ""),
            n_values=num("n_values", 0),
            n_pvs=num("n_pvs", 0),
            n_batches=num("n_batches", 0),
            expected_messages=num("expected_messages", -1),
            missing_messages=num("missing_messages", -1),
            duplicates=num("duplicates", 0),
            tags=tuple(_tags_of(columns, row).items()),
        )


def _tags_of(columns: Mapping[str, Any], row: int) -> dict[str, str]:
    col = columns.get("tags")
    tags = col[row] if col is not None else None
    return {str(k): str(v) for k, v in tags.items()} if isinstance(tags, Mapping) else {}


def stacked_for(snapshot_type: object) -> bool:
    """Whether a run's PVs are stacked along a first axis: its snapshot is timedbuffered."""
    text = getattr(snapshot_type, "value", snapshot_type)
    return isinstance(text, str) and text.lower() == TIMEDBUFFERED


def karabo_timestamp(ns: int) -> dict[str, Any]:
    """``timestamp`` (s, float), ``timestamp.sec`` (str), ``timestamp.frac`` (attoseconds,
    str of 18 digits) from ns since the Unix epoch."""
    sec, frac_ns = divmod(ns, NS_PER_S)
    return {
        "timestamp": ns / NS_PER_S,
        "timestamp.sec": str(sec),
        "timestamp.frac": f"{frac_ns:09d}000000000",
    }


# --- one sample -------------------------------------------------------------------------------
def _scalar(value: Any, path: str, float32_paths: frozenset[str]) -> Any:
    if isinstance(value, bool):
        return np.bool_(value)
    if isinstance(value, int):
        if INT64_MIN <= value <= INT64_MAX:
            return np.int64(value)
        if INT64_MAX < value <= UINT64_MAX:
            return np.uint64(value)
        return value
    if isinstance(value, float):
        return np.float32(value) if path in float32_paths else np.float64(value)
    return value


def _flatten(value: Any, path: str, float32_paths: frozenset[str], out: dict[str, Any]) -> None:
    if value.__class__ is dict or isinstance(value, Mapping):
        for key, item in value.items():
            sub = f"{path}.{key}"
            # the common leaves inline (exact classes; bool is not int here), the rest recurses:
            # the same result as _flatten(item, ...), 2x faster for NT structures
            cls = item.__class__
            if cls is float:
                out[sub] = np.float32(item) if sub in float32_paths else np.float64(item)
            elif cls is str:
                out[sub] = item
            elif cls is int and INT64_MIN <= item <= INT64_MAX:
                out[sub] = np.int64(item)
            else:
                _flatten(item, sub, float32_paths, out)
    elif isinstance(value, list):
        kind, typed = typed_array(value, path in float32_paths)
        if kind is ValueKind.ARRAY:
            out[path] = typed
        elif kind is ValueKind.STRING_ARRAY:
            out[path] = list(typed)
        else:
            out[path] = value
    else:
        out[path] = _scalar(value, path, float32_paths)


FlatCache = dict[
    tuple[int, str, frozenset[str]], tuple[Any, dict[str, Any], tuple[str, ...]]
]
"""Flattened sub-structures by identity (see :func:`flatten_sample`): the structure (held, so
its id stays its own), its flat fields, and which of them are mutable (lists, arrays)."""
FLAT_CACHE_MAX = 4096
_PER_SAMPLE = frozenset({"value", "alarm", "timeStamp"})  # new dicts in every sample


def _fresh(value: Any) -> Any:
    """A copy of a mutable flat field (list, array); immutable ones as they are."""
    cls = value.__class__
    return list(value) if cls is list else value.copy() if cls is np.ndarray else value


def _mutable_keys(flat: Mapping[str, Any]) -> tuple[str, ...]:
    """The fields :func:`_fresh` copies (lists, arrays)."""
    return tuple(k for k, v in flat.items() if v.__class__ is list or v.__class__ is np.ndarray)


def _copy_into(out: dict[str, Any], flat: Mapping[str, Any], mutable: tuple[str, ...]) -> None:
    """``out.update(flat)`` with the ``mutable`` fields copied (re-assigned: each key keeps
    its place), so no two results share a list or an array."""
    out.update(flat)
    for k in mutable:
        out[k] = _fresh(out[k])


def flatten_sample(sample: PVSample, cache: FlatCache | None = None) -> dict[str, Any]:
    """The flat fields of one PV value (see the module docstring).

    ``cache``: samples rebuilt from a file share the dicts of their metadata entry (display,
    control, valueAlarm...) from row to row; their flattened fields are kept by the dict's
    identity and reused (one dict update; lists and arrays copied, so no two samples share a
    mutable field). The result is the same as without it, key order included."""
    out: dict[str, Any] = {}
    f32 = sample.float32_paths
    kind = sample.kind
    for key, item in sample.data.items():
        name = key if isinstance(key, str) else str(key)
        if cache is not None and name not in _PER_SAMPLE and item.__class__ is dict:
            ckey = (id(item), name, f32)
            hit = cache.get(ckey)
            if hit is None or hit[0] is not item:
                sub: dict[str, Any] = {}
                _flatten(item, name, f32, sub)
                if len(cache) >= FLAT_CACHE_MAX:
                    cache.clear()
                hit = cache[ckey] = (item, {k: _fresh(v) for k, v in sub.items()},
                                     _mutable_keys(sub))
            _copy_into(out, hit[1], hit[2])
        elif name != "value" or kind not in _TYPED_KINDS:
            _flatten(item, name, f32, out)
        elif kind is ValueKind.NDARRAY:
            out["value"] = sample.value.image()
        elif kind is ValueKind.STRING_ARRAY:
            out["value"] = list(sample.value)
        else:  # the sample's typed value (cached; typed exactly as _flatten would)
            out["value"] = sample.value
    return out


_TYPED_KINDS = frozenset({
    ValueKind.SCALAR, ValueKind.BOOL, ValueKind.STRING, ValueKind.ARRAY,
    ValueKind.STRING_ARRAY, ValueKind.NDARRAY,
})


@dataclass(slots=True, kw_only=True)
class FlatTemplate:
    """The flat fields of one sample, reused for later values of the same PV that differ from
    it only in the fields a recording stores per row: the value (scalar, bool, string,
    waveform, enum index), the EPICS time and user tag and the alarm severity, status and
    message.

    A file's reader builds one per metadata entry and row flags (:meth:`of`, from the first
    such row's sample and its :func:`flatten_sample` result), then :meth:`row` gives each
    later row's flat fields: a copy of the first with those leaves replaced, typed by the
    same rules (``typed_value`` for ``value``, the leaf rule otherwise), keys in the same
    order. Lists and arrays are copied, as :func:`flatten_sample` does."""

    base: dict[str, Any]
    f32: frozenset[str]
    kind: ValueKind
    value_path: str | None  # the value's leaf, when the value is stored per row
    time: bool  # per-row leaves: EPICS time, alarm severity, status, message
    severity: bool
    status: bool
    message: bool
    time_ns: int | None  # the EPICS time of every row when it is not per row
    user_tag: bool = False
    mutable: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.mutable = _mutable_keys(self.base)

    @classmethod
    def of(cls, sample: PVSample, flat: dict[str, Any], *, value: bool, time: bool,
           severity: bool, status: bool, message: bool, user_tag: bool = False,
           frame: bool = False) -> FlatTemplate | None:
        """A template from ``sample`` and ``flat = flatten_sample(sample)``, the flags saying
        which leaves change from row to row; None when a leaf is not where it would be
        replaced (an NTTable, an image, a structure: such rows are flattened in full)."""
        if frame:  # an image's uniqueId and dataTimeStamp: flattened in full
            return None
        kind = sample.kind
        path: str | None = None
        if value:
            if kind in _ROW_VALUE_KINDS:
                path = "value"
            elif kind is ValueKind.ENUM:
                path = "value.index"
            else:
                return None
        leaves = [path] if path else []
        if time:
            leaves += [_SECONDS, _NANOS]
        leaves += [p for p, on in ((_USER_TAG, user_tag), (_SEVERITY, severity),
                                   (_STATUS, status), (_MESSAGE, message)) if on]
        if any(p not in flat for p in leaves):
            return None
        return cls(base={k: _fresh(v) for k, v in flat.items()}, f32=sample.float32_paths,
                   kind=kind, value_path=path, time=time, severity=severity, status=status,
                   message=message, time_ns=sample.timestamp_ns, user_tag=user_tag)

    def row(self, value: Any, time_ns: int, severity: int, status: int,  # noqa: PLR0917
            message: str | None, user_tag: int = 0) -> tuple[dict[str, Any], int | None] | None:
        """(flat fields, EPICS time in ns) of a row; None when its value does not type as the
        template's did (the row is then flattened in full)."""
        out: dict[str, Any] = {}
        _copy_into(out, self.base, self.mutable)
        f32 = self.f32
        path = self.value_path
        if path == "value":
            kind, typed = typed_value({"value": value}, f32)
            if kind is not self.kind:  # e.g. strings in a waveform: flatten_sample decides
                return None
            out[path] = typed  # what flatten_sample puts there for these kinds
        elif path is not None:
            out[path] = _int_leaf(value, path, f32)
        ts = self.time_ns
        if self.time:
            ts = time_ns
            seconds, nanos = divmod(time_ns, NS_PER_S)
            out[_SECONDS] = _int_leaf(seconds, _SECONDS, f32)
            out[_NANOS] = _int_leaf(nanos, _NANOS, f32)
        if self.user_tag:
            out[_USER_TAG] = _int_leaf(user_tag, _USER_TAG, f32)
        if self.severity:
            out[_SEVERITY] = _int_leaf(severity, _SEVERITY, f32)
        if self.status:
            out[_STATUS] = _int_leaf(status, _STATUS, f32)
        if self.message:
            out[_MESSAGE] = _scalar(message, _MESSAGE, f32)
        return out, ts


def _int_leaf(value: int, path: str, f32: frozenset[str]) -> Any:
    """An integer leaf as :func:`_flatten` types it (inline for int64, as there)."""
    if value.__class__ is int and INT64_MIN <= value <= INT64_MAX:
        return np.int64(value)
    return _scalar(value, path, f32)


_ROW_VALUE_KINDS = frozenset({ValueKind.SCALAR, ValueKind.BOOL, ValueKind.STRING,
                              ValueKind.ARRAY})
_SECONDS, _NANOS = "timeStamp.secondsPastEpoch", "timeStamp.nanoseconds"
_USER_TAG = "timeStamp.userTag"
_SEVERITY, _STATUS, _MESSAGE = "alarm.severity", "alarm.status", "alarm.message"


# --- several samples of one PV ----------------------------------------------------------------
_MISSING = object()


def plain(value: Any) -> Any:
    """Plain Python (msgpack-able) form of a field: arrays -> lists, numpy scalars -> items."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def _stack_field(leaves: list[Any]) -> Any:
    if all(isinstance(x, (np.ndarray, np.generic)) for x in leaves):
        first = leaves[0]
        if first.dtype != object and all(
            x.dtype == first.dtype and x.shape == first.shape for x in leaves
        ):
            return np.stack([np.asarray(x) for x in leaves])
    return [None if x is _MISSING else plain(x) for x in leaves]


def stack_fields(flats: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack the flat fields of several values of one PV along a new first axis."""
    keys: dict[str, None] = {}
    for flat in flats:
        keys.update(dict.fromkeys(flat))
    return {key: _stack_field([flat.get(key, _MISSING) for flat in flats]) for key in keys}


# --- one iteration ----------------------------------------------------------------------------
def recorder_entry(
    info: IterationInfo, *, n_sources: int, stacked: bool, run_name: str, snapshot_name: str
) -> dict[str, Any]:
    """The recorder-level source's data (plain Python values)."""
    return {
        "iter_index": info.iter_index,
        "status": info.status,
        "complete": info.complete,
        "reason": info.reason,
        "header_timestamp": info.header_timestamp_ns,
        "tail_timestamp": info.tail_timestamp_ns,
        "error_code": info.error_code,
        "error_message": info.error_message,
        "n_values": info.n_values,
        "n_pvs": info.n_pvs,
        "n_batches": info.n_batches,
        "expected_messages": info.expected_messages,
        "missing_messages": info.missing_messages,
        "duplicates": info.duplicates,
        "tags": dict(info.tags),
        "n_sources": n_sources,
        "stacked": stacked,
        "run_name": run_name,
        "snapshot_name": snapshot_name,
    }


FlatValue = tuple[dict[str, Any], int | None]
"""One value of a PV as a train holds it: its flat fields and its EPICS time (ns, or None)."""


def build_train(
    info: IterationInfo,
    samples: Iterable[PVSample],
    *,
    stacked: bool,
    run_name: str = "",
    snapshot_name: str = "",
    flat_cache: FlatCache | None = None,
) -> Train:
    """The ``(data, metadata)`` container of one iteration (``flat_cache``: see
    :func:`flatten_sample`).

    ``samples``: the iteration's PV values in arrival order (values of different PVs may be
    interleaved). ``stacked``: the run's PVs are stacked along a first axis
    (:func:`stacked_for` of the snapshot type). Only PVs with a value in the iteration appear.
    """
    grouped: dict[str, list[PVSample]] = {}
    for sample in samples:
        grouped.setdefault(sample.pv, []).append(sample)
    by_pv: dict[str, list[FlatValue]] = {}
    for pv, pv_samples in grouped.items():
        values: list[FlatValue] = [(flatten_sample(s, flat_cache), None) for s in pv_samples]
        values[-1] = (values[-1][0], pv_samples[-1].timestamp_ns)  # the only time used
        by_pv[pv] = values
    return build_train_flat(info, by_pv, stacked=stacked, run_name=run_name,
                            snapshot_name=snapshot_name)


def build_train_flat(
    info: IterationInfo,
    by_pv: Mapping[str, Sequence[FlatValue]],
    *,
    stacked: bool,
    run_name: str = "",
    snapshot_name: str = "",
) -> Train:
    """:func:`build_train` from values already flattened, by PV (in the order the PVs are
    to appear; each PV's values in arrival order). A PV's metadata timestamp is its last
    value's time (the other values' times are not read)."""
    iteration_ns = info.header_timestamp_ns or info.tail_timestamp_ns
    data: dict[str, dict[str, Any]] = {}
    meta: dict[str, dict[str, Any]] = {}
    for pv, values in by_pv.items():
        if not values:
            continue
        if stacked or len(values) > 1:
            data[pv] = stack_fields([flat for flat, _ in values])
        else:
            data[pv] = values[0][0]
        ts = values[-1][1]
        meta[pv] = {
            "source": pv,
            **karabo_timestamp(iteration_ns if ts is None else ts),
            "timestamp.tid": info.iter_index,
        }
    data[RECORDER_SOURCE] = recorder_entry(
        info,
        n_sources=len(meta),
        stacked=stacked,
        run_name=run_name,
        snapshot_name=snapshot_name,
    )
    meta[RECORDER_SOURCE] = {
        "source": RECORDER_SOURCE,
        **karabo_timestamp(iteration_ns),
        "timestamp.tid": info.iter_index,
    }
    return data, meta


__all__ = [
    "RECORDER_SOURCE",
    "FlatCache",
    "FlatTemplate",
    "FlatValue",
    "IterationInfo",
    "Train",
    "build_train",
    "build_train_flat",
    "flatten_sample",
    "karabo_timestamp",
    "plain",
    "recorder_entry",
    "stack_fields",
    "stacked_for",
]
