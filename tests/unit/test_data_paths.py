"""The default PATHs of ``ls`` and ``verify``: the output directories of the run definitions."""

from __future__ import annotations

from pathlib import Path

import pytest

from recorder.cli.data_paths import paths_to_read


def test_runs_whose_definition_has_an_error_are_not_skipped_without_a_word(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose definition has an error (an edit the daemon refused to reload: it goes on
    recording with the old one) was left out of the directories ``ls`` and the nightly
    ``verify`` read, and nothing said so: its files were not checked, and verify passed."""
    good, other = tmp_path / "good", tmp_path / "other"
    good.mkdir()
    other.mkdir()
    runs = tmp_path / "runs.d"
    runs.mkdir()
    (runs / "good.yaml").write_text(
        f"name: good\nsnapshot: {{snapshot_name: good, pv_uri_list: [pva://A]}}\n"
        f"output: {{directory: {good}}}\n")
    (runs / "other.yaml").write_text(
        f"name: other\nsnapshot: {{snapshot_name: other, pv_uri_list: [pva://A]}}\n"
        f"output: {{directory: {other}, compresion: none}}\n")
    monkeypatch.setenv("RECORDER_CONFIG_PATH", str(runs))
    assert paths_to_read([], "verify") == [good]
    err = capsys.readouterr().err
    assert err == (f"k2eg-recorder verify: 1 problem in the run definitions at {runs}: the "
                   "output directories of runs with errors are not read (k2eg-recorder "
                   "validate lists the problems; or give their PATHs)\n")
