"""``k2eg-recorder verify`` / ``recorder.verify`` over real files: every kind the writer makes
passes, and each rule of docs/file-format.md broken on a copy is named."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from test_hdf5_per_sample_fields import samples_of as tagged_samples
from test_hdf5_roundtrip import record, write_iteration

from recorder.client.events import (
    IncompleteReason,
    IterationClosed,
    IterationOpened,
    IterationStatus,
    ValuesReceived,
)
from recorder.client.values import PVSample
from recorder.sinks.codec import POOL_NAMES, STRING_DTYPE_CODE
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import Compression, OutputOptions, SegmentOptions
from recorder.sinks.superblock import clear_consistency_flags
from recorder.verify import Report, verify_file

# a writer killed (-9) in the middle of its recording
KILLED = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from recorder.client.events import IterationOpened, ValuesReceived, IterationClosed
    from recorder.client.events import IterationStatus
    from recorder.client.values import PVSample
    from recorder.sinks.hdf5 import HDF5Recording
    from recorder.sinks.options import OutputOptions
    import structlog, logging
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    rec = HDF5Recording(OutputOptions(directory=Path(sys.argv[1])), run_name="killed")
    for i in range(1, 40):
        rec.handle(IterationOpened("t", "s", i, i))
        rec.handle(ValuesReceived("t", i, 1, 1, (PVSample("K:W", {"value": [1.0 * i] * i}),)))
        rec.handle(IterationClosed("t", "s", i, IterationStatus.COMPLETE, None, i, i))
        if i == 20:
            rec.flush()
    rec.handle(IterationOpened("t", "s", 40, 40))
    rec.handle(ValuesReceived("t", 40, 1, 1, (PVSample("K:W", {"value": [0.5]}),)))
    rec.flush()
    print("FLUSHED", flush=True)
    sys.stdin.read()
    """
)


def verify_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``k2eg-recorder verify`` in a child process (a reader other than the writer)."""
    return subprocess.run([sys.executable, "-m", "recorder.cli", "verify", *args],
                          check=False, capture_output=True, text=True, timeout=300)


def every_kind(directory: Path) -> list[Path]:
    """Files of every kind the writer makes, in ``directory``: each value type with
    sub-push and a gateway error (live copy and final), timedbuffered with overlapping
    iterations and late values, zstd segments, a waveform file with chunked gzip data,
    user tags taken out into columns, and a file left by kill -9 with its recovered twin."""
    rec, _sent = record(directory / "types")
    rec.flush()
    live = rec.current_path
    assert live is not None
    shutil.copy(live, directory / "types" / "copy-of-live.h5.partial")
    rec.close()

    rec = HDF5Recording(OutputOptions(directory=directory / "tb"), run_name="tb")
    rec.handle(IterationOpened("t", "s", 1, 1))
    rec.handle(IterationOpened("t", "s", 2, 2))
    for it, n in ((2, 3), (1, 4), (2, 2)):
        rec.handle(ValuesReceived("t", it, 1, 1, tuple(
            PVSample("P", {"value": float(it * 100 + k)}) for k in range(n))))
    rec.handle(IterationClosed("t", "s", 2, IterationStatus.COMPLETE, None, 2, 3))
    rec.handle(IterationClosed("t", "s", 1, IterationStatus.INCOMPLETE,
                               IncompleteReason.TIMEOUT, 1, None))
    rec.handle(ValuesReceived("t", 2, 2, 2, (PVSample("P", {"value": -1.0}),)))  # late
    rec.handle(IterationOpened("t", "s", 3, 3))  # never closed: the recording stops
    rec.handle(ValuesReceived("t", 3, 1, 1, (PVSample("P", {"value": 9.0}),)))
    rec.close()

    rec = HDF5Recording(OutputOptions(directory=directory / "seg", compression=Compression.ZSTD,
                                      segment=SegmentOptions(max_iterations=40)),
                        run_name="seg")
    for i in range(100):
        write_iteration(rec, i, [PVSample("A", {"value": float(i)}),
                                 PVSample("W", {"value": [float(i)] * 300})])
    rec.tag_iteration(3, {"shot": "3"})
    rec.close()

    rng = np.random.default_rng(7)
    rec = HDF5Recording(OutputOptions(directory=directory / "wave"), run_name="wave")
    for i in range(400):
        write_iteration(rec, i, [PVSample("W", {"value": rng.normal(size=256).tolist()})])
    rec.close()

    rec = HDF5Recording(OutputOptions(directory=directory / "tags"), run_name="tags")
    for i in range(12):
        write_iteration(rec, i, tagged_samples(i))
    rec.close()

    killed = directory / "killed"
    killed.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(killed)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "FLUSHED"
    (partial,) = killed.glob("*.partial")
    live = verify_file(partial, data=True)  # its writer holds it open (SWMR) meanwhile
    assert live.ok and not live.problems, live.problems
    assert (live.status, live.iterations, live.values) == ("recording", 39, 40)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    shutil.copy(partial, directory / "killed" / "copy-before-recover.h5.partial")
    subprocess.run([sys.executable, "-m", "recorder.cli", "recover", str(partial)],
                   check=True, capture_output=True, timeout=120)
    return sorted(p for p in directory.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return every_kind(tmp_path_factory.mktemp("verify"))


def by_name(files: list[Path], part: str) -> Path:
    (path,) = [p for p in files if part in str(p)]
    return path


def test_every_kind_of_file_passes(files: list[Path]) -> None:
    assert len(files) == 10
    out = verify_cli("--data", "--json", *map(str, files))
    assert out.returncode == 0, out.stdout + out.stderr
    reports = {Path(r["path"]).relative_to(files[0].parents[1]).as_posix(): r
               for r in json.loads(out.stdout)["files"]}
    for name, r in reports.items():
        assert r["ok"] and not r["errors"], (name, r)
        if name.endswith(".partial"):  # copies of files nobody writes any more
            assert r["layout"] == "live" and r["status"] == "unfinished"
            assert [w["message"][:26] for w in r["warnings"]] == ["no writer holds this file:"]
        else:
            assert r["layout"] == "final" and r["warnings"] == [], (name, r)
    final = {n: r for n, r in reports.items() if not n.endswith(".partial")}
    assert sorted(r["status"] for r in final.values()) == ["aborted"] + ["complete"] * 7
    types = next(r for n, r in final.items() if n.startswith("types/"))
    assert (types["iterations"], types["pvs"], types["values"]) == (5, 17, 85)
    tb = next(r for n, r in final.items() if n.startswith("tb/"))
    assert (tb["iterations"], tb["values"]) == (3, 11)


def test_the_table_and_exit_status(files: list[Path], tmp_path: Path) -> None:
    directory = by_name(files, "wave/").parent
    out = verify_cli(str(directory))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("ok    ") and "(final, complete, 400 iterations, 1 PVs, " \
        "400 values)" in lines[0]
    assert lines[-1] == "1 file(s) checked: 1 ok, 0 with warnings, 0 failed"
    assert verify_cli(str(tmp_path / "nowhere")).returncode == 2
    (tmp_path / "notes.h5").write_text("not HDF5\n")
    out = verify_cli("-q", str(directory), str(tmp_path / "notes.h5"))
    assert out.returncode == 1
    assert out.stdout.splitlines() == [
        f"FAIL  {tmp_path / 'notes.h5'}",
        "      error: /: cannot read: Unable to synchronously open file (file signature "
        "not found)",
        "2 file(s) checked: 1 ok, 0 with warnings, 1 failed",
    ]


def _set(path: str, index: Any, value: Any) -> Callable[[h5py.File], None]:
    def change(f: h5py.File) -> None:
        f[path][index] = value
    return change


def _attr(name: str, value: Any = None) -> Callable[[h5py.File], None]:
    def change(f: h5py.File) -> None:
        if value is None:
            del f.attrs[name]
        else:
            f.attrs[name] = value
    return change


def _delete(path: str) -> Callable[[h5py.File], None]:
    def change(f: h5py.File) -> None:
        del f[path]
    return change


def _replace(path: str, data: Any) -> Callable[[h5py.File], None]:
    def change(f: h5py.File) -> None:
        del f[path]
        f[path] = data
    return change


def _pv_info(pv: str, name: str, value: Any) -> Callable[[h5py.File], None]:
    """One field of one PV's /pv_info row changed (the compound dataset rewritten)."""
    def change(f: h5py.File) -> None:
        info = f["pv_info"][()]
        names = [x.decode() for x in info["pv_name"]]
        info[name][names.index(pv)] = value
        del f["pv_info"]
        f["pv_info"] = info
    return change


def _unlink_iteration(f: h5py.File) -> None:
    """A PV's iteration column of its own (not the shared one), one row off."""
    g = f["pvs/I"]
    column = g["iteration"][()]
    del g["iteration"]
    column[1] = 999
    g["iteration"] = column


def _narrower_column(f: h5py.File) -> None:
    """The NTTable column ``name`` one table row narrower than ``x``."""
    value = f["pvs/T/value"]
    column = value["name"][()]
    attrs = dict(value["name"].attrs)
    del value["name"]
    value.create_dataset("name", data=column[:, :1], dtype=h5py.string_dtype())
    value["name"].attrs.update(attrs)


FINAL_BREAKS: list[tuple[str, Callable[[h5py.File], None], str]] = [
    ("newer format", _attr("format_version", "9.0"),
     "/: format 9.0 is newer than this k2eg-recorder knows (5.x)"),
    ("foreign file", _attr("format", "other"), "/: not a k2eg-recorder file"),
    ("attribute gone", _attr("run_name"), "/: root attribute 'run_name' is missing"),
    ("bad JSON attribute", _attr("pv_uri_map", "{oops"), "/: root attribute 'pv_uri_map' is "
     "not JSON"),
    # text of the global heap (no checksum) zeroed: it reads back empty or cut short
    ("empty identity", _attr("recording_uid", ""), "/: root attribute 'recording_uid' is "
     "empty"),
    ("cut time", _attr("start_time", "2026-11-2"), "/: root attribute 'start_time' is not "
     "an ISO 8601 time: '2026-11-2'"),
    ("status of a live file", _attr("status", "recording"),
     "/: status 'recording' in a finalized file"),
    ("times reversed", _attr("end_time_ns", 1), "/: end_time_ns 1 is before start_time_ns"),
    # numbers the catalog (`ls`) and the reader (`export`) take as integers: `ls` called
    # such a file unreadable and `export` ended in a traceback, while verify said ok
    ("segment not a number", _attr("segment", "abc"),
     "/: root attribute 'segment' is not an integer: 'abc'"),
    ("start time not a number", _attr("start_time_ns", "x"),
     "/: root attribute 'start_time_ns' is not an integer: 'x'"),
    ("recording_seq not an integer", _attr("recording_seq", 1.5),
     "/: root attribute 'recording_seq' is not an integer: 1.5"),
    ("value count", _attr("n_values", 86), "/: n_values is 86, the PVs hold 85 rows"),
    ("iteration count", _attr("n_iterations", 4), "/: n_iterations is 4, /iterations has 5"),
    ("duplicate iteration", _set("iterations/iter_index", 1, 100),
     "/iterations/iter_index: iter_index 100 more than once"),
    ("complete with a reason", _set("iterations/reason", 0, 2),
     "/iterations/reason: rows 0: a complete iteration with an incompleteness reason"),
    ("unknown reason", _set("iterations/reason", 2, 77),
     "/iterations/reason: rows 2: unknown reason code"),
    ("tags not an object", _set("iterations/tags", 1, "[1, 2]"),
     "/iterations/tags: rows 1: not a JSON object"),
    ("n_written", _set("iterations/n_written", 3, 16),
     "/iterations/n_written: rows 3 (iter_index 103: 16, the PVs hold 17)"),
    ("group gone", _delete("pvs/F64"), "/pvs/F64: the group of PV 'F64' is missing"),
    ("column gone", _delete("pvs/B/time"), "/pvs/B: dataset 'time' is missing"),
    ("value gone", _delete("pvs/B/value"), "/pvs/B: no 'value' for 5 rows of kind 'bool'"),
    ("index out of range", _set("index/S/count", 4, 2),
     "/index/S/count: iteration rows 4: first/count point outside the PV's 5 rows"),
    ("index gone", _delete("index/S"), "/index/S: missing (the PV's first/count index)"),
    ("index in the NXlog", lambda f: f["pvs/S"].create_dataset("first", data=[0]),
     "/pvs/S/first: format 5 keeps 'first' out of the PV group"),
    ("frame time under its 4.x name", lambda f: f["pvs/S"].create_dataset("data_time", data=[0]),
     "/pvs/S/data_time: format 5 names it 'data_timestamp'"),
    ("index to the wrong rows", _unlink_iteration,
     "/pvs/I/iteration: rows 1 (indexed as iteration 101, holds 999)"),
    ("alarm text code", _set("pvs/F64/alarm_message", 0, 40),
     "/pvs/F64/alarm_message: rows 0: code outside -1..1"),
    ("NeXus axes", lambda f: f["pvs/W"].attrs.__setitem__("axes", ["x", "time"]),
     "/pvs/W: axes ['x', 'time'] must be 'time' and one entry per further dimension"),
    ("NeXus indices of nothing", lambda f: f["pvs/W"].attrs.__setitem__("gone_indices", 0),
     "/pvs/W: gone_indices names no dataset of the group"),
    ("metadata JSON", _set("metadata/X/json", 0, "{"),
     "/metadata/X/json: entries 0 do not parse"),
    ("metadata order", _set("metadata/X/row", 0, 3),
     "/metadata/X/row: entries must start at row 0 and increase"),
    ("flags column gone", _delete("pvs/Z/flags"),
     "/pvs/Z: no flags dataset, but /pv_info says the rows' flags differ"),
    ("time units gone", lambda f: f["pvs/U/time"].attrs.__delitem__("units"),
     "/pvs/U/time: attribute units='ns' is missing"),
    ("description gone", _delete("pv_info"), "/pv_info: missing"),
    ("description of another PV", _pv_info("S", "pv_name", b"Q"),
     "/pv_info: rows 5: pv_name differs from /pvs@pv_names"),
    ("row count", _pv_info("B", "count", 4), "/pvs/B/time: (5,) rows, the PV has 4"),
    ("flags said constant", _pv_info("Z", "flags", 9),
     "/pvs/Z/flags: present, but /pv_info says every row has flags 9"),
    ("storage dtype", _pv_info("I", "storage_dtype", b"float32"),
     "/pvs/I/value: dtype int64, /pv_info says float32"),
    ("unknown kind", _pv_info("I", "kind", b"scalr"),
     "/pv_info: rows 1: kind 'scalr' is not one of none, scalar, bool, "),
    ("metadata entries", _pv_info("X", "metadata_entries", 7),
     "/metadata/X: 2 entries, /pv_info says 7"),
    # an NTTable column named in value@columns without its dataset: the reader fails on it
    ("table column gone", _delete("pvs/T/value/x"),
     "/pvs/T/value: column 'x' (in its 'columns') has no dataset"),
    # a column narrower than the others: the reader cuts every column of the table to it
    ("table column narrower", _narrower_column,
     "/pvs/T/value: columns of different widths (rows per table): {'x': 2, 'name': 1}"),
    # a shape row past the stored value, or negative: the reader gives padding, or cuts
    ("shape past the value", _set("pvs/W/shape", 1, 13),
     "/pvs/W/shape: rows 1: a shape outside 0..(12,), the trailing shape of value"),
    ("negative shape", _set("pvs/WI/shape", 2, -1),
     "/pvs/WI/shape: rows 2: a shape outside 0..(5,), the trailing shape of value"),
    # JSON that parses but is not what the spec (and the reader) needs: the reader fails
    ("metadata entry not an object", _set("metadata/X/json", 1, "[1]"),
     "/metadata/X/json: entries 1 do not parse as a JSON object"),
    ("row 0 metadata not an object", _pv_info("B", "metadata", b"[1]"),
     "/pv_info: the metadata JSON of /pvs/B does not parse as a JSON object"),
    # zeroed text of the global heap reads back empty
    ("row 0 metadata empty", _pv_info("B", "metadata", b""),
     "/pv_info: the metadata JSON of /pvs/B is empty, the PV has 5 rows"),
    ("unmatched tags not by iteration", _attr("unmatched_tags", '{"x": {"shot": "1"}}'),
     "/: root attribute 'unmatched_tags' is not a JSON object of iter_index: tags"),
    ("unmatched tags not objects", _attr("unmatched_tags", '{"7": "shot"}'),
     "/: root attribute 'unmatched_tags' is not a JSON object of iter_index: tags"),
    ("shape of another rank", _replace("pvs/IMG/shape", np.ones((5, 1), np.int64)),
     "/pvs/IMG/shape: (5, 1): a rank of 1, value has rows of rank 2"),
]


@pytest.mark.parametrize(("change", "expected"), [b[1:] for b in FINAL_BREAKS],
                         ids=[b[0] for b in FINAL_BREAKS])
def test_a_broken_final_file_names_the_rule(files: list[Path], tmp_path: Path,
                                            change: Callable[[h5py.File], None],
                                            expected: str) -> None:
    broken = tmp_path / "broken.h5"
    shutil.copy(by_name(files, "types/rt_"), broken)
    broken.chmod(0o644)
    with h5py.File(broken, "r+") as f:
        change(f)
    broken.chmod(0o444)
    report = verify_file(broken)
    assert not report.ok
    assert any(str(p).startswith(expected) for p in report.errors), report.problems


def test_per_sample_fields_need_their_columns(files: list[Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.h5"
    shutil.copy(by_name(files, "tags/tags_"), broken)
    assert verify_file(broken).ok
    broken.chmod(0o644)
    with h5py.File(broken, "r+") as f:
        del f["pvs/P/user_tag"]  # flag 32 in /pv_info
        del f["pvs/M/user_tag"]  # flag 32 in some rows of its flags column
        del f["pvs/IMG/unique_id"]  # flag 64: an image's uniqueId and dataTimeStamp
    broken.chmod(0o444)
    errors = [str(p) for p in verify_file(broken).errors]
    for pv in ("P", "M"):
        assert f"/pvs/{pv}: rows have flag 32 (user tag in user_tag), but there is no " \
               "'user_tag'" in errors, errors
    assert "/pvs/IMG: rows have flag 64 (NTNDArray uniqueId and dataTimeStamp in unique_id, " \
           "data_time), but there is no 'unique_id'" in errors, errors


def test_warnings_alone_pass(files: list[Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy.h5"
    shutil.copy(by_name(files, "types/rt_"), copy)
    copy.chmod(0o644)
    with h5py.File(copy, "r+") as f:
        f["iterations/reason"][2] = 0  # incomplete, no reason given
        f.attrs["status"] = "aborted"
        f.attrs["status_reason"] = ""
        f.create_group("pvs/stray")
    report = verify_file(copy)
    assert report.ok
    assert [str(p) for p in report.warnings] == [
        "/: status 'aborted' without a status_reason",
        "/: finalized file is writable (mode -rw-r--r--; the recorder leaves it 0444)",
        "/iterations/reason: rows 2: an incomplete iteration without a reason",
        "/pvs/stray: a group that is not in /pvs@pv_names",
    ]


def test_a_format_1_file_gets_its_iterations_checked(files: list[Path], tmp_path: Path
                                                      ) -> None:
    copy = tmp_path / "old.h5"
    shutil.copy(by_name(files, "types/rt_"), copy)
    copy.chmod(0o644)
    with h5py.File(copy, "r+") as f:
        f.attrs["format_version"] = "1.0"
        f["iterations/iter_index"][4] = 100
        f.create_group("pvs/stray")
    report = verify_file(copy)
    assert [str(p) for p in report.errors] == [
        "/iterations/iter_index: iter_index 100 more than once (a file holds each iteration "
        "once)"]
    assert "/pvs: format 1.0: the PV groups of 1.x files are not checked (root attributes " \
        "and /iterations are)" in [str(p) for p in report.warnings]


def test_a_damaged_block_shows_with_data(files: list[Path], tmp_path: Path) -> None:
    """Bytes of a compressed chunk overwritten on disk: the structure is intact, so only
    ``--data`` (which decompresses every chunk) can tell."""
    damaged = tmp_path / "damaged.h5"
    shutil.copy(by_name(files, "wave/"), damaged)
    with h5py.File(damaged, "r") as f:
        ds = f["pvs/W/value"]
        assert ds.compression == "gzip"
        info = ds.id.get_chunk_info(0)
    damaged.chmod(0o644)
    with damaged.open("r+b") as fh:
        fh.seek(info.byte_offset + 100)
        fh.write(b"\xff" * 200)
    assert verify_file(damaged).ok
    report = verify_file(damaged, data=True)
    assert [p.where for p in report.errors] == ["/pvs/W/value"]
    assert "cannot read its data" in report.errors[0].message
    out = verify_cli("--data", str(damaged))
    assert out.returncode == 1 and "FAIL  " in out.stdout and "/pvs/W/value" in out.stdout


@pytest.mark.parametrize("compression", ["lzf", "zstd", "blosc2", "none"])
def test_a_damaged_chunk_shows_with_data_whatever_the_compression(
    tmp_path: Path, compression: str
) -> None:
    """lzf, zstd and blosc2 chunks keep no checksum of their own (gzip's deflate stream
    does): their datasets carry HDF5's fletcher32 after the compressor, so bytes changed in
    a stored chunk fail to read (verify --data, the reader) instead of reading back as
    other values, which they did before. ``none`` stays unfiltered: its damage is not seen
    (the README says so)."""
    rng = np.random.default_rng(3)
    rec = HDF5Recording(OutputOptions(directory=tmp_path / "out",
                                      compression=Compression(compression)), run_name="c")
    for i in range(400):
        write_iteration(rec, i, [PVSample("W", {"value": np.round(rng.normal(size=256),
                                                                  3).tolist()})])
    (path,) = rec.close()
    assert verify_file(path, data=True).ok
    with h5py.File(path, "r") as f:
        ds = f["pvs/W/value"]
        assert ds.fletcher32 is (compression != "none")
        before = ds[()]
        info = ds.id.get_chunk_info(1)
    path.chmod(0o644)
    with path.open("r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(b"\x5a" * 8)
    assert verify_file(path).ok  # the structure is intact
    report = verify_file(path, data=True)
    if compression == "none":
        assert report.ok
        with h5py.File(path, "r") as f:
            assert not np.array_equal(f["pvs/W/value"][()], before)  # read back as others
        return
    assert [p.where for p in report.errors] == ["/pvs/W/value"], report.problems
    assert "cannot read its data" in report.errors[0].message
    code = ("import sys\nfrom recorder.reader import open_file\n"
            "with open_file(sys.argv[1]) as f:\n    f.values('W')\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], check=False,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and f"DamagedFileError: {path}: damaged: " in out.stderr, \
        out.stderr[-2000:]


def test_plugin_filter_must_be_named(files: list[Path], tmp_path: Path) -> None:
    first = sorted(p for p in files if "/seg/" in str(p))[0]
    copy = tmp_path / "zstd.h5"
    shutil.copy(first, copy)
    copy.chmod(0o644)
    with h5py.File(copy, "r+") as f:
        ds = f["pvs/W/value"]
        assert ds.chunks is not None and "zstd" in ds.attrs["required_filter"]
        del ds.attrs["required_filter"]
    report = verify_file(copy)
    assert [str(p) for p in report.errors] == [
        "/pvs/W/value: compressed with a plugin filter without a 'required_filter' attribute "
        "naming it"]


LIVE_BREAKS: list[tuple[str, str, int, int, str]] = [
    ("unknown PV", "live/samples/pv", 0, 99, "/live/samples/pv: rows 0: no such PV"),
    ("unknown iteration row", "live/samples/iter_row", 1, -5,
     "/live/samples/iter_row: rows 1: no such iteration row"),
    ("closed iteration past the rows", "live/samples/iter_row", 1, 50,
     "/live/samples/iter_row: iterations 100: samples point past /iterations, but the "
     "iteration has its row"),
    ("other iteration", "live/samples/iteration", 2, 7,
     "/live/samples/iteration: rows 2: not the iter_index of their /iterations row"),
    ("n_written", "iterations/n_written", 0, 3,
     "/iterations/n_written: rows 0: not the number of samples placed in them"),
    ("element range", "live/samples/size", -1, 10**9,
     "/live/pool_{pool}: rows {row}: ranges outside the"),
    ("metadata range", "live/meta/offset", 0, 10**9, "/live/meta: rows 0: ranges outside"),
]


@pytest.mark.parametrize(("path", "row", "value", "expected"), [b[1:] for b in LIVE_BREAKS],
                         ids=[b[0] for b in LIVE_BREAKS])
def test_a_broken_live_file_names_the_rule(files: list[Path], tmp_path: Path, *, path: str,
                                           row: int, value: int, expected: str) -> None:
    broken = tmp_path / "broken.h5.partial"
    shutil.copy(by_name(files, "copy-of-live"), broken)
    clear_consistency_flags(broken)  # a copy of a live file: open it for writing
    with h5py.File(broken, "r+") as f:
        if path == "live/samples/size":  # a row of a waveform: its elements in the pool
            dtype = f["live/samples/dtype"][()]
            row = int(np.flatnonzero((f["live/samples/size"][()] > 0)
                                     & (dtype != STRING_DTYPE_CODE))[0])
            expected = expected.format(row=row, pool=POOL_NAMES[int(dtype[row])])
        f[path][row] = value
    report = verify_file(broken)
    assert any(str(p).startswith(expected) for p in report.errors), report.problems


def test_reports_are_plain_data(files: list[Path]) -> None:
    report = verify_file(by_name(files, "tb/"))
    assert isinstance(report, Report) and report.ok
    document = report.to_json()
    assert json.loads(json.dumps(document)) == document
    assert os.fspath(report.path).endswith(".h5")
    assert stat.S_IMODE(report.path.stat().st_mode) == 0o444


def test_recover_says_when_its_file_does_not_pass(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """``recover`` checks the .partial and what it wrote before that replaces it; a finding
    (here injected: the recovery itself is sound, see test_hdf5_crash) in either makes it
    exit 1, name the first error and leave the .partial byte for byte, with no other file."""
    from recorder import verify
    from recorder.cli import main as cli_main

    rec = HDF5Recording(OutputOptions(directory=tmp_path / "w"), run_name="r")
    write_iteration(rec, 1, [PVSample("A", {"value": 1.0})])
    rec.flush()
    partial = rec.current_path
    assert partial is not None
    left = tmp_path / "left.h5.partial"
    shutil.copy(partial, left)
    shutil.copy(partial, tmp_path / "other.h5.partial")
    rec.close()
    capsys.readouterr()  # the recording's log lines
    before = left.read_bytes()

    def failing(path: Path, *, data: bool = False, finalized: bool) -> Report:
        if finalized == str(path).endswith(".partial"):
            return Report(Path(path))
        return Report(Path(path), problems=[verify.Problem("error", "/pvs/A", "made up")])

    for finalized, says in ((False, "it does not pass k2eg-recorder verify (1 error(s)); "
                                    "the first: /pvs/A: made up; left as it was"),
                            (True, "the finalized file would not pass k2eg-recorder verify "
                                   "(1 problem(s)); the first: /pvs/A: made up")):
        monkeypatch.setattr(verify, "verify_file",
                            lambda p, *, data=False, f=finalized: failing(p, data=data,
                                                                         finalized=f))
        assert cli_main(["recover", str(left)]) == 1
        out = capsys.readouterr().out
        assert out.startswith(f"{left}: NOT recovered: {says}"), out
        assert left.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
            "left.h5.partial", "other.h5.partial"]
    other = tmp_path / "other.h5.partial"
    assert cli_main(["recover", "--no-verify", str(other)]) == 0  # not checked: passes
    assert capsys.readouterr().out == f"{other} -> {tmp_path / 'other.h5'}\n"


def test_selection_by_run_and_time_as_ls_does(tmp_path: Path) -> None:
    """``--run`` / ``--since`` / ``--until`` pick the recordings ``ls`` would list; a file
    that cannot be read is always checked (it cannot be placed, and needs a look)."""
    from test_catalog_ls import T_ALPHA, T_BETA
    from test_catalog_ls import record as record_at

    data = tmp_path / "data"
    alpha = record_at(data, "alpha", T_ALPHA, 4, segment_every=2)  # 2026-01-01 10:00
    beta = record_at(data, "beta", T_BETA, 3)  # 2026-01-02 10:00
    (data / "cut.h5").write_bytes(alpha[0].read_bytes()[:4096])

    def checked(*args: str) -> list[str]:
        out = verify_cli("--json", *args, str(data))
        doc = json.loads(out.stdout)
        assert out.returncode == (0 if all(f["ok"] for f in doc["files"]) else 1)
        return sorted(Path(f["path"]).name for f in doc["files"])

    everything = sorted(p.name for p in [*alpha, *beta, data / "cut.h5"])
    assert checked() == everything
    assert checked("--run", "alpha") == sorted([*(p.name for p in alpha), "cut.h5"])
    assert checked("--since", "2026-01-02") == sorted([beta[0].name, "cut.h5"])
    assert checked("--until", "2026-01-01T10:00:02") == sorted([alpha[0].name, "cut.h5"])
    out = verify_cli("--since", "last week", str(data))
    assert out.returncode == 2 and "ISO 8601" in out.stderr
    out = verify_cli("--since", "2026-01-03", "--until", "2026-01-01", str(data))
    assert out.returncode == 2 and "--since is after --until" in out.stderr


def test_a_selection_names_a_finalized_file_hdf5_loops_on(tmp_path: Path) -> None:
    """The nightly ``verify -q --data --since 26h``: selecting the recordings reads every
    file's attributes, on which HDF5 loops for ever when a finalized file's global heap was
    zero-filled (storage damage). The file that does not answer in time is checked like any
    unreadable one (verify's heap scan names the damage), and the others are verified; the
    selection hung for good before."""
    from test_catalog_ls import T_ALPHA, T_BETA, zero_first_heap_collection
    from test_catalog_ls import record as record_at

    data = tmp_path / "data"
    (good,) = record_at(data, "alpha", T_ALPHA, 3)
    (bad,) = record_at(data, "beta", T_BETA, 2)
    zero_first_heap_collection(bad)
    out = subprocess.run([sys.executable, "-m", "recorder.cli", "verify", "-q", "--since",
                          "2026-01-01", "--file-timeout", "3", str(data)], check=False,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out
    assert f"FAIL  {bad}" in out.stdout and "damaged global-heap collection" in out.stdout
    assert "2 file(s) checked: 1 ok, 0 with warnings, 1 failed" in out.stdout, out.stdout
    assert str(good) not in out.stdout  # -q: ok files are not listed


def test_a_segment_finalized_while_verify_runs_is_not_a_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The nightly verify reads the directories the daemon writes to: a .partial listed at
    the start is finalized (renamed) by the time its turn comes (a rotation or a stop during
    a long `--data` run). It was reported FAIL ("No such file or directory") and failed the
    unit; its finalized file is checked instead."""
    import recorder.verify
    from recorder.cli import main as cli_main

    first = HDF5Recording(OutputOptions(directory=tmp_path), run_name="alpha")
    write_iteration(first, 0, [PVSample("A", {"value": 1.0})])
    (checked_first,) = first.close()
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="racing")
    for i in range(3):
        write_iteration(rec, i, [PVSample("A", {"value": 1.0 * i})])
    rec.flush()
    partial = rec.current_path
    assert partial is not None and partial.name.endswith(".partial")
    real = recorder.verify.verify_file
    finalized: list[Path] = []

    def racing(path: Path, **kwargs: Any) -> Report:
        if path == checked_first:  # while it is checked, the daemon finalizes the other
            finalized.extend(rec.close())
        return real(path, **kwargs)

    monkeypatch.setattr(recorder.verify, "verify_file", racing)
    assert cli_main(["verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (final,) = finalized
    assert f"ok    {final}  (final, complete, 3 iterations" in out, out
    assert "2 file(s) checked: 2 ok, 0 with warnings, 0 failed" in out


def test_a_recording_across_a_clock_stepped_back_passes(tmp_path: Path) -> None:
    """NTP stepping the wall clock back an hour while a recording is written: its file ended
    'before it started' (end_time_ns < start_time_ns), which verify (and the nightly timer)
    reported as broken; the end is now never before the start."""
    wall = [1_795_510_560.25]
    rec = HDF5Recording(OutputOptions(directory=tmp_path, isolate=False), run_name="jump",
                        wall_clock=lambda: wall[0])
    write_iteration(rec, 1, [PVSample("A", {"value": 1.0})])
    wall[0] -= 3600
    (path,) = rec.close()
    report = verify_file(path)
    assert report.ok, [str(p) for p in report.errors]
    with h5py.File(path, "r") as f:
        assert f.attrs["end_time_ns"] == f.attrs["start_time_ns"]
        assert f.attrs["end_time"] == f.attrs["start_time"]
