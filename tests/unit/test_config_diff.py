"""Reload diff: added / removed / changed (with fields and restart need) / unchanged."""

from __future__ import annotations

from typing import Any

import pytest

from recorder.config.diff import RunDiff, changed_fields, diff_runs
from recorder.config.models import RunDefinition


def d(name: str, **over: Any) -> RunDefinition:
    data: dict[str, Any] = {
        "name": name,
        "snapshot": {"snapshot_name": f"s_{name}", "pv_uri_list": ["pva://SIM:AI:DOUBLE:1"]},
        "output": {"directory": f"/data/{name}"},
    }
    for key, value in over.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    return RunDefinition.model_validate(data)


def test_added_removed_changed_unchanged() -> None:
    old = [d("a"), d("b"), d("c"), d("e")]
    new = [
        d("e"),
        d("c", snapshot={"time_window": 500}, metadata={"tags": ["x"]}),
        d("a"),
        d("f"),
        d("b", autostart=False),
    ]
    diff = diff_runs(old, new)
    assert [r.name for r in diff.added] == ["f"]
    assert diff.removed == ()
    assert [(c.name, c.fields, c.restart_required) for c in diff.changed] == [
        ("c", ("snapshot.time_window", "metadata.tags"), True),
        ("b", ("autostart",), False),
    ]
    assert [r.name for r in diff.unchanged] == ["e", "a"]
    assert not diff.empty
    assert diff.summary() == (
        "1 added (f); 2 changed (c: snapshot.time_window metadata.tags, b: autostart); 2 unchanged"
    )
    assert diff.as_dict() == {
        "added": ["f"],
        "removed": [],
        "changed": {
            "c": {"fields": ["snapshot.time_window", "metadata.tags"], "restart": True},
            "b": {"fields": ["autostart"], "restart": False},
        },
        "unchanged": ["e", "a"],
    }


def test_removed_and_mapping_input() -> None:
    old = {"a": d("a"), "b": d("b")}
    diff = diff_runs(old, {"b": d("b")})
    assert [r.name for r in diff.removed] == ["a"]
    assert diff.summary() == "1 removed (a); 1 unchanged"


def test_identical_sets_are_empty() -> None:
    diff = diff_runs([d("a")], [d("a")])
    assert diff.empty
    assert diff == RunDiff(unchanged=(d("a"),))
    assert diff_runs([], []).empty


def test_nested_output_and_attribute_changes_are_named() -> None:
    old = d("a", output={"segment": {"max_iterations": 10}}, metadata={"attributes": {"k": 1}})
    new = d(
        "a", output={"segment": {"max_iterations": 20}}, metadata={"attributes": {"k": 2, "j": 1}}
    )
    assert changed_fields(old, new) == (
        "output.segment.max_iterations",
        "metadata.attributes.k",
        "metadata.attributes.j",
    )
    (change,) = diff_runs([old], [new]).changed
    assert change.restart_required  # output and metadata go into the files: new recording


def test_pv_list_change_and_order_matter() -> None:
    old = d("a", snapshot={"pv_uri_list": ["pva://A", "pva://B"]})
    new = d("a", snapshot={"pv_uri_list": ["pva://B", "pva://A"]})
    (change,) = diff_runs([old], [new]).changed
    assert change.fields == ("snapshot.pv_uri_list",)


def test_duplicate_names_in_an_iterable_are_refused() -> None:
    with pytest.raises(ValueError, match="appears twice"):
        diff_runs([d("a"), d("a")], [])


@pytest.mark.parametrize(("before", "after"), [(1, True), (0, False), (1, 1.0)])
def test_an_attribute_of_another_type_is_a_change(before: Any, after: Any) -> None:
    """1 == True == 1.0 in Python, so `operator_ok: 1` -> `true` was "unchanged": the reload
    did not apply it and the files went on saying 1."""
    diff = diff_runs([d("a", metadata={"attributes": {"x": before}})],
                     [d("a", metadata={"attributes": {"x": after}})])
    assert [(c.name, c.fields) for c in diff.changed] == [("a", ("metadata.attributes.x",))]
    assert diff.unchanged == ()
