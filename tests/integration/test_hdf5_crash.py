"""kill -9 consistency, live reading from another process, unwritable directory."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import pytest

from recorder.cli import main as cli_main
from recorder.reader import open_file
from recorder.verify import verify_file

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
    rec = HDF5Recording(OutputOptions(directory=Path(sys.argv[1]), flush_interval_s=0.02),
                        run_name="crash", pv_uris=[f"pva://P{k}" for k in range(20)])
    print("PATH", rec.current_path, flush=True)
    delay = float(sys.argv[2])
    for i in range(100000):
        rec.handle(IterationOpened("t", "s", i, i))
        samples = tuple(PVSample(f"P{k}", {"value": float(i * 100 + k),
                                          "timeStamp": {"secondsPastEpoch": i, "nanoseconds": k}})
                        for k in range(20))
        samples += (PVSample("W", {"value": list(range(i % 50))}),)
        rec.handle(ValuesReceived("t", i, 1, 0, samples, offset=i))
        rec.handle(IterationClosed("t", "s", i, IterationStatus.COMPLETE, None, i, i, offset=i))
        if rec.maybe_flush():
            print("FLUSHED", rec.counters["iterations"], flush=True)
        time.sleep(delay)
    """
)


def _check_values(f: object, n_iter: int) -> None:
    from recorder.reader import RecordingFile

    assert isinstance(f, RecordingFile)
    its = f.iterations()["iter_index"]
    assert its.tolist() == list(range(len(its)))
    assert len(its) >= n_iter
    for k in (0, 7, 19):
        vals = f.values(f"P{k}")
        _first, count = f.first_count(f"P{k}")
        assert vals[: len(its)].tolist() == [float(i * 100 + k) for i in range(len(its))]
        assert count.tolist() == [1] * len(its)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_at_random_moment_then_recover(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), "0.0005"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        path = Path(proc.stdout.readline().split()[1])
        flushed = 0
        deadline = time.monotonic() + rng.uniform(0.3, 1.5)
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("FLUSHED"):
                flushed = int(line.split()[1])
        time.sleep(rng.uniform(0, 0.02))  # land anywhere, also inside a flush
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert path.name.endswith(".h5.partial") and path.exists()
    with open_file(path) as f:  # opens despite the crash (SWMR read)
        assert f.layout == "live" and f.status == "recording"
        _check_values(f, flushed)
    # consistent at its last complete commit wherever the kill landed, data included
    report = verify_file(path, data=True)
    assert report.ok and report.status == "unfinished", report.problems
    assert cli_main(["recover", str(tmp_path)]) == 0
    assert not path.exists()
    (final,) = tmp_path.glob("*.h5")
    with h5py.File(final, "r") as h:  # plain open works after recovery
        assert h.attrs["status"] == "aborted"
        assert "recovered" in h.attrs["status_reason"]
    assert not final.stat().st_mode & 0o222
    with open_file(final) as f:
        _check_values(f, flushed)
    report = verify_file(final, data=True)
    assert report.ok and not report.warnings, report.problems
    assert report.status == "aborted"


def test_live_reader_sees_iterations_appear(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path), "0.01"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        path = Path(proc.stdout.readline().split()[1])
        seen: list[int] = []
        with open_file(path) as f:  # this process is the reader; the writer is another one
            for _ in range(30):
                f.refresh()
                n = len(f.iterations()["iter_index"])
                seen.append(n)
                if n:
                    _check_values(f, 0)
                time.sleep(0.05)
        assert seen == sorted(seen) and seen[-1] > seen[0] + 5, seen
    finally:
        proc.kill()
        proc.wait()


# Disk full (a real ENOSPC on a tiny tmpfs) is tested in test_sink_isolation.py: after
# ENOSPC/EFBIG the HDF5 library may crash the process on calls for *other* files, so each
# recording gets its own writer process (recorder.sinks.process.IsolatedRecording).


def test_unwritable_directory_fails_cleanly(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        target = Path("/proc/k2eg-recorder-test")  # not writable even for root
    else:
        target = tmp_path / "ro"
        target.mkdir(mode=0o500)
    from recorder.sinks.hdf5 import HDF5Recording
    from recorder.sinks.options import OutputOptions

    rec = HDF5Recording(OutputOptions(directory=target), run_name="x")
    assert rec.status == "failed" and rec.reason
    assert rec.close() == []



# a writer killed (kill -9) inside finalization, right after the final file took its name
# and before the .partial was removed
KILLED_AFTER_RENAME = textwrap.dedent(
    """
    import os, pathlib, signal, sys
    from pathlib import Path
    from recorder.client.events import (IterationOpened, ValuesReceived, IterationClosed,
        IterationStatus)
    from recorder.client.values import PVSample
    from recorder.sinks.hdf5 import HDF5Recording
    from recorder.sinks.options import OutputOptions
    import structlog, logging
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    real = pathlib.Path.unlink
    def unlink(self, *args, **kwargs):
        if self.name.endswith(".partial"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, *args, **kwargs)
    pathlib.Path.unlink = unlink
    rec = HDF5Recording(OutputOptions(directory=Path(sys.argv[1])), run_name="renamed",
                        pv_uris=["pva://R:X"])
    for i in range(1, 4):
        rec.handle(IterationOpened("t", "s", i, i, offset=3 * i))
        rec.handle(ValuesReceived("t", i, 1, i, (PVSample("R:X", {"value": float(i)}),),
                                  offset=3 * i + 1))
        rec.handle(IterationClosed("t", "s", i, IterationStatus.COMPLETE, None, i, i,
                                   offset=3 * i + 2))
    rec.close("complete")
    """
)


def _killed_after_rename(directory: Path) -> tuple[Path, Path]:
    proc = subprocess.run([sys.executable, "-c", KILLED_AFTER_RENAME, str(directory)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (final,) = directory.glob("*.h5")
    (partial,) = directory.glob("*.h5.partial")
    assert partial.name == final.name + ".partial"
    return partial, final


def test_a_writer_killed_between_rename_and_unlink_is_recovered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The final file is complete (fsync'ed, checked, read-only) once it has its name: the
    .partial beside it is what is left of a finalization that had finished. `recover`
    refused it for ever ("exists; refusing to overwrite", exit 1, after finalizing it
    again each time); it now removes the .partial and leaves the final file as it was."""
    partial, final = _killed_after_rename(tmp_path)
    before = final.read_bytes()
    assert cli_main(["recover", str(tmp_path)]) == 0, capsys.readouterr().out
    assert not partial.exists() and final.read_bytes() == before
    with h5py.File(final, "r") as h:
        assert h.attrs["status"] == "complete" and h.attrs["n_iterations"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]
    assert cli_main(["recover", str(tmp_path)]) == 0  # nothing left: a second run is a no-op


def test_the_removal_of_a_finalized_partial_is_durable_before_recover_returns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """recover (the daemon's at a restart, which then drops the file from the run state)
    removed the .partial beside its final file without an fsync of the directory: after a
    power cut it could come back, listed as an unfinished recording, a copy of the
    finalized segment. Same for a .partial that held nothing."""
    from recorder.sinks.recover import recover_file

    partial, final = _killed_after_rename(tmp_path)
    events: list[str] = []
    real_unlink, real_fsync = Path.unlink, os.fsync

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self == partial:
            events.append("unlink")
        real_unlink(self, missing_ok=missing_ok)

    def fsync(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")) == tmp_path.resolve():
            events.append("fsync dir")
        real_fsync(fd)

    monkeypatch.setattr(Path, "unlink", unlink)
    monkeypatch.setattr(os, "fsync", fsync)
    assert recover_file(partial) == final
    assert events == ["unlink", "fsync dir"]


def test_recover_refuses_a_name_another_file_holds_and_leaves_nothing_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The final name of a .partial holds another file (not the finalized segment): recover
    refuses and leaves both files as they were. It finalized the .partial in full first and
    then left that copy beside them, read-only, as ``<name>.h5.finalizing``."""
    partial, final = _killed_after_rename(tmp_path)
    final.unlink()
    with h5py.File(final, "w") as other:
        other["x"] = [1, 2, 3]
    before = {p: p.read_bytes() for p in (partial, final)}
    assert cli_main(["recover", str(tmp_path)]) == 1
    assert f"{final} exists; refusing to overwrite" in capsys.readouterr().out
    assert sorted(tmp_path.iterdir()) == sorted(before)
    for p, content in before.items():
        assert p.read_bytes() == content, p


LEFT_BY_A_CRASH = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from recorder.client.events import (IterationOpened, ValuesReceived, IterationClosed,
        IterationStatus)
    from recorder.client.values import PVSample
    from recorder.sinks.hdf5 import HDF5Recording
    from recorder.sinks.options import OutputOptions
    import structlog, logging
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    rec = HDF5Recording(OutputOptions(directory=Path(sys.argv[1])), run_name="old",
                        pv_uris=["pva://O:X"])
    for i in range(1, 4):
        rec.handle(IterationOpened("t", "s", i, i, offset=3 * i))
        rec.handle(ValuesReceived("t", i, 1, i, (PVSample("O:X", {"value": [float(i)] * 4096}),),
                                  offset=3 * i + 1))
        rec.handle(IterationClosed("t", "s", i, IterationStatus.COMPLETE, None, i, i,
                                   offset=3 * i + 2))
    rec.flush()
    print(rec.current_path, flush=True)
    os._exit(0)
    """
)


def _left_by_a_crash(directory: Path) -> Path:
    """The ``.partial`` a writer killed after its third iteration leaves in ``directory``."""
    out = subprocess.run([sys.executable, "-c", LEFT_BY_A_CRASH, str(directory)], check=True,
                         capture_output=True, text=True, timeout=120)
    return Path(out.stdout.split()[-1])


@pytest.mark.parametrize("stored", [{"swmr": False}, {"a_later_option": 1}])
def test_a_leftover_whose_stored_output_options_no_longer_validate_is_recovered(
        tmp_path: Path, stored: dict[str, object]) -> None:
    """A leftover keeps the output options its writer ran with (``output_options``, JSON),
    which finalization reads for the compression. Written by another version, they may not
    validate here: ``swmr: false`` (accepted, and ignored, before 2026-11-22, refused
    since), an option a later version added (the model forbids unknown keys). Recovery
    failed on them for good ("NOT recovered: 1 validation error for OutputOptions"); the
    file is now finalized with the compression settings it names."""
    import json

    from recorder.sinks.superblock import clear_consistency_flags

    partial = _left_by_a_crash(tmp_path)
    clear_consistency_flags(partial)
    with h5py.File(partial, "r+") as h:  # as that other version wrote it
        options = json.loads(h.attrs["output_options"])
        h.attrs["output_options"] = json.dumps({**options, "compression": "lzf", **stored})
    assert cli_main(["recover", str(partial)]) == 0
    final = partial.with_name(partial.name.removesuffix(".partial"))
    with h5py.File(final, "r") as h:
        assert h.attrs["status"] == "aborted"
        assert h["iterations/iter_index"][()].tolist() == [1, 2, 3]
        assert "lzf" in str(list(h.attrs["required_plugins"]))  # its compression, kept


def test_a_failed_finalization_is_not_reported_complete(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finalization failing at close (an I/O error, a value HDF5 refuses) left the
    ``.partial`` and logged "recording failed", but close() then set the status it was
    asked for: "recording closed status=complete files=0"."""
    from recorder.client.events import (
        IterationClosed,
        IterationOpened,
        IterationStatus,
        ValuesReceived,
    )
    from recorder.client.values import PVSample
    from recorder.sinks import hdf5 as hdf5_module
    from recorder.sinks.hdf5 import HDF5Recording
    from recorder.sinks.options import OutputOptions

    def fails(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hdf5_module, "finalize", fails)
    rec = HDF5Recording(OutputOptions(directory=tmp_path), run_name="x")
    rec.handle(IterationOpened("t", "s", 1, 1))
    rec.handle(ValuesReceived("t", 1, 1, 1, (PVSample("A", {"value": 1.0}),)))
    rec.handle(IterationClosed("t", "s", 1, IterationStatus.COMPLETE, None, 1, 1))
    assert rec.close() == []
    assert rec.status == "failed" and "No space left" in rec.reason
    assert [p.name.endswith(".h5.partial") for p in tmp_path.iterdir()] == [True]


# a writer killed while it created its file (a rotation, a start): before SWMR writing
# starts HDF5 has written nothing but the superblock
KILLED_WHILE_CREATING = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import structlog, logging
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    from recorder.sinks import hdf5
    from recorder.sinks.hdf5 import HDF5Recording
    from recorder.sinks.options import OutputOptions
    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    hdf5.create_live_layout = killed
    HDF5Recording(OutputOptions(directory=Path(sys.argv[1])), run_name="born",
                  pv_uris=["pva://B:X"])
    """
)


@pytest.mark.parametrize("options", [[], ["--no-verify"]])
def test_a_writer_killed_while_creating_its_file_leaves_nothing_recover_refuses(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str]) -> None:
    """Killed before it wrote anything but the superblock, a writer left a 48-byte
    ``.partial`` whose superblock names a larger file: `recover` called it "truncated" and
    refused it for ever (exit 1), as the daemon's recovery of leftovers did. It holds no
    data: it is removed, and said so."""
    proc = subprocess.run([sys.executable, "-c", KILLED_WHILE_CREATING, str(tmp_path)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (partial,) = tmp_path.iterdir()
    assert cli_main(["recover", *options, str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{partial}: removed: it holds nothing" in out, out
    assert list(tmp_path.iterdir()) == []


def test_a_file_an_hdf5_writer_is_creating_is_not_removed(tmp_path: Path) -> None:
    """The same 48 bytes while a writer creates the file (HDF5's own exclusive lock, before
    the writer lock is taken): not a leftover."""
    from recorder.errors import NothingToRecoverError
    from recorder.sinks.recover import recover_file

    partial = tmp_path / "x.h5.partial"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import h5py, sys; f = h5py.File(sys.argv[1], 'x', "
         "libver=('v110', 'v110')); print('open', flush=True); sys.stdin.read()",
         str(partial)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        before = partial.read_bytes()
        with pytest.raises(OSError) as raised:
            recover_file(partial)
        assert not isinstance(raised.value, NothingToRecoverError)
        assert partial.read_bytes() == before
    finally:
        holder.kill()
        holder.wait()


def test_the_daemon_removes_such_a_leftover_and_says_it_held_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The daemon's recovery of leftovers at a restart logged "could not recover a leftover
    file (left for `k2eg-recorder recover`)", which refused it too."""
    from recorder.daemon import leftovers
    from recorder.errors import NothingToRecoverError

    subprocess.run([sys.executable, "-c", KILLED_WHILE_CREATING, str(tmp_path)],
                   check=False, capture_output=True, timeout=120)
    (partial,) = tmp_path.iterdir()
    with pytest.raises(NothingToRecoverError, match="holds nothing"):
        leftovers.recover_in_child(partial)
    assert not partial.exists()
    subprocess.run([sys.executable, "-c", KILLED_WHILE_CREATING, str(tmp_path)],
                   check=False, capture_output=True, timeout=120)
    (partial,) = tmp_path.iterdir()
    assert leftovers.finalize_leftover(partial, "born") is None
    assert not partial.exists()
    assert "could not recover" not in capsys.readouterr().out


def test_a_leftover_another_hdf5_writer_has_open_is_left_alone(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A program that opened a leftover for writing with HDF5 (after ``h5clear -s``, with
    h5py's "r+") holds HDF5's exclusive lock, not the writer lock: `recover` rewrote the
    superblock under it (the flags cleared, then put back), then failed to open it,
    "NOT recovered: ... unable to lock file" (exit 1). It is now left alone as busy."""
    from recorder.errors import FileBusyError
    from recorder.sinks.recover import recover_file
    from recorder.sinks.superblock import clear_consistency_flags

    partial = _left_by_a_crash(tmp_path)
    clear_consistency_flags(partial)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import h5py, sys; f = h5py.File(sys.argv[1], 'r+'); "
         "print('open', flush=True); sys.stdin.read()", str(partial)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        before, mtime = partial.read_bytes(), partial.stat().st_mtime_ns
        with pytest.raises(FileBusyError):
            recover_file(partial)
        for options in ([], ["--no-verify"]):
            assert cli_main(["recover", *options, str(tmp_path)]) == 0
            assert "left alone" in capsys.readouterr().out
        assert partial.read_bytes() == before and partial.stat().st_mtime_ns == mtime
        assert sorted(tmp_path.iterdir()) == [partial]
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("unwritten", [("time", "status", "n_samples", "n_iterations",
                                        "n_meta", "n_pvs", "n_kafka", "n_bytes", "n_tags"),
                                       ("n_samples", "n_iterations")])
def test_a_commit_row_whose_values_never_reached_the_disk_is_not_the_last_commit(
        tmp_path: Path, unwritten: tuple[str, ...]) -> None:
    """HDF5 can write a dataset's new extent before the chunk that holds the new rows (its
    metadata cache flushes what it must, when it must): a kill then leaves ``/live/state``
    rows that read as the fill value, 0. Such a row passed as the last commit (0 rows of
    everything fit any file): `recover` made a verified file of 0 iterations and removed
    the ``.partial`` that held them all. Rows of 0 (no time, counts that went down) are not
    commits; the last real one is taken."""
    from recorder.sinks.livefile import STATE_COLUMNS
    from recorder.sinks.superblock import clear_consistency_flags

    partial = _left_by_a_crash(tmp_path)
    clear_consistency_flags(partial)
    with h5py.File(partial, "r+") as h:  # a row whose columns in ``unwritten`` read as 0
        state = h["live/state"]
        last = {k: state[k][-1] for k in STATE_COLUMNS}
        for k in STATE_COLUMNS:
            state[k].resize((state[k].shape[0] + 1,))
            if k not in unwritten:
                state[k][-1] = last[k]
    assert cli_main(["recover", str(partial)]) == 0
    final = partial.with_name(partial.name.removesuffix(".partial"))
    with h5py.File(final, "r") as h:
        assert h["iterations/iter_index"][()].tolist() == [1, 2, 3]
        assert h.attrs["n_values"] == 3


# someone else's program writing an HDF5 file in SWMR mode, killed: a v3 superblock with its
# "open for write" flags set, named like a leftover of ours
FOREIGN_SWMR_WRITER = textwrap.dedent(
    """
    import os, sys
    import h5py
    f = h5py.File(sys.argv[1], "w", libver="latest")
    f.create_dataset("x", data=list(range(1000)), maxshape=(None,), chunks=(100,))
    f.attrs["format"] = "someone-else"
    f.swmr_mode = True
    f.flush()
    os._exit(0)
    """
)


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.iterdir()}


@pytest.mark.parametrize("options", [[], ["--no-verify"]])
@pytest.mark.parametrize("what", ["newer format", "not ours", "foreign SWMR writer",
                                  "finalized file"])
def test_recover_leaves_a_partial_that_is_not_ours_alone(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str,
        options: list[str]) -> None:
    """A ``.partial`` that is not a k2eg-recorder file (another program's, killed while it
    wrote in SWMR mode), or one of a format newer than this version knows (left by a newer
    version, before a downgrade): `recover --no-verify` (and the daemon's recovery of
    leftovers, which does not verify) finalized the two the code could read as if written by
    this version, and removed the ``.partial``; it rewrote the superblock of the third (its
    flags cleared, then put back: a new mtime), and called a finalized file renamed
    ``.partial`` "damaged". Each is now refused before anything is written to it."""
    from recorder.sinks.superblock import clear_consistency_flags

    if what == "foreign SWMR writer":
        partial = tmp_path / "other_0000.h5.partial"
        subprocess.run([sys.executable, "-c", FOREIGN_SWMR_WRITER, str(partial)], check=True,
                       capture_output=True, timeout=120)
    else:
        partial = _left_by_a_crash(tmp_path)
        clear_consistency_flags(partial)
    if what == "finalized file":
        assert cli_main(["recover", str(partial)]) == 0
        final = partial.with_name(partial.name.removesuffix(".partial"))
        partial = final.rename(tmp_path / "renamed.h5.partial")
    elif what != "foreign SWMR writer":
        with h5py.File(partial, "r+") as h:
            if what == "newer format":
                h.attrs["format_version"] = "99.0"
            else:
                del h.attrs["format"]
    os.utime(partial, ns=(1_000_000_000, 1_000_000_000))  # any change shows
    before = _snapshot(tmp_path)
    assert cli_main(["recover", *options, str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"{partial}: NOT recovered" in out, out
    assert {"newer format": "newer", "finalized file": "layout 'final'"}.get(
        what, "not a k2eg-recorder file") in out, out
    assert _snapshot(tmp_path) == before


def test_recover_leaves_a_truncated_leftover_as_it_was_mtime_included(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`recover --no-verify` of a truncated copy of a leftover (flags set) cleared its
    flags, failed to open it and put them back: the bytes as they were, but a new mtime (a
    file "left exactly as it was" looked changed to backups and archive jobs)."""
    partial = _left_by_a_crash(tmp_path)
    with open(partial, "r+b") as fh:
        fh.truncate(partial.stat().st_size * 9 // 10)
    os.utime(partial, ns=(1_000_000_000, 1_000_000_000))
    before = _snapshot(tmp_path)
    assert cli_main(["recover", "--no-verify", str(partial)]) == 1
    out = capsys.readouterr().out
    assert f"{partial}: NOT recovered" in out and "truncated" in out, out
    assert _snapshot(tmp_path) == before


def _set_consistency_flags(path: Path, flags: int) -> None:
    """The superblock's "open for write" flags, as a writer killed in SWMR mode leaves them."""
    import struct

    from recorder.sinks.superblock import lookup3, restore_superblock, superblock_bytes

    sb = bytearray(superblock_bytes(path))
    sb[11] = flags
    sb[-4:] = struct.pack("<I", lookup3(bytes(sb[:-4])))
    restore_superblock(path, bytes(sb))


def test_a_leftover_recover_cannot_finalize_keeps_its_mtime(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A leftover of ours (its flags set) damaged past what opening it reads: `recover
    --no-verify` cleared the flags, failed, and put the superblock back byte for byte, but
    the file had a new mtime (a file "left exactly as it was" looked changed to backups and
    archive jobs that go by it)."""
    from recorder.sinks.superblock import clear_consistency_flags

    partial = _left_by_a_crash(tmp_path)
    flags = clear_consistency_flags(partial)
    assert flags is not None
    with h5py.File(partial, "r+") as h:
        del h["live/samples/pv"]
    _set_consistency_flags(partial, flags[11])
    os.utime(partial, ns=(1_000_000_000, 1_000_000_000))
    before = _snapshot(tmp_path)
    assert cli_main(["recover", "--no-verify", str(partial)]) == 1
    assert f"{partial}: NOT recovered" in capsys.readouterr().out
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("options", [[], ["--no-verify"]])
def test_recover_does_not_hang_on_a_fifo_named_partial(tmp_path: Path,
                                                       options: list[str]) -> None:
    """A FIFO (or a directory, a symbolic link to nothing) named ``*.h5.partial`` in the
    directory scanned: `recover` opened the FIFO to read it and waited for a writer for
    ever (the files after it never reached). Such names are now said not to be regular
    files, without being opened, and the others are recovered."""
    partial = _left_by_a_crash(tmp_path)
    fifo = tmp_path / "a_0000.h5.partial"  # listed before the leftover
    os.mkfifo(fifo)
    (tmp_path / "b_0000.h5.partial").mkdir()
    (tmp_path / "c_0000.h5.partial").symlink_to(tmp_path / "gone")
    got = subprocess.run([sys.executable, "-m", "recorder.cli", "recover", *options,
                          str(tmp_path)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert got.returncode == 1, got.stdout + got.stderr
    assert f"{fifo}: NOT recovered: not a regular file" in got.stdout, got.stdout
    assert f"{tmp_path / 'b_0000.h5.partial'}: NOT recovered: not a regular file" in got.stdout
    assert f"{tmp_path / 'c_0000.h5.partial'}: NOT recovered: not a regular file" in got.stdout
    assert f"{partial} -> " in got.stdout, got.stdout


@pytest.mark.parametrize("version", ["-1.0", "\u0665.0", "5", " 5.1", "5.x"])
def test_a_format_version_that_is_not_major_minor_is_refused_alike(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], version: str) -> None:
    """The reader, ``verify`` and ``recover`` each parsed ``format_version`` their own way
    (``int()``, ``str.isdigit()``, a string compare), so an odd one was refused by one and
    taken by another: "-1.0" passed verify's check (major -1 is not newer), "\u0665.0" (an
    Arabic-Indic digit) passed verify and recover, "5" passed verify and the reader. All three
    now take MAJOR.MINOR in ASCII digits, and refuse the rest alike."""
    from recorder.errors import FileFormatError
    from recorder.sinks.superblock import clear_consistency_flags

    partial = _left_by_a_crash(tmp_path)
    assert cli_main(["recover", str(partial)]) == 0
    final = partial.with_name(partial.name.removesuffix(".partial"))
    final.chmod(0o644)
    with h5py.File(final, "r+") as h:
        h.attrs["format_version"] = version
    report = verify_file(final)
    assert any("is not MAJOR.MINOR" in p.message for p in report.problems), report.problems
    with pytest.raises(FileFormatError, match="unsupported format_version"):
        open_file(final)

    partial = _left_by_a_crash(tmp_path / "b")
    clear_consistency_flags(partial)
    with h5py.File(partial, "r+") as h:
        h.attrs["format_version"] = version
    capsys.readouterr()
    assert cli_main(["recover", "--no-verify", str(partial)]) == 1
    assert "is not MAJOR.MINOR" in capsys.readouterr().out
    assert partial.exists()


def test_an_empty_leftover_a_writer_killed_while_hdf5_created_its_file_is_removed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """HDF5 creates the file (an open with O_CREAT) before it writes its superblock: a
    writer killed in between (a daemon of many runs killed again while their resumed
    recordings created their first segments) left an empty ``.partial``. `recover` refused
    it for ever (exit 1, "file signature not found"), as the daemon's recovery did ("could
    not recover a leftover file"), and `verify` failed it every night. It holds nothing: it
    is removed, and said so."""
    from recorder.daemon import leftovers

    partial = tmp_path / "r_20261124T220818Z_0000_s0001.h5.partial"
    partial.touch()
    assert cli_main(["recover", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{partial}: removed: it holds nothing" in out, out
    assert list(tmp_path.iterdir()) == []
    partial.touch()
    assert leftovers.finalize_leftover(partial, "r") is None
    assert not partial.exists()
    assert "could not recover" not in capsys.readouterr().out


def test_an_empty_file_an_hdf5_writer_is_creating_is_not_removed(tmp_path: Path) -> None:
    """Empty while HDF5 creates it (its exclusive lock held): not a leftover."""
    from recorder.errors import NothingToRecoverError
    from recorder.sinks.recover import recover_file

    partial = tmp_path / "x.h5.partial"
    partial.touch()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'r+b'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('open', flush=True); sys.stdin.read()",
         str(partial)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        with pytest.raises(OSError) as raised:
            recover_file(partial)
        assert not isinstance(raised.value, NothingToRecoverError)
        assert partial.exists() and partial.stat().st_size == 0
    finally:
        holder.kill()
        holder.wait()


def test_a_recording_that_cannot_create_its_file_on_a_full_disk_leaves_no_empty_file(
        tmp_path: Path) -> None:
    """HDF5 creates the file, then fails to write its superblock (ENOSPC): the recording
    failed ("it resumes when its disk has room again") and left an empty ``.partial``, one
    more at each start or rotation the full disk refused; `verify` failed each one
    ("file signature not found") and `recover` refused them. The file it created is
    removed."""
    from daemon_support import tmpfs

    from recorder.sinks.hdf5 import HDF5Recording
    from recorder.sinks.options import OutputOptions

    full = tmp_path / "full"
    full.mkdir()
    with tmpfs(full, "1m") as mounted:
        if not mounted:
            pytest.skip("needs a tmpfs (root) for a real ENOSPC")
        filler = full / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as f:
            while True:
                f.write(bytes(4096))
                f.flush()
        rec = HDF5Recording(OutputOptions(directory=full), run_name="z", pv_uris=["pva://A"])
        assert rec.status == "failed" and "No space left" in rec.reason, rec.reason
        assert sorted(p.name for p in full.iterdir()) == ["filler"]
