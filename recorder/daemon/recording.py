"""What a run records into: the :class:`Recording` and :class:`RecordingFactory` protocols
the run controller (:mod:`recorder.daemon.controller`) drives, and the production factory
:data:`hdf5_recording` (:class:`HDF5RecordingFactory`: an HDF5 writer process per recording, or
in-process with ``output.isolate: false``), with :func:`prewarm_writers` to start writer
processes ahead of time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from recorder.client import IterationEvent
from recorder.config.models import RunDefinition
from recorder.newest import Newest


class Recording(Protocol):
    """What the controller needs of a recording (:class:`~recorder.sinks.hdf5.HDF5Recording`)."""

    status: str
    reason: str
    current_path: Path | None
    paths: Newest[Path]  # finalized files: the newest (FILES_KEPT) and how many (.total)
    counters: dict[str, int]
    last_flush_seconds: float
    uid: str

    @property
    def last_durable_offset(self) -> dict[tuple[str, int], int]: ...

    @property
    def flush_seconds(self) -> Sequence[float]:
        """The durations of its latest flushes, newest last."""
        ...

    def handle(self, event: IterationEvent) -> None: ...

    def maybe_flush(self, now: float | None = None, *, idle: bool = False) -> bool: ...

    def flush(self) -> None: ...

    def close(self, status: str = "complete", reason: str = "") -> list[Path]:
        """Finalize; returns the files held in ``paths``."""
        ...


class RecordingFactory(Protocol):
    def __call__(
        self, definition: RunDefinition, *, seq: int, recording_uid: str | None,
        first_segment: int = 0, start_ns: int | None = None,
    ) -> Recording: ...


class HDF5RecordingFactory:
    """The production recording factory (:data:`hdf5_recording`): HDF5 files as the run
    definition's ``output:`` says, written by a writer process of its own
    (:class:`~recorder.sinks.process.IsolatedRecording`) unless ``output.isolate: false``
    (then :class:`~recorder.sinks.hdf5.HDF5Recording` in the daemon's process); see
    :func:`recorder.sinks.process.open_recording`.

    :meth:`prewarm` starts the writer processes of the next recordings ahead of time (the
    daemon at start-up for the runs it starts, the controller before subscribing), so their
    start-up (an interpreter, h5py: 0.5-1 s) overlaps connecting and subscribing instead of
    delaying the first write."""

    def __call__(
        self, definition: RunDefinition, *, seq: int, recording_uid: str | None,
        first_segment: int = 0, start_ns: int | None = None,
    ) -> Recording:
        from recorder.sinks.process import open_recording

        props = definition.snapshot.to_properties()
        return open_recording(
            definition.output,
            run_name=definition.name,
            snapshot=props,
            run_definition_text=definition.model_dump_json(indent=1),
            metadata=definition.metadata.file_attributes(),
            pv_uris=props.pv_uri_list,
            seq=seq,
            recording_uid=recording_uid,
            first_segment=first_segment,
            start_wall=None if start_ns is None else start_ns / 1e9,
        )

    @staticmethod
    def prewarm(*definitions: RunDefinition) -> None:
        """Have a writer process waiting for each of ``definitions`` that isolates its writer
        (the daemon calls it at start-up for the runs it starts, the controller before each
        subscription)."""
        count = sum(1 for d in definitions if d.output.isolate)
        if count:
            from recorder.sinks.process import prewarm_writer

            prewarm_writer(count)


hdf5_recording = HDF5RecordingFactory()


def prewarm_writers(factory: RecordingFactory, definitions: Sequence[RunDefinition],
                    log: Any) -> None:
    """Ask ``factory`` (if it can: ``prewarm``) to start the writers of ``definitions`` ahead
    of time. An optimization only: a failure is logged, never raised."""
    prewarm = getattr(factory, "prewarm", None)
    if prewarm is None or not definitions:
        return
    try:
        prewarm(*definitions)
    except Exception:
        log.exception("starting writer processes ahead of time failed")
