"""Samples that crossed the pipe to a writer process, still in one buffer.

A ``ValuesReceived`` travels to the writer as the PV names, one blob of the messages the
samples were received in and each PV map's (start, end) position in it (see
:mod:`recorder.sinks.process_codec`). :class:`PackedSamples` keeps them that way: the
recording buffer (:mod:`recorder.sinks.buffer`) stores the blob once with the positions and
decodes the PV maps in place when it flushes, with no object per sample. Anything else that
looks at the samples gets ordinary lazily-built :class:`~recorder.client.values.PVSample` s,
each over its own copy of its PV map, made on first use.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import repeat
from typing import overload

from recorder.client.values import PVSample


class PackedSamples(Sequence[PVSample]):
    """The samples of one event: ``pvs[i]``'s PV map is ``blob[starts[i]:ends[i]]``.

    The caller vouches that each range holds one complete msgpack map (the client's wire
    decoder checked it before the samples were sent)."""

    __slots__ = ("_samples", "blob", "ends", "pvs", "starts")

    def __init__(self, pvs: list[str], blob: bytes, starts: list[int], ends: list[int]) -> None:
        if not len(pvs) == len(starts) == len(ends):
            raise ValueError("one (start, end) per PV")
        self.pvs = pvs
        self.blob = blob
        self.starts = starts
        self.ends = ends
        self._samples: tuple[PVSample, ...] | None = None

    @property
    def payload_bytes(self) -> int:
        """Bytes of the PV maps (the blob less the message headers around them)."""
        return sum(self.ends) - sum(self.starts)

    def samples(self) -> tuple[PVSample, ...]:
        """Each as a lazily-built sample over its own bytes (one small copy each; made once)."""
        if self._samples is None:
            blob = self.blob
            pieces = map(blob.__getitem__, map(slice, self.starts, self.ends))
            self._samples = tuple(map(PVSample.from_raw, self.pvs, pieces, repeat(0)))
        return self._samples

    def __len__(self) -> int:
        return len(self.pvs)

    @overload
    def __getitem__(self, index: int) -> PVSample: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[PVSample, ...]: ...
    def __getitem__(self, index: int | slice) -> PVSample | tuple[PVSample, ...]:
        return self.samples()[index]

    def __iter__(self) -> Iterator[PVSample]:
        return iter(self.samples())

    def __repr__(self) -> str:
        return f"PackedSamples({len(self.pvs)} samples, {len(self.blob)} bytes)"
