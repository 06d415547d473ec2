"""`k2eg-recorder validate`, the shipped examples and the JSON Schema export."""

from __future__ import annotations

import json
import textwrap
from importlib import resources
from pathlib import Path

import pytest

from recorder.cli import main
from recorder.config.loader import load_runs
from recorder.config.schema import run_file_schema
from recorder.sim.pvs import parse_pv

EXAMPLES = Path(str(resources.files("recorder") / "examples"))


def test_examples_are_valid_and_cover_the_three_modes() -> None:
    loaded = load_runs(EXAMPLES)
    modes = {d.name: d.mode for d in loaded}
    assert "periodic normal" in modes.values()
    assert "periodic timedbuffered" in modes.values()
    assert any(m.startswith("triggered") for m in modes.values())
    sub_push = [d for d in loaded if d.snapshot.sub_push_delay_msec]
    assert sub_push and sub_push[0].snapshot.type.value == "timedbuffered"
    assert any(not d.autostart for d in loaded)


def test_example_pvs_are_served_by_the_simulator() -> None:
    for definition in load_runs(EXAMPLES):
        for name in definition.snapshot.pv_names:
            assert parse_pv(name).connects, name


def test_validate_prints_runs_files_and_groups(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(EXAMPLES)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "4 valid runs in 3 files" in out
    assert "run sim-triggered-lookback" in out
    assert "no: waits for `k2eg-recorder start sim-triggered-lookback`" in out
    assert "/data/k2eg-recorder/sim-normal/sim-normal-10hz_" in out
    assert "/pvs/SIM:WF:FLOAT:1" in out
    assert "pushed every 250 ms" in out
    # the triggered examples set no segment limit: the time a stop takes grows with the run
    assert out.count("one file per recording (no segment limit)") == 2


def test_validate_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--json", str(EXAMPLES / "triggered.yaml")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["valid"] is True
    assert [r["name"] for r in doc["runs"]] == ["sim-triggered-images", "sim-triggered-lookback"]
    images = doc["runs"][0]
    assert images["topic"] == "sim_triggered_images"
    assert images["files"][0].startswith("/data/k2eg-recorder/sim-triggered/sim-triggered-images_")
    assert images["files"][0].endswith("_0000.h5")
    assert images["groups"][0] == "/pvs/SIM:IMG:UBYTE:1:S64x48"


def test_validate_reports_every_error_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ok.yaml").write_text(
        "name: ok\nsnapshot: {snapshot_name: ok, pv_uri_list: [pva://SIM:AI:DOUBLE:1]}\n"
        "output: {directory: /data/ok}\n"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        textwrap.dedent(
            """\
            name: bad
            snapshot:
              snapshot_name: OK
              pv_uri_list: [pva://SIM:AI:DOUBLE:1, "pva://has space"]
            output: {directory: ../data}
            """
        )
    )
    assert main(["validate", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "0 valid runs in 2 files" in out  # ok.yaml's snapshot is bad.yaml's too
    lines = err.splitlines()
    assert lines == [
        f"{bad}:4: snapshot.pv_uri_list.1: 'pva://has space' is not a valid PV URI: expected "
        "pva://NAME, ca://NAME or pv://NAME with NAME made of [A-Za-z0-9-_] parts joined by ':' "
        "and an optional .field",
        f"{bad}:5: output.directory: output directory '../data' must be an absolute path "
        "(a daemon's working directory is not a place for data)",
        f"{tmp_path / 'ok.yaml'}:2: snapshot.snapshot_name: snapshot_name 'ok' is the same k2eg "
        f"snapshot (topic 'ok') as 'OK' of run 'bad' at {bad}:1: k2eg normalizes names "
        "([^A-Za-z0-9-] -> '_', lower case)",
        "3 errors: nothing would start",
    ]
    assert main(["validate", "--quiet", str(tmp_path)]) == 1
    assert capsys.readouterr().out == ""


def test_validate_with_errors_says_no_run_would_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A valid run beside an invalid one does not start either (the daemon refuses the
    definitions as a whole): the summary on stdout says so, as stderr does."""
    (tmp_path / "ok.yaml").write_text(
        "name: ok\nsnapshot: {snapshot_name: ok, pv_uri_list: [pva://SIM:AI:DOUBLE:1]}\n"
        "output: {directory: /data/ok}\n")
    (tmp_path / "bad.yaml").write_text(
        "name: bad\nsnapshot: {snapshot_name: bad, pv_uri_list: [pva://X], nope: 1}\n"
        "output: {directory: /data/bad}\n")
    assert main(["validate", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == (f"1 valid run in 2 files under {tmp_path}; none would start "
                                   "with the daemon until the errors are fixed")
    assert err.splitlines()[-1] == "1 error: nothing would start"
    assert main(["validate", str(tmp_path / "ok.yaml")]) == 0
    assert "1 would start with the daemon" in capsys.readouterr().out


def test_validate_shows_a_runs_live_bridge(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "c.yaml"
    run.write_text("name: c\nsnapshot: {snapshot_name: c, pv_uri_list: [pva://X]}\n"
                   "output: {directory: /data/c, bridge: {rep: 4545}}\n")
    assert main(["validate", str(run)]) == 0
    assert ("  bridge       rep tcp://127.0.0.1:4545 (Karabo bridge protocol 2.2, "
            "docs/bridge.md)\n") in capsys.readouterr().out
    assert main(["validate", "--json", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["runs"][0]["bridge"]["rep"] == (
        "tcp://127.0.0.1:4545")


def test_validate_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["validate", str(tmp_path / "nope")]) == 1
    out, err = capsys.readouterr()
    assert "no such file or directory" in err
    assert out == ""  # no "0 valid runs in 0 files" for a path that is not there
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["validate", str(empty)]) == 0  # the daemon may start with no runs
    assert "note: no *.yaml or *.yml file in" in capsys.readouterr().err
    monkeypatch.setenv("RECORDER_CONFIG_PATH", str(tmp_path / "nope"))
    assert main(["validate"]) == 1  # what the daemon would load: RECORDER_CONFIG_PATH
    monkeypatch.setenv("RECORDER_ADMIN_SECRET", "short")
    assert main(["validate"]) == 2  # settings the daemon would refuse: no path to check
    assert "RECORDER_ADMIN_SECRET" in capsys.readouterr().err


def test_schema_export(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema == json.loads(json.dumps(run_file_schema()))
    defs = schema["$defs"]
    run = defs["RunDefinition"]
    assert set(run["properties"]) == {"name", "autostart", "snapshot", "output", "metadata"}
    assert run["additionalProperties"] is False
    assert set(defs["SnapshotSpec"]["properties"]) >= {"snapshot_name", "pv_uri_list", "type"}

    def refs(node: object) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if "$ref" in node else []
            return found + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(schema):
        assert ref.removeprefix("#/$defs/") in defs, ref


def test_output_directories_that_are_not_ready_are_noted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recorder.cli import validate

    ready = tmp_path / "data"
    ready.mkdir()
    assert validate.directory_note(ready) is None
    later = validate.directory_note(tmp_path / "new" / "deeper")
    assert later is not None and later.startswith("note: does not exist yet")
    assert str(tmp_path) in later
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "is not a directory" in str(validate.directory_note(blocker))
    assert f"{blocker} is not a directory" in str(validate.directory_note(blocker / "sub"))
    # as a user without write access (the tests may run as root, so access is simulated)
    monkeypatch.setattr(validate.os, "access", lambda _path, _mode: False)
    assert "not writable by" in str(validate.directory_note(ready))
    assert "is not writable by" in str(validate.directory_note(ready / "sub"))


def test_validate_shows_the_directory_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs.yaml"
    missing = tmp_path / "not-yet"
    runs.write_text(
        "runs:\n  - name: bpm\n    snapshot:\n      snapshot_name: bpm\n"
        "      pv_uri_list: [\"pva://SIM:AI:DOUBLE:1\"]\n      time_window: 100\n"
        f"    output:\n      directory: {missing}\n"
    )
    assert main(["validate", str(runs)]) == 0  # a note, not an error
    out = capsys.readouterr().out
    assert f"directory    {missing}: note: does not exist yet" in out
    assert main(["validate", "--json", str(runs)]) == 0
    assert json.loads(capsys.readouterr().out)["runs"][0]["directory_note"].startswith("note:")


def test_validate_refuses_a_snapshot_published_on_one_of_the_daemons_own_topics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon refuses, at its start and in a reload, a run whose snapshot topic (its
    normalized name) is one of its own topics or the gateway's command topic. validate, the
    dry run meant to be run before `systemctl reload`, said such a file was valid (exit 0).
    It now reports it as the daemon does, from the same RECORDER_* environment, at the line
    of snapshot_name."""
    run = tmp_path / "own.yaml"
    run.write_text("name: own\nsnapshot:\n  pv_uri_list: [pva://A]\n"
                   "  snapshot_name: K2EG-Recorder-Files\noutput: {directory: /data/own}\n")
    assert main(["validate", str(run)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith(
        f"{run}:4: snapshot.snapshot_name: snapshot_name 'K2EG-Recorder-Files' is published on "
        "topic 'k2eg-recorder-files'"), err
    assert "RECORDER_FILES_TOPIC" in err
    monkeypatch.setenv("RECORDER_FILES_TOPIC", "ops-files")  # the daemon's settings count
    assert main(["validate", str(run)]) == 0
    monkeypatch.setenv("RECORDER_CMD_TOPIC", "k2eg-recorder-files")
    assert main(["validate", str(run)]) == 1
    assert "RECORDER_CMD_TOPIC" in capsys.readouterr().err
