"""The live Karabo bridge as the run controller (:mod:`recorder.daemon.controller`) sees it:
the :class:`BridgeSink` and :class:`BridgeFactory` protocols, the production factory
:func:`karabo_bridge` (:mod:`recorder.sinks.bridge`), and :func:`bridge_status`, the ``bridge``
entry of a run's status document.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from recorder.client import IterationEvent, SnapshotProperties
from recorder.sinks.bridge import BridgeOptions


class BridgeSink(Protocol):
    """What the controller needs of a live sink
    (:class:`~recorder.sinks.bridge.sink.KaraboBridgeSink`)."""

    status: str
    reason: str
    endpoints: dict[str, str]
    counters: dict[str, int]

    @property
    def has_subscribers(self) -> bool: ...

    def handle(self, event: IterationEvent) -> None: ...

    def tag_iteration(self, iter_index: int, tags: Mapping[str, str]) -> None: ...

    def end_recording(self) -> None: ...

    def begin_recording(self, snapshot: SnapshotProperties | None) -> None: ...

    def close(self, status: str = "complete", reason: str = "") -> None: ...


class BridgeFactory(Protocol):
    def __call__(
        self, options: BridgeOptions, *, run_name: str, snapshot: SnapshotProperties | None
    ) -> BridgeSink: ...


def karabo_bridge(
    options: BridgeOptions, *, run_name: str, snapshot: SnapshotProperties | None
) -> BridgeSink:
    """The production bridge: :func:`recorder.sinks.bridge.create_bridge_sink`."""
    from recorder.sinks.bridge import create_bridge_sink

    return create_bridge_sink(options, run_name=run_name, snapshot=snapshot)


BRIDGE_COUNTERS = ("iterations", "served", "published", "replies", "dropped_iterations",
                   "skipped_incomplete", "late_tags")


def bridge_status(sink: BridgeSink) -> dict[str, Any]:
    """The ``bridge`` entry of a run's status document."""
    counters = sink.counters
    out: dict[str, Any] = {
        "status": sink.status,
        "reason": sink.reason,
        "endpoints": dict(sink.endpoints),
        "subscribers": bool(sink.has_subscribers),
    }
    out.update({k: int(counters.get(k, 0)) for k in BRIDGE_COUNTERS})
    return out
