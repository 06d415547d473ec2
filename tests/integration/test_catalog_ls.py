"""``k2eg-recorder ls`` and ``recorder.catalog`` over real files, read from other processes;
the writer lock keeps ``recover`` off a file a live writer is writing."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from recorder.catalog import find_recordings, scan
from recorder.client.events import (
    IterationClosed,
    IterationOpened,
    IterationStatus,
    ValuesReceived,
)
from recorder.client.values import PVSample
from recorder.errors import DamagedFileError, FileFormatError
from recorder.reader import open_file
from recorder.sinks.h5open import open_for_reading
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions, SegmentOptions

T_ALPHA = dt.datetime(2026, 1, 1, 10, 0, tzinfo=dt.UTC).timestamp()
T_BETA = dt.datetime(2026, 1, 2, 10, 0, tzinfo=dt.UTC).timestamp()

# a writer in its own process that keeps its file open until told (stdin closed) or killed
WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from recorder.client.events import (IterationOpened, ValuesReceived, IterationClosed,
        IterationStatus)
    from recorder.client.values import PVSample
    from recorder.sinks.hdf5 import HDF5Recording
    from recorder.sinks.options import OutputOptions
    import structlog, logging
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    rec = HDF5Recording(OutputOptions(directory=Path(sys.argv[1])), run_name="gamma",
                        pv_uris=["pva://G:X"])
    for i in range(1, 6):
        ns = time.time_ns()  # the gateway's timestamps: now, as the file's start
        rec.handle(IterationOpened("t", "gamma", i, ns))
        rec.handle(ValuesReceived("t", i, 1, ns,
                                  (PVSample("G:X", {"value": float(i)}),), offset=i))
        rec.handle(IterationClosed("t", "gamma", i, IterationStatus.COMPLETE, None,
                                   ns, ns, offset=i))
    rec.flush()
    print("READY", rec.current_path, flush=True)
    sys.stdin.read()
    rec.close()
    print("CLOSED", flush=True)
    """
)


def record(directory: Path, run: str, t0: float, n: int, *, segment_every: int | None = None,
           incomplete: set[int] = frozenset(), close: tuple[str, str] = ("complete", "")
           ) -> list[Path]:
    """A recording of ``n`` iterations of PV ``<run>:X`` whose clock starts at ``t0``
    (one iteration a second); ``incomplete`` iterations lose their tail."""
    now = [t0]
    opts = OutputOptions(directory=directory,
                         segment=SegmentOptions(max_iterations=segment_every))
    rec = HDF5Recording(opts, run_name=run, pv_uris=[f"pva://{run}:X"],
                        wall_clock=lambda: now[0], start_wall=t0)
    for i in range(1, n + 1):
        now[0] = t0 + i
        ns = int(now[0] * 1e9)
        rec.handle(IterationOpened("t", run, i, ns, offset=3 * i))
        rec.handle(ValuesReceived("t", i, 1, ns, (PVSample(f"{run}:X", {"value": float(i)}),),
                                  offset=3 * i + 1))
        status = IterationStatus.INCOMPLETE if i in incomplete else IterationStatus.COMPLETE
        rec.handle(IterationClosed("t", run, i, status, None, ns, ns, offset=3 * i + 2))
    now[0] = t0 + n + 1
    return rec.close(*close)


def ls(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``k2eg-recorder ls`` in a child process (another reader than the writers)."""
    return subprocess.run([sys.executable, "-m", "recorder.cli", "ls", *args],
                          check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def ls_json(*args: str) -> dict[str, Any]:
    out = ls(*args, "--json")
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def recover(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "recorder.cli", "recover", *args],
                          check=False, capture_output=True, text=True, timeout=120)


@contextlib.contextmanager
def gamma_writer(data: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """A live writer (run gamma) with a flushed .partial in ``data``, killed by PID at the
    end."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(data)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY"), line
        yield proc, Path(line.split()[1])
    finally:
        proc.kill()
        proc.wait(10)


@pytest.fixture
def gamma(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    with gamma_writer(tmp_path / "data") as writer:
        yield writer


def test_ls_lists_recordings_and_tells_live_files_from_leftovers(
    tmp_path: Path, gamma: tuple[subprocess.Popen[str], Path]
) -> None:
    data = tmp_path / "data"
    alpha = record(data, "alpha", T_ALPHA, 5, segment_every=3, incomplete={2})
    beta = record(data, "beta", T_BETA, 2, close=("aborted", "operator stop"))
    assert len(alpha) == 2 and len(beta) == 1
    proc, partial = gamma

    doc = ls_json(str(data))
    by_run = {r["run"]: r for r in doc["recordings"]}
    assert [r["run"] for r in doc["recordings"]] == ["alpha", "beta", "gamma"]  # oldest first
    a = by_run["alpha"]
    assert a["status"] == "complete"
    assert [f["path"] for f in a["files"]] == [str(p) for p in alpha]
    assert [f["segment"] for f in a["files"]] == [0, 1]
    assert [f["iterations"] for f in a["files"]] == [3, 2]
    assert (a["iterations"], a["incomplete"], a["values"]) == (5, 1, 5)
    assert a["start"] == "2026-01-01T10:00:00.000Z"
    assert a["end"] == "2026-01-01T10:00:06.000Z"  # closed one second after the last
    assert a["bytes"] == sum(p.stat().st_size for p in alpha)
    b = by_run["beta"]
    assert (b["status"], b["reason"], b["iterations"]) == ("aborted", "operator stop", 2)
    g = by_run["gamma"]
    assert g["status"] == "recording"
    assert g["files"][0]["partial"] is True and g["files"][0]["path"] == str(partial)
    assert (g["iterations"], g["values"]) == (5, 5)
    assert doc["unreadable"] == [] and doc["foreign"] == []

    text = ls(str(data))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split()[:4] == ["run", "start", "(UTC)", "end"]
    assert lines[1].split()[:8] == ["alpha", "2026-01-01", "10:00:00.000", "2026-01-01",
                                    "10:00:06.000", "complete", "2", "5"]
    assert "(1)" in lines[1]  # one incomplete iteration
    assert lines[2].split()[5:7] == ["aborted", "1"]
    assert lines[3].strip() == "aborted: operator stop"
    assert lines[4].split()[0] == "gamma" and "recording" in lines[4]
    assert lines[5].startswith("3 recording(s), 4 file(s), ")

    # recover leaves the live writer's file alone (safe while the daemon records) ...
    out = recover(str(data))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{partial}: left alone: a running writer is writing it" in out.stdout
    assert partial.exists()
    # ... and the writer goes on and finalizes it itself
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    assert proc.stdout.readline().strip() == "CLOSED"
    proc.wait(30)
    g = {r["run"]: r for r in ls_json(str(data))["recordings"]}["gamma"]
    assert (g["status"], g["files"][0]["partial"]) == ("complete", False)


def test_a_killed_writer_leaves_an_unfinished_file_that_recover_finalizes(
    tmp_path: Path, gamma: tuple[subprocess.Popen[str], Path]
) -> None:
    data = tmp_path / "data"
    proc, partial = gamma
    assert recover(str(partial)).returncode == 0 and partial.exists()  # busy: left alone
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    g = ls_json(str(data))["recordings"][0]
    assert (g["run"], g["status"], g["iterations"]) == ("gamma", "unfinished", 5)
    text = ls(str(data)).stdout
    assert "unfinished" in text.splitlines()[1]
    assert "1 file(s) unfinished" in text and "k2eg-recorder recover" in text

    out = recover(str(data))
    assert out.returncode == 0, out.stdout
    assert f"{partial} -> {str(partial).removesuffix('.partial')} (verified)" \
        in out.stdout.splitlines(), out.stdout
    g = ls_json(str(data))["recordings"][0]
    assert (g["status"], g["iterations"], g["files"][0]["partial"]) == ("aborted", 5, False)
    assert "recovered by k2eg-recorder recover" in g["reason"]


def test_recover_scans_a_leftovers_global_heap_once(
    tmp_path: Path, gamma: tuple[subprocess.Popen[str], Path], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The heap scan reads the whole file (~0.6 s per GB): recover's check of the leftover
    (verify) scans it, and neither recover_file nor the finalizer's open scan it again (they
    did: three scans of the leftover); the finalized result is scanned by its own check."""
    from recorder.cli import recover as recover_cli
    from recorder.sinks import h5open

    proc, partial = gamma
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    scanned: list[str] = []
    real = h5open.looping_collections

    def counting(path: str | os.PathLike[str]) -> Any:
        scanned.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(h5open, "looping_collections", counting)
    final = Path(str(partial).removesuffix(".partial"))
    args = argparse.Namespace(paths=[partial], no_verify=False)
    assert recover_cli.run(args) == 0, capsys.readouterr().out
    assert f"{partial} -> {final} (verified)" in capsys.readouterr().out
    assert scanned.count(partial.name) == 1, scanned
    assert len(scanned) == 2 and scanned[1].startswith(final.name), scanned  # the result

    # --no-verify: recover_file's own scan, once
    with gamma_writer(tmp_path / "again") as (proc2, partial2):
        proc2.send_signal(signal.SIGKILL)
        proc2.wait(10)
        scanned.clear()
        assert recover_cli.run(argparse.Namespace(paths=[partial2], no_verify=True)) == 0
        assert scanned == [partial2.name], scanned


def test_a_file_recover_cannot_recover_is_left_byte_for_byte(
    tmp_path: Path, gamma: tuple[subprocess.Popen[str], Path]
) -> None:
    """A leftover truncated (a disk that lost its tail), with damaged metadata, or a symbolic
    link to one: `recover` says NOT recovered, goes on with the other files, and leaves each
    damaged one exactly as it was (it cleared the superblock's flags first, and did not put
    them back)."""
    proc, partial = gamma
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    whole = partial.read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    truncated = bad / "t.h5.partial"
    truncated.write_bytes(whole[: len(whole) // 2])
    damaged = bad / "d.h5.partial"
    damaged.write_bytes(whole[:200] + bytes(4000) + whole[4200:])  # metadata zeroed
    good = bad / partial.name
    good.write_bytes(whole)
    # a link to a leftover elsewhere: finalized next to the link, the real file would stay,
    # its flags cleared, to be recovered again (a second copy of the recording)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = elsewhere / "l.h5.partial"
    target.write_bytes(whole)
    link = bad / "l.h5.partial"
    link.symlink_to(target)
    before = {p: p.read_bytes() for p in (truncated, damaged, target)}
    out = recover(str(bad))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith(f"{truncated}: NOT recovered: ") for line in lines), lines
    assert any(line.startswith(f"{damaged}: NOT recovered: ") for line in lines), lines
    assert any(line.startswith(f"{good} -> ") for line in lines), lines  # the others go on
    assert f"{link}: NOT recovered: {link} is a symbolic link (to {target})" in out.stdout
    assert link.is_symlink() and sorted(p.name for p in elsewhere.iterdir()) == [target.name]
    for p, content in before.items():
        assert p.read_bytes() == content, p


def test_swmr_opens_set_the_metadata_read_attempts(
    gamma: tuple[subprocess.Popen[str], Path]
) -> None:
    """open_live reaches H5Pset_metadata_read_attempts in the libhdf5 h5py loaded (a wheel
    that renamed it would silently bring back HDF5's 100 attempts) and the open file has
    the bound."""
    import ctypes

    from recorder.sinks import h5open

    _, partial = gamma
    lib = h5open.libhdf5()
    assert lib is not None, "h5py's libhdf5 not found in /proc/self/maps"
    with h5open.open_live(partial) as f:
        assert f.swmr_mode
        get = lib.H5Pget_metadata_read_attempts
        get.argtypes = [ctypes.c_int64, ctypes.POINTER(ctypes.c_uint)]
        attempts = ctypes.c_uint()
        assert get(f.id.get_access_plist().id, ctypes.byref(attempts)) >= 0
        assert attempts.value == h5open.METADATA_READ_ATTEMPTS == 30


def test_swmr_opens_work_with_the_oldest_h5py_pyproject_allows(
    gamma: tuple[subprocess.Popen[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyproject allows h5py>=3.10, whose make_fapl (3.10 to 3.12) has no defaults: open_live
    called it with the File keywords only, so with those h5py versions every SWMR open
    raised TypeError, and every recording failed at its finalization (the demo made no file).
    Here make_fapl has the 3.10 signature."""
    from h5py._hl import files

    from recorder.sinks import h5open

    real = files.make_fapl

    def make_fapl_3_10(  # noqa: PLR0917 (h5py 3.10's signature)
        driver: Any, libver: Any, rdcc_nslots: Any, rdcc_nbytes: Any, rdcc_w0: Any,
        locking: Any, page_buf_size: Any, min_meta_keep: Any, min_raw_keep: Any,
        alignment_threshold: Any, alignment_interval: Any, meta_block_size: Any, **kwds: Any
    ) -> Any:
        return real(driver, libver, rdcc_nslots, rdcc_nbytes, rdcc_w0, locking,
                    page_buf_size, min_meta_keep, min_raw_keep, alignment_threshold,
                    alignment_interval, meta_block_size, **kwds)

    monkeypatch.setattr(files, "make_fapl", make_fapl_3_10)
    _, partial = gamma
    with h5open.open_live(partial) as f:
        assert f.swmr_mode and "live" in f
    with h5open.open_live(partial, rdcc_nbytes=1 << 20) as f:
        assert f.swmr_mode


@pytest.mark.parametrize("where", ["column-header", "root-attribute"])
def test_damaged_metadata_in_a_live_file_is_reported_not_waited_on(
    tmp_path: Path, gamma: tuple[subprocess.Popen[str], Path], where: str
) -> None:
    """A live file opens only in SWMR mode, where HDF5 re-reads metadata whose checksum
    fails 100 times, doubling a sleep from 1 ns: one damaged block (a live column's object
    header; the heap block holding the name of a root attribute, which only finalization
    reads in `recover`) made inspect, ls, verify, recover and the reader wait for good (the
    timeouts here fail). Each now says the file is damaged within seconds, and recover
    leaves it byte for byte (decision 0013)."""
    proc, partial = gamma
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    whole = bytearray(partial.read_bytes())
    if where == "column-header":
        with open_for_reading(partial, live_first=True) as f:
            column = f["live/state"]
            at = h5py.h5o.get_info(column[next(iter(column))].id).addr + 8
    else:
        assert whole.count(b"pv_uri_map") == 1
        at = whole.find(b"pv_uri_map")
    whole[at : at + 10] = b"XXXXXXXXXX"  # the checksum of the block no longer holds
    bad = tmp_path / "bad"
    bad.mkdir()
    damaged = bad / partial.name
    damaged.write_bytes(whole)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "recorder.cli", *args], check=False,
                              capture_output=True, text=True, timeout=60)

    for args in (["inspect"], ["ls"], ["verify"], ["recover"]):
        out = cli(*args, str(damaged))
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr, (args, out.stderr)
        assert "checksum" in out.stdout + out.stderr, (args, out.stdout, out.stderr)
    assert damaged.read_bytes() == whole  # recover put the superblock's flags back
    code = ("import sys\nfrom recorder.reader import open_file\n"
            "from recorder.errors import FileFormatError\n"
            "try:\n    open_file(sys.argv[1])\nexcept FileFormatError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(damaged)], check=False,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith(f"{damaged}: damaged: "), out.stdout + out.stderr


def test_a_finalized_file_damaged_inside_is_named_not_a_traceback(tmp_path: Path) -> None:
    """Damage found after opening (a PV's dataset whose object header no longer checks):
    the reader raises FileFormatError "PATH: damaged: ..." (h5py alone: a KeyError naming
    no file, or None from .items()), inspect and export say so and exit 1; the reader's own
    errors stay what they were."""
    (path,) = record(tmp_path / "data", "alpha", T_ALPHA, 3)
    with h5py.File(path, "r") as f:
        header = h5py.h5o.get_info(f["pvs/alpha:X/value"].id).addr
    whole = bytearray(path.read_bytes())
    whole[header + 8 : header + 40] = bytes(range(100, 132))
    path.chmod(0o644)
    path.write_bytes(whole)
    with open_file(path) as rf:
        with pytest.raises(FileFormatError, match=f"^{path}: damaged: .*checksum"):
            rf.values("alpha:X")
        with pytest.raises(FileFormatError, match="damaged"):
            list(rf.trains())
        with pytest.raises(KeyError, match="no PV 'alpha:Y'"):
            rf.values("alpha:Y")
        assert rf.iterations()["iter_index"].tolist() == [1, 2, 3]  # the rest still reads
    for args in (["inspect", str(path)], ["export", str(path), "-o", str(tmp_path / "x.csv")]):
        out = subprocess.run([sys.executable, "-m", "recorder.cli", *args], check=False,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr, out.stderr
        assert f"{path}: damaged: " in out.stderr, out.stderr


def crashed_copy(directory: Path, name: str) -> Path:
    """A .partial as a crashed writer leaves it (flags set, no lock): two PVs, 3 iterations,
    copied after a flush while its writer held it."""
    rec = HDF5Recording(OutputOptions(directory=directory / "w"), run_name="crash",
                        pv_uris=["pva://C:A", "pva://C:B"])
    for i in range(1, 4):
        rec.handle(IterationOpened("t", "crash", i, i, offset=3 * i))
        rec.handle(ValuesReceived("t", i, 1, i, (PVSample("C:A", {"value": float(i)}),
                                                 PVSample("C:B", {"value": -float(i)})),
                                  offset=3 * i + 1))
        rec.handle(IterationClosed("t", "crash", i, IterationStatus.COMPLETE, None, i, i,
                                   offset=3 * i + 2))
    rec.flush()
    assert rec.current_path is not None
    copy = directory / name
    copy.write_bytes(rec.current_path.read_bytes())
    rec.close()
    return copy


def set_rows(path: Path, dataset: str, values: dict[int, int]) -> None:
    """Overwrite rows of an uncompressed live column in place (damage where it lies)."""
    with open_for_reading(path, live_first=True) as f:
        ds = f[dataset]
        assert ds.compression is None
        at, dtype = ds.id.get_chunk_info(0).byte_offset, ds.dtype
    data = bytearray(path.read_bytes())
    for row, value in values.items():
        start = at + row * dtype.itemsize
        data[start : start + dtype.itemsize] = np.array(value, dtype).tobytes()
    path.write_bytes(data)


def test_recover_leaves_a_partial_verify_rejects_and_names_the_damage(tmp_path: Path) -> None:
    """Values pointing at no PV: `recover` checked only the file it made, after it had
    replaced the .partial, or stopped in an IndexError traceback. It now verifies the
    .partial first and leaves it byte for byte, saying where it is damaged; --no-verify
    (finalize what can be read) reports the damage in one line too. Two PVs under one name
    are an error of verify (finalizing stopped on "name already exists")."""
    bad_pv = crashed_copy(tmp_path, "bad-pv.h5.partial")
    set_rows(bad_pv, "live/samples/pv", {0: 9999, 3: -5})
    twice = crashed_copy(tmp_path, "twice.h5.partial")
    with open_for_reading(twice, live_first=True) as f:
        first = int(f["live/pvs/offset"][0])
        size = int(f["live/pvs/size"][0])
    set_rows(twice, "live/pvs/offset", {1: first})
    set_rows(twice, "live/pvs/size", {1: size})
    before = {p: p.read_bytes() for p in (bad_pv, twice)}
    out = recover(str(bad_pv), str(twice))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert f"{bad_pv}: NOT recovered: it does not pass k2eg-recorder verify (1 error(s)); " \
           "the first: /live/samples/pv: rows 0, 3: no such PV;" in out.stdout, lines
    assert f"{twice}: NOT recovered: " in out.stdout and "/live/pvs: rows 1: the name of " \
           "an earlier PV (e.g. 'C:A')" in out.stdout, lines
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [bad_pv.name,
                                                                          twice.name]
    # the reader too (it left those rows out without a word)
    with open_file(bad_pv) as f, pytest.raises(
            DamagedFileError, match=r"/live/samples/pv: rows 0, 3: no such PV"):
        f.values("C:B")
    forced = recover("--no-verify", str(bad_pv))
    assert forced.returncode == 1 and "Traceback" not in forced.stderr, forced.stderr
    assert forced.stdout.startswith(f"{bad_pv}: NOT recovered: damaged: "), forced.stdout
    assert bad_pv.read_bytes() == before[bad_pv]


def test_a_finalized_result_that_fails_its_check_leaves_the_partial(tmp_path: Path) -> None:
    """The file recover writes replaces the .partial only once it passes the check (verify
    in the CLI): else the .partial stays byte for byte and nothing else remains."""
    from recorder.sinks.recover import recover_file

    partial = crashed_copy(tmp_path, "c.h5.partial")
    before = partial.read_bytes()
    seen: list[Path] = []

    def check(path: Path) -> list[str]:
        seen.append(path)
        with h5py.File(path, "r") as f:  # the finalized file, complete, not yet in place
            assert f.attrs["status"] == "aborted"
        return ["/pvs/C:A/value: made up for the test"]

    with pytest.raises(DamagedFileError, match=r"would not pass k2eg-recorder verify .*made up"):
        recover_file(partial, check=check)
    assert len(seen) == 1 and not seen[0].exists()
    assert partial.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [partial.name]
    assert recover_file(partial, check=lambda _p: []).exists() and not partial.exists()


def test_text_damaged_in_the_global_heap_is_found_by_verify_data_and_named_by_readers(
    tmp_path: Path
) -> None:
    """Variable-length strings live in HDF5's global heap, which has no checksum: a changed
    byte read back as text that is not UTF-8. `verify --data` said ok; the reader and export
    failed with a UnicodeDecodeError traceback. verify --data names the rows; the reader
    raises DamagedFileError; export says so in one line."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path / "d"), run_name="txt",
                        pv_uris=["pva://T:S"])
    for i in range(1, 4):
        rec.handle(IterationOpened("t", "txt", i, i, offset=3 * i))
        rec.handle(ValuesReceived("t", i, 1, i, (PVSample("T:S", {"value": "é" * 60 + str(i)}),),
                                  offset=3 * i + 1))
        rec.handle(IterationClosed("t", "txt", i, IterationStatus.COMPLETE, None, i, i,
                                   offset=3 * i + 2))
    (path,) = rec.close()
    whole = bytearray(path.read_bytes())
    at = whole.find(("é" * 60 + "2").encode())
    assert at > 0
    whole[at] = 0xFF  # not a UTF-8 lead byte
    path.chmod(0o644)
    path.write_bytes(whole)
    out = subprocess.run([sys.executable, "-m", "recorder.cli", "verify", "--data", str(path)],
                         check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stdout
    assert "error: /pvs/T:S/value: cannot read its data: ValueError: rows 1: text that is " \
           "not UTF-8" in out.stdout, out.stdout
    with open_file(path) as f, pytest.raises(DamagedFileError, match="UnicodeDecodeError"):
        f.values("T:S")
    out = subprocess.run([sys.executable, "-m", "recorder.cli", "export", str(path), "-o",
                          str(tmp_path / "x.csv")], check=False, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"{path}: damaged: UnicodeDecodeError" in out.stderr, out.stderr


def open_in_child(path: Path, mode: str, **kwargs: Any) -> str:
    """What h5py in another process says when it opens ``path``: "ok" or its error."""
    code = (f"import h5py\ntry:\n    h5py.File({str(path)!r}, {mode!r}, **{kwargs!r}).close()\n"
            "    print('ok')\nexcept OSError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                         text=True, timeout=60)
    return out.stdout.strip()


def test_a_live_file_cannot_be_opened_for_writing_nor_h5cleared(
    tmp_path: Path, gamma: tuple[subprocess.Popen[str], Path]
) -> None:
    """A plain open of a live file fails with HDF5's "may use <h5clear file>"; h5clear would
    then have rewritten the superblock under the writer. The writer's shared flock stops it
    (and h5py's "r+"/"a") while SWMR readers go on reading."""
    proc, partial = gamma
    assert open_in_child(partial, "r", swmr=True) == "ok"
    assert "h5clear" in open_in_child(partial, "r")  # HDF5's advice, which must not work
    for mode in ("r+", "a"):
        assert "unable to lock file" in open_in_child(partial, mode), mode
    if shutil.which("h5clear"):
        out = subprocess.run(["h5clear", "-s", str(partial)], check=False,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0, out.stdout + out.stderr
        assert "h5clear" in open_in_child(partial, "r")  # flags untouched
    # the writer is unaffected and finalizes its file, which opens every way
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    assert proc.stdout.readline().strip() == "CLOSED"
    proc.wait(30)
    final = partial.with_name(partial.name.removesuffix(".partial"))
    assert open_in_child(final, "r") == "ok"


def test_a_killed_writer_takes_its_locks_along(
    tmp_path: Path, gamma: tuple[subprocess.Popen[str], Path]
) -> None:
    proc, partial = gamma
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    # nothing holds the file: HDF5 now refuses "r+" only for its flags, not for a lock
    said = open_in_child(partial, "r+")
    assert "unable to lock file" not in said and "h5clear" in said, said
    assert open_in_child(partial, "r", swmr=True) == "ok"


def test_filters_windows_and_the_reader(tmp_path: Path) -> None:
    data = tmp_path / "data"
    record(data, "alpha", T_ALPHA, 5, segment_every=3)
    record(data, "beta", T_BETA, 2)

    def runs(*args: str) -> list[tuple[str, int]]:
        return [(r["run"], len(r["files"])) for r in ls_json(str(data), *args)["recordings"]]

    assert runs("--run", "beta") == [("beta", 1)]
    assert runs("--run", "beta", "--run", "alpha") == [("alpha", 2), ("beta", 1)]
    assert runs("--run", "nope") == []
    assert runs("--since", "2026-01-02") == [("beta", 1)]
    assert runs("--until", "2026-01-01T12:00") == [("alpha", 2)]
    # alpha's segments: 10:00:00-10:00:04 (iterations 1-3), 10:00:04-10:00:06 (4-5)
    assert runs("--since", "2026-01-01T10:00:05") == [("alpha", 1), ("beta", 1)]
    assert runs("--since", "2026-01-01T11:00:01+01:00", "--until", "2026-01-01T10:00:03Z") \
        == [("alpha", 1)]
    assert runs("--since", "1h") == []
    bad = ls(str(data), "--since", "last tuesday")
    assert bad.returncode == 2 and "cannot read the time 'last tuesday'" in bad.stderr
    bad = ls(str(data), "--since", "2026-01-02", "--until", "2026-01-01")
    assert bad.returncode == 2 and "--since is after --until" in bad.stderr

    # the same from Python, and on to the data
    (alpha,) = find_recordings(data, run="alpha")
    with alpha.open() as rec:
        assert rec.values("alpha:X").tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [r.run for r in find_recordings([data], since="2026-01-02")] == ["beta"]


def test_a_file_spans_the_iterations_it_holds_not_only_its_wall_clock(tmp_path: Path,
                                                                      ) -> None:
    """A segment opened after the headers of its first iterations (read back from Kafka
    after a restart, or the recording's first iteration already under way) is listed from
    its first header on: --until between that header and the segment's opening finds it."""
    data = tmp_path / "data"
    t0 = dt.datetime(2026, 1, 3, 12, 0, tzinfo=dt.UTC).timestamp()
    now = [t0]
    rec = HDF5Recording(OutputOptions(directory=data), run_name="late", pv_uris=["pva://L:X"],
                        wall_clock=lambda: now[0], start_wall=t0)
    for i in range(1, 4):  # headers at 11:59:57, 11:59:58, 11:59:59: before the file opened
        ns = int((t0 - 4 + i) * 1e9)
        rec.handle(IterationOpened("t", "late", i, ns, offset=3 * i))
        rec.handle(ValuesReceived("t", i, 1, ns, (PVSample("L:X", {"value": float(i)}),),
                                  offset=3 * i + 1))
        rec.handle(IterationClosed("t", "late", i, IterationStatus.COMPLETE, None, ns, ns,
                                   offset=3 * i + 2))
        now[0] = t0 + i
    rec.close()
    (entry,) = ls_json(str(data))["recordings"]
    assert entry["start"].startswith("2026-01-03T11:59:57"), entry
    until = ls_json(str(data), "--until", "2026-01-03T11:59:58.5Z")["recordings"]
    assert [r["run"] for r in until] == ["late"]
    assert ls_json(str(data), "--until", "2026-01-03T11:59:56Z")["recordings"] == []


def test_open_recording_chains_one_recordings_segments_only(tmp_path: Path) -> None:
    """open_recording of a directory or a list: the segments of one recording, in order;
    files of two recordings (whose iter_index both start at 1) or one file twice are an
    error that says so, never one chained table."""
    from recorder.errors import FileFormatError
    from recorder.reader import open_recording

    alpha = record(tmp_path / "a", "alpha", T_ALPHA, 5, segment_every=3)
    with open_recording(tmp_path / "a") as rec:  # a directory of one recording
        assert rec.values("alpha:X").tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
        assert rec.iterations()["segment"].tolist() == [0, 0, 0, 1, 1]
    with open_recording(list(reversed(alpha))) as rec:  # any order: segment order
        assert rec.iterations()["iter_index"].tolist() == [1, 2, 3, 4, 5]
    with open_recording(alpha[1]) as rec:  # one file: its recording's files beside it
        assert len(rec.files) == 2
    beta = record(tmp_path / "a", "beta", T_BETA, 2)
    with pytest.raises(FileFormatError, match="belong to 2 recordings, not one") as err:
        open_recording([alpha[0], beta[0]])
    assert "'alpha'" in str(err.value) and "'beta'" in str(err.value)
    with pytest.raises(FileFormatError, match="holds the files of 2 recordings"):
        open_recording(tmp_path / "a")
    with pytest.raises(FileFormatError, match="given twice"):
        open_recording([alpha[0], alpha[1], alpha[0]])
    with open_recording(beta[0]) as rec:  # a file: only its own recording
        assert rec.values("beta:X").tolist() == [1.0, 2.0]


def test_default_paths_come_from_the_run_definitions(tmp_path: Path) -> None:
    data = tmp_path / "data"
    record(data, "alpha", T_ALPHA, 2)
    runs = tmp_path / "runs.yaml"
    runs.write_text(textwrap.dedent(f"""
        runs:
          - name: alpha
            snapshot: {{snapshot_name: alpha, pv_uri_list: ["pva://alpha:X"]}}
            output: {{directory: {data}}}
          - name: never-recorded
            snapshot: {{snapshot_name: other, pv_uri_list: ["pva://other:X"]}}
            output: {{directory: {tmp_path / "nothing-yet"}}}
        """))
    out = ls(env={"RECORDER_CONFIG_PATH": str(runs)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1].split()[0] == "alpha"
    missing = ls(env={"RECORDER_CONFIG_PATH": str(tmp_path / "none.yaml")})
    assert missing.returncode == 2
    assert "give a PATH (no run definitions at" in missing.stderr


def test_other_files_are_skipped_or_reported(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (alpha,) = record(data, "alpha", T_ALPHA, 2)
    with h5py.File(data / "someone-else.h5", "w") as f:
        f["x"] = [1, 2, 3]
    (data / "notes.h5").write_text("not HDF5 at all")
    (data / "readme.txt").write_text("ignored: not a recording's name")
    doc = ls_json(str(data))
    assert [r["run"] for r in doc["recordings"]] == ["alpha"]
    assert sorted(Path(p).name for p in doc["foreign"]) == ["notes.h5", "someone-else.h5"]
    assert "2 file(s) skipped: not k2eg-recorder files" in ls(str(data)).stdout

    (data / "cut.h5").write_bytes(alpha.read_bytes()[:4096])  # a copy that was cut short
    out = ls(str(data))
    assert out.returncode == 1
    assert out.stdout.splitlines()[1].split()[0] == "alpha"  # the rest is still listed
    assert f"{data / 'cut.h5'}: cannot read:" in out.stderr
    assert [p.name for p, _ in scan(data).unreadable] == ["cut.h5"]

    # a live file cut short (a copy of a .partial that still has its "open for write" flags):
    # it opens only in SWMR mode, where HDF5 would retry its reads for ever; reported at once
    rec = HDF5Recording(OutputOptions(directory=tmp_path / "live"), run_name="live",
                        pv_uris=["pva://L:X"])
    rec.handle(IterationOpened("t", "live", 1, 1))
    rec.handle(ValuesReceived("t", 1, 1, 1, (PVSample("L:X", {"value": 1.0}),), offset=1))
    rec.flush()
    assert rec.current_path is not None
    whole = rec.current_path.read_bytes()
    rec.close()
    (data / "cut-live.h5.partial").write_bytes(whole[:4096])
    out = ls(str(data / "cut-live.h5.partial"))
    assert out.returncode == 1
    assert "cut-live.h5.partial: cannot read:" in out.stderr
    assert f"truncated file: 4096 bytes, its superblock needs {len(whole)}" in out.stderr
    inspect = subprocess.run([sys.executable, "-m", "recorder.cli", "inspect",
                              str(data / "cut-live.h5.partial")],
                             check=False, capture_output=True, text=True, timeout=120)
    assert inspect.returncode == 1 and "truncated file" in inspect.stderr

    gone = ls(str(tmp_path / "missing"))
    assert gone.returncode == 2 and "no such file or directory" in gone.stderr


def test_a_parent_directory_is_not_searched_and_ls_and_verify_say_where_files_are(
    tmp_path: Path
) -> None:
    """``ls /data`` / ``verify /data`` of ``/data/<run>/*.h5``: directories are not searched
    recursively, so nothing is listed or checked (exit 0: an empty directory is fine); they
    say on stderr which subdirectories hold files, so "0 file(s) checked" is not taken
    for a clean bill of health."""
    data = tmp_path / "data"
    record(data / "alpha", "alpha", T_ALPHA, 2)
    (data / "empty").mkdir()
    out = ls(str(data))
    assert out.returncode == 0 and out.stdout == "no recordings\n"
    assert f"{data}: no recorder files in it (directories are not searched" in out.stderr
    assert f"subdirectories with files: {data / 'alpha'} " in out.stderr
    checked = subprocess.run([sys.executable, "-m", "recorder.cli", "verify", str(data)],
                             check=False, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0 and "0 file(s) checked" in checked.stdout
    assert f"k2eg-recorder verify: {data}: no recorder files" in checked.stderr
    # a directory with files of its own, or one without any below it: no note
    assert ls(str(data / "alpha")).stderr == ""
    assert ls(str(data / "empty")).stderr == ""


def zero_first_heap_collection(path: Path) -> bytes:
    """Zero-fill the objects of ``path``'s first global-heap collection ("GCOL", version,
    3 reserved bytes, its size), as a power loss can leave them; returns the new bytes."""
    whole = bytearray(path.read_bytes())
    at = whole.find(b"GCOL\x01\x00\x00\x00")
    size = int.from_bytes(whole[at + 8 : at + 16], "little")
    assert at > 0 and 32 < size <= 65536, (at, size)
    whole[at + 16 : at + size] = bytes(size - 16)
    path.chmod(0o644)
    path.write_bytes(whole)
    return bytes(whole)


def test_a_heap_hdf5_loops_on_is_refused_not_hung_on(
    tmp_path: Path, gamma: tuple[subprocess.Popen[str], Path]
) -> None:
    """A zero-filled global-heap collection makes HDF5 2.0 loop for ever holding the GIL
    (an object of size 0 never advances its parser). On such a leftover inspect, ls,
    verify, recover, export and the reader hung for good (the 60 s timeouts here fail on
    the code before recorder.sinks.globalheap); each now names the collection at once, and
    recover leaves the file byte for byte. verify scans finalized files too."""
    from recorder.errors import HeapLoopError
    from recorder.sinks.globalheap import looping_collections

    proc, partial = gamma
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert looping_collections(partial) == []
    whole = zero_first_heap_collection(partial)
    (loop,) = looping_collections(partial)
    assert whole[loop.collection : loop.collection + 4] == b"GCOL" and loop.size == 0

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "recorder.cli", *args], check=False,
                              capture_output=True, text=True, timeout=60)

    said = f"damaged global-heap collection at byte {loop.collection}"
    for args in (["inspect"], ["ls"], ["verify"], ["verify", "--data"], ["recover"],
                 ["export", "-o", str(tmp_path / "x.csv")]):
        out = cli(*args[:1], str(partial), *args[1:])
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr, (args, out.stderr)
        assert said in out.stdout + out.stderr, (args, out.stdout, out.stderr)
    assert partial.read_bytes() == whole  # recover touched nothing
    assert sorted(p.name for p in partial.parent.iterdir()) == [partial.name]
    code = ("import sys\nfrom recorder.reader import open_file\n"
            "try:\n    open_file(sys.argv[1])\nexcept OSError as e:\n"
            "    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(partial)], check=False,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("HeapLoopError Unable to open"), out.stdout + out.stderr
    assert said in out.stdout

    (final,) = record(tmp_path / "final", "alpha", T_ALPHA, 3)
    assert looping_collections(final) == []
    zero_first_heap_collection(final)
    for args in (["verify"], ["verify", "--data"]):
        out = cli(*args, str(final))
        assert out.returncode == 1 and "damaged global-heap collection" in out.stdout, out
    with pytest.raises(HeapLoopError):
        from recorder.sinks.h5open import check_heap

        check_heap(final)


def test_a_leftover_recovery_that_does_not_end_is_killed_and_leaves_the_file(
    tmp_path: Path, gamma: tuple[subprocess.Popen[str], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The daemon's safety net for loops the heap scan does not know: the recovery child
    (here a stand-in that clears the superblock's flags, starts the final file, and then
    never ends) is killed after its deadline, the superblock is put back and the half-written
    final file removed, so the leftover is byte for byte what it was."""
    from recorder.daemon.leftovers import recover_in_child
    from recorder.sinks.finalize import FINAL_SUFFIX
    from recorder.sinks.options import final_path

    proc, partial = gamma
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    before = partial.read_bytes()
    marker = tmp_path / "cleared"
    stand_in = tmp_path / "python"
    stand_in.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        exec {sys.executable} -c '
        import sys, time
        from pathlib import Path
        from recorder.sinks.superblock import clear_consistency_flags
        p = Path(sys.argv[-1])
        clear_consistency_flags(p)
        Path(sys.argv[-1][: -len(".partial")] + "{FINAL_SUFFIX}").write_bytes(b"half")
        Path("{marker}").touch()
        time.sleep(600)
        ' "$@"
        """))
    stand_in.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(stand_in))
    with pytest.raises(DamagedFileError, match=r"did not end within 3 s .* was killed"):
        recover_in_child(partial, timeout_s=3)
    assert marker.exists()  # the stand-in did change the file before it was killed
    assert partial.read_bytes() == before
    final = final_path(partial)
    assert not final.with_name(final.name + FINAL_SUFFIX).exists()
    assert sorted(p.name for p in partial.parent.iterdir()) == [partial.name]


STRING_LEFTOVER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from recorder.client.events import IterationClosed, IterationOpened, IterationStatus
    from recorder.client.events import ValuesReceived
    from recorder.client.values import PVSample
    from recorder.sinks.hdf5 import HDF5Recording
    from recorder.sinks.options import OutputOptions

    # a string value holding exactly the bytes of a zero-filled global-heap collection
    fake = "GCOL\\x01\\x00\\x00\\x00" + "\\x00\\x10" + "\\x00" * 54
    rec = HDF5Recording(OutputOptions(directory=Path(sys.argv[1])), run_name="fp",
                        pv_uris=["pva://S"])
    for i in range(1, 4):
        ns = time.time_ns()
        rec.handle(IterationOpened("t", "fp", i, ns))
        rec.handle(ValuesReceived("t", i, 1, ns, (PVSample("S", {"value": fake}),), offset=i))
        rec.handle(IterationClosed("t", "fp", i, IterationStatus.COMPLETE, None, ns, ns,
                                   offset=i))
    rec.flush()
    print(rec.current_path, flush=True)
    os._exit(0)  # a crash: the .partial stays, no writer holds it
    """
)


def test_a_string_value_that_looks_like_a_damaged_heap_is_data(tmp_path: Path) -> None:
    """The byte scan finds the signature of a zero-filled collection in a string PV's
    bytes (a live file keeps them in a pool dataset); those lie in a dataset's stored data,
    so they are data: the leftover is read, recovered and verified as any other (it was
    refused by every tool), and the finalized file, where the string sits inside a sound
    collection, passes verify --data."""
    from recorder.sinks.globalheap import looping_collections
    from recorder.sinks.h5open import check_heap

    out = subprocess.run([sys.executable, "-c", STRING_LEFTOVER, str(tmp_path)],
                         check=True, capture_output=True, text=True, timeout=60)
    partial = Path(out.stdout.split()[-1])  # the last line (log lines come first)
    assert len(looping_collections(partial)) == 3  # the three values, seen as collections
    check_heap(partial)  # ... but in the pool's chunks: no error
    for args in (["inspect"], ["verify", "--data"]):
        got = subprocess.run([sys.executable, "-m", "recorder.cli", *args, str(partial)],
                             check=False, capture_output=True, text=True, timeout=60)
        assert "global-heap" not in got.stdout + got.stderr, (args, got.stdout, got.stderr)
    assert recover(str(partial)).returncode == 0
    (final,) = tmp_path.glob("*.h5")
    got = subprocess.run([sys.executable, "-m", "recorder.cli", "verify", "--data", str(final)],
                         check=False, capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stdout + got.stderr
    with open_file(final) as rf:
        assert rf.values("S").tolist() == ["GCOL\x01\x00\x00\x00\x00\x10" + "\x00" * 54] * 3


def test_ls_lists_the_others_when_a_finalized_file_makes_hdf5_loop(tmp_path: Path) -> None:
    """A finalized file is not scanned before it opens (a full read of every file), so
    HDF5 loops for ever on one whose global heap was zero-filled afterwards (storage
    damage). ls reads each file in a worker process with a deadline: the damaged file is
    reported and the other recordings listed (ls hung for good before); inspect gives up
    after its --timeout."""
    data = tmp_path / "data"
    (good,) = record(data, "alpha", T_ALPHA, 3)
    (bad,) = record(data, "beta", T_BETA, 2)
    zero_first_heap_collection(bad)
    out = ls(str(data), "--file-timeout", "3", "--json")
    assert out.returncode == 1, out.stderr
    doc = json.loads(out.stdout)
    assert [f["path"] for r in doc["recordings"] for f in r["files"]] == [str(good)]
    (unreadable,) = doc["unreadable"]
    assert unreadable["path"] == str(bad)
    assert "no answer within 3 s" in unreadable["error"], unreadable
    assert f"{bad}: cannot read: Unable to read {bad} (no answer within 3 s" in out.stderr
    # inspect, which Ctrl-C cannot stop there either, gives up after its --timeout
    out = subprocess.run([sys.executable, "-m", "recorder.cli", "inspect", str(bad),
                          "--timeout", "3"], check=False, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and "no answer within 3 s" in out.stderr, out
    out = subprocess.run([sys.executable, "-m", "recorder.cli", "inspect", str(good)],
                         check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith(f"file      {good}\n"), out


@pytest.mark.parametrize("command", ["ls", "inspect"])
def test_ctrl_c_ends_a_command_whose_file_makes_hdf5_loop(tmp_path: Path, command: str) -> None:
    """Ctrl-C (SIGINT to the terminal's process group) while the worker is stuck in HDF5's
    loop on a damaged finalized file: the command ends at once, exit 130, and takes its
    worker along (it waited for the worker, which never ends, for good)."""
    (bad,) = record(tmp_path / "data", "beta", T_BETA, 2)
    zero_first_heap_collection(bad)
    target = bad.parent if command == "ls" else bad
    proc = subprocess.Popen([sys.executable, "-m", "recorder.cli", command, str(target)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        time.sleep(4)  # the worker is in HDF5's loop by now
        assert proc.poll() is None
        os.killpg(proc.pid, signal.SIGINT)
        _out, err = proc.communicate(timeout=15)
        assert proc.returncode == 130, err
        assert "Traceback" not in err, err
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)  # no worker left behind in the process group
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_segment_finalized_while_ls_runs_is_listed_not_unreadable(tmp_path: Path) -> None:
    """``ls`` beside the daemon: a .partial listed at the start was finalized (renamed) by
    the time its turn came. It was reported unreadable (exit 1, "No such file or
    directory"); its final file is described instead, and a file removed meanwhile is not
    an error."""
    from test_hdf5_roundtrip import write_iteration

    from recorder.catalog import describe_file

    first = HDF5Recording(OutputOptions(directory=tmp_path), run_name="alpha")
    write_iteration(first, 0, [PVSample("A", {"value": 1.0})])
    (alpha,) = first.close()
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="racing")
    write_iteration(rec, 0, [PVSample("A", {"value": 1.0})])
    rec.flush()
    gone = HDF5Recording(OutputOptions(directory=tmp_path / "other"), run_name="zeta")
    write_iteration(gone, 0, [PVSample("A", {"value": 1.0})])
    (zeta,) = gone.close()
    zeta = zeta.rename(tmp_path / zeta.name)
    finalized: list[Path] = []

    def describe(path: Path) -> Any:
        if path == alpha:  # meanwhile the daemon finalizes one, an archive job takes one
            finalized.extend(rec.close())
            zeta.unlink()
        return describe_file(path)

    catalog = scan(tmp_path, describe=describe)
    assert catalog.unreadable == []
    assert [f.path for r in catalog.recordings for f in r.files] == [alpha, *finalized]
    assert [r.status for r in catalog.recordings] == ["complete", "complete"]


@pytest.mark.parametrize("moment", ["layout", "swmr"])
def test_a_file_being_created_is_locked_from_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    """The writer lock is taken when the .partial is created (file-format.md: "from its
    creation"): `recover` run while a segment is being set up (its layout created, SWMR
    started) leaves it alone. The lock came only after that, so recover found no writer:
    before SWMR it said "NOT recovered" (exit 1) for a file being written (with
    --no-verify, after clearing the flags of the open file and writing the old superblock
    back over the writer's); after it, it finalized the empty file and deleted the .partial
    the writer went on writing (the recording failed at its end: its final name was
    taken, its data gone)."""
    from recorder.sinks import hdf5 as hdf5_module
    from recorder.sinks.livefile import LiveWriter

    said: list[str] = []

    def recover_now(path: Path) -> None:
        out = recover(str(path))
        said.append(f"{out.returncode} {out.stdout.strip()}")

    real_layout = hdf5_module.create_live_layout

    def layout(f: h5py.File, options: OutputOptions) -> list[str]:
        plugins = real_layout(f, options)
        recover_now(Path(f.filename))  # the layout is there, SWMR not yet started
        return plugins

    def writer(f: h5py.File, *, sync: bool = True) -> LiveWriter:
        recover_now(Path(f.filename))  # SWMR started
        return LiveWriter(f, sync=sync)

    if moment == "layout":
        monkeypatch.setattr(hdf5_module, "create_live_layout", layout)
    else:
        monkeypatch.setattr(hdf5_module, "LiveWriter", writer)
    paths = record(tmp_path / "data", "delta", T_ALPHA, 3)
    assert len(said) == 1 and said[0].startswith("0 ") and "left alone" in said[0], said
    assert len(paths) == 1
    with open_file(paths[0]) as f:
        assert f.status == "complete" and len(f.iterations()["iter_index"]) == 3


def test_a_live_file_finalized_while_recover_runs_is_not_a_failure(
    tmp_path: Path, gamma: tuple[subprocess.Popen[str], Path], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`recover DIR` is safe while the daemon records there: a .partial its writer
    finalizes after recover listed it (a rotation, a stop) is gone when its turn comes.
    recover reported it "NOT recovered" (it could not be read) and exited 1."""
    from recorder.cli import recover as recover_cli
    from recorder.sinks import recover as recover_module

    proc, live = gamma
    data = live.parent
    leftover = crashed_copy(data, "a.h5.partial")  # listed first
    real = recover_module.recover_file

    def recover_then_writer_finalizes(path: Path, **kwargs: Any) -> Path:
        out = real(path, **kwargs)
        if path == leftover:  # meanwhile the live writer finalizes its file
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.close()
            assert proc.stdout.readline().strip() == "CLOSED"
            proc.wait(30)
        return out

    monkeypatch.setattr(recover_module, "recover_file", recover_then_writer_finalizes)
    final = live.with_name(live.name.removesuffix(".partial"))
    code = recover_cli.run(argparse.Namespace(paths=[data], no_verify=False))
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"{leftover} -> " in out and "NOT recovered" not in out, out
    assert f"{live}: finalized meanwhile by its writer: {final}" in out.splitlines(), out
    with open_file(final) as f:
        assert f.status == "complete"


def test_two_recoveries_of_one_leftover_at_once(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A second `recover` of a leftover another one is finalizing (the daemon's at its
    restart and an operator's) leaves it alone, as a file a writer holds. It removed the
    first one's unfinished `.finalizing` as stale, wrote its own under the same name and
    renamed it: the first then synced, checked and renamed whatever had that name (here it
    failed, NOT recovered; at other moments it takes the other's file half-written)."""
    from recorder.sinks import finalize as finalize_module
    from recorder.sinks.recover import recover_file

    partial = crashed_copy(tmp_path, "c.h5.partial")
    said: list[subprocess.CompletedProcess[str]] = []
    real = finalize_module._write_final

    def write_final(*args: Any, **kwargs: Any) -> None:
        real(*args, **kwargs)
        said.append(recover("--no-verify", str(partial)))  # the other one, meanwhile

    monkeypatch.setattr(finalize_module, "_write_final", write_final)
    final = recover_file(partial)
    (other,) = said
    assert other.returncode == 0 and "left alone" in other.stdout, other.stdout
    assert not partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [final.name]
    with open_file(final) as f:
        assert f.status == "aborted" and len(f.iterations()["iter_index"]) == 3


def test_the_daemon_retries_a_leftover_only_while_a_writer_holds_it(
    tmp_path: Path, gamma: tuple[subprocess.Popen[str], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At a restart a leftover a dying writer still holds is tried again (5 times, a second
    apart); any other failure of its recovery is final. Every OSError was retried: a
    full disk (ENOSPC) or a final name another file holds finalized the leftover 5 times
    over (a child process each, up to its deadline) before the run could start."""
    from recorder.daemon import leftovers

    _proc, live = gamma
    calls: list[Path] = []
    real = leftovers.recover_in_child

    def counting(partial: Path, **kwargs: Any) -> Path:
        calls.append(partial)
        return real(partial, **kwargs)

    monkeypatch.setattr(leftovers, "recover_in_child", counting)
    monkeypatch.setattr(leftovers, "LEFTOVER_RETRY_S", 0.0)
    assert leftovers.finalize_leftover(live, "gamma") is None  # its writer holds it
    assert len(calls) == leftovers.LEFTOVER_ATTEMPTS

    calls.clear()
    partial = crashed_copy(tmp_path, "c.h5.partial")
    taken = tmp_path / "c.h5"
    taken.write_bytes(b"another file")
    assert leftovers.finalize_leftover(partial, "crash") is None
    assert len(calls) == 1
    assert partial.exists() and taken.read_bytes() == b"another file"


def test_recover_of_finalized_files_says_there_is_nothing_to_do(tmp_path: Path) -> None:
    """`recover data/*` (the shell's glob takes the finalized files too) reported each of
    them "NOT recovered: not a file being written" and exited 1; a finalized file of ours is
    now "already finalized", exit 0, while a foreign file stays an error."""
    (done,) = record(tmp_path / "data", "alpha", T_BETA, 2)
    out = recover(str(done))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "already finalized (status complete): nothing to do" in out.stdout
    assert "nothing to recover" in out.stdout
    foreign = tmp_path / "notes.h5"
    foreign.write_bytes(b"not hdf5")
    out = recover(str(done), str(foreign))
    assert out.returncode == 1 and "notes.h5: NOT recovered" in out.stdout, out.stdout


def test_a_partial_left_beside_its_finalized_file_is_not_listed_twice(tmp_path: Path) -> None:
    """A writer (or recover) killed after the finalized file took its name and before it
    removed the ``.partial``: that finalization was complete (``recover`` only removes the
    ``.partial``). ``ls`` listed the segment twice: the recording ``unfinished``, with twice
    its iterations, values and bytes."""
    data = tmp_path / "data"
    rec = HDF5Recording(OutputOptions(directory=data), run_name="twice", pv_uris=["pva://T:X"])
    for i in range(1, 4):
        ns = time.time_ns()
        rec.handle(IterationOpened("t", "twice", i, ns, offset=3 * i))
        rec.handle(ValuesReceived("t", i, 1, ns, (PVSample("T:X", {"value": float(i)}),),
                                  offset=3 * i + 1))
        rec.handle(IterationClosed("t", "twice", i, IterationStatus.COMPLETE, None, ns, ns,
                                   offset=3 * i + 2))
    rec.flush()
    partial = rec.current_path
    assert partial is not None
    shutil.copyfile(partial, tmp_path / "copy")
    (final,) = rec.close()
    shutil.copyfile(tmp_path / "copy", partial)  # as the killed finalization left it

    (entry,) = find_recordings(data)
    assert [f.path for f in entry.files] == [final]
    assert (entry.status, entry.iterations, entry.values) == ("complete", 3, 3)
    doc = ls_json(str(data))
    assert [f["path"] for r in doc["recordings"] for f in r["files"]] == [str(final)]


def test_a_partial_finalized_since_it_was_named_is_read_as_its_final_file(
    tmp_path: Path,
) -> None:
    """``status`` shows a run's current ``.partial``; a rotation or stop finalizes it before
    the operator's ``inspect``/``ls``/``verify``/``export`` of that path, which then said
    "no such file" (exit 1 or 2). Each reads the final file and says so on stderr."""
    (final,) = record(tmp_path, "R", 1_700_000_000.0, 3)
    partial = final.with_name(final.name + ".partial")
    assert not partial.exists()
    for command in (["inspect"], ["ls"], ["verify", "--data"], ["export", "-o",
                                                               str(tmp_path / "x.csv")]):
        out = subprocess.run([sys.executable, "-m", "recorder.cli", *command, str(partial)],
                             check=False, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (command, out.stdout, out.stderr)
        assert f"{partial}: finalized since; reading {final}" in out.stderr, (command, out.stderr)
    assert "3.0" in (tmp_path / "x.csv").read_text()
    gone = tmp_path / "missing.h5.partial"
    out = subprocess.run([sys.executable, "-m", "recorder.cli", "inspect", str(gone)],
                         check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "no such file" in out.stderr


@pytest.mark.parametrize("command", ["ls", "verify"])
def test_a_path_that_is_not_a_file_nor_a_directory_is_not_called_missing(
        tmp_path: Path, command: str) -> None:
    """A FIFO given by name: `ls` and `verify` said "no such file or directory" of a path
    that is there (exit 2); they now say what it is."""
    fifo = tmp_path / "x.h5"
    os.mkfifo(fifo)
    out = subprocess.run([sys.executable, "-m", "recorder.cli", command, str(fifo)],
                         check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode in (1, 2) and "Traceback" not in out.stderr, out.stderr
    assert "no such file" not in out.stderr, out.stderr
    assert f"{fifo}: " in out.stderr, out.stderr
    assert "not a regular file nor a directory" in out.stderr, out.stderr


def test_an_iteration_open_at_a_rotation_counts_once_for_the_recording(
        tmp_path: Path) -> None:
    """An iteration still open when its segment rotated has a row in each file (the first
    incomplete, `recording_stopped`): `ls` and the catalog counted it twice, once as an
    incomplete iteration, so a lossless recording of 3 iterations showed "4 (1)". The
    recording's counts are of its iterations (the later row's status), a file's of its own
    rows."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path,
                                      segment=SegmentOptions(max_iterations=1)),
                        run_name="split", pv_uris=["pva://A"])
    for i, v in ((1, 1.0), (2, 2.0)):
        rec.handle(IterationOpened("t", "s", i, 1000 * i))
        rec.handle(ValuesReceived("t", i, 1, 1, (PVSample("A", {"value": v}),)))
    rec.handle(IterationClosed("t", "s", 1, IterationStatus.COMPLETE, None, 1000, 1000))
    rec.handle(IterationOpened("t", "s", 3, 3000))  # rotates: iteration 2 is open
    rec.handle(ValuesReceived("t", 2, 2, 2, (PVSample("A", {"value": 2.5}),)))
    rec.handle(IterationClosed("t", "s", 2, IterationStatus.COMPLETE, None, 2000, 2000))
    rec.handle(ValuesReceived("t", 3, 1, 1, (PVSample("A", {"value": 3.0}),)))
    rec.handle(IterationClosed("t", "s", 3, IterationStatus.COMPLETE, None, 3000, 3000))
    first, _ = rec.close()

    (entry,) = find_recordings(tmp_path)
    assert (entry.iterations, entry.incomplete) == (3, 0)
    assert [(f.iterations, f.incomplete) for f in entry.files] == [(2, 1), (2, 0)]
    doc = ls_json(str(tmp_path))
    (r,) = doc["recordings"]
    assert (r["iterations"], r["incomplete"]) == (3, 0)
    assert [(f["iterations"], f["incomplete"]) for f in r["files"]] == [(2, 1), (2, 0)]
    text = ls(str(tmp_path)).stdout.splitlines()
    assert "3 (0)" in text[1], text
    # each file alone: its rows (the second file of a pair alone is a whole iteration)
    (only_first,) = find_recordings(first)
    assert (only_first.iterations, only_first.incomplete) == (2, 1)


def test_a_file_named_that_is_not_a_recording_is_said_so(tmp_path: Path) -> None:
    """``ls FILE`` of a file that is not a recording (not HDF5, another program's HDF5, an
    empty file) printed "no recordings" and "1 file(s) skipped", naming no file, and exited
    0; a file given by name is now said on stderr, with its name, and the exit status is 1
    (in a directory, such files are still only counted)."""
    (alpha,) = record(tmp_path / "data", "alpha", T_ALPHA, 2)
    other = tmp_path / "someone-else.h5"
    with h5py.File(other, "w") as f:
        f["x"] = [1, 2, 3]
    notes = tmp_path / "notes.h5"
    notes.write_text("not HDF5 at all")
    empty = tmp_path / "empty.h5"
    empty.touch()
    for path in (other, notes, empty):
        out = ls(str(path))
        assert out.returncode == 1, (path, out.stdout, out.stderr)
        assert out.stderr.splitlines() == [f"{path}: not a k2eg-recorder file"], out.stderr
    out = ls(str(alpha), str(notes))  # the rest is listed
    assert out.returncode == 1 and out.stdout.splitlines()[1].split()[0] == "alpha"
    assert ls(str(tmp_path)).returncode == 0  # in a directory given: skipped, counted


@pytest.mark.parametrize("command", ["inspect", "export", "ls", "verify", "recover"])
def test_a_path_that_cannot_be_looked_up_is_said_in_one_line(
        tmp_path: Path, command: str) -> None:
    """A PATH whose lookup fails with another error than "no such file" (a name too long
    for the file system; for a user, a file in a directory they may not search, as the
    data directories of other groups are): `export`, `ls`, `verify` and `recover` ended in a
    traceback (OSError from Path.exists); each now says in one line which path and why,
    exit non-zero."""
    path = tmp_path / ("x" * 300 + ".h5")
    out = subprocess.run([sys.executable, "-m", "recorder.cli", command, str(path)],
                         check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    said = [line for line in (out.stdout + out.stderr).splitlines()
            if str(path) in line]
    assert len(said) == 1 and "File name too long" in said[0], (out.stdout, out.stderr)
