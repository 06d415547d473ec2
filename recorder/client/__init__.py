"""The embedded k2eg client: snapshots from the k2eg gateway over Kafka.

Public API: :class:`K2egClient` (one-shot, recurring, trigger, stop, get) with
:class:`SnapshotProperties` (the official client's field names), the iteration events it
delivers, typed PV values, and the Kafka adapter's :class:`StartAt` positions.
"""

from recorder.client.client import (
    Ack,
    EventHandler,
    Iteration,
    IterationCollector,
    K2egClient,
    OneShotHandler,
    RecurringSnapshot,
    StopResult,
    iteration_timeout_s,
)
from recorder.client.events import (
    IncompleteReason,
    IterationClosed,
    IterationEvent,
    IterationOpened,
    IterationStatus,
    ValuesReceived,
)
from recorder.client.kafka import KafkaAdapter, StartAt
from recorder.client.properties import (
    PVUri,
    SnapshotProperties,
    SnapshotType,
    normalize_snapshot_name,
    pv_base_name,
)
from recorder.client.values import EnumValue, NDArrayValue, PVSample, TableValue, ValueKind
from recorder.errors import (
    ClientClosedError,
    ClientError,
    GatewayError,
    GatewayTimeoutError,
    InvalidSnapshotPropertiesError,
    TransportError,
)

__all__ = [
    "Ack",
    "ClientClosedError",
    "ClientError",
    "EnumValue",
    "EventHandler",
    "GatewayError",
    "GatewayTimeoutError",
    "IncompleteReason",
    "InvalidSnapshotPropertiesError",
    "Iteration",
    "IterationClosed",
    "IterationCollector",
    "IterationEvent",
    "IterationOpened",
    "IterationStatus",
    "K2egClient",
    "KafkaAdapter",
    "NDArrayValue",
    "OneShotHandler",
    "PVSample",
    "PVUri",
    "RecurringSnapshot",
    "SnapshotProperties",
    "SnapshotType",
    "StartAt",
    "StopResult",
    "TableValue",
    "TransportError",
    "ValueKind",
    "ValuesReceived",
    "iteration_timeout_s",
    "normalize_snapshot_name",
    "pv_base_name",
]
