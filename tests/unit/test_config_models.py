"""RunDefinition / SnapshotSpec: k2eg field parity, strict values, safety checks."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from pydantic import ValidationError

from recorder.client.properties import SnapshotProperties, SnapshotType
from recorder.config.models import RunDefinition, SnapshotSpec


def run(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "bpm",
        "snapshot": {"snapshot_name": "bpm_snap", "pv_uri_list": ["pva://SIM:AI:DOUBLE:1"]},
        "output": {"directory": "/data/bpm"},
    }
    for key, value in over.items():
        if key in ("snapshot", "output", "metadata") and isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    return data


def test_snapshot_fields_and_defaults_are_k2egs() -> None:
    k2eg = {f.name: f for f in dataclasses.fields(SnapshotProperties)}
    assert set(SnapshotSpec.model_fields) == set(k2eg)
    for name, info in SnapshotSpec.model_fields.items():
        if info.is_required():
            assert k2eg[name].default is dataclasses.MISSING, name
        else:
            expected: object = k2eg[name].default
            factory = k2eg[name].default_factory
            if expected is dataclasses.MISSING and callable(factory):  # pv_field_filter_list
                expected = factory()
            assert info.get_default(call_default_factory=True) == expected, name


def test_to_properties() -> None:
    d = RunDefinition.model_validate(
        run(
            snapshot={
                "pv_uri_list": ["pva://SIM:AI:DOUBLE:1", "ca://SIM:WF:FLOAT:1.VAL"],
                "type": "timedbuffered",
                "time_window": 500,
                "sub_push_delay_msec": 100,
                "pv_field_filter_list": ["value"],
            }
        )
    )
    props = d.snapshot.to_properties()
    assert props == SnapshotProperties(
        snapshot_name="bpm_snap",
        pv_uri_list=("pva://SIM:AI:DOUBLE:1", "ca://SIM:WF:FLOAT:1.VAL"),
        time_window=500,
        sub_push_delay_msec=100,
        type=SnapshotType.TIMEDBUFFERED,
        pv_field_filter_list=("value",),
    )
    assert props.problems() == []
    assert d.snapshot.topic == "bpm_snap"
    assert d.autostart is True
    assert d.mode == "periodic timedbuffered"


def errors(data: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    with pytest.raises(ValidationError) as info:
        RunDefinition.model_validate_json(__import__("json").dumps(data), strict=True)
    out = []
    for e in info.value.errors():
        ctx = e.get("ctx") or {}
        out.append((tuple(e["loc"]) + tuple(ctx.get("subloc", ())), e["msg"]))
    return out


@pytest.mark.parametrize(
    ("data", "loc", "needle"),
    [
        (run(name="has space"), ("name",), "run name"),
        (run(name="-lead"), ("name",), "run name"),
        (run(autostart="yes"), ("autostart",), "valid boolean"),
        (run(snapshot={"snapshot_name": "a b"}), ("snapshot", "snapshot_name"), "[A-Za-z0-9_-]+"),
        (  # its topic is the normalized name: Kafka refuses topic names beyond 249 chars
            run(snapshot={"snapshot_name": "s" * 250}),
            ("snapshot", "snapshot_name"),
            "at most 249 characters",
        ),
        (run(snapshot={"pv_uri_list": []}), ("snapshot", "pv_uri_list"), "at least 1"),
        (
            run(snapshot={"pv_uri_list": ["pva://A", "http://B"]}),
            ("snapshot", "pv_uri_list", 1),
            "not a valid PV URI",
        ),
        (
            run(snapshot={"pv_uri_list": ["pva://A", "pva://timestamp", "ca://B"]}),
            ("snapshot", "pv_uri_list", 1),
            "the PV name 'timestamp' is also a field of the gateway's snapshot data messages",
        ),
        (
            run(snapshot={"pv_uri_list": ["ca://iter_index.VAL"]}),
            ("snapshot", "pv_uri_list", 0),
            "could not be told apart",
        ),
        (
            run(snapshot={"pv_uri_list": ["pva://A:B", "ca://A:B.VAL"]}),
            ("snapshot", "pv_uri_list", 1),
            "same PV (A:B)",
        ),
        (run(snapshot={"time_window": "100"}), ("snapshot", "time_window"), "valid integer"),
        (run(snapshot={"time_window": 1.5}), ("snapshot", "time_window"), "valid integer"),
        (run(snapshot={"time_window": -1}), ("snapshot", "time_window"), "greater than or equal"),
        (run(snapshot={"time_window": 0}), ("snapshot", "time_window"), "a flood"),
        (
            run(output={"segment": {"max_seconds": float("inf")}}),
            ("output", "segment", "max_seconds"),
            "finite number",
        ),
        (
            run(snapshot={"time_window": 0, "type": "timedbuffered"}),
            ("snapshot", "time_window"),
            "~1 ms loop",
        ),
        (
            run(output={"compression": "gzip", "compression_level": 15}),
            ("output", "compression_level"),
            "gzip compression_level must be 0..9",
        ),
        (
            run(output={"compression": "lzf", "compression_level": 1}),
            ("output", "compression_level"),
            "not allowed with compression 'lzf'",
        ),
        (run(snapshot={"repeat_delay": 2**31}), ("snapshot", "repeat_delay"), "less than or equal"),
        (run(snapshot={"type": "NORMAL"}), ("snapshot", "type"), "'normal' or 'timedbuffered'"),
        (
            run(snapshot={"sub_push_delay_msec": 5}),
            ("snapshot", "sub_push_delay_msec"),
            "only used by timedbuffered",
        ),
        (
            run(snapshot={"sub_push_delay_msec": 5, "type": "timedbuffered", "triggered": True}),
            ("snapshot", "sub_push_delay_msec"),
            "non-triggered",
        ),
        (
            run(snapshot={"pv_field_filter_list": ["value"]}),
            ("snapshot", "pv_field_filter_list"),
            "only used by timedbuffered",
        ),
        (
            run(snapshot={"type": "timedbuffered", "pv_field_filter_list": ["value", "value"]}),
            ("snapshot", "pv_field_filter_list", 1),
            "listed twice",
        ),
        (  # the gateway's SnapshotOpInfo::filterPVField would throw (pvData refuses a
            # field name with '.') in its snapshot loop instead of sending data
            run(snapshot={"type": "timedbuffered",
                          "pv_field_filter_list": ["value", "alarm.severity"]}),
            ("snapshot", "pv_field_filter_list", 1),
            "top-level field",
        ),
        (
            run(snapshot={"pv_uri_list": ["pva://A"], "extra": 1}),
            ("snapshot", "extra"),
            "Extra inputs",
        ),
        (run(output={"directory": "relative/dir"}), ("output", "directory"), "absolute"),
        (run(output={"swmr": False}), ("output", "swmr"), "swmr: false is not supported"),
        (run(output={"directory": "/data/../etc"}), ("output", "directory"), "'..'"),
        (run(output={"file_template": "../x.h5"}), ("output", "file_template"), "not a path"),
        (run(metadata={"tags": ["a", "a"]}), ("metadata", "tags", 1), "listed twice"),
        (
            run(metadata={"attributes": {"x": [1]}}),
            ("metadata", "attributes", "x"),
            "attribute values",
        ),
        (
            run(metadata={"attributes": {"bad key": 1}}),
            ("metadata", "attributes", "bad key"),
            "attribute name",
        ),
        ({"name": "x"}, ("snapshot",), "Field required"),
    ],
)
def test_invalid(data: dict[str, Any], loc: tuple[Any, ...], needle: str) -> None:
    found = errors(data)
    assert any(where == loc and needle in m for where, m in found), found


def test_metadata_file_attributes() -> None:
    d = RunDefinition.model_validate(
        run(
            metadata={
                "description": "d",
                "experiment": "e",
                "tags": ["t"],
                "attributes": {"k": 1.5},
            }
        )
    )
    assert d.metadata.file_attributes() == {
        "description": "d",
        "experiment": "e",
        "tags": ["t"],
        "k": 1.5,
    }


def test_definitions_are_frozen_and_comparable() -> None:
    a = RunDefinition.model_validate(run())
    b = RunDefinition.model_validate(run())
    assert a == b
    with pytest.raises(ValidationError):
        a.name = "other"


def test_time_window_zero_is_a_valid_look_back_for_a_triggered_snapshot() -> None:
    d = RunDefinition.model_validate(run(snapshot={"time_window": 0, "triggered": True}))
    assert d.snapshot.time_window == 0 and d.triggered


@pytest.mark.parametrize("name", ["description", "experiment", "tags"])
def test_an_attribute_named_like_a_metadata_field_is_refused(name: str) -> None:
    """The free attributes go into the file's metadata beside description, experiment and
    tags: one named like them replaced the run's own (description 'BPM orbit' became the
    attribute's value in every file, without a word; tags a scalar instead of a list)."""
    data = run(metadata={"description": "BPM orbit", "experiment": "MD-1", "tags": ["bpm"],
                         "attributes": {name: "other", "operator": "jdoe"}})
    found = errors(data)
    assert any(where == ("metadata", "attributes", name) and f"metadata.{name}" in m
               for where, m in found), found
