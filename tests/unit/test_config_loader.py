"""YAML loading: every error at once as file:line: field: message, cross-file checks."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recorder.config.loader import (
    Problem,
    RunDefinitionError,
    check_runs,
    definition_files,
    load_runs,
    parse_runs,
)
from recorder.errors import ConfigError

GOOD = """\
name: {name}
snapshot:
  snapshot_name: {snap}
  pv_uri_list: [pva://SIM:AI:DOUBLE:1]
output:
  directory: /data/{name}
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(text: str, filename: str = "runs.yaml") -> list[str]:
    _, problems = parse_runs([(filename, textwrap.dedent(text))])
    return [str(p) for p in problems]


def test_single_run_file(tmp_path: Path) -> None:
    path = write(tmp_path, "bpm.yaml", GOOD.format(name="bpm", snap="bpm"))
    loaded = load_runs(path)
    assert list(loaded.runs) == ["bpm"]
    assert str(loaded.sources["bpm"]) == f"{path}:1"
    assert loaded.files == (path,)
    assert len(loaded) == 1
    assert [d.name for d in loaded] == ["bpm"]


def test_runs_list_and_directory_order(tmp_path: Path) -> None:
    write(tmp_path, "b.yml", GOOD.format(name="second", snap="s2"))
    write(
        tmp_path,
        "a.yaml",
        """\
        runs:
          - name: first
            autostart: false
            snapshot: {snapshot_name: s1, pv_uri_list: [pva://SIM:AI:DOUBLE:1]}
            output: {directory: /data/x}
          - name: third
            snapshot: {snapshot_name: s3, pv_uri_list: [ca://SIM:AI:DOUBLE:2]}
            output: {directory: /data/x}
        """,
    )
    write(tmp_path, "notes.txt", "not yaml")
    write(tmp_path, ".hidden.yaml", "garbage: [")
    (tmp_path / "sub.yaml").mkdir()
    loaded = load_runs(tmp_path)
    assert list(loaded.runs) == ["first", "third", "second"]
    assert loaded.runs["first"].autostart is False
    assert [p.name for p in loaded.files] == ["a.yaml", "b.yml"]
    assert loaded.sources["third"].field == "runs.1"
    assert loaded.sources["third"].line == 6


def test_a_broken_symlink_in_a_directory_is_an_error(tmp_path: Path) -> None:
    """A run file linked from elsewhere whose target is gone is reported (a reload would
    otherwise stop its runs without a word); the other files still load."""
    write(tmp_path, "a.yaml", GOOD.format(name="first", snap="s1"))
    (tmp_path / "b.yaml").symlink_to(tmp_path / "gone" / "b.yaml")
    loaded, problems = check_runs(tmp_path)
    assert list(loaded.runs) == ["first"]
    assert [str(p) for p in problems] == [
        f"{tmp_path / 'b.yaml'}: broken symbolic link (to '{tmp_path / 'gone' / 'b.yaml'}'): "
        "its run definitions cannot be read; fix or remove the link"]
    with pytest.raises(RunDefinitionError, match="broken symbolic link"):
        load_runs(tmp_path)


def test_a_yaml_1_1_directive_is_refused() -> None:
    """README: run definitions are YAML 1.2, where `yes` is a string; a %YAML 1.1 directive
    would make ruamel read it as a boolean."""
    text = "# runs\n%YAML 1.1\n---\n" + GOOD.format(name="a", snap="s") + "autostart: yes\n"
    assert problems_of(text) == [
        "runs.yaml:2: '%YAML 1.1': run definitions are read as YAML 1.2 (yes/no/on/off are "
        "strings, not booleans); remove the directive"]
    text12 = "%YAML 1.2\n---\n" + GOOD.format(name="a", snap="s")
    assert problems_of(text12) == []


def test_empty_runs_list_and_empty_directory(tmp_path: Path) -> None:
    write(tmp_path, "none.yaml", "runs: []\n")
    assert len(load_runs(tmp_path)) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(load_runs(empty)) == 0


def test_every_error_is_reported_with_file_line_and_field(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a.yaml",
        """\
        runs:
          - name: bpm
            autostart: yes
            snapshot:
              snapshot_name: bpm
              pv_uri_list:
                - pva://SIM:AI:DOUBLE:1
                - not a uri
              time_window: "100"
              time_windw: 3
            output:
              directory: data/relative
              flush_interval_s: 0
          - name: wf
            snapshot:
              snapshot_name: wf
              pv_uri_list: [pva://SIM:WF:FLOAT:1]
              triggered: false
              triggered: true
            output: {directory: /data/wf}
        """,
    )
    write(tmp_path, "b.yaml", "name: x\n  bad: [\n")
    with pytest.raises(RunDefinitionError) as info:
        load_runs(tmp_path)
    error = info.value
    assert isinstance(error, ConfigError)
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert [str(p) for p in error.problems] == [
        f"{a}:3: runs.0.autostart: Input should be a valid boolean (got 'yes')",
        f"{a}:8: runs.0.snapshot.pv_uri_list.1: 'not a uri' is not a valid PV URI: expected "
        "pva://NAME, ca://NAME or pv://NAME with NAME made of [A-Za-z0-9-_] parts joined by "
        "':' and an optional .field",
        f"{a}:9: runs.0.snapshot.time_window: Input should be a valid integer (got '100')",
        f"{a}:10: runs.0.snapshot.time_windw: unknown key 'time_windw' (did you mean "
        "'time_window'?); allowed: pv_field_filter_list, pv_uri_list, repeat_delay, "
        "respect_push_order, snapshot_name, sub_push_delay_msec, time_window, triggered, type",
        f"{a}:12: runs.0.output.directory: output directory 'data/relative' must be an absolute "
        "path (a daemon's working directory is not a place for data)",
        f"{a}:13: runs.0.output.flush_interval_s: Input should be greater than 0 (got 0)",
        f"{a}:19: runs.1.snapshot.triggered: duplicate key 'triggered' (first defined at line 18)",
        f"{b}:2: YAML syntax error: mapping values are not allowed here",
    ]
    assert str(error).startswith("8 errors in run definitions:\n")


def test_cross_file_collisions(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD.format(name="bpm", snap="My-Snap"))
    write(tmp_path, "b.yaml", GOOD.format(name="bpm", snap="other"))
    write(tmp_path, "c.yaml", GOOD.format(name="c", snap="my-snap"))
    write(tmp_path, "d.yaml", GOOD.format(name="d", snap="my-snap2"))
    loaded, problems = check_runs(tmp_path)
    assert list(loaded.runs) == ["bpm", "d"]
    text = [str(p) for p in problems]
    assert (
        text[0] == f"{tmp_path / 'b.yaml'}:1: name: run name 'bpm' is already defined at "
        f"{tmp_path / 'a.yaml'}:1"
    )
    assert text[1].startswith(
        f"{tmp_path / 'c.yaml'}:3: snapshot.snapshot_name: snapshot_name 'my-snap' is the "
        "same k2eg snapshot (topic 'my-snap') as 'My-Snap' of run 'bpm'"
    )
    assert len(text) == 2


def test_normalization_collision_with_underscore() -> None:
    text = """\
    runs:
      - name: a
        snapshot: {snapshot_name: Beam_Orbit, pv_uri_list: [pva://X]}
        output: {directory: /d}
      - name: b
        snapshot: {snapshot_name: beam_orbit, pv_uri_list: [pva://Y]}
        output: {directory: /d}
    """
    (problem,) = problems_of(text)
    assert problem.startswith("runs.yaml:6: runs.1.snapshot.snapshot_name:")
    assert "topic 'beam_orbit'" in problem


def test_output_file_name_collision() -> None:
    text = """\
    runs:
      - name: a
        snapshot: {snapshot_name: a, pv_uri_list: [pva://X]}
        output: {directory: /d, file_template: "daq_{seq}.h5"}
      - name: b
        snapshot: {snapshot_name: b, pv_uri_list: [pva://Y]}
        output:
          directory: /d/
          file_template: "daq_{seq}.h5"
      - name: c
        snapshot: {snapshot_name: c, pv_uri_list: [pva://Y]}
        output: {directory: /e, file_template: "daq_{seq}.h5"}
    """
    (problem,) = problems_of(text)
    assert problem.startswith(
        "runs.yaml:9: runs.1.output.file_template: files would have the same names as "
        "those of run 'a'"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "runs.yaml:1: empty file: write one run, or `runs: []` for none"),
        ("# only a comment\n", "runs.yaml:1: empty file: write one run, or `runs: []` for none"),
        (
            "- a\n- b\n",
            "runs.yaml:1: expected a run (a mapping with name:, snapshot:, ...) or `runs:` "
            "with a list of runs",
        ),
        ("runs: {a: 1}\n", "runs.yaml:1: runs: expected a list of runs"),
        ("runs:\n  - 5\n", "runs.yaml:2: runs.0: expected a run (a mapping)"),
        (
            "runs: []\nname: x\n",
            "runs.yaml:2: name: unknown key: a file with `runs:` holds nothing else",
        ),
        (
            "name: a\n---\nname: b\n",
            "runs.yaml:3: a file holds one YAML document; put several runs under `runs:` "
            "instead of '---'",
        ),
        ("name: *nope\n", "runs.yaml:1: YAML syntax error: found undefined alias 'nope'"),
        ("name: !!binary aGVsbG8=\n", "runs.yaml:1: name: unsupported YAML value"),
        ("1: x\nname: y\n", "runs.yaml:1: keys must be strings, got 1; quote it"),
    ],
)
def test_file_shape_problems(text: str, expected: str) -> None:
    found = problems_of(text)
    assert found, text
    assert found[0].startswith(expected), found


def test_missing_fields_point_at_their_parent() -> None:
    text = """\
    runs:
      - name: a
        snapshot:
          pv_uri_list: [pva://X]
        output: {}
    """
    assert problems_of(text) == [
        "runs.yaml:3: runs.0.snapshot.snapshot_name: required field is missing",
        "runs.yaml:5: runs.0.output.directory: required field is missing",
    ]


def test_yaml_12_on_off_stay_strings_and_anchors_work() -> None:
    text = """\
    defaults: &out
      directory: /data/shared
    """
    # `defaults` is not allowed at top level; anchors inside runs are fine
    text = """\
    runs:
      - name: a
        autostart: off
        snapshot: {snapshot_name: a, pv_uri_list: [pva://X]}
        output: &out {directory: /data/shared, file_template: "{run}_{seq}.h5"}
      - name: b
        snapshot: {snapshot_name: b, pv_uri_list: [pva://Y]}
        output: *out
    """
    assert problems_of(text) == [
        "runs.yaml:3: runs.0.autostart: Input should be a valid boolean (got 'off')"
    ]
    loaded, problems = parse_runs([("r.yaml", textwrap.dedent(text).replace("off", "false"))])
    assert problems == ()
    assert loaded.runs["b"].output.directory == Path("/data/shared")


def test_merge_keys_do_not_break_line_lookup() -> None:
    text = """\
    runs:
      - name: a
        snapshot: {snapshot_name: a, pv_uri_list: [pva://X]}
        output: &out {directory: /data/x, file_template: "{run}.h5"}
      - name: b
        snapshot: {snapshot_name: b, pv_uri_list: [pva://Y]}
        output:
          <<: *out
          flush_interval_s: -1
    """
    assert problems_of(text) == [
        "runs.yaml:9: runs.1.output.flush_interval_s: Input should be greater than 0 (got -1)"
    ]


def test_unreadable_and_missing_paths(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"name: x\nsnapshot:\n  snapshot_name: caf\xe9\n")
    _, problems = check_runs(bad)
    assert problems == (Problem(str(bad), 3, "", "not UTF-8 text: byte 0xe9 at column 21 "
                                "(run definitions are UTF-8; re-save the file as UTF-8)"),)
    _, problems = check_runs(tmp_path / "missing")
    assert problems == (Problem(str(tmp_path / "missing"), None, "", "no such file or directory"),)
    assert definition_files(tmp_path / "missing") == []


EXAMPLE = (Path(__file__).resolve().parents[2] / "recorder/examples/triggered.yaml").read_text()


@settings(max_examples=300, deadline=None)
@given(
    edits=st.lists(
        st.tuples(
            st.integers(0, len(EXAMPLE) - 1), st.sampled_from(list(":-[]{}\"'!&*#\n ab1.?|>%@`,"))
        ),
        min_size=1,
        max_size=6,
    )
)
def test_damaged_files_never_raise_and_problems_have_lines(edits: list[tuple[int, str]]) -> None:
    text = list(EXAMPLE)
    for index, char in edits:
        text[index] = char
    loaded, problems = parse_runs([("f.yaml", "".join(text))])
    for problem in problems:
        assert problem.file == "f.yaml"
        assert problem.line is not None and problem.line >= 1
        assert problem.message
    assert len(loaded.runs) + bool(problems) >= 1 or not "".join(text).strip()


def test_complex_mapping_keys_are_reported_not_raised() -> None:
    # found by the hypothesis test above: ruamel raises TypeError building such a document
    text = """\
    name: a
    snapshot:
      ? {pv_uri_list: [pva://X]}
      : 1
    output:
      directory: /data/a
    """
    assert problems_of(text) == [
        "runs.yaml:3: snapshot: mapping keys must be plain names, not lists or mappings"
    ]


def test_checks_between_fields_of_a_block_are_reported_with_its_other_errors() -> None:
    """A block with a wrong field still gets the checks that relate two of its fields (its
    model validators), so one pass reports every problem; unless a field those checks read
    is itself wrong or possibly misspelt: then a default would be judged, not the author's
    value, and nothing more is said."""
    text = """\
    name: a
    snapshot:
      snapshot_name: a
      pv_uri_list: [pva://X, "pva://bad name"]
      sub_push_delay_msec: 100
      colour: red
    output:
      directory: /data/a
      compression: gzip
      compression_level: 15
      segment: {max_iterations: 1.5}
    """
    got = problems_of(text)
    assert [p.split(": ", 2)[:2] for p in got] == [
        ["runs.yaml:4", "snapshot.pv_uri_list.1"],
        ["runs.yaml:5", "snapshot.sub_push_delay_msec"],
        ["runs.yaml:6", "snapshot.colour"],
        ["runs.yaml:10", "output.compression_level"],
        ["runs.yaml:11", "output.segment.max_iterations"],
    ], got
    assert "only used by timedbuffered" in got[1] and "gzip compression_level" in got[3]
    cautious = """\
    name: b
    snapshot:
      snapshot_name: b
      pv_uri_list: [pva://X]
      type: NORMAL
      sub_push_delay_msec: 100
    output:
      directory: /data/b
      compresion: zstd
      compression_level: 15
    """
    got = problems_of(cautious)
    assert [p.split(": ", 2)[1] for p in got] == ["snapshot.type", "output.compresion"], got


def test_every_setting_the_gateway_would_ignore_is_reported_at_once() -> None:
    """The snapshot block's checks between fields report all they find in one pass, not the
    first (a second run used to show the field filter only once sub_push_delay_msec was
    fixed); a list whose only item is wrong says so once, not also that it is empty."""
    text = """\
    name: a
    snapshot:
      snapshot_name: a
      pv_uri_list: [pva://X]
      time_window: 0
      sub_push_delay_msec: 50
      pv_field_filter_list: [value]
    output: {directory: /data/a}
    """
    got = problems_of(text)
    assert [p.split(": ", 2)[:2] for p in got] == [
        ["runs.yaml:5", "snapshot.time_window"],
        ["runs.yaml:6", "snapshot.sub_push_delay_msec"],
        ["runs.yaml:7", "snapshot.pv_field_filter_list"],
    ], got
    only_bad = """\
    name: b
    snapshot: {snapshot_name: b, pv_uri_list: ["pva://has space"]}
    output: {directory: /data/b}
    """
    got = problems_of(only_bad)
    assert len(got) == 1 and "snapshot.pv_uri_list.0: 'pva://has space'" in got[0], got


def test_every_repeated_or_reserved_list_entry_is_reported_at_once() -> None:
    """`validate` reports every problem at once (README): two PVs repeated, two field
    filters repeated, two tags repeated and two reserved attribute names are each reported,
    not only the first of each list (the second showed only once the first was fixed)."""
    text = """\
    name: a
    snapshot:
      snapshot_name: a
      type: timedbuffered
      pv_uri_list: [pva://X, ca://X, pva://Y, pva://Y]
      pv_field_filter_list: [value, value, alarm, alarm]
    output: {directory: /data/a}
    metadata:
      tags: [t, t, u, u]
      attributes: {description: d, tags: x, experiment: e}
    """
    got = problems_of(text)
    assert [p.split(": ", 2)[1] for p in got] == [
        "snapshot.pv_uri_list.1", "snapshot.pv_uri_list.3",
        "snapshot.pv_field_filter_list.1", "snapshot.pv_field_filter_list.3",
        "metadata.tags.1", "metadata.tags.3",
        "metadata.attributes.description", "metadata.attributes.tags",
        "metadata.attributes.experiment",
    ], got


def test_collisions_are_reported_with_the_runs_other_errors(tmp_path: Path) -> None:
    """A run with an error of its own still takes part in the checks between runs (name,
    k2eg topic), so one pass reports the collision too, not only after the other fix."""
    write(tmp_path, "a.yaml", """\
        runs:
          - name: bpm
            snapshot: {snapshot_name: Beam-Orbit, pv_uri_list: [pva://X], time_window: "1"}
            output: {directory: /data/a}
          - name: bpm
            snapshot: {snapshot_name: beam-orbit, pv_uri_list: [pva://X]}
            output: {directory: /data/b}
        """)
    write(tmp_path, "b.yaml", """\
        name: other
        snapshot: {snapshot_name: BEAM-ORBIT, pv_uri_list: [pva://X]}
        output: {directory: relative}
        """)
    loaded, problems = check_runs(tmp_path)
    assert len(loaded) == 0
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert [(p.file, p.line, p.field) for p in problems] == [
        (str(a), 3, "runs.0.snapshot.time_window"),
        (str(a), 5, "runs.1.name"),
        (str(a), 6, "runs.1.snapshot.snapshot_name"),
        (str(b), 2, "snapshot.snapshot_name"),
        (str(b), 3, "output.directory"),
    ], problems
    assert problems[1].message == f"run name 'bpm' is already defined at {a}:2"
    assert "as 'Beam-Orbit' of run 'bpm' at" in problems[3].message
    # a run whose own name is wrong cannot collide by name, and is still not kept
    _, problems = parse_runs([("c.yaml", textwrap.dedent("""\
        runs:
          - name: -bad
            snapshot: {snapshot_name: s, pv_uri_list: [pva://X]}
            output: {directory: /data/c}
          - name: ok
            snapshot: {snapshot_name: t, pv_uri_list: [pva://X]}
            output: {directory: /data/c}
        """))])
    assert [p.field for p in problems] == ["runs.0.name"]


def test_values_yaml_alone_has_do_not_hide_the_runs_other_errors() -> None:
    """A non-string key, a value of a YAML-only type or a string that is not Unicode text
    (a lone surrogate escape) is reported at its own line, with every other error of the
    run, and never as a JSON parse error without a field."""
    text = """\
    name: "\\ud800x"
    snapshot:
      snapshot_name: s
      pv_uri_list: [pva://X]
      time_window: "100"
    output: {directory: /data/s}
    metadata:
      tags: [a, a]
      attributes:
        ok: 1
        2: two
        when: !!set {a}
    """
    assert problems_of(text) == [
        "runs.yaml:1: name: '\\ud800x' holds \\ud800, half of a UTF-16 surrogate pair, not a "
        "character: write the character itself (or its \\UXXXXXXXX escape)",
        "runs.yaml:5: snapshot.time_window: Input should be a valid integer (got '100')",
        "runs.yaml:8: metadata.tags.1: tag 'a' is listed twice",
        "runs.yaml:11: metadata.attributes: keys must be strings, got 2; quote it",
        "runs.yaml:12: metadata.attributes.when: unsupported YAML value "
        "set(odict_keys(['a'])) (CommentedSet); use a plain value",
    ]
    # alone, such a value still makes the run invalid
    loaded, problems = parse_runs([("r.yaml", GOOD.format(name="a", snap="a")
                                    + "metadata: {attributes: {3: x}}\n")])
    assert len(loaded) == 0 and [str(p) for p in problems] == [
        "r.yaml:7: metadata.attributes: keys must be strings, got 3; quote it"
    ]


def test_an_output_directory_with_a_nul_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    # found by hand: "\0" in a double-quoted directory reached Path.resolve() (ValueError)
    path = write(tmp_path, "nul.yaml", """\
        name: nul
        snapshot: {snapshot_name: nul, pv_uri_list: [pva://X]}
        output: {directory: "/data/x\\0y"}
        """)
    _, problems = check_runs(path)
    assert [str(p) for p in problems] == [
        f"{path}:3: output.directory: output directory '/data/x\\x00y' must not contain a NUL "
        "character ('\\0')"
    ]


def test_output_directories_the_kernel_refuses_are_errors_not_tracebacks(tmp_path: Path) -> None:
    # found by hand: each raised out of validate (and the daemon's start-up) before
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    cases = {
        "/" + "a" * 5000: "is too long: at most 3841 bytes leave room for its file names",
        "/" + "b" * 256 + "/x": "is longer than 255 bytes, the longest name a Linux file system",
        str(tmp_path / "loop1" / "x"): "cannot be resolved on this host: Symlink loop from",
    }
    for directory, expected in cases.items():
        text = GOOD.format(name="d", snap="d").replace("/data/d", directory)
        _, problems = parse_runs([("d.yaml", text)])
        assert [(p.line, p.field) for p in problems] == [(6, "output.directory")], problems
        assert expected in problems[0].message, problems[0].message


def test_validate_notes_a_directory_it_cannot_check(tmp_path: Path) -> None:
    from recorder.cli.validate import directory_note

    note = directory_note(tmp_path / ("b" * 256))  # ENAMETOOLONG from is_dir()
    assert note is not None and note.startswith("warning: cannot be checked on this host: ")


def test_problems_of_a_directory_come_in_file_order(tmp_path: Path) -> None:
    """A file that is not UTF-8 was listed before every other file's problems."""
    write(tmp_path, "a.yaml", "name: a\n")
    (tmp_path / "b.yaml").write_bytes(b"name: caf\xe9\n")
    write(tmp_path, "c.yaml", "name: c\n")
    _, problems = check_runs(tmp_path)
    assert [(Path(p.file).name, p.line) for p in problems] == [
        ("a.yaml", 1), ("a.yaml", 1), ("b.yaml", 1), ("c.yaml", 1), ("c.yaml", 1)
    ], problems


def test_a_tab_says_to_use_spaces_and_where_it_is() -> None:
    assert problems_of("name: t\nsnapshot:\n\tsnapshot_name: x\n") == [
        "runs.yaml:3: YAML syntax error: while scanning for the next token; found character "
        "'\\t' that cannot start any token (the tab at column 1): YAML takes spaces, not tabs, "
        "for indentation and after ':'"
    ]
    [problem] = problems_of("name:\tt\n")
    assert problem.startswith("runs.yaml:1: ") and "(the tab at column 6)" in problem


def test_a_compression_whose_plugin_is_not_installed_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """zstd/blosc2 without hdf5plugin passed validate and start; the file then failed to
    finalize at the stop, left .partial (found by the README walkthrough). Now the run is
    refused where it is defined, as on a host without the package."""
    import importlib.util

    from recorder.sinks import filters

    text = GOOD.format(name="z", snap="z") + "  compression: zstd\n  live_compression: blosc2\n"
    assert problems_of(text) == []  # the test environment has hdf5plugin
    real = importlib.util.find_spec
    monkeypatch.setattr(filters.importlib.util, "find_spec",
                        lambda name, *a: None if name == "hdf5plugin" else real(name, *a))
    loaded, problems = parse_runs([("z.yaml", text)])
    assert [str(p) for p in problems] == [
        f"z.yaml:{line}: {field}: compression {comp!r} needs the hdf5plugin package, which "
        "is not installed here (pip install 'k2eg-recorder[compression]', or hdf5plugin)"
        for line, field, comp in ((7, "output.compression", "zstd"),
                                  (8, "output.live_compression", "blosc2"))]
    assert len(loaded) == 0
    assert problems_of(GOOD.format(name="g", snap="g") + "  compression: lzf\n") == []


def test_a_run_with_a_duplicate_key_is_not_valid() -> None:
    """YAML keeps one of the two values silently: the run was counted valid ("1 valid run")
    beside the error (found by the README walkthrough). Its neighbours stay valid."""
    one = "name: d\nautostart: true\nautostart: false\n" + GOOD.format(name="d", snap="d")[8:]
    loaded, problems = parse_runs([("one.yaml", one)])
    assert [str(p) for p in problems] == [
        "one.yaml:3: autostart: duplicate key 'autostart' (first defined at line 2)"]
    assert len(loaded) == 0
    many = """\
    runs:
      - name: a
        snapshot: {snapshot_name: a, pv_uri_list: [pva://X]}
        output: {directory: /a}
      - name: b
        snapshot: {snapshot_name: b, pv_uri_list: [pva://X], time_window: 5, time_window: 6}
        output: {directory: /b}
      - name: c
        snapshot: {snapshot_name: c, pv_uri_list: [pva://X]}
        output: {directory: /c}
    """
    loaded, problems = parse_runs([("many.yaml", textwrap.dedent(many))])
    assert [p.field for p in problems] == ["runs.1.snapshot.time_window"]
    assert [r.name for r in loaded] == ["a", "c"]


@pytest.mark.parametrize(("value", "needle"), [
    ("2026-02-30", "'2026-02-30' cannot be read as timestamp: day is out of range for month"),
    ("2026-13-01", "'2026-13-01' cannot be read as timestamp: month must be in 1..12"),
    ("!!int abc", "'abc' cannot be read as int"),
    ("!!bool maybe", "'maybe' cannot be read as bool"),
    ("9" * 5000, "cannot be read as int: Exceeds the limit"),
])
def test_a_value_ruamel_cannot_build_is_an_error_not_a_traceback(value: str, needle: str) -> None:
    """ruamel resolves `2026-02-30` to a date (and an integer of 5,000 digits to an int) and
    raises a bare ValueError building it: check_runs raised, so `validate` printed a
    traceback and a SIGHUP reload took the daemon's main loop down (no clean stop)."""
    text = GOOD.format(name="v", snap="v") + f"metadata:\n  experiment: {value}\n"
    [problem] = problems_of(text)
    assert problem.startswith("runs.yaml:8: metadata.experiment: "), problem
    assert needle in problem and "quote it" in problem


@pytest.mark.parametrize(("text", "expected"), [
    ("!!int abc\n", "runs.yaml:1: 'abc' cannot be read as int"),
    ("runs: !!int abc\n", "runs.yaml:1: runs: 'abc' cannot be read as int"),
    ("runs:\n  - !!int abc\n", "runs.yaml:2: runs.0: 'abc' cannot be read as int"),
    ("2026-02-30: x\nruns: []\n",
     "runs.yaml:1: key '2026-02-30' cannot be read as timestamp"),
])
def test_a_value_ruamel_cannot_build_where_a_run_or_the_runs_go_says_so(
        text: str, expected: str) -> None:
    """The whole file, ``runs:``, a run or a top-level key that ruamel cannot build (since
    those became stand-ins, to go on checking) was said to be no run / no list of runs, the
    reason lost ("'abc' cannot be read as int ... quote it"), or named by the stand-in's
    repr (``_Unreadable(message=...)``)."""
    [problem] = problems_of(text)
    assert problem.startswith(expected), problem
    assert "quote it" in problem and "_Unreadable" not in problem, problem


@pytest.mark.parametrize(("extra", "line"), [
    ("metadata: &m {tags: *m}", 7),  # an alias inside what it names: an infinite value
    ("metadata: {attributes: {a: " + "[" * 400 + "]" * 400 + "}}", 7),  # past the stack
    ("metadata:\n  attributes:\n" + "".join("  " * (i + 2) + f"k{i}:\n" for i in range(300)),
     39),  # the first mapping 33 levels deep
])
def test_recursive_or_too_deep_values_are_errors_not_a_recursion_error(extra: str,
                                                                       line: int) -> None:
    """ruamel, _plain and the duplicate-key walk recurse per level: a recursive alias or a
    few hundred levels raised RecursionError out of check_runs (validate's traceback, a
    reload killing the daemon's loop)."""
    [problem] = problems_of(GOOD.format(name="v", snap="v") + extra + "\n")
    assert problem.startswith(f"runs.yaml:{line}: "), problem
    assert "nested more than 32 levels" in problem or "refers to a mapping or list" in problem


def test_aliases_that_expand_exponentially_are_refused_at_once() -> None:
    """Nine levels of ten aliases each ("billion laughs"): the loader expanded them into
    10^9 values (a reload hung the daemon's loop until the watchdog killed it)."""
    text = "x:\n  - &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9))
    [problem] = problems_of(text)
    assert problem.startswith("runs.yaml:2: more than 2000000 values"), problem


def test_a_directory_that_cannot_be_listed_is_an_error_not_a_traceback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's user may not list a run-definition directory (wrong mode after an edit):
    iterdir's PermissionError came out of check_runs (a SIGHUP reload killed the loop)."""
    import errno

    write(tmp_path, "a.yaml", GOOD.format(name="a", snap="a"))

    def refused(self: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", refused)
    loaded, problems = check_runs(tmp_path)
    assert len(loaded) == 0
    assert [str(p) for p in problems] == [
        f"{tmp_path}: cannot read: [Errno 13] Permission denied: '{tmp_path}'"]


@pytest.mark.parametrize(("field", "line"), [
    ("name", "name: \"x\\n\""),
    ("snapshot.snapshot_name", "  snapshot_name: \"x\\n\""),
    ("snapshot.pv_uri_list.0", "  pv_uri_list: [\"pva://SIM:AI:DOUBLE:1\\n\"]"),
    ("metadata.attributes.a\n", "metadata: {attributes: {\"a\\n\": 1}}"),
])
def test_a_trailing_newline_is_not_part_of_a_valid_name(field: str, line: str) -> None:
    """The name patterns ended in `$`, which also matches before a final newline: a quoted
    or block-scalar `bpm\\n` passed validate and went to the gateway and into admin names."""
    lines = GOOD.format(name="x", snap="x").splitlines()
    key = line.split(":", maxsplit=1)[0]
    text = "\n".join([line if ln.split(":", maxsplit=1)[0] == key else ln for ln in lines]
                     + ([line] if key == "metadata" else [])) + "\n"
    problems = problems_of(text)
    assert [p.split(": ", 2)[1] for p in problems] == [field], problems


def test_bridge_endpoints_two_runs_would_both_bind_are_refused(tmp_path: Path) -> None:
    """Two runs serving their live bridge on one endpoint (a copied definition; a port on
    all interfaces and the same port on one): validate said valid, and the daemon's second
    run found the address in use (`karabo bridge failed: cannot bind`), its live view never
    served. Both the clash between runs and one within a run (rep on '*', pub on 127.0.0.1
    of one port) are now errors at the endpoint's line."""
    write(tmp_path, "a.yaml", """\
        name: a
        snapshot: {snapshot_name: a, pv_uri_list: [pva://A]}
        output:
          directory: /data/a
          bridge: {rep: 4545, pub: "tcp://*:4546"}
        """)
    write(tmp_path, "b.yaml", """\
        runs:
          - name: b
            snapshot: {snapshot_name: b, pv_uri_list: [pva://A]}
            output:
              directory: /data/b
              bridge:
                rep: "tcp://127.0.0.1:4545"
                pub: 0
          - name: c
            snapshot: {snapshot_name: c, pv_uri_list: [pva://A]}
            output:
              directory: /data/c
              bridge:
                pub: "tcp://127.0.0.1:4546"
                rep: 0
          - name: d
            snapshot: {snapshot_name: d, pv_uri_list: [pva://A]}
            output:
              directory: /data/d
              bridge: {rep: "tcp://*:4547", pub: 4547}
          - name: e
            snapshot: {snapshot_name: e, pv_uri_list: [pva://A]}
            output:
              directory: /data/e
              bridge: {rep: 4548, pub: 0}
        """)
    loaded, problems = check_runs(tmp_path)
    b = tmp_path / "b.yaml"
    assert [(p.file, p.line, p.field) for p in problems] == [
        (str(b), 7, "runs.0.output.bridge.rep"),
        (str(b), 14, "runs.1.output.bridge.pub"),
        (str(b), 20, "runs.2.output.bridge"),
    ], problems
    assert "run 'a' at " in problems[0].message and "4545" in problems[0].message
    assert list(loaded.runs) == ["a", "e"]  # port 0 (any free port) never clashes


@pytest.mark.parametrize(("char", "name"), [("\x00", "U+0000"), ("\x07", "U+0007"),
                                            ("\x1b", "U+001B"), ("\x7f", "U+007F")])
def test_a_control_character_is_reported_at_its_line_and_column(
        tmp_path: Path, char: str, name: str) -> None:
    """A character YAML does not allow (a NUL, a terminal escape pasted in) was reported
    without a line, on two lines, as a position in '<unicode string>'."""
    path = tmp_path / "runs.yaml"
    path.write_text(GOOD.format(name="a", snap="a") + f"metadata:\n  description: ab{char}c\n")
    _, problems = check_runs(tmp_path)
    assert [str(p) for p in problems] == [
        f"{path}:8: control character {name} at column 18 is not allowed in YAML; remove it "
        "(or write it as an escape in a double-quoted string)"
    ]


def test_a_value_ruamel_cannot_build_does_not_hide_the_files_other_errors() -> None:
    """A date that does not exist (or `!!int abc`) stopped the file's checks at it: the
    other errors of its run, of the file's other runs, and the other such values were not
    reported (README: every problem at once), so each fix brought up the next."""
    text = """\
    runs:
      - name: a
        snapshot: {snapshot_name: a, pv_uri_list: [pva://X], time_window: '100'}
        output: {directory: /data/a}
        metadata:
          attributes: {shift: 2026-02-30, end: 2026-02-31, 2026-02-32: x}
      - name: b
        snapshot: {snapshot_name: b, pv_uri_list: [pva://X]}
        output: {directory: data/b}
      - name: c
        snapshot: {snapshot_name: c, pv_uri_list: [pva://X]}
        output: {directory: /data/c}
    """
    loaded, problems = parse_runs([("runs.yaml", textwrap.dedent(text))])
    assert [(p.line, p.field, p.message.split(":")[0]) for p in problems] == [
        (3, "runs.0.snapshot.time_window", "Input should be a valid integer (got '100')"),
        (6, "runs.0.metadata.attributes.shift", "'2026-02-30' cannot be read as timestamp"),
        (6, "runs.0.metadata.attributes.end", "'2026-02-31' cannot be read as timestamp"),
        (6, "runs.0.metadata.attributes", "key '2026-02-32' cannot be read as timestamp"),
        (9, "runs.1.output.directory", "output directory 'data/b' must be an absolute path "
         "(a daemon's working directory is not a place for data)"),
    ], problems
    assert list(loaded.runs) == ["c"]


def test_the_errors_of_a_long_pv_list_are_collected_in_linear_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each error of a run was compared with every one before it (to drop repeats): a list
    of 20,000 PVs written without their pva:// took 18 s to check, on the daemon's main loop
    in a reload (no watchdog ping meanwhile: WatchdogSec=30s kills the daemon, which then
    refuses to start on the same definitions), and minutes for a few runs more."""
    count = 2000
    text = ("name: r\nsnapshot:\n  snapshot_name: r\n  pv_uri_list:\n"
            + "".join(f"    - 'LINAC PV{j}'\n" for j in range(count))
            + "output:\n  directory: /data/r\n")
    comparisons = 0
    original = Problem.__eq__

    def counting(self: Problem, other: object) -> bool:
        nonlocal comparisons
        comparisons += 1
        return original(self, other)

    monkeypatch.setattr(Problem, "__eq__", counting)
    _, problems = parse_runs([("runs.yaml", text)])
    assert len(problems) == count
    assert comparisons < 10 * count, comparisons


@pytest.mark.parametrize(("snap", "reserved"), [
    ("k2eg-recorder-status", "k2eg-recorder-status"),
    ("Ops_Status", "ops.status"),  # topic ops_status: Kafka refuses it beside ops.status
])
def test_a_snapshot_on_a_topic_of_the_daemon_is_refused(snap: str, reserved: str) -> None:
    """Kafka takes '.' and '_' for the same character in topic names: with the status topic
    named ops.status, the topic ops_status of snapshot "Ops_Status" cannot be created (the
    gateway's snapshot never published), yet validate compared the names exactly."""
    loaded, problems = parse_runs([("r.yaml", GOOD.format(name="a", snap=f"'{snap}'"))],
                                  reserved_topics={reserved: "RECORDER_STATUS_TOPIC"})
    assert len(loaded) == 0 and len(problems) == 1, problems
    text = str(problems[0])
    assert text.startswith("r.yaml:3: snapshot.snapshot_name: ") and "RECORDER_STATUS_TOPIC" in text
    assert ("collide" in text) is (reserved != snap), text
