"""``k2eg-recorder demo --output DIR``: the demo writes its own run definitions into
DIR/runs.d and never mixes them with an operator's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recorder.cli import main
from recorder.cli.demo import write_examples
from recorder.config.loader import check_runs
from recorder.errors import ConfigError

pytestmark = pytest.mark.usefixtures("logging_untouched")


def test_examples_are_written_with_their_data_under_the_output(tmp_path: Path) -> None:
    written = write_examples(tmp_path / "runs.d", tmp_path / "data")
    assert {p.name for p in written} == {"periodic-normal.yaml", "timedbuffered-subpush.yaml",
                                         "triggered.yaml"}
    loaded, problems = check_runs(tmp_path / "runs.d")
    assert problems == ()
    assert all(Path(d.output.directory).is_relative_to(tmp_path / "data") for d in loaded)
    write_examples(tmp_path / "runs.d", tmp_path / "data")  # again: the demo's own files


def test_a_runs_dir_with_other_definitions_is_refused_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs.d"
    runs.mkdir()
    mine = runs / "mine.yaml"
    mine.write_text("name: [broken\n")
    with pytest.raises(ConfigError, match=r"not the demo's \(mine.yaml\)"):
        write_examples(runs, tmp_path / "data")
    assert [p.name for p in runs.iterdir()] == ["mine.yaml"]
    assert main(["demo", "--output", str(tmp_path), "--seconds", "1"]) == 2
    assert "new or empty directory" in capsys.readouterr().err
    assert [p.name for p in runs.iterdir()] == ["mine.yaml"]


@pytest.mark.parametrize("blocker", ["runs.d", "daemon.log"])
def test_an_output_the_demo_cannot_write_in_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], blocker: str
) -> None:
    """An --output directory the demo cannot write its files in (no permission, read-only, a
    directory in the way): exit 2 with the path and the reason, not a traceback."""
    (tmp_path / blocker).mkdir() if blocker == "daemon.log" else (tmp_path / blocker).touch()
    assert main(["demo", "--output", str(tmp_path), "--seconds", "1"]) == 2
    err = capsys.readouterr().err
    assert f"--output {tmp_path}" in err and blocker in err, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in a read-only directory")
def test_a_read_only_output_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_path.chmod(0o555)
    try:
        assert main(["demo", "--output", str(tmp_path), "--seconds", "1"]) == 2
    finally:
        tmp_path.chmod(0o755)
    assert "Permission denied" in capsys.readouterr().err
