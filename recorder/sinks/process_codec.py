"""What crosses the pipe between an :class:`~recorder.sinks.process.IsolatedRecording` and its
writer process: the message kinds and event tags, events encoded in the parent
(:class:`_Encoder`) and rebuilt in the child (:func:`_decode_event`), the snapshot's fields
(:func:`_snapshot_dict`) and the msgpack settings of every frame (:func:`_new_packer`,
:func:`_unpack`). Imported by both sides, so it imports neither h5py nor the HDF5 sink.

Serialization (no pickling of events)
    ``handle`` encodes each event at once into a msgpack list: the dataclass fields in order,
    enums as their value. The samples of a ``ValuesReceived`` travel as
    ``[pvs, blob, offsets, f32]``: the PV names, *one* blob (the concatenated message bytes
    the lazily-built samples were received as: one ``b"".join``, no per-sample slicing), the
    (start, end) position of each sample's PV map in it (int64 arrays) and ``f32`` (``None``,
    or ``{index: sorted float32 paths}`` for hand-built samples, whose ``data`` is packed
    with ``msgpack.packb`` into the blob). The child keeps them as
    :class:`~recorder.sinks.packed.PackedSamples` over the blob: no object and no copy per
    sample; the recording buffer decodes the PV maps in place at its flush (so decoding moves
    off the daemon; float32 paths of received samples are read from the same bytes). Floats
    of hand-built samples travel as float64 and are re-typed from float32_paths: values are
    bit-exact. A sample whose ``data`` msgpack cannot represent (only possible for hand-built
    samples) is dropped, logged and counted in ``counters["unserializable_values"]``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import msgpack
import numpy as np
import structlog

from recorder.client.events import (
    IncompleteReason,
    IterationClosed,
    IterationEvent,
    IterationOpened,
    IterationStatus,
    ValuesReceived,
)
from recorder.client.properties import SnapshotProperties
from recorder.client.values import PVSample
from recorder.sinks.buffer import raw_messages
from recorder.sinks.packed import PackedSamples

log = structlog.get_logger("recorder.sinks.process")

# parent -> child message kinds
_EVENTS, _FLUSH, _CLOSE = 0, 1, 2
# event tags (_TAGS: trigger tags, [_TAGS, iter_index, {key: value}], in order with events)
_OPENED, _VALUES, _CLOSED, _TAGS = 0, 1, 2, 3
_EVENT_TYPES: tuple[type[Any], ...] = (IterationOpened, ValuesReceived, IterationClosed)
_FIELDS: tuple[tuple[str, ...], ...] = tuple(
    tuple(f.name for f in dataclasses.fields(cls)) for cls in _EVENT_TYPES
)
_ENUM_FIELDS: dict[str, type[enum.Enum]] = {
    "status": IterationStatus,
    "reason": IncompleteReason,
}
_SAMPLE_OVERHEAD = 24  # bytes per sample beyond payload + name (msgpack framing)

WRITER_PROTOCOL: Final = 1
"""Bump at every change of what crosses the pipe that :func:`protocol` does not show by itself
(message kinds, event tags, the init, the replies). Between ``pip install -U`` and the restart
the running daemon spawns writers that import the *new* package from disk: the writer compares
the init's ``protocol`` with its own first and refuses a daemon that speaks another one
(:func:`~recorder.sinks.process_child._refusal`)."""


def protocol() -> list[Any]:
    """What the daemon and its writer processes must agree on: :data:`WRITER_PROTOCOL` and
    the fields of each event (a field added to an event changes it without a bump)."""
    return [WRITER_PROTOCOL, [list(fields) for fields in _FIELDS]]


def _pack_default(obj: Any) -> Any:
    """msgpack fallback for hand-built sample data (the client only produces msgpack types)."""
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    tolist = getattr(obj, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        return tolist()
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def _new_packer() -> msgpack.Packer:
    return msgpack.Packer(
        default=_pack_default, use_bin_type=True, unicode_errors="surrogateescape"
    )


def _unpack(frame: bytes) -> Any:
    return msgpack.unpackb(
        frame, raw=False, strict_map_key=False, unicode_errors="surrogateescape"
    )


class _Encoder:
    """Events -> compact msgpack-ready lists (see the module docstring)."""

    def __init__(self) -> None:
        self._packer = _new_packer()
        self.unserializable = 0

    def samples(self, samples: Sequence[PVSample]) -> tuple[list[Any], int]:
        """``[pvs, blob, offsets, f32]``: the PV names, one blob holding every sample's bytes,
        their (start, end) positions in it (int64 little-endian: every start, then every end)
        and ``{index: float32 paths}`` for samples whose bytes were packed here (``None``
        when there are none)."""
        try:
            # lazily-built samples (all the client produces): their message bytes as received
            samples, msgs = raw_messages(samples)
            if msgs.count(None):
                return self._samples_mixed(samples)
            starts = [s._start for s in samples]
            ends = [s._end for s in samples]
            pvs = [s.pv for s in samples]
        except AttributeError:  # not a PVSample (duck-typed)
            return self._samples_mixed(samples)
        return self._packed(pvs, msgs, starts, ends, None)  # type: ignore[arg-type] # no None

    def _samples_mixed(self, samples: Iterable[PVSample]) -> tuple[list[Any], int]:
        pvs: list[str] = []
        msgs: list[bytes] = []
        starts: list[int] = []
        ends: list[int | None] = []
        f32s: dict[int, list[str]] = {}
        pack = self._packer.pack
        for s in samples:
            msg = getattr(s, "_msg", None)
            if msg is not None:
                pvs.append(s.pv)
                msgs.append(msg)
                starts.append(s._start)
                ends.append(s._end)
                continue
            try:
                payload = pack(s.data)
            except (TypeError, ValueError, OverflowError) as exc:
                self._packer.reset()
                self.unserializable += 1
                log.error("PV sample cannot be sent to the writer process; dropped",
                          pv=s.pv, error=str(exc))
                continue
            f32s[len(pvs)] = sorted(s.float32_paths)
            pvs.append(s.pv)
            msgs.append(payload)
            starts.append(0)
            ends.append(None)
        return self._packed(pvs, msgs, starts, ends, f32s or None)

    @staticmethod
    def _packed(pvs: list[str], msgs: list[bytes], starts: list[int],
                ends: list[int | None], f32s: dict[int, list[str]] | None,
                ) -> tuple[list[Any], int]:
        n = len(msgs)
        lens = np.fromiter(map(len, msgs), dtype=np.int64, count=n)
        base = np.zeros(n, dtype=np.int64)
        if n > 1:
            np.cumsum(lens[:-1], out=base[1:])
        offsets = np.empty(2 * n, dtype="<i8")
        np.add(base, np.fromiter(starts, dtype=np.int64, count=n), out=offsets[:n])
        if ends.count(None) == n:
            np.add(base, lens, out=offsets[n:])
        else:
            np.add(base, np.fromiter((len(m) if e is None else e for m, e in
                                      zip(msgs, ends, strict=True)), dtype=np.int64, count=n),
                   out=offsets[n:])
        blob = b"".join(msgs)
        size = len(blob) + 16 * n + sum(map(len, pvs)) + _SAMPLE_OVERHEAD
        if f32s:
            size += 16 * len(f32s)
        return [pvs, blob, offsets.tobytes(), f32s], size

    def event(self, event: IterationEvent) -> tuple[list[Any], int]:
        if isinstance(event, ValuesReceived):
            tag, size = _VALUES, 64
        elif isinstance(event, IterationOpened):
            tag, size = _OPENED, 64
        elif isinstance(event, IterationClosed):
            tag, size = _CLOSED, 96 + len(event.error_message)
        else:
            raise TypeError(f"not an iteration event: {type(event).__name__}")
        row: list[Any] = [tag]
        for name in _FIELDS[tag]:
            value = getattr(event, name)
            if name == "samples":
                value, n = self.samples(value)
                size += n
            elif isinstance(value, enum.Enum):
                value = value.value
            row.append(value)
        return row, size


def _rebuild_samples(packed: list[Any]) -> Sequence[PVSample]:
    """The samples of an encoded ``ValuesReceived``, as :class:`PackedSamples` over the blob
    (nothing is copied or decoded here: the recording buffer decodes the PV maps in place).
    Hand-built samples (with float32 paths) are rebuilt one by one as hand-built samples."""
    pvs, blob, offsets, f32s = packed
    n = len(pvs)
    if not n:
        return ()
    pos = np.frombuffer(offsets, dtype="<i8")
    packed_samples = PackedSamples(pvs, blob, pos[:n].tolist(), pos[n:].tolist())
    if not f32s:
        return packed_samples
    samples = list(packed_samples.samples())
    for i, paths in f32s.items():
        # hand-built again (its bytes are not what a gateway sent: every float is float64),
        # so the recording buffer splits it as such instead of matching its bytes against a
        # payload template, which would give it the template's float widths
        s = samples[int(i)]
        samples[int(i)] = PVSample(s.pv, s.data, frozenset(paths))
    return tuple(samples)


def _decode_event(row: list[Any]) -> IterationEvent:
    tag = row[0]
    kwargs = dict(zip(_FIELDS[tag], row[1:], strict=True))
    if tag == _VALUES:
        kwargs["samples"] = _rebuild_samples(kwargs["samples"])
    else:
        for name, cls in _ENUM_FIELDS.items():
            if name in kwargs and kwargs[name] is not None:
                kwargs[name] = cls(kwargs[name])
    event: IterationEvent = _EVENT_TYPES[tag](**kwargs)
    return event


def _snapshot_dict(snapshot: SnapshotProperties) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(snapshot):
        value = getattr(snapshot, f.name)
        if isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out
