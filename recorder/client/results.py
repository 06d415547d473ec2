"""What the client hands back: gateway acknowledgements (:class:`Ack`), what a stop
observed (:class:`StopResult`), and whole iterations (:class:`Iteration`, gathered from the
events by :class:`IterationCollector`, as the official client's handler receives them).
Pure code: no threads, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from recorder.client.events import (
    IterationClosed,
    IterationEvent,
    IterationOpened,
    ValuesReceived,
)
from recorder.client.values import PVSample

__all__ = ["Ack", "Iteration", "IterationCollector", "StopResult"]

ALREADY_STOPPED = "is already stopped"  # the stop ack of a snapshot the gateway does not run


@dataclass(frozen=True, slots=True)
class Ack:
    """A gateway acknowledgement (error 0)."""

    command: str
    reply_id: str
    message: str
    publishing_topic: str | None = None


@dataclass(frozen=True, slots=True)
class StopResult:
    """What :meth:`K2egClient.snapshot_stop` observed.

    ``final_seen``: a tail published after the stop command was read (the final iteration);
    ``final`` is its close event. False when the client was not reading the snapshot, or the
    tail did not arrive within the final timeout (then the open iteration was closed
    ``CLOSED``).
    """

    snapshot_name: str
    topic: str
    message: str
    final_seen: bool
    final: IterationClosed | None = None

    @property
    def already_stopped(self) -> bool:
        """The gateway answered "is already stopped": it did not run the snapshot (it was
        restarted, or someone else stopped it), so no final iteration was published."""
        return ALREADY_STOPPED in self.message


@dataclass(frozen=True, slots=True)
class Iteration:
    """A whole iteration, as the official client's handler receives it (plus its status)."""

    topic: str
    snapshot_name: str | None
    iter_index: int
    header_timestamp_ns: int | None
    tail_timestamp_ns: int | None
    values: dict[str, list[PVSample]]
    closed: IterationClosed

    @property
    def complete(self) -> bool:
        return self.closed.complete


class IterationCollector:
    """An :data:`~recorder.client.client.EventHandler` that gathers events into whole
    :class:`Iteration` objects.

    ``pv_names`` (base names) get an empty list when they sent nothing, like the official
    client's ``{pv: [...]}`` for every PV of the request. Values of one PV keep arrival order.
    Pure code: no threads, no I/O.
    """

    def __init__(self, handler: Callable[[Iteration], None], pv_names: Iterable[str] = ()) -> None:
        self._handler = handler
        self._pv_names = tuple(pv_names)
        self._open: dict[tuple[str, int], dict[str, list[PVSample]]] = {}

    def __call__(self, event: IterationEvent) -> None:
        key = (event.topic, event.iter_index)
        if isinstance(event, IterationOpened):
            self._open[key] = {pv: [] for pv in self._pv_names}
        elif isinstance(event, ValuesReceived):
            values = self._open.setdefault(key, {pv: [] for pv in self._pv_names})
            for sample in event.samples:
                values.setdefault(sample.pv, []).append(sample)
        else:
            found = self._open.pop(key, None)
            values = found if found is not None else {pv: [] for pv in self._pv_names}
            self._handler(
                Iteration(
                    event.topic,
                    event.snapshot_name,
                    event.iter_index,
                    event.header_timestamp_ns,
                    event.tail_timestamp_ns,
                    values,
                    event,
                )
            )
