"""Run definitions: what one recording run records, and where (pydantic v2, pure code).

A run definition in YAML (see :mod:`recorder.config.loader` for the file layout)::

    name: bpm-10hz                 # unique across all loaded files
    autostart: true                # start recording when the daemon starts (default true);
                                   # false: wait for an admin `start`
    snapshot:                      # exactly k2eg's SnapshotProperties fields and defaults
      snapshot_name: bpm_10hz
      pv_uri_list: [pva://SIM:AI:DOUBLE:1, pva://SIM:WF:FLOAT:1]
      time_window: 100             # ms: period (normal) / window and look-back (timedbuffered)
      repeat_delay: 0
      sub_push_delay_msec: 0       # timedbuffered, non-triggered only
      respect_push_order: true
      triggered: false
      type: normal                 # normal | timedbuffered
      pv_field_filter_list: []     # timedbuffered only
    output:                        # recorder.sinks.options.OutputOptions
      directory: /data/k2eg-recorder/bpm
      file_template: "{run}_{start:%Y%m%dT%H%M%SZ}_{seq:04d}.h5"
    metadata:                      # copied into every file of the run
      description: BPM orbit at 10 Hz
      experiment: MD-2024-11
      tags: [bpm, orbit]
      attributes: {operator: jdoe, shift: 3}

Values are validated strictly (``"100"`` is not an integer, ``yes`` is not a boolean).
Errors raised by validators carry a ``subloc`` in their context so the loader can point at the
exact YAML line (for example the duplicate PV in a list).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import PurePosixPath
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from recorder.client.properties import (
    PV_URI_RE,
    SNAPSHOT_NAME_MAX,
    SNAPSHOT_NAME_RE,
    PVUri,
    SnapshotProperties,
    SnapshotType,
    message_field_clash,
    normalize_snapshot_name,
    snapshot_name_too_long,
)
from recorder.sinks.options import OutputOptions
from recorder.validation import invalid, invalid_all

__all__ = [
    "RUN_NAME_RE",
    "RunDefinition",
    "RunMetadata",
    "SnapshotSpec",
    "directory_problem",
    "invalid",
]

RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}\Z")
FIELD_FILTER_RE = re.compile(r"^[A-Za-z0-9_]+\Z")
ATTRIBUTE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}\Z")
METADATA_FIELDS = frozenset({"description", "experiment", "tags"})
"""The fields of ``metadata`` that the free ``attributes`` sit beside in a file's metadata."""
INT32_MAX = 2**31 - 1
NAME_MAX_BYTES = 255  # Linux NAME_MAX: one path component
PATH_MAX_BYTES = 4096  # Linux PATH_MAX, the terminating NUL included
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(SnapshotProperties)}


def _check_run_name(name: str) -> str:
    if not RUN_NAME_RE.match(name):
        raise invalid(
            f"run name {name!r} must start with a letter or digit and use only "
            "[A-Za-z0-9_.-] (at most 100 characters)"
        )
    return name


def _check_snapshot_name(name: str) -> str:
    if not SNAPSHOT_NAME_RE.match(name):
        raise invalid(f"snapshot_name {name!r} must be non-empty and match [A-Za-z0-9_-]+")
    if len(name) > SNAPSHOT_NAME_MAX:
        raise invalid(snapshot_name_too_long(name))
    return name


def _check_pv_uri(uri: str) -> str:
    if PV_URI_RE.match(uri) is None:
        raise invalid(
            f"{uri!r} is not a valid PV URI: expected pva://NAME, ca://NAME or pv://NAME with "
            "NAME made of [A-Za-z0-9-_] parts joined by ':' and an optional .field"
        )
    clash = message_field_clash(uri)
    if clash:
        raise invalid(clash)
    return uri


def _check_field_filter(name: str) -> str:
    if "." in name and all(FIELD_FILTER_RE.match(part) for part in name.split(".")):
        # k2eg's SnapshotOpInfo::filterPVField builds a structure with a field of that name,
        # which pvData refuses (field names are [A-Za-z0-9_]): it throws in the gateway's
        # snapshot loop, which does not catch it
        raise invalid(
            f"{name!r}: the gateway filters only a PV's top-level fields; a nested name "
            f"makes its filter fail (pvData refuses '.' in a field name) instead of "
            f"sending data: name the top-level field {name.split('.', 1)[0]!r}"
        )
    if not FIELD_FILTER_RE.match(name):
        raise invalid(f"{name!r} is not a PV field name ([A-Za-z0-9_]+)")
    return name


def _check_attribute_value(value: Any) -> str | int | float | bool:
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise invalid("attribute values must be finite numbers")
        return value
    raise invalid(
        "attribute values must be a string, integer, number or boolean "
        f"(got {type(value).__name__})"
    )


RunName = Annotated[str, AfterValidator(_check_run_name)]
SnapshotName = Annotated[str, AfterValidator(_check_snapshot_name)]
PvUri = Annotated[str, AfterValidator(_check_pv_uri)]
FieldFilter = Annotated[str, AfterValidator(_check_field_filter)]
AttributeValue = Annotated[Any, AfterValidator(_check_attribute_value)]
Millis = Annotated[int, Field(ge=0, le=INT32_MAX)]


def cadence(*, triggered: bool, timedbuffered: bool, time_window: int,
            sub_push_delay_msec: int = 0) -> str:
    """What a snapshot's settings make the gateway publish, in words (``validate``,
    ``inspect``)."""
    if triggered:
        text = "one iteration per admin trigger"
        if timedbuffered:
            text += f", looking back {time_window} ms"
        return text
    if timedbuffered:
        text = f"every event, in {time_window} ms windows"
        if sub_push_delay_msec:
            text += f", pushed every {sub_push_delay_msec} ms"
        return text
    return f"latest values every {time_window} ms"


class SnapshotSpec(BaseModel):
    """The ``snapshot:`` block: the fields of k2eg's ``SnapshotProperties``, same names and
    defaults (checked by a test), plus the checks the gateway would only log and ignore."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    snapshot_name: SnapshotName = Field(
        description="k2eg snapshot name ([A-Za-z0-9_-]+, at most 249 characters). The "
        "gateway publishes on the topic named by normalize_snapshot_name(snapshot_name)."
    )
    pv_uri_list: tuple[PvUri, ...] = Field(
        min_length=1, description="PV URIs (pva://NAME, ca://NAME, optional .field)."
    )
    time_window: Millis = Field(
        default=_DEFAULTS["time_window"],
        description="ms. normal: the period; timedbuffered: the window and look-back.",
    )
    repeat_delay: Millis = Field(default=_DEFAULTS["repeat_delay"], description="ms (k2eg field).")
    sub_push_delay_msec: Millis = Field(
        default=_DEFAULTS["sub_push_delay_msec"],
        description="ms between partial pushes inside a window (timedbuffered, not triggered).",
    )
    respect_push_order: bool = Field(default=_DEFAULTS["respect_push_order"])
    triggered: bool = Field(
        default=_DEFAULTS["triggered"],
        description="One iteration per admin `trigger` instead of one per time_window.",
    )
    type: SnapshotType = Field(default=_DEFAULTS["type"], description="normal | timedbuffered")
    pv_field_filter_list: tuple[FieldFilter, ...] = Field(
        default=(), description="PV fields to keep (timedbuffered only)."
    )

    @field_validator("pv_uri_list")
    @classmethod
    def _distinct_base_names(cls, uris: tuple[str, ...]) -> tuple[str, ...]:
        # the gateway keys data by base name: pva://X and ca://X.VAL would mix in one dataset
        first: dict[str, int] = {}
        problems: list[tuple[str, tuple[str | int, ...]]] = []
        for index, uri in enumerate(uris):
            name = PVUri.parse(uri).name
            if name in first:
                problems.append((
                    f"{uri!r} names the same PV ({name}) as entry {first[name]} "
                    f"({uris[first[name]]!r}); the gateway sends both under one key",
                    (index,),
                ))
            else:
                first[name] = index
        if problems:  # every one at once, as validate promises
            raise invalid_all(problems)
        return uris

    @field_validator("pv_field_filter_list")
    @classmethod
    def _distinct_filters(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        seen: set[str] = set()
        problems: list[tuple[str, tuple[str | int, ...]]] = []
        for index, name in enumerate(value):
            if name in seen:
                problems.append((f"{name!r} is listed twice", (index,)))
            seen.add(name)
        if problems:
            raise invalid_all(problems)
        return value

    @model_validator(mode="after")
    def _only_used_fields(self) -> SnapshotSpec:
        """Settings the gateway would flood with or silently ignore; every one at once."""
        timedbuffered = self.type is SnapshotType.TIMEDBUFFERED
        problems: list[tuple[str, tuple[str | int, ...]]] = []
        if self.time_window == 0 and not self.triggered:
            problems.append((
                "time_window: 0 on a periodic snapshot makes the gateway publish an iteration "
                "on every pass of its ~1 ms loop (a flood); give the period in ms",
                ("time_window",)))
        if self.sub_push_delay_msec and (not timedbuffered or self.triggered):
            problems.append((
                "sub_push_delay_msec is only used by timedbuffered, non-triggered snapshots "
                "(the gateway would ignore it here)",
                ("sub_push_delay_msec",)))
        if self.pv_field_filter_list and not timedbuffered:
            problems.append((
                "pv_field_filter_list is only used by timedbuffered snapshots "
                "(the gateway would ignore it here)",
                ("pv_field_filter_list",)))
        if problems:
            raise invalid_all(problems)
        return self

    @property
    def topic(self) -> str:
        """The Kafka topic the gateway publishes this snapshot on."""
        return normalize_snapshot_name(self.snapshot_name)

    @property
    def pv_names(self) -> tuple[str, ...]:
        """Base PV names (the keys of the gateway's data messages), in list order."""
        return tuple(PVUri.parse(uri).name for uri in self.pv_uri_list)

    def to_properties(self) -> SnapshotProperties:
        """The k2eg client's value object for this snapshot."""
        return SnapshotProperties(
            snapshot_name=self.snapshot_name,
            pv_uri_list=self.pv_uri_list,
            time_window=self.time_window,
            repeat_delay=self.repeat_delay,
            sub_push_delay_msec=self.sub_push_delay_msec,
            respect_push_order=self.respect_push_order,
            triggered=self.triggered,
            type=self.type,
            pv_field_filter_list=self.pv_field_filter_list,
        )


class RunMetadata(BaseModel):
    """Free description of a run, copied into every file it writes."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    description: str = Field(default="", max_length=4096)
    experiment: str = Field(default="", max_length=256)
    tags: tuple[str, ...] = Field(default=(), description="labels, e.g. [bpm, orbit]")
    attributes: dict[str, AttributeValue] = Field(
        default_factory=dict,
        description="free key -> scalar (string, integer, number, boolean) file attributes",
    )

    @field_validator("tags")
    @classmethod
    def _tags(cls, tags: tuple[str, ...]) -> tuple[str, ...]:
        seen: set[str] = set()
        problems: list[tuple[str, tuple[str | int, ...]]] = []
        for index, tag in enumerate(tags):
            if not tag.strip():
                problems.append(("tags must not be empty", (index,)))
            elif tag in seen:
                problems.append((f"tag {tag!r} is listed twice", (index,)))
            seen.add(tag)
        if problems:
            raise invalid_all(problems)
        return tags

    @field_validator("attributes")
    @classmethod
    def _attribute_names(cls, attributes: dict[str, Any]) -> dict[str, Any]:
        problems: list[tuple[str, tuple[str | int, ...]]] = []
        for key in attributes:
            if not ATTRIBUTE_NAME_RE.match(key):
                problems.append((
                    f"attribute name {key!r} must match {ATTRIBUTE_NAME_RE.pattern}", (key,)))
            elif key in METADATA_FIELDS:  # one map in the file: it would replace the field
                problems.append((f"attribute {key!r} would replace metadata.{key} in the files; "
                                 f"set metadata.{key}, or give the attribute another name", (key,)))
        if problems:
            raise invalid_all(problems)
        return attributes

    def file_attributes(self) -> dict[str, str | int | float | bool | list[str]]:
        """What a sink writes as file attributes: description, experiment, tags, then the free
        ``attributes`` (a sink should keep them apart from its own, e.g. in a group)."""
        out: dict[str, str | int | float | bool | list[str]] = {
            "description": self.description,
            "experiment": self.experiment,
            "tags": list(self.tags),
        }
        out.update(self.attributes)
        return out


def directory_problem(directory: str) -> str | None:
    """Why ``directory`` is not a safe output directory, or None (absolute, no '..', no
    NUL: no file system takes one in a path)."""
    if "\x00" in directory:
        return f"output directory {directory!r} must not contain a NUL character ('\\0')"
    path = PurePosixPath(directory)
    if not path.is_absolute():
        return (
            f"output directory {directory!r} must be an absolute path "
            "(a daemon's working directory is not a place for data)"
        )
    if ".." in path.parts:
        return f"output directory {directory!r} must not contain '..'"
    if len(directory.encode("utf-8", "surrogateescape")) > PATH_MAX_BYTES - NAME_MAX_BYTES:
        return (f"output directory '{directory[:40]}...' is too long: at most "
                f"{PATH_MAX_BYTES - NAME_MAX_BYTES} bytes leave room for its file names "
                f"(Linux takes paths of up to {PATH_MAX_BYTES})")
    for part in path.parts:
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX_BYTES:
            return (f"output directory: its part '{part[:40]}...' is longer than "
                    f"{NAME_MAX_BYTES} bytes, the longest name a Linux file system takes")
    return None


class RunDefinition(BaseModel):
    """One recording run: a k2eg repeating snapshot recorded into HDF5 files."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: RunName = Field(description="Unique run name (admin commands, metrics, file names).")
    autostart: bool = Field(
        default=True,
        description="Start recording when the daemon starts (and when added by a reload); "
        "false: wait for an admin `start`.",
    )
    snapshot: SnapshotSpec
    output: OutputOptions
    metadata: RunMetadata = Field(default_factory=RunMetadata)

    @field_validator("output")
    @classmethod
    def _safe_directory(cls, output: OutputOptions) -> OutputOptions:
        problem = directory_problem(str(output.directory))
        if problem is not None:
            raise invalid(problem, "directory")
        return output

    @property
    def triggered(self) -> bool:
        return self.snapshot.triggered

    @property
    def mode(self) -> str:
        """``periodic`` or ``triggered``, followed by the snapshot type, for display."""
        kind = "triggered" if self.snapshot.triggered else "periodic"
        return f"{kind} {self.snapshot.type.value}"
