"""Live iterations over the Karabo bridge protocol (European XFEL's ``karabo_bridge``).

* :mod:`recorder.sinks.bridge.options` — ``BridgeOptions``, the ``output.bridge`` block of a
  run definition [pure].
* :mod:`recorder.sinks.bridge.mapping` — one iteration's PV samples -> the karabo-bridge
  ``(data, metadata)`` container [pure]. The single source of truth for that container: the
  live sink and :meth:`recorder.reader.RecordingFile.trains` both build it here, so code
  written against the live bridge runs unchanged on recorded files.
* :mod:`recorder.sinks.bridge.sink` — ``KaraboBridgeSink``, the sink the daemon drives; it
  serves iterations over ZeroMQ (the only module importing ``zmq``/``karabo_bridge``, which
  come with the optional extra ``k2eg-recorder[bridge]``).

Importing this package does not import zmq; :func:`create_bridge_sink` imports the sink
module when a run asks for a bridge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from recorder.errors import SinkError
from recorder.sinks.bridge.mapping import (
    RECORDER_SOURCE,
    IterationInfo,
    Train,
    build_train,
    flatten_sample,
    stacked_for,
)
from recorder.sinks.bridge.options import BridgeOptions

if TYPE_CHECKING:
    from recorder.client.properties import SnapshotProperties
    from recorder.sinks.bridge.sink import KaraboBridgeSink


def create_bridge_sink(
    options: BridgeOptions, *, run_name: str, snapshot: SnapshotProperties | None = None
) -> KaraboBridgeSink:
    """A :class:`~recorder.sinks.bridge.sink.KaraboBridgeSink` for a run whose output block
    has ``bridge:``. Raises :class:`~recorder.errors.SinkError` when the optional extra
    (pyzmq, karabo-bridge) is not installed; a port that cannot be bound does not raise (the
    sink's ``status`` is ``failed`` and recording goes on)."""
    try:
        from recorder.sinks.bridge.sink import KaraboBridgeSink
    except ImportError as exc:
        raise SinkError(
            f"output.bridge needs the optional extra: pip install 'k2eg-recorder[bridge]' ({exc})"
        ) from exc
    return KaraboBridgeSink(options, run_name=run_name, snapshot=snapshot)


__all__ = [
    "RECORDER_SOURCE",
    "BridgeOptions",
    "IterationInfo",
    "Train",
    "build_train",
    "create_bridge_sink",
    "flatten_sample",
    "stacked_for",
]
