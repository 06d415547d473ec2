"""The embedded k2eg client: snapshots from the k2eg gateway over Kafka.

Public API: :class:`K2egClient` (one-shot, recurring, trigger, stop, get) with
:class:`SnapshotProperties` (the official client's field names), the iteration events it
delivers, typed PV values, and the Kafka adapter's :class:`StartAt` positions.

The names are imported lazily (PEP 562): ``import recorder.client.events`` or ``.values`` (what
a writer process needs) does not load confluent-kafka, pydantic and the client machinery.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recorder.client.client import (
        EventHandler,
        K2egClient,
        OneShotHandler,
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
    from recorder.client.results import Ack, Iteration, IterationCollector, StopResult
    from recorder.client.subscription import RecurringSnapshot
    from recorder.client.values import EnumValue, NDArrayValue, PVSample, TableValue, ValueKind
    from recorder.errors import (
        ClientClosedError,
        ClientError,
        GatewayError,
        GatewayTimeoutError,
        InvalidSnapshotPropertiesError,
        TransportError,
    )

# name -> the module that defines it
_LAZY: dict[str, str] = {
    **dict.fromkeys(
        ("EventHandler", "K2egClient", "OneShotHandler", "iteration_timeout_s"),
        "recorder.client.client",
    ),
    **dict.fromkeys(
        ("Ack", "Iteration", "IterationCollector", "StopResult"), "recorder.client.results"
    ),
    **dict.fromkeys(("RecurringSnapshot",), "recorder.client.subscription"),
    **dict.fromkeys(
        (
            "IncompleteReason",
            "IterationClosed",
            "IterationEvent",
            "IterationOpened",
            "IterationStatus",
            "ValuesReceived",
        ),
        "recorder.client.events",
    ),
    **dict.fromkeys(("KafkaAdapter", "StartAt"), "recorder.client.kafka"),
    **dict.fromkeys(
        (
            "PVUri",
            "SnapshotProperties",
            "SnapshotType",
            "normalize_snapshot_name",
            "pv_base_name",
        ),
        "recorder.client.properties",
    ),
    **dict.fromkeys(
        ("EnumValue", "NDArrayValue", "PVSample", "TableValue", "ValueKind"),
        "recorder.client.values",
    ),
    **dict.fromkeys(
        (
            "ClientClosedError",
            "ClientError",
            "GatewayError",
            "GatewayTimeoutError",
            "InvalidSnapshotPropertiesError",
            "TransportError",
        ),
        "recorder.errors",
    ),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


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
