"""``k2eg-recorder export``: a recording's scalar PVs as CSV, one row per iteration, read
back with the csv module from the command's real output (a child process)."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pytest
from test_hdf5_roundtrip import write_iteration
from test_reader_aligned import N, samples_of

from recorder.client.values import PVSample
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions, SegmentOptions

REPO = Path(__file__).resolve().parents[2]


def export(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "recorder.cli", "export", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120, check=False)


def rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_export_a_recording_of_several_segments(tmp_path: Path) -> None:
    rec = HDF5Recording(OutputOptions(directory=tmp_path, segment=SegmentOptions(max_iterations=4)),
                        run_name="csv")
    for i in range(N):
        f32 = PVSample("F", {"value": float(np.float32(0.1 * i)),
                             "timeStamp": {"secondsPastEpoch": 1, "nanoseconds": i}},
                       frozenset({"value"}))
        flag = [PVSample("Q", {"value": i % 2 == 0})] if i != 3 else []  # a bool, a gap
        write_iteration(rec, i, [*samples_of(i), f32, *flag])
        if i == 4:
            rec.tag_iteration(4, {"shot": "42", "operator": "jdoe"})
    first, second = rec.close()

    proc = export(str(second))  # any file of the recording: all its segments
    assert proc.returncode == 0, proc.stderr
    table = rows(proc.stdout)
    head = list(table[0])
    assert head[:6] == ["iter_index", "segment", "status", "header_time", "header_timestamp_ns",
                        "tags"]
    assert sorted(head[6:]) == ["A", "B", "E", "F", "Q", "S", "T"], head
    assert [r["tags"] for r in table] == [""] * 4 + ['{"shot":"42","operator":"jdoe"}', ""]
    assert [r["iter_index"] for r in table] == [str(i) for i in range(N)]
    assert [r["segment"] for r in table] == ["0"] * 4 + ["1"] * 2
    # gaps: empty; integers, enum indices and booleans print as such despite the gaps
    assert [r["B"] for r in table] == ["0", "10", "", "30", "40", ""]
    assert [r["S"] for r in table] == ["s0", "", "s2", "s3", "s4", ""]
    assert [r["T"] for r in table] == ["2.0", "102.0", "202.0", "302.0", "", ""]  # the last
    assert [r["E"] for r in table] == ["0", "1", "0", "1", "0", ""]
    assert [r["Q"] for r in table] == ["True", "False", "True", "", "True", "False"]
    assert [r["F"] for r in table] == [str(np.float32(0.1 * i)) for i in range(N)]  # 0.3, not
    assert "W" not in table[0]  # waveforms have no CSV cell      # 0.30000001192092896
    assert table[0]["header_time"] == ""  # header timestamp 0: none received
    assert table[1]["header_time"] == "1970-01-01T00:00:00.000000Z"  # 1 ns
    assert table[1]["header_timestamp_ns"] == "1"

    firsts = rows(export(str(first), "--pick", "first", "--only-file", "--pv", "T",
                         "--pv", "A").stdout)
    # the same columns for one file (its segment number) as for the recording
    assert list(firsts[0]) == ["iter_index", "segment", "status", "header_time",
                               "header_timestamp_ns", "tags", "T", "A"]
    assert {r["segment"] for r in firsts} == {"0"}
    assert [r["T"] for r in firsts] == ["1.0", "101.0", "201.0", "301.0"]

    out = tmp_path / "out.csv"
    proc = export(str(first), "-o", str(out))
    assert proc.returncode == 0 and "6 iterations x" in proc.stderr
    assert rows(out.read_text()) == table

    bad = export(str(first), "--pv", "W", "--pv", "NOPE")
    assert bad.returncode == 2 and bad.stdout == ""
    assert "'W' holds array values" in bad.stderr and "no PV 'NOPE'" in bad.stderr
    assert export(str(tmp_path / "missing.h5")).returncode == 1


def test_a_nan_value_is_not_a_gap(tmp_path: Path) -> None:
    """A NaN the PV sent (a BPM without beam, say) is a value: ``nan`` in its cell; only an
    iteration without a value of the PV has an empty cell (float64 and float32 alike)."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="nan")
    nan = float("nan")
    for i, x in enumerate((1.5, nan, None, 2.5)):  # None: no value in that iteration
        ts = {"secondsPastEpoch": 1, "nanoseconds": i}
        samples = [] if x is None else [
            PVSample("D", {"value": x, "timeStamp": ts}),
            PVSample("F", {"value": x, "timeStamp": ts}, frozenset({"value"}))]
        write_iteration(rec, i, [PVSample("A", {"value": i, "timeStamp": ts}), *samples])
    (path,) = rec.close()

    table = rows(export(str(path)).stdout)
    assert [r["D"] for r in table] == ["1.5", "nan", "", "2.5"]
    assert [r["F"] for r in table] == ["1.5", "nan", "", "2.5"]
    assert [r["A"] for r in table] == ["0", "1", "2", "3"]


def test_an_output_that_cannot_be_written_is_said_in_one_line(tmp_path: Path) -> None:
    rec = HDF5Recording(OutputOptions(directory=tmp_path / "data"), run_name="out")
    write_iteration(rec, 0, [PVSample("A", {"value": 1.0})])
    (path,) = rec.close()
    for target, why in ((tmp_path / "no" / "such" / "x.csv", "No such file or directory"),
                        (tmp_path, "Is a directory")):
        out = export(str(path), "-o", str(target))
        assert out.returncode == 1, out
        assert out.stderr == f"{target}: cannot write: {why}\n", out.stderr
    before = path.read_bytes()
    out = export(str(path), "-o", str(path))  # the recording itself: never overwritten
    assert out.returncode == 2 and "not overwritten" in out.stderr, out
    assert path.read_bytes() == before


def test_a_value_after_a_type_change_is_exported_as_sent(tmp_path: Path) -> None:
    """A PV stored as integers that later sends a float (its IOC record changed type): the
    float is its value in that iteration, not truncated to the integer column's type."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="change")
    for i, x in enumerate((1, 2, 2.75, -0.5)):
        write_iteration(rec, i, [PVSample("X", {"value": x}), PVSample("Q", {
            "value": i % 2 == 0 if i < 2 else 0.5})])
    (path,) = rec.close()

    table = rows(export(str(path)).stdout)
    assert [r["X"] for r in table] == ["1", "2", "2.75", "-0.5"]
    assert [r["Q"] for r in table] == ["True", "False", "0.5", "0.5"]


def test_standard_output_on_a_full_disk_is_said_in_one_line(tmp_path: Path) -> None:
    """``export FILE > out.csv`` on a full filesystem (here /dev/full): one line, exit 1,
    as with ``-o`` (it was a traceback); the same for the other commands that print."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="full")
    for i in range(3):
        write_iteration(rec, i, [PVSample("A", {"value": 1.0 * i})])
    (path,) = rec.close()
    for args in (["export", str(path)], ["ls", str(tmp_path)], ["verify", str(path)],
                 ["inspect", str(path)]):
        with open("/dev/full", "w") as full:
            out = subprocess.run([sys.executable, "-m", "recorder.cli", *args], stdout=full,
                                 stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=120,
                                 check=False)
        assert out.returncode == 1, (args, out.stderr)
        assert out.stderr == (f"k2eg-recorder {args[0]}: cannot write the output: "
                              "No space left on device\n"), (args, out.stderr)


def test_a_pv_without_values_in_the_first_segment_is_exported(tmp_path: Path) -> None:
    """A PV that has values only from the second segment on (disconnected when the
    recording began) is one of the recording's integer PVs: it was left out of the export,
    and ``--pv`` refused it as holding "none values"; a PV without any value, named, is an
    empty column."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path, segment=SegmentOptions(
        max_iterations=2)), run_name="late", pv_uris=["pva://A", "pva://B", "pva://NEVER"])
    for i in range(4):
        late = [PVSample("B", {"value": 10 + i})] if i >= 2 else []
        write_iteration(rec, i, [PVSample("A", {"value": float(i)}), *late])
    first, _second = rec.close()

    table = rows(export(str(first)).stdout)
    assert [r["B"] for r in table] == ["", "", "12", "13"]
    named = export(str(first), "--pv", "B", "--pv", "NEVER")
    assert named.returncode == 0, named.stderr
    assert [(r["B"], r["NEVER"]) for r in rows(named.stdout)] == [
        ("", ""), ("", ""), ("12", ""), ("13", "")]


def test_a_pv_without_a_value_in_the_first_segment_is_exported(tmp_path: Path) -> None:
    """A PV whose samples had no value in the first segment (not connected yet) and numbers
    later is exported by default (it was left out: the recording's summary said kind
    ``none``)."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path, segment=SegmentOptions(
        max_iterations=2)), run_name="unconnected")
    for i in range(4):
        write_iteration(rec, i, [PVSample("A", {"value": float(i)}),
                                 PVSample("X", {"value": None if i < 2 else 10 + i})])
    first, _second = rec.close()

    proc = export(str(first))
    assert proc.returncode == 0, proc.stderr
    assert [r.get("X") for r in rows(proc.stdout)] == ["", "", "12", "13"]


def test_a_file_beside_the_recording_that_cannot_be_read_is_said(tmp_path: Path) -> None:
    """A file of the recording's directory that cannot be read (a damaged segment?) was left
    out without a word: the CSV lacked its iterations and export exited 0. It is still left
    out (whose it is cannot be known), but named on stderr, and open_recording warns."""
    import pytest

    from recorder.reader import SkippedFileWarning, open_recording

    rec = HDF5Recording(OutputOptions(directory=tmp_path, segment=SegmentOptions(max_iterations=4)),
                        run_name="csv")
    for i in range(N):
        write_iteration(rec, i, samples_of(i))
    first, _second = rec.close()
    damaged = tmp_path / "csv_20260101T000000Z_0002.h5"
    damaged.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))  # a signature, then zeros

    with pytest.warns(SkippedFileWarning, match=damaged.name):
        recording = open_recording(first)
    with recording:
        assert [p for p, _why in recording.skipped] == [damaged]
        assert len(recording.files) == 2
    proc = export(str(first))
    assert proc.returncode == 0, proc.stderr
    assert len(rows(proc.stdout)) == N
    assert f"{damaged}: could not be read" in proc.stderr
    assert "Warning" not in proc.stderr  # said in one line, not as a Python warning


def test_a_text_that_is_not_utf8_is_written_as_sent(tmp_path: Path) -> None:
    """A string PV whose IOC sent bytes that are not UTF-8 (a Latin-1 ``°C``: the reader
    gives them as lone surrogates) made ``-o out.csv`` fail with a traceback, and standard
    output too under a strict UTF-8 locale; the bytes are now written as the IOC sent them,
    to the file and to standard output alike."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path / "data"), run_name="latin")
    for i, text in enumerate(("20 C", "20\udcb0C", "")):
        write_iteration(rec, i, [PVSample("S", {"value": text}), PVSample("A", {"value": i})])
    (path,) = rec.close()

    out = tmp_path / "out.csv"
    proc = export(str(path), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    raw = out.read_bytes()
    assert b",20\xb0C,1\n" in raw
    with open(out, encoding="utf-8", errors="surrogateescape", newline="") as f:
        assert [r["S"] for r in csv.DictReader(f)] == ["20 C", "20\udcb0C", ""]
    strict = subprocess.run([sys.executable, "-m", "recorder.cli", "export", str(path)],
                            capture_output=True, cwd=REPO, timeout=120, check=False,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert strict.returncode == 0, strict.stderr
    assert strict.stdout == raw


def test_a_pv_named_as_a_fixed_column_keeps_both(tmp_path: Path) -> None:
    """A PV named ``status``, ``segment``, ``tags``, ``iter_index`` or ``header_timestamp``
    replaced that column of the iterations (``status`` printed the PV's values, a ``tags``
    PV printed ``{}``), or the iterations' column replaced the PV's values; both are now
    written, each as it is."""
    names = ["status", "segment", "tags", "iter_index", "header_timestamp"]
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="names")
    for i in range(3):
        write_iteration(rec, 10 + i, [PVSample("status", {"value": 100 + i}),
                                      PVSample("segment", {"value": 0.5 + i}),
                                      PVSample("tags", {"value": f"t{i}"}),
                                      PVSample("iter_index", {"value": 7}),
                                      PVSample("header_timestamp", {"value": -1.5})])
    (path,) = rec.close()

    for args in ([], [arg for pv in names for arg in ("--pv", pv)]):
        proc = export(str(path), *args)
        assert proc.returncode == 0, proc.stderr
        head, *body = list(csv.reader(io.StringIO(proc.stdout)))
        assert head[6:] == names
        assert [r[:6] for r in body] == [
            [str(10 + i), "0", "complete", "1970-01-01T00:00:00.000000Z", str(10 + i), ""]
            for i in range(3)]
        assert [r[6:] for r in body] == [[str(100 + i), str(0.5 + i), f"t{i}", "7", "-1.5"]
                                         for i in range(3)]


def test_a_value_of_another_kind_after_a_type_change_is_exact(tmp_path: Path) -> None:
    """A PV whose IOC record changed type while recorded: an enum that then sends integers
    printed its enum values as ``EnumValue(index=0, choices=('Off', 'On'))``, not their
    index; a scalar that then sends a waveform printed numpy's rounded summary
    (``[0.12345679 1. ...]``, 8 digits, elided past 1,000 elements). An enum value is now
    its index, a waveform a JSON list of its exact values."""
    wave = [0.123456789012, 1.0, *range(2000)]
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="kinds")
    for i in range(3):
        e = {"index": i, "choices": ["Off", "On", "Mid"]} if i < 2 else 5
        write_iteration(rec, i, [PVSample("E", {"value": e}),
                                 PVSample("X", {"value": wave if i == 1 else 0.5 * i})])
    (path,) = rec.close()

    table = rows(export(str(path)).stdout)
    assert [r["E"] for r in table] == ["0", "1", "5"]
    assert [r["X"] for r in table][::2] == ["0.0", "1.0"]
    assert json.loads(table[1]["X"]) == wave


def test_a_segment_number_that_is_not_a_number_is_said_in_one_line(tmp_path: Path) -> None:
    """A file whose root attribute ``segment`` is not an integer (damaged, or written by
    another program): `export` ended in a traceback (ValueError: invalid literal for int()),
    with or without --only-file; it now says in one line which file and what (exit 1)."""
    import h5py

    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="csv")
    write_iteration(rec, 0, [PVSample("A", {"value": 1.0})])
    (final,) = rec.close()
    final.chmod(0o644)
    with h5py.File(final, "r+") as f:
        f.attrs["segment"] = "abc"
    for options in ([], ["--only-file"]):
        proc = export(str(final), *options)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.splitlines()) == 1, proc.stderr
        assert f"{final}: damaged: root attribute 'segment'" in proc.stderr, proc.stderr


def test_a_value_column_shorter_than_its_index_is_said_in_one_line(tmp_path: Path) -> None:
    """A PV whose ``value`` dataset holds fewer rows than its index points at: `export` of
    the recording ended in a traceback (IndexError: index 3 is out of bounds), where
    `export --only-file` said the file was damaged; both now say so in one line."""
    import h5py

    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="csv")
    for i in range(6):
        write_iteration(rec, i, [PVSample("A", {"value": float(i)})])
    (final,) = rec.close()
    final.chmod(0o644)
    with h5py.File(final, "r+") as f:
        del f["pvs/A/value"]
        f["pvs/A"].create_dataset("value", data=np.zeros(3))
    for options in ([], ["--only-file"]):
        proc = export(str(final), *options)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.splitlines()) == 1, proc.stderr
        assert f"{final}: damaged: " in proc.stderr, proc.stderr


def test_an_export_cut_short_leaves_no_half_written_output(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``export FILE -o out.csv`` ended part-way, by Ctrl-C (exit 130) or a full disk (exit
    1), left ``out.csv`` with the rows written so far: a well-formed CSV that looked like the
    whole recording. The half-written output now goes; an output that is not a regular file
    (``-o /dev/full``) is left alone."""
    import recorder.cli.export as export_cmd
    from recorder.cli import main

    rec = HDF5Recording(OutputOptions(directory=tmp_path / "data"), run_name="cut")
    for i in range(3):
        write_iteration(rec, i, [PVSample("A", {"value": 1.0 * i})])
    (path,) = rec.close()
    whole = export_cmd.write_csv

    def cut_by(exc: BaseException) -> Callable[..., int]:
        def write_csv(table: dict[str, Any], pvs: list[str], out: TextIO, *args: Any,
                      **kwargs: Any) -> int:
            out.write("iter_index,segment\n" * 1000)
            out.flush()
            raise exc
        return write_csv

    out = tmp_path / "out.csv"
    for exc, code in ((KeyboardInterrupt(), 130),
                      (OSError(errno.ENOSPC, "No space left on device"), 1)):
        out.write_text("an earlier export\n")
        monkeypatch.setattr(export_cmd, "write_csv", cut_by(exc))
        assert main(["export", str(path), "-o", str(out)]) == code
        assert not out.exists(), (exc, out.read_text()[:100])
    monkeypatch.setattr(export_cmd, "write_csv", whole)
    assert main(["export", str(path), "-o", str(out)]) == 0
    assert len(rows(out.read_text())) == 3
    monkeypatch.setattr(export_cmd, "write_csv",
                        cut_by(OSError(errno.ENOSPC, "No space left on device")))
    null = Path(os.devnull)
    assert main(["export", str(path), "-o", str(null)]) == 1
    assert null.exists() and not null.is_file()


def test_an_iteration_open_at_a_rotation_is_one_row(tmp_path: Path) -> None:
    """An iteration still open when its segment rotated has a row in each file (the first
    one incomplete, `recording_stopped`) and its values split between them: the CSV has one
    row for it, complete, with the values of both files."""
    from recorder.client.events import (
        IterationClosed,
        IterationOpened,
        IterationStatus,
        ValuesReceived,
    )

    def value(pv: str, v: float) -> PVSample:
        return PVSample(pv, {"value": v, "timeStamp": {"secondsPastEpoch": 1, "nanoseconds": 0}})

    def closed(i: int) -> IterationClosed:
        return IterationClosed("t", "s", i, IterationStatus.COMPLETE, None, 1000 * i, 1000 * i)

    rec = HDF5Recording(OutputOptions(directory=tmp_path,
                                      segment=SegmentOptions(max_iterations=1)),
                        run_name="split")
    rec.handle(IterationOpened("t", "s", 1, 1000))
    rec.handle(ValuesReceived("t", 1, 1, 1, (value("A", 1.0), value("B", 10.0))))
    rec.handle(IterationOpened("t", "s", 2, 2000))
    rec.handle(ValuesReceived("t", 2, 1, 1, (value("A", 2.0),)))
    rec.handle(closed(1))
    rec.handle(IterationOpened("t", "s", 3, 3000))  # rotates: iteration 2 is open
    rec.handle(ValuesReceived("t", 2, 2, 2, (value("B", 20.0),)))
    rec.handle(closed(2))
    rec.handle(ValuesReceived("t", 3, 1, 1, (value("A", 3.0), value("B", 30.0))))
    rec.handle(closed(3))
    first, _ = rec.close()

    proc = export(str(first))
    assert proc.returncode == 0, proc.stderr
    table = rows(proc.stdout)
    assert [(r["iter_index"], r["segment"], r["status"], r["header_timestamp_ns"], r["A"],
             r["B"]) for r in table] == [
        ("1", "0", "complete", "1000", "1.0", "10.0"),
        ("2", "1", "complete", "2000", "2.0", "20.0"),
        ("3", "1", "complete", "3000", "3.0", "30.0"),
    ]
    pick_first = rows(export(str(first), "--pick", "first").stdout)
    assert [(r["A"], r["B"]) for r in pick_first][1] == ("2.0", "20.0")
    only = rows(export(str(first), "--only-file").stdout)  # the file's own rows
    assert [(r["iter_index"], r["status"], r["A"], r["B"]) for r in only] == [
        ("1", "complete", "1.0", "10.0"), ("2", "incomplete", "2.0", "")]


def test_an_output_of_dash_is_standard_output(tmp_path: Path) -> None:
    """``export FILE -o -`` wrote the CSV into a file named ``-`` in the working directory
    (and said "-: 3 iterations"), where a shell user means standard output; it is standard
    output now, as without ``-o``."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path / "data"), run_name="dash")
    for i in range(3):
        write_iteration(rec, i, [PVSample("A", {"value": 1.0 * i})])
    (path,) = rec.close()
    proc = subprocess.run([sys.executable, "-m", "recorder.cli", "export", str(path), "-o", "-"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert [r["A"] for r in rows(proc.stdout)] == ["0.0", "1.0", "2.0"], proc.stdout
    assert not (tmp_path / "-").exists()


def test_an_output_path_that_cannot_be_looked_up_is_said_in_one_line(tmp_path: Path) -> None:
    """``-o`` with a name too long for the file system (or, for a user, in a directory they
    may not search) ended in a traceback (OSError from the check that the output is not a
    file of the recording); it is one line naming the output now, exit 1, the input left
    as it was."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path / "data"), run_name="long")
    write_iteration(rec, 0, [PVSample("A", {"value": 1.0})])
    (path,) = rec.close()
    before = path.read_bytes()
    out = tmp_path / ("x" * 300 + ".csv")
    proc = export(str(path), "-o", str(out))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines() == [f"{out}: cannot write: File name too long"], proc.stderr
    assert path.read_bytes() == before
