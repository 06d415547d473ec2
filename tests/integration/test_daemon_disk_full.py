"""A disk that fills up under a recording daemon, then gets room again.

The run records waveforms onto a small tmpfs (a real ENOSPC) that a filler file has almost
filled. Its recording fails; the run must not wait for an operator but say that it waits for
room (state ``retrying``, ``status --check`` exits 4) while the gateway snapshot runs on, and
once the filler is deleted resume on its own from its last durable offset into a new segment,
so the two files together hold every iteration exactly once: no gap where the disk was full
(the gateway's data waited in Kafka).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemon_support import (
    DaemonEnv,
    DaemonProcess,
    cli,
    complete_iterations,
    request,
    run_state,
    simulator,
    tmpfs,
    wait_for,
)

from recorder.reader import open_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DISK_MB = 96
LEFT_KB = 2048  # free space the filler leaves


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of DISK_MB MiB (mounting needs root: skipped elsewhere, required in CI)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    with tmpfs(disk, f"{DISK_MB}m") as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        yield disk


def fill(disk: Path, leave_bytes: int) -> Path:
    filler = disk / "filler"
    v = os.statvfs(disk)
    size = v.f_bavail * v.f_frsize - leave_bytes
    with open(filler, "wb") as f:
        block = b"\0" * (1 << 20)
        while size > 0:
            size -= f.write(block[: min(len(block), size)])
    return filler


def test_a_run_whose_disk_filled_waits_for_room_and_resumes_without_a_gap(
    tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str],
    daemons: list[DaemonProcess], small_disk: Path,
) -> None:
    token = unique_name("f").replace("-", "_")
    config = tmp_path / "runs.yaml"
    config.write_text(f"""
runs:
  - name: wf
    snapshot:
      snapshot_name: wf_{token}
      pv_uri_list: [pva://SIM:WF:DOUBLE:1:N8192, pva://SIM:AI:DOUBLE:1]
      time_window: 100
    output: {{directory: {small_disk}/wf, flush_interval_s: 0.3, compression: none}}
""")
    denv = DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config,
                            {"RECORDER_DISK_CHECK_INTERVAL_S": "0.3"})
    filler = fill(small_disk, LEFT_KB * 1024)
    with simulator(denv.bootstrap, denv.cmd_topic), denv.admin() as admin:
        daemon = DaemonProcess(denv)
        daemons.append(daemon)
        waiting = wait_for(lambda: (s := run_state(admin, "wf")) and s["state"] == "retrying"
                           and s, 60, "the recording to fail on the full disk")
        assert "resumes when its disk has room again" in waiting["last_error"], waiting
        failed_file = waiting["current_file"]
        assert failed_file is None  # closed (failed); the resume state is kept
        check = cli(denv, "status", "--check")
        assert check.returncode == 4 and "attention: run wf is retrying" in check.stderr, check
        before = complete_iterations(admin, "wf")

        filler.unlink()  # an operator makes room
        resumed = wait_for(lambda: (s := run_state(admin, "wf")) and s["state"] == "recording"
                           and s, 30, "the run to resume on its own")
        assert resumed["current_file"] and "_s0001" in resumed["current_file"], resumed
        wait_for(lambda: complete_iterations(admin, "wf") >= before + 10, 30,
                 "10 iterations after the resume")
        assert request(admin, "stop", "wf").ok
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0, daemon.log_text()[-3000:]
    log = daemon.log_text()
    assert "recording failed: its disk ran out" in log
    assert "disk has room again: recording resumed" in log

    files = sorted((small_disk / "wf").glob("*.h5*"))
    statuses, indexes = [], []
    for path in files:
        with open_file(path) as f:
            statuses.append(f.status)
            indexes.append(f.iterations()["iter_index"].tolist())
    # the failed segment (finalized as aborted when the run resumed) and the resumed one: the
    # gateway snapshot ran on while the disk was full (iter_index never began again), and
    # the resume read its data from Kafka after the last durable offset
    assert len(files) == 2 and statuses == ["aborted", "complete"], (files, statuses)
    assert files[1].name.endswith("_s0001.h5")
    seen = indexes[0] + indexes[1]
    assert indexes[0] and indexes[1] and seen == list(range(seen[0], seen[-1] + 1)), indexes
