"""Back-pressure sizing of a run's event queue (pure code).

Events flow: Kafka -> the client's consumer thread (assembly) -> the run's bounded event queue
(:class:`~recorder.client.RecurringSnapshot`) -> the run's worker thread -> the HDF5 recording.
When the worker falls behind (slow disk, a long flush), the queue reaches its bound and the
client *pauses* the snapshot topic (nothing more is fetched, nothing is dropped); once the
worker has taken it down to the low-water mark (half) the topic is resumed right after the
last delivered record. The queue is also bounded in bytes: the client pauses the topic once
its events hold ``max_pending_bytes`` of Kafka messages (64 MiB by default,
:data:`recorder.client.subscription.DEFAULT_MAX_PENDING_BYTES`), so a few large arrays
(images) pause it long before the event bound. The recording itself flushes when its buffers
exceed ``max_buffer_bytes``. So memory is bounded by ``max_pending`` events or 64 MiB of
messages, whichever comes first, plus one buffer, whatever the rate or the length of the run.

A ``ValuesReceived`` event holds one data batch, up to every PV of the snapshot, so the bound
is derived from a budget of *values* rather than a fixed number of events.
"""

from __future__ import annotations

DEFAULT_VALUE_BUDGET = 200_000  # PV values queued per run before its topic is paused
MIN_PENDING = 16
MAX_PENDING = 10_000


def pending_bound(
    n_pvs: int, value_budget: int = DEFAULT_VALUE_BUDGET, *, batches_per_iteration: int = 1
) -> int:
    """Events a run may queue: ``value_budget`` values worth of events, at least enough for a
    few whole iterations (header + batches + tail), within [MIN_PENDING, MAX_PENDING]."""
    per_event = max(1, n_pvs // max(1, batches_per_iteration))
    events = value_budget // per_event
    floor = max(MIN_PENDING, 4 * (batches_per_iteration + 2))
    return max(floor, min(MAX_PENDING, events))
