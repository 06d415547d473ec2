"""output.fsync: a flush's Kafka offsets count as written only once its data is on disk.

A write that returned is in the page cache: it survives ``kill -9`` (the crash tests) but not a
power cut. The daemon resumes after ``last_durable_offset``; were that offset saved before its
data reached the disk, a power cut would lose the data between them for good. These tests
watch the real ``fsync`` calls (wrapped, still made) of a real recording.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import h5py
import pytest

from recorder.client.events import IterationClosed, IterationOpened, IterationStatus, ValuesReceived
from recorder.client.values import PVSample
from recorder.daemon import resume
from recorder.reader import open_file
from recorder.sinks import finalize as finalize_module
from recorder.sinks import hdf5, livefile
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions


def _iteration(rec: HDF5Recording, i: int) -> None:
    rec.handle(IterationOpened("t", "s", i, i, offset=3 * i))
    rec.handle(ValuesReceived("t", i, 1, i, (PVSample("X", {"value": float(i)}),),
                              offset=3 * i + 1))
    rec.handle(IterationClosed("t", "s", i, IterationStatus.COMPLETE, None, i, i,
                               offset=3 * i + 2))


def _committed(path: Path) -> tuple[int, int]:
    """(samples, iterations) of the last commit record of the live file, read as a reader
    in another process would (SWMR)."""
    with h5py.File(path, "r", swmr=True) as f:
        limits = livefile.read_commit(f).limits
        return limits["n_samples"], limits["n_iterations"]


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Every fsync of a live file and of a directory, in order: ("file", path) and
    ("dir", path). The real call is still made."""
    calls: list[tuple[str, Any]] = []
    real_fd, real_dir = livefile.sync_fd, hdf5.sync_directory

    def sync_fd(fd: int) -> None:
        calls.append(("file", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fd(fd)

    def sync_directory(directory: Path) -> None:
        calls.append(("dir", Path(directory)))
        real_dir(directory)

    monkeypatch.setattr(livefile, "sync_fd", sync_fd)
    monkeypatch.setattr(hdf5, "sync_directory", sync_directory)
    return calls


def test_a_flush_syncs_its_data_then_its_commit_before_its_offsets_count(
        tmp_path: Path, syncs: list[tuple[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    rec = HDF5Recording(OutputOptions(directory=tmp_path, flush_interval_s=3600),
                        run_name="f", clock=lambda: 0.0)
    partial = rec.current_path
    assert partial is not None
    # the new file: its empty commit, then its name in the directory
    assert syncs == [("file", partial), ("dir", tmp_path.resolve())]
    syncs.clear()
    for i in range(1, 4):
        _iteration(rec, i)
    seen: list[tuple[tuple[int, int], dict[tuple[str, int], int]]] = []
    real = livefile.sync_fd

    def watch(fd: int) -> None:
        # what the file holds on disk when each sync starts, and what the recording reports
        seen.append((_committed(partial), rec.last_durable_offset))
        real(fd)

    monkeypatch.setattr(livefile, "sync_fd", watch)
    rec.flush()
    # 1st sync: the values are written, not yet committed; 2nd: the commit record is
    # written; at neither has the recording said the offsets are durable
    assert seen == [((0, 0), {}), ((3, 3), {})]
    assert rec.last_durable_offset == {("t", 0): 11}
    paths = rec.close()
    f = open_file(paths[0])
    try:
        assert f.values("X").tolist() == [1.0, 2.0, 3.0]
    finally:
        f.close()


def test_a_failed_fsync_fails_the_recording_and_moves_no_offset(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EIO from fsync: the kernel could not write the pages back; they may be gone. The
    offsets must stay where the last good flush left them (a restart records the rest
    again), the recording fails with the reason, and what was synced before is kept."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path, flush_interval_s=3600),
                        run_name="f", clock=lambda: 0.0)
    _iteration(rec, 1)
    rec.flush()
    assert rec.last_durable_offset == {("t", 0): 5}

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(livefile, "sync_fd", eio)
    _iteration(rec, 2)
    rec.flush()
    assert rec.status == "failed"
    assert rec.reason == (f"{rec.current_path}: flushed data did not reach the disk (fsync "
                          "failed: Input/output error); what earlier flushes wrote is kept")
    assert rec.last_durable_offset == {("t", 0): 5}
    partial = rec.current_path
    assert partial is not None
    assert _committed(partial) == (1, 1)  # iteration 1, synced before, is readable


def test_fsync_false_leaves_the_flushes_in_the_page_cache(
        tmp_path: Path, syncs: list[tuple[str, Any]]) -> None:
    rec = HDF5Recording(OutputOptions(directory=tmp_path, flush_interval_s=3600, fsync=False),
                        run_name="f", clock=lambda: 0.0)
    for i in range(1, 3):
        _iteration(rec, i)
    rec.flush()
    assert rec.last_durable_offset == {("t", 0): 8}
    assert syncs == []
    rec.close()


def test_each_new_segment_is_synced_with_its_name(
        tmp_path: Path, syncs: list[tuple[str, Any]]) -> None:
    rec = HDF5Recording(OutputOptions(directory=tmp_path, flush_interval_s=3600,
                                      segment={"max_iterations": 2}),
                        run_name="f", clock=lambda: 0.0)
    for i in range(1, 6):
        _iteration(rec, i)
    dirs = [p for kind, p in syncs if kind == "dir"]
    assert dirs == [tmp_path.resolve()] * 3  # segments 1, 2 and 3
    rec.close()


def test_the_run_state_survives_a_power_cut_once_saved(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The state file is replaced by a rename: without an fsync of the directory after it,
    a power cut can bring back the older file (older offsets: a restart records a stretch
    twice) or, for a new file, no file at all."""
    order: list[str] = []
    real_fd, real_dir = resume.sync_fd, resume.sync_directory
    real_replace = os.replace

    def sync_fd(fd: int) -> None:
        order.append("fsync file")
        real_fd(fd)

    def replace(a: Any, b: Any) -> None:
        order.append("rename")
        real_replace(a, b)

    def sync_directory(directory: Path) -> None:
        order.append(f"fsync {Path(directory).name}")
        real_dir(directory)

    monkeypatch.setattr(resume, "sync_fd", sync_fd)
    monkeypatch.setattr(resume, "sync_directory", sync_directory)
    monkeypatch.setattr(resume.os, "replace", replace)
    state = tmp_path / "state"
    resume.write_json_atomic(state / "run.json", {"offsets": {"0": 41}})
    assert order == ["fsync file", "rename", "fsync state"]
    assert json.loads((state / "run.json").read_text()) == {"offsets": {"0": 41}}


def test_the_final_name_is_durable_before_the_partial_file_is_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finalization renames ``.finalizing`` to the final name, then removes the ``.partial``.
    A power cut may keep directory changes out of order (btrfs does): with one fsync of the
    directory after both, the removal could reach the disk and the rename not, leaving only
    a ``.finalizing`` copy that recover deletes as an interrupted finalization (the segment
    lost). The rename is made durable first."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path, flush_interval_s=3600),
                        run_name="f", clock=lambda: 0.0)
    _iteration(rec, 1)
    partial = rec.current_path
    assert partial is not None
    order: list[str] = []
    real_rename, real_unlink, real_dir = os.rename, Path.unlink, finalize_module.sync_directory

    def rename(a: Any, b: Any) -> None:
        order.append("rename")
        real_rename(a, b)

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self == partial:
            order.append("unlink partial")
        real_unlink(self, missing_ok=missing_ok)

    def sync_directory(directory: Path) -> None:
        order.append("fsync dir")
        real_dir(directory)

    monkeypatch.setattr(finalize_module.os, "rename", rename)
    monkeypatch.setattr(Path, "unlink", unlink)
    monkeypatch.setattr(finalize_module, "sync_directory", sync_directory)
    (final,) = rec.close()
    assert order == ["rename", "fsync dir", "unlink partial", "fsync dir"]
    assert final.exists() and not partial.exists()


@pytest.mark.parametrize("failing", ["sync_file", "rename"])
def test_a_finalization_that_cannot_reach_the_disk_leaves_no_copy_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    """ENOSPC/EDQUOT/EIO from the fsync (network file systems and quotas report them only
    there) or from the rename of the finalized copy: the recording fails with the reason and
    keeps its ``.partial`` for recover, and the ``.finalizing`` copy (as large as the
    segment, on a disk that may be full: the run waits for room that copy takes) is removed,
    as after any other failed finalization."""
    rec = HDF5Recording(OutputOptions(directory=tmp_path, flush_interval_s=3600),
                        run_name="f", clock=lambda: 0.0)
    _iteration(rec, 1)
    partial = rec.current_path
    assert partial is not None

    def full(*args: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if failing == "sync_file":
        monkeypatch.setattr(finalize_module, "sync_file", full)
    else:
        monkeypatch.setattr(finalize_module.os, "rename", full)
    assert rec.close() == []
    assert rec.status == "failed" and "No space left on device" in rec.reason
    assert sorted(p.name for p in tmp_path.iterdir()) == [partial.name]
    assert _committed(partial) == (1, 1)


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The path behind every fsync'ed descriptor, in order (the real call is still made)."""
    calls: list[Path] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_an_output_directory_the_recording_creates_is_synced_into_its_parent(
        tmp_path: Path, fsynced: list[Path]) -> None:
    """The output directory is created at the first segment when missing (a new run's
    directory): its name is in its parent directory, and until that is on disk a power cut
    can take the directory and every file in it, whose offsets the run state says are
    written."""
    out = tmp_path / "runs" / "linac"
    rec = HDF5Recording(OutputOptions(directory=out, flush_interval_s=3600),
                        run_name="f", clock=lambda: 0.0)
    assert rec.status == "recording", rec.reason
    base = tmp_path.resolve()
    assert base in fsynced and base / "runs" in fsynced
    _iteration(rec, 1)
    rec.flush()
    rec.close()


def test_a_state_directory_the_state_file_creates_is_synced_into_its_parent(
        tmp_path: Path, fsynced: list[Path]) -> None:
    """The state directory is created with the first state file when missing (no systemd
    StateDirectory=): without an fsync of its parent a power cut can take the directory
    and the state file in it, and the next start resumes nothing."""
    resume.write_json_atomic(tmp_path / "var" / "state" / "run.json", {"offsets": {"0": 41}})
    base = tmp_path.resolve()
    assert base in fsynced and base / "var" in fsynced
