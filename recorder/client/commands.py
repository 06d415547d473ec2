"""k2eg command encoding (pure code): dicts of gateway field names, then compact JSON bytes.

The gateway reads each command as one JSON object (protocol §2.1): ``command`` selects it,
``reply_topic`` and ``reply_id`` route the answer, ``serialization`` is always ``"msgpack"``
here (the only format this client decodes). Commands are validated before they are built, so
what the gateway would reject (or, for a one-shot ``snapshot``, silently truncate at the first
malformed PV URI, §3.1) fails early with :class:`InvalidSnapshotPropertiesError`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Final

from recorder.client.properties import PV_URI_RE, SNAPSHOT_NAME_RE, SnapshotProperties
from recorder.errors import InvalidSnapshotPropertiesError

__all__ = [
    "GET",
    "REPEATING_SNAPSHOT",
    "REPEATING_SNAPSHOT_STOP",
    "REPEATING_SNAPSHOT_TRIGGER",
    "SERIALIZATION",
    "SNAPSHOT",
    "encode_command",
    "get_command",
    "new_reply_id",
    "repeating_snapshot_command",
    "snapshot_command",
    "stop_command",
    "trigger_command",
]

SNAPSHOT: Final = "snapshot"
REPEATING_SNAPSHOT: Final = "repeating_snapshot"
REPEATING_SNAPSHOT_TRIGGER: Final = "repeating_snapshot_trigger"
REPEATING_SNAPSHOT_STOP: Final = "repeating_snapshot_stop"
GET: Final = "get"
SERIALIZATION: Final = "msgpack"


def new_reply_id() -> str:
    """A fresh reply id (32 hex digits)."""
    return uuid.uuid4().hex


def encode_command(fields: Mapping[str, Any]) -> bytes:
    """Compact JSON (UTF-8) of a command; NaN/inf are refused (the gateway's parser would)."""
    try:
        return json.dumps(
            dict(fields), separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise InvalidSnapshotPropertiesError(f"command cannot be encoded as JSON: {exc}") from None


def _envelope(command: str, reply_topic: str, reply_id: str) -> dict[str, Any]:
    if not isinstance(reply_topic, str) or not reply_topic:
        raise InvalidSnapshotPropertiesError("reply_topic must be a non-empty string")
    if not isinstance(reply_id, str) or not reply_id:
        raise InvalidSnapshotPropertiesError("reply_id must be a non-empty string")
    return {
        "command": command,
        "serialization": SERIALIZATION,
        "reply_topic": reply_topic,
        "reply_id": reply_id,
    }


def _check_uri(uri: object) -> str:
    if not isinstance(uri, str) or PV_URI_RE.match(uri) is None:
        raise InvalidSnapshotPropertiesError(
            f"PV URI {uri!r} is not valid: expected pva://NAME, ca://NAME or pv://NAME"
        )
    return uri


def _check_name(snapshot_name: object) -> str:
    if not isinstance(snapshot_name, str) or not SNAPSHOT_NAME_RE.match(snapshot_name):
        raise InvalidSnapshotPropertiesError(
            f"snapshot_name {snapshot_name!r} must be non-empty and match [A-Za-z0-9_-]+"
        )
    return snapshot_name


def _check_msec(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**31 - 1:
        raise InvalidSnapshotPropertiesError(f"{name} must be an int32 >= 0 (got {value!r})")
    return value


def snapshot_command(
    pv_uri_list: Iterable[str],
    *,
    reply_topic: str,
    reply_id: str,
    time_window_msec: int | None = None,
) -> dict[str, Any]:
    """One-shot ``snapshot``: one reply per PV, then ``{error: 1}`` after the time window."""
    uris = [
        _check_uri(uri) for uri in ([pv_uri_list] if isinstance(pv_uri_list, str) else pv_uri_list)
    ]
    if not uris:
        raise InvalidSnapshotPropertiesError("pv_uri_list must hold at least one PV URI")
    fields = _envelope(SNAPSHOT, reply_topic, reply_id)
    fields["pv_name_list"] = uris
    if time_window_msec is not None:
        fields["time_window_msec"] = _check_msec("time_window_msec", time_window_msec)
    return fields


def repeating_snapshot_command(
    props: SnapshotProperties,
    *,
    reply_topic: str,
    reply_id: str,
    snapshot_type_key: str = "type",
) -> dict[str, Any]:
    """``repeating_snapshot`` start command from validated :class:`SnapshotProperties`.

    ``snapshot_type_key``: ``"type"`` for gateway main; the unmerged storage-node branch reads
    ``"type"`` as the command and wants ``"snapshot_type"`` instead (protocol §7.1).
    """
    if snapshot_type_key not in ("type", "snapshot_type"):
        raise InvalidSnapshotPropertiesError(
            f"snapshot_type_key must be 'type' or 'snapshot_type', not {snapshot_type_key!r}"
        )
    props.validate()
    fields = _envelope(REPEATING_SNAPSHOT, reply_topic, reply_id)
    body = props.command_fields()
    for name in ("time_window_msec", "repeat_delay_msec", "sub_push_delay_msec"):
        _check_msec(name, body[name])
    if snapshot_type_key != "type":
        body[snapshot_type_key] = body.pop("type")
    fields.update(body)
    return fields


def trigger_command(
    snapshot_name: str,
    *,
    reply_topic: str,
    reply_id: str,
    tags: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``repeating_snapshot_trigger`` (``tags`` are parsed and ignored by gateway main)."""
    fields = _envelope(REPEATING_SNAPSHOT_TRIGGER, reply_topic, reply_id)
    fields["snapshot_name"] = _check_name(snapshot_name)
    if tags is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
            raise InvalidSnapshotPropertiesError("tags must map strings to strings")
        fields["tags"] = dict(tags)
    return fields


def stop_command(snapshot_name: str, *, reply_topic: str, reply_id: str) -> dict[str, Any]:
    """``repeating_snapshot_stop``; the ack comes after the final iteration is published."""
    fields = _envelope(REPEATING_SNAPSHOT_STOP, reply_topic, reply_id)
    fields["snapshot_name"] = _check_name(snapshot_name)
    return fields


def get_command(pv_uri: str, *, reply_topic: str, reply_id: str) -> dict[str, Any]:
    """``get``: one reply ``{error, reply_id, "<base pv>": {...}}`` or an error reply."""
    fields = _envelope(GET, reply_topic, reply_id)
    fields["pv_name"] = _check_uri(pv_uri)
    return fields
