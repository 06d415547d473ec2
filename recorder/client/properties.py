"""k2eg snapshot parameters, PV URI grammar and snapshot-name normalization (pure code).

Field names follow the official client's ``SnapshotProperties`` (PyPI ``k2eg``), so run
definitions and code written against that client carry over unchanged.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from recorder.errors import InvalidSnapshotPropertiesError

# The gateway's PV URI grammar (EpicsServiceManager.cpp): protocol, base name, optional .field
PV_URI_RE = re.compile(
    r"^(?P<protocol>pva?|ca)://"
    r"(?P<name>[a-zA-Z0-9\-_]+(?::[a-zA-Z0-9\-_]+)*)"
    r"(?:\.(?P<field>[a-zA-Z0-9\-_]+(?:\.[a-zA-Z0-9_]+)*))?\Z"
)
# What the official client accepts as a snapshot name
SNAPSHOT_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+\Z")
# The snapshot's topic is its normalized name (as long): Kafka refuses longer topic names
SNAPSHOT_NAME_MAX = 249
_NON_TOPIC_CHARS = re.compile(r"[^A-Za-z0-9\-]")
# The fields of snapshot messages besides the PV: a PV with one of these names would share its
# key with the field in the gateway's data message (one map), so its values could not be read
SNAPSHOT_METADATA_KEYS: frozenset[str] = frozenset(
    {
        "message_type",
        "timestamp",
        "iter_index",
        "msg_seq",
        "submission_seq",
        "last_submission_data",
        "header_timestamp",
        "snapshot_name",
        "error",
        "error_message",
        "total_messages",
        "message-size",  # injected by the official client; harmless to know
    }
)


class SnapshotType(enum.StrEnum):
    """k2eg repeating-snapshot types."""

    NORMAL = "normal"
    TIMEDBUFFERED = "timedbuffered"


@dataclass(frozen=True, slots=True)
class PVUri:
    """A parsed PV URI such as ``pva://LINAC:BPM1:X.VAL``."""

    uri: str
    protocol: str  # "pva", "ca" or "pv" (the gateway treats "pv" as CA)
    name: str  # base name: the key the gateway uses in every payload
    field: str | None

    @classmethod
    def parse(cls, uri: str) -> PVUri:
        match = PV_URI_RE.match(uri)
        if match is None:
            raise InvalidSnapshotPropertiesError(
                f"PV URI {uri!r} is not valid: expected pva://NAME, ca://NAME or pv://NAME "
                "with NAME made of [A-Za-z0-9-_] parts joined by ':' and an optional .field"
            )
        return cls(uri, match["protocol"], match["name"], match["field"])


def normalize_snapshot_name(name: str) -> str:
    """The gateway's snapshot topic name: ``[^A-Za-z0-9-]`` -> ``_``, then lower-case.

    ``"My Snap"`` and ``"my_snap"`` therefore share one topic (and one running snapshot).
    """
    return _NON_TOPIC_CHARS.sub("_", name).lower()


def snapshot_name_too_long(name: str) -> str:
    """Why a snapshot name longer than :data:`SNAPSHOT_NAME_MAX` is refused."""
    return (
        f"snapshot_name '{name[:40]}...' is {len(name)} characters long, at most "
        f"{SNAPSHOT_NAME_MAX} characters: the gateway publishes on a topic named as it "
        "(normalized), and Kafka refuses longer topic names"
    )


def message_field_clash(uri: str) -> str | None:
    """Why the PV of a valid ``uri`` cannot be recorded from a snapshot, or None: its name is
    a field of the gateway's data messages."""
    name = PVUri.parse(uri).name
    if name not in SNAPSHOT_METADATA_KEYS:
        return None
    return (
        f"{uri!r}: the PV name {name!r} is also a field of the gateway's snapshot data "
        "messages, which carry both in one map: its values could not be told apart"
    )


def pv_base_name(uri: str) -> str:
    """The key under which the gateway sends a PV's data (no protocol, no field)."""
    return PVUri.parse(uri).name


@dataclass(frozen=True, slots=True)
class SnapshotProperties:
    """Parameters of a repeating snapshot, as the official k2eg client names them."""

    snapshot_name: str
    pv_uri_list: Sequence[str]  # stored as a tuple
    time_window: int = 1000
    repeat_delay: int = 0
    sub_push_delay_msec: int = 0
    respect_push_order: bool = True
    triggered: bool = False
    type: SnapshotType = SnapshotType.NORMAL
    pv_field_filter_list: Sequence[str] = field(default_factory=tuple)  # stored as a tuple

    def __post_init__(self) -> None:
        # accept lists from callers, keep the object hashable
        object.__setattr__(self, "pv_uri_list", tuple(self.pv_uri_list))
        object.__setattr__(self, "pv_field_filter_list", tuple(self.pv_field_filter_list or ()))
        object.__setattr__(self, "type", SnapshotType(self.type))

    def validate(self) -> None:
        """Raise :class:`InvalidSnapshotPropertiesError` for what the gateway would reject."""
        problems = self.problems()
        if problems:
            raise InvalidSnapshotPropertiesError("; ".join(problems))

    def problems(self) -> list[str]:
        """Every reason the gateway (or the official client) would reject these properties."""
        out: list[str] = []
        if not self.snapshot_name or not SNAPSHOT_NAME_RE.match(self.snapshot_name):
            out.append(
                f"snapshot_name {self.snapshot_name!r} must be non-empty and match [A-Za-z0-9_-]+"
            )
        elif len(self.snapshot_name) > SNAPSHOT_NAME_MAX:
            out.append(snapshot_name_too_long(self.snapshot_name))
        if not self.pv_uri_list:
            out.append("pv_uri_list must hold at least one PV URI")
        for uri in self.pv_uri_list:
            if not isinstance(uri, str) or PV_URI_RE.match(uri) is None:
                out.append(f"pv_uri_list: {uri!r} is not a valid PV URI")
            elif clash := message_field_clash(uri):
                out.append(f"pv_uri_list: {clash}")
        for name, value in (
            ("time_window", self.time_window),
            ("repeat_delay", self.repeat_delay),
            ("sub_push_delay_msec", self.sub_push_delay_msec),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                out.append(f"{name} must be an integer >= 0 (got {value!r})")
        return out

    @property
    def topic(self) -> str:
        """The snapshot topic the gateway publishes to."""
        return normalize_snapshot_name(self.snapshot_name)

    @property
    def pv_names(self) -> tuple[str, ...]:
        """Base PV names, the keys the gateway uses in data messages (order kept, no repeats)."""
        seen: dict[str, None] = {}
        for uri in self.pv_uri_list:
            seen.setdefault(pv_base_name(uri), None)
        return tuple(seen)

    def command_fields(self) -> dict[str, Any]:
        """The ``repeating_snapshot`` command fields (gateway names, not client names)."""
        fields: dict[str, Any] = {
            "snapshot_name": self.snapshot_name,
            "pv_name_list": list(self.pv_uri_list),
            "time_window_msec": self.time_window,
            "repeat_delay_msec": self.repeat_delay,
            "sub_push_delay_msec": self.sub_push_delay_msec,
            "respect_push_order": self.respect_push_order,
            "triggered": self.triggered,
            "type": self.type.value,
        }
        if self.pv_field_filter_list:
            fields["pv_field_filter_list"] = list(self.pv_field_filter_list)
        return fields
