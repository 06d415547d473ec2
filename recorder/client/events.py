"""Iteration events: what the iteration assembler emits and what sinks consume.

A k2eg repeating snapshot publishes, per iteration, a header, one or more *batches* of data
messages (several with sub-push, the gateway's "submissions") and a tail. The assembler turns
that stream into three kinds of event, in order per topic:

* :class:`IterationOpened` once per iteration (also when its header was lost),
* :class:`ValuesReceived` once per data batch, as soon as the batch is known to be over, so
  sub-push partial results flow out while the iteration is still open,
* :class:`IterationClosed` once per iteration: complete (tail seen, nothing missing) or
  incomplete with a reason.

Every event carries the Kafka ``topic``, ``partition`` and the highest ``offset`` of the
messages it was built from, so a consumer can record how far it has durably written.
Timestamps are int64 nanoseconds since the Unix epoch (the gateway sends ms; we normalize).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from recorder.client.values import PVSample


class IterationStatus(enum.StrEnum):
    COMPLETE = "complete"
    INCOMPLETE = "incomplete"


class IncompleteReason(enum.StrEnum):
    """Why an iteration was closed without being complete."""

    NO_TAIL = "no_tail"  # a newer iteration started before this one's tail arrived
    TIMEOUT = "timeout"  # the per-iteration deadline passed without a tail
    GATEWAY_ERROR = "gateway_error"  # the tail carried error != 0
    MISSING_MESSAGES = "missing_messages"  # sequenced stream: msg_seq gaps at the deadline
    NO_HEADER = "no_header"  # tail seen, but the header (and maybe data) never came
    CLOSED = "closed"  # the client or the topic's subscription was closed first


@dataclass(frozen=True, slots=True)
class IterationOpened:
    topic: str
    snapshot_name: str | None  # from the header; None when the header was lost
    iter_index: int
    header_timestamp_ns: int | None  # None when the iteration was opened by data, not a header
    partition: int = 0
    offset: int = -1


@dataclass(frozen=True, slots=True)
class ValuesReceived:
    topic: str
    iter_index: int
    batch: int  # 1-based number of this batch within the iteration
    timestamp_ns: int  # the gateway's batch timestamp
    # the client gives a tuple; a writer process gets recorder.sinks.packed.PackedSamples
    samples: Sequence[PVSample]
    submission_seq: int | None = None  # sequenced stream only
    late: bool = False  # data that arrived after its batch had already been emitted
    partition: int = 0
    offset: int = -1
    # bytes of the Kafka messages that carried these samples (the client's back-pressure
    # counts them; 0 when not known)
    nbytes: int = 0


@dataclass(frozen=True, slots=True)
class IterationClosed:
    topic: str
    snapshot_name: str | None
    iter_index: int
    status: IterationStatus
    reason: IncompleteReason | None
    header_timestamp_ns: int | None
    tail_timestamp_ns: int | None
    error_code: int = 0  # the tail's `error`
    error_message: str = ""
    n_values: int = 0  # PV values delivered in this iteration
    n_pvs: int = 0  # distinct PVs among them
    n_batches: int = 0  # ValuesReceived events emitted for this iteration
    expected_messages: int | None = None  # sequenced: `total_messages` from the tail
    missing_messages: int | None = None  # sequenced: messages never received
    duplicates: int = 0  # duplicate data messages dropped
    partition: int = 0
    offset: int = -1
    # the Kafka timestamp of the tail's message (ms; the gateway's producer clock for
    # CreateTime topics), None when unknown: a stop compares it with its ack's
    tail_kafka_time_ms: int | None = None

    @property
    def complete(self) -> bool:
        return self.status is IterationStatus.COMPLETE


IterationEvent = IterationOpened | ValuesReceived | IterationClosed
