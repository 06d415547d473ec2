"""The snapshot stream's messages as the gateway builds them: header, data and tail maps
(pure code; the simulator's engine and ``k2eg-recorder replay`` both publish these).

Key order and presence follow the gateway (research notes ``k2eg-protocol.md`` §2 and
``k2eg-protocol-sequenced.md``): a header is ``{message_type: 0, snapshot_name, timestamp,
iter_index}``, a data message ``{message_type: 1, timestamp, iter_index, <pv>: {...}}``, a tail
``{message_type: 2, error, [error_message], iter_index, timestamp, snapshot_name}``; the
sequenced stream adds ``msg_seq`` and ``submission_seq`` to each, ``last_submission_data`` to
the last data message of a submission and ``total_messages`` to the tail. Timestamps are
wall-clock milliseconds.
"""

from __future__ import annotations

from typing import Any


def header_message(snapshot: str, timestamp_ms: int, iter_index: int, *,
                   msg_seq: int | None = None, submission_seq: int = 1) -> dict[str, Any]:
    """A header; ``msg_seq`` given: the sequenced stream's."""
    msg: dict[str, Any] = {"message_type": 0, "snapshot_name": snapshot,
                           "timestamp": timestamp_ms, "iter_index": iter_index}
    if msg_seq is not None:
        msg["msg_seq"] = msg_seq
        msg["submission_seq"] = submission_seq
    return msg


def data_message(pv: str, structure: Any, timestamp_ms: int, iter_index: int, *,
                 msg_seq: int | None = None, submission_seq: int = 1,
                 last_of_submission: bool = False) -> dict[str, Any]:
    """A data message carrying one PV's structure."""
    msg: dict[str, Any] = {"message_type": 1, "timestamp": timestamp_ms, "iter_index": iter_index}
    if msg_seq is not None:
        msg["msg_seq"] = msg_seq
        msg["submission_seq"] = submission_seq
        if last_of_submission:
            msg["last_submission_data"] = True
    msg[pv] = structure
    return msg


def tail_message(snapshot: str, timestamp_ms: int, iter_index: int, *, error: int = 0,
                 error_message: str = "", json_form: bool = False,
                 msg_seq: int | None = None, submission_seq: int = 1) -> dict[str, Any]:
    """A tail; ``error_message`` is only sent when non-empty (always in the JSON form, as the
    gateway does); ``msg_seq`` given: the sequenced stream's, ``total_messages`` = ``msg_seq``."""
    msg: dict[str, Any] = {"message_type": 2, "error": error}
    if error_message or json_form:
        msg["error_message"] = error_message
    msg |= {"iter_index": iter_index, "timestamp": timestamp_ms, "snapshot_name": snapshot}
    if msg_seq is not None:
        msg["msg_seq"] = msg_seq
        msg["total_messages"] = msg_seq
        msg["submission_seq"] = submission_seq
    return msg
