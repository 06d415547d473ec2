"""``k2eg-recorder inspect FILE`` on live and finalized files (its own process), and
``RecordingFile.summary`` behind it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import pytest
from test_hdf5_roundtrip import record, write_iteration

from recorder.client.values import PVSample
from recorder.reader import open_file
from recorder.sinks.final_layout import FORMAT_VERSION
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions


def _inspect(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "recorder.cli", "inspect", str(path)],
                          capture_output=True, text=True, timeout=120, check=False)


def _rows(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("PV "))
    return {line.split()[0]: line.split() for line in lines[start + 1 :]}


def test_inspect_live_and_final(tmp_path: Path) -> None:
    rec, sent = record(tmp_path, n_iter=5)
    rec.flush()
    live = rec.current_path
    assert live is not None
    got = _inspect(live)
    assert got.returncode == 0, got.stderr
    assert f"format    k2eg-recorder {FORMAT_VERSION} (live layout)" in got.stdout
    assert "status    recording" in got.stdout
    live_rows = _rows(got.stdout)
    with open_file(live) as f:
        live_summary = {r["pv"]: r for r in f.summary()}
    (final,) = rec.close()
    got = _inspect(final)
    assert got.returncode == 0, got.stderr
    out = got.stdout
    assert f"format    k2eg-recorder {FORMAT_VERSION} (final layout)" in out
    assert "status    complete" in out
    assert "iterations 5 (4 complete, 1 incomplete)  iter_index 100..104" in out
    rows = _rows(out)
    assert set(rows) == set(sent) == set(live_rows)
    # PV  kind  dtype  shape  units  count  first .. last
    assert rows["F32"][1:6] == ["scalar", "float32", "()", "mm", "5"]
    assert rows["W"][1:6] == ["array", "float32", "varies", "-", "5"]
    assert rows["S"][1:3] == ["string", "utf-8"] and rows["T"][1:3] == ["table", "table"]
    assert rows["F32"][6] == "2023-11-14T22:13:20.123+00:00"  # 1_700_000_000 s + 123 ms
    assert rows["F32"][8] == "2023-11-14T22:13:24.123+00:00"
    assert rows["N"][5:] == ["5", "-", "..", "-"]  # out-of-range time stamps: not typed
    with open_file(final) as f:
        summary = {r["pv"]: r for r in f.summary()}
        for pv, samples in sent.items():
            row = summary[pv]
            assert row["count"] == len(samples) == live_summary[pv]["count"], pv
            assert row["first_ns"] == live_summary[pv]["first_ns"], pv
            assert row["last_ns"] == live_summary[pv]["last_ns"], pv
            assert row["units"] == live_summary[pv]["units"], pv
            live_row = live_summary[pv]
            assert (live_row["kind"], live_row["dtype"]) == (row["kind"], row["dtype"]), pv
            assert live_row["shape"] == row["shape"], pv
            assert row["kind"] == samples[0].kind.value or pv in ("SA", "T", "X"), pv


def test_live_summary_gives_the_shape_of_images_of_one_shape(tmp_path: Path) -> None:
    """An NTNDArray PV whose frames all have one shape: the live file's summary (inspect of
    a .partial) gives it as the final file does, not "varies"."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="img")
    for i in range(4):
        write_iteration(rec, i, [
            PVSample("CAM", {"value": {"ushortValue": list(range(6))},
                             "dimension": [{"size": 3}, {"size": 2}], "uniqueId": i}),
            PVSample("LINE", {"value": {"ubyteValue": [1, 2, 3, 4]},
                              "dimension": [{"size": 4}]}),
            PVSample("GROW", {"value": {"ubyteValue": [1] * 4},
                              "dimension": [{"size": 2}, {"size": 2}] if i else [{"size": 4}]}),
        ])
    rec.flush()
    assert rec.current_path is not None
    with open_file(rec.current_path) as f:
        live = {r["pv"]: r["shape"] for r in f.summary()}
    (final,) = rec.close()
    with open_file(final) as f:
        assert {r["pv"]: r["shape"] for r in f.summary()} == live
    assert live == {"CAM": (2, 3), "LINE": (4,), "GROW": None}


@pytest.mark.parametrize(("props", "line"), [
    ({"time_window": 100}, "periodic normal: latest values every 100 ms"),
    ({"time_window": 300, "type": "timedbuffered", "sub_push_delay_msec": 100},
     "periodic timedbuffered: every event, in 300 ms windows, pushed every 100 ms"),
    ({"time_window": 0, "triggered": True}, "triggered normal: one iteration per admin trigger"),
])
def test_inspect_says_how_the_snapshot_was_taken(tmp_path: Path, props: dict[str, Any],
                                                 line: str) -> None:
    """A triggered run's file says it is triggered (it used to print only `type normal`)."""
    from recorder.client.properties import SnapshotProperties, SnapshotType

    if "type" in props:
        props = {**props, "type": SnapshotType(props["type"])}
    snapshot = SnapshotProperties("shots", ("pva://A",), **props)
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="m", snapshot=snapshot)
    write_iteration(rec, 1, [PVSample("A", {"value": 1.0})])
    (path,) = rec.close()
    got = _inspect(path)
    assert got.returncode == 0, got.stderr
    assert f"snapshot  shots  {line}\n" in got.stdout, got.stdout


def test_inspect_not_a_recording(tmp_path: Path) -> None:
    bad = tmp_path / "x.h5"
    bad.write_bytes(b"not hdf5")
    got = _inspect(bad)
    assert got.returncode == 1 and got.stdout == ""
    assert got.stderr == f"{bad}: cannot open: not an HDF5 file\n"
    missing = _inspect(tmp_path / "missing.h5")
    assert missing.returncode == 1
    assert missing.stderr == f"{tmp_path / 'missing.h5'}: no such file\n"
    assert _inspect(tmp_path).stderr == f"{tmp_path}: not a file\n"
    other = tmp_path / "other.h5"  # HDF5, but not one of ours
    with h5py.File(other, "w") as f:
        f["x"] = [1, 2, 3]
    got = _inspect(other)
    assert got.returncode == 1 and got.stderr == f"{other} is not a k2eg-recorder file\n"


def test_an_epics_time_of_zero_is_a_time(tmp_path: Path) -> None:
    """An IOC sends time 0 (1970-01-01) for a record never processed: a time, printed as one;
    ``-`` only where there is none (no values, or a time stamp that could not be stored)."""
    from test_hdf5_roundtrip import write_iteration

    from recorder.client.values import PVSample
    from recorder.sinks.hdf5 import HDF5Recording
    from recorder.sinks.options import OutputOptions

    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="zero",
                        pv_uris=["pva://ZERO", "pva://BAD", "pva://ABSENT"])
    for i in range(3):
        write_iteration(rec, i, [
            PVSample("ZERO", {"value": 1.0, "timeStamp": {"secondsPastEpoch": 0,
                                                           "nanoseconds": 0}}),
            PVSample("BAD", {"value": 2.0, "timeStamp": {"secondsPastEpoch": 1,
                                                          "nanoseconds": -1}}),
        ])
    rec.flush()
    live = rec.current_path
    assert live is not None
    got = _inspect(live)
    assert got.returncode == 0, got.stderr
    rows = _rows(got.stdout)
    assert rows["ZERO"][6:] == ["1970-01-01T00:00:00.000+00:00", "..",
                                "1970-01-01T00:00:00.000+00:00"]
    assert rows["BAD"][6:] == ["-", "..", "-"]
    (final,) = rec.close()
    rows = _rows(_inspect(final).stdout)
    assert rows["ZERO"][6] == "1970-01-01T00:00:00.000+00:00"
    assert rows["BAD"][6:] == ["-", "..", "-"]
    assert rows["ABSENT"][5:] == ["0", "-", "..", "-"]
    with open_file(final) as f:
        summary = {r["pv"]: r for r in f.summary()}
    assert summary["ZERO"]["first_ns"] == 0 and summary["BAD"]["first_ns"] is None
    assert summary["ABSENT"]["first_ns"] is None


def test_a_partial_no_writer_holds_is_unfinished_not_recording(tmp_path: Path) -> None:
    """A .partial whose writer is gone (here: a copy, which no writer locks; a crash leaves
    the same) is shown as ``ls`` and ``verify`` show it, ``unfinished`` with what to do, not
    as ``recording``, which only a file its writer holds is."""
    import shutil

    rec, _sent = record(tmp_path / "run", n_iter=3)
    rec.flush()
    live = rec.current_path
    assert live is not None
    left = tmp_path / live.name
    shutil.copyfile(live, left)
    got = _inspect(live)
    assert "status    recording\n" in got.stdout and "(still recording)" in got.stdout
    got = _inspect(left)
    assert got.returncode == 0, got.stderr
    assert "status    unfinished (no writer holds this file" in got.stdout
    assert "k2eg-recorder recover" in got.stdout and "(not finalized)" in got.stdout
    rec.close()


def test_a_damaged_file_is_said_in_one_line_and_does_not_stop_its_neighbours(
        tmp_path: Path) -> None:
    """A final file whose metadata is damaged (4 KB zeroed near its start): `inspect` and
    the reader say so (FileFormatError "damaged"), no traceback; a good file beside it still
    opens as its recording (the damaged one is not taken for a segment)."""
    from recorder.errors import FileFormatError
    from recorder.reader import SkippedFileWarning, open_recording

    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="good")
    write_iteration(rec, 1, [PVSample("A", {"value": 1.0})])
    (good,) = rec.close()
    whole = good.read_bytes()
    damaged = tmp_path / "other.h5"
    damaged.write_bytes(whole[:200] + bytes(4000) + whole[4200:])
    got = _inspect(damaged)
    assert got.returncode == 1 and "Traceback" not in got.stderr, got.stderr
    assert got.stderr.startswith(f"{damaged}: damaged: ") or "not a k2eg-recorder" in got.stderr
    with pytest.raises(FileFormatError):
        open_file(damaged)
    with pytest.warns(SkippedFileWarning, match="other.h5"), open_recording(good) as r:
        assert [f.path for f in r.files] == [good]
        assert [p for p, _why in r.skipped] == [damaged]  # named, not chained
        assert r.values("A").tolist() == [1.0]


def test_a_commit_with_a_negative_count_is_not_taken(tmp_path: Path) -> None:
    """A .partial whose commit row was overwritten (random bytes: a count below 0) fitted
    "every count within the data" and was taken: inspect and export died on a traceback
    (ValueError from an empty slice), verify said "cannot check: ValueError". Such a row is
    a commit cut short: readers use the one before, as for a count past the data."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path / "run"), run_name="neg")
    write_iteration(rec, 1, [PVSample("A", {"value": 1.0})])
    rec.flush()
    write_iteration(rec, 2, [PVSample("A", {"value": 2.0})])
    rec.flush()
    live = rec.current_path
    assert live is not None
    left = tmp_path / live.name
    left.write_bytes(live.read_bytes())
    rec.close()
    from recorder.sinks.superblock import clear_consistency_flags

    clear_consistency_flags(left)  # the copy still says "open for SWMR write"
    with h5py.File(left, "r+") as f:
        n_pvs = f["live/state/n_pvs"]
        n_pvs[n_pvs.shape[0] - 1] = -3692734034357870552
    got = _inspect(left)
    assert got.returncode == 0 and "Traceback" not in got.stderr, got.stderr
    assert "iterations 1 (1 complete, 0 incomplete)  iter_index 1..1" in got.stdout, got.stdout
    out = subprocess.run([sys.executable, "-m", "recorder.cli", "export", str(left)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.splitlines()[1].startswith("1,0,complete,"), out


def test_a_live_file_of_images_of_one_size_has_their_shape(tmp_path: Path) -> None:
    """A camera's frames of one size: the live file's summary (what `inspect` prints while
    it records) gives their shape, as the finalized file's does (it said None, "varies",
    for every NTNDArray PV of a live file). Frames whose shape changes, or a frame that
    changes the PV's type, still give None, in both layouts."""

    def frame(i: int, w: int, h: int, pixels: Any = None, union: str = "ushortValue",
              ) -> PVSample:
        return PVSample("CAM", {
            "value": {union: list(range(w * h)) if pixels is None else pixels},
            "dimension": [{"size": w}, {"size": h}], "uniqueId": i,
            "timeStamp": {"secondsPastEpoch": 1_700_000_000 + i, "nanoseconds": 0}})

    cases = {
        "same": [frame(i, 4, 3) for i in range(4)],
        "resized": [frame(0, 4, 3), frame(1, 4, 3), frame(2, 3, 4), frame(3, 4, 3)],
        "other_type": [frame(0, 4, 3), frame(1, 4, 3), frame(2, 4, 3, [0.5] * 12, "doubleValue")],
        "one_flat": [frame(0, 4, 3), frame(1, 4, 3), frame(2, 5, 3, list(range(12)))],
    }
    for name, frames in cases.items():
        rec = HDF5Recording(OutputOptions(directory=tmp_path / name), run_name=name)
        for i, sample in enumerate(frames):
            write_iteration(rec, i + 1, [sample])
        rec.flush()
        assert rec.current_path is not None
        with open_file(rec.current_path) as f:
            (live,) = f.summary()
        (final,) = rec.close()
        with open_file(final) as f:
            (done,) = f.summary()
        assert live["shape"] == done["shape"], (name, live, done)
        assert done["shape"] == ((3, 4) if name == "same" else None), (name, done)


@pytest.mark.parametrize("column", ["iter_index", "status", "error_message"])
@pytest.mark.parametrize("command", ["inspect", "export"])
def test_a_final_file_missing_an_iterations_column_is_said_in_one_line(
        tmp_path: Path, column: str, command: str) -> None:
    """A finalized file whose ``/iterations`` lacks a column: `inspect` and `export` ended
    in a Python traceback (KeyError: 'iter_index') where the column was ``iter_index`` (the
    reader's iterations() returned the table without it); each now says, in one line naming
    the file and the column, that it is damaged (exit 1)."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="cut")
    write_iteration(rec, 1, [PVSample("A", {"value": 1.0})])
    (final,) = rec.close()
    final.chmod(0o644)
    with h5py.File(final, "r+") as f:
        del f[f"iterations/{column}"]
    got = subprocess.run([sys.executable, "-m", "recorder.cli", command, str(final)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert got.returncode == 1 and "Traceback" not in got.stderr, got.stderr
    assert len(got.stderr.splitlines()) == 1, got.stderr
    assert f"{final}: damaged: " in got.stderr and column in got.stderr, got.stderr


@pytest.mark.parametrize("change", ["header_timestamp gone", "status cut short",
                                    "iter_index as text"])
@pytest.mark.parametrize("options", [[], ["--only-file"]])
def test_export_of_a_file_with_a_broken_iterations_table_is_said_in_one_line(
        tmp_path: Path, change: str, options: list[str]) -> None:
    """``/iterations`` without ``header_timestamp``, with a column shorter than the others,
    or with ``iter_index`` not integers: `export` ended in a traceback (KeyError,
    IndexError, ValueError: invalid literal for int()); it now says in one line that the
    file is damaged, and how (exit 1)."""
    import numpy as np

    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="cut")
    for i in range(1, 5):
        write_iteration(rec, i, [PVSample("A", {"value": float(i)})])
    (final,) = rec.close()
    final.chmod(0o644)
    with h5py.File(final, "r+") as f:
        table = f["iterations"]
        if change == "header_timestamp gone":
            del table["header_timestamp"]
        elif change == "status cut short":
            del table["status"]
            table["status"] = np.zeros(2, np.int8)
        else:
            del table["iter_index"]
            table["iter_index"] = np.array([b"x"] * 4)
    got = subprocess.run([sys.executable, "-m", "recorder.cli", "export", str(final),
                          *options], capture_output=True, text=True, timeout=120,
                         check=False)
    assert got.returncode == 1 and "Traceback" not in got.stderr, got.stderr
    assert len(got.stderr.splitlines()) == 1, got.stderr
    assert f"{final}: damaged: /iterations" in got.stderr, got.stderr


def test_a_file_whose_last_iteration_goes_on_in_the_next_segment_says_so(
        tmp_path: Path) -> None:
    """The first file of an iteration open at a rotation counts its row as incomplete
    (`recording_stopped`), where `ls` and `export` count the recording's iteration once, as
    complete: `inspect` of that file said "1 incomplete" and nothing more; it now says the
    count is this file's row and the iteration goes on in the next segment."""
    from recorder.client.events import (
        IterationClosed,
        IterationOpened,
        IterationStatus,
        ValuesReceived,
    )
    from recorder.sinks.options import SegmentOptions

    rec = HDF5Recording(OutputOptions(directory=tmp_path,
                                      segment=SegmentOptions(max_iterations=1)),
                        run_name="split")
    for i in (1, 2):
        rec.handle(IterationOpened("t", "s", i, 1000 * i))
        rec.handle(ValuesReceived("t", i, 1, 1, (PVSample("A", {"value": 1.0 * i}),)))
    rec.handle(IterationClosed("t", "s", 1, IterationStatus.COMPLETE, None, 1000, 1000))
    rec.handle(IterationOpened("t", "s", 3, 3000))  # rotates: iteration 2 is open
    for i in (2, 3):
        rec.handle(IterationClosed("t", "s", i, IterationStatus.COMPLETE, None, 1000 * i,
                                   1000 * i))
    first, second = rec.close()
    got = _inspect(first)
    assert got.returncode == 0, got.stderr
    assert "iterations 2 (1 complete, 1 incomplete)  iter_index 1..2" in got.stdout
    assert ("iter_index 2 was open when this file ended (recording_stopped): counted here as "
            "this file's row") in got.stdout, got.stdout
    assert "was open when" not in _inspect(second).stdout
