"""A run's output directory in the service's private /tmp (systemd's PrivateTmp=, which the
unit sets): systemd deletes that directory, with every file recorded there, when the service
stops. The recording refuses to start there and says why, instead of recording into it."""

from __future__ import annotations

from pathlib import Path

import pytest

from recorder import durability
from recorder.sinks.hdf5 import HDF5Recording
from recorder.sinks.options import OutputOptions


def _mountinfo(tmp_path: Path, private: Path) -> Path:
    """A mountinfo where ``private`` is a PrivateTmp= mount (as systemd sets it up) and a
    mount inside it is an ordinary one."""
    text = (
        "22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
        f"90 22 253:0 /tmp/systemd-private-0123abcd-k2eg-recorder.service-xYz/tmp {private} "
        "rw,relatime shared:40 master:1 - ext4 /dev/vda1 rw\n"
        f"91 90 0:50 / {private}/mnt rw - tmpfs tmpfs rw\n"
    )
    path = tmp_path / "mountinfo"
    path.write_text(text)
    return path


def test_private_tmp_mount_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    private = tmp_path / "tmp"
    monkeypatch.setattr(durability, "MOUNTINFO", str(_mountinfo(tmp_path, private)))
    assert durability.private_tmp_mount(private) == str(private)
    assert durability.private_tmp_mount(private / "k2eg" / "run") == str(private)
    assert durability.private_tmp_mount(private / "mnt" / "run") is None  # mounted over it
    assert durability.private_tmp_mount(tmp_path / "tmpdata") is None
    assert durability.private_tmp_mount(Path("/data/k2eg-recorder")) is None


def test_no_mountinfo_means_no_private_tmp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durability, "MOUNTINFO", "/nonexistent/mountinfo")
    assert durability.private_tmp_mount(Path("/tmp/x")) is None


def test_a_recording_into_the_private_tmp_fails_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private = tmp_path / "tmp"
    monkeypatch.setattr(durability, "MOUNTINFO", str(_mountinfo(tmp_path, private)))
    rec = HDF5Recording(OutputOptions(directory=private / "runs"), run_name="lost")
    try:
        assert rec.status == "failed"
        assert "PrivateTmp=" in rec.reason and "ReadWritePaths=" in rec.reason, rec.reason
        assert not (private / "runs").exists()
    finally:
        rec.close()
