"""Free space where the runs write, as operators see it from a running daemon.

``k2eg-recorder run`` records with a free-space minimum above what the test machine's disk has
free, so its filesystem must be reported as needing a look everywhere an operator or a
monitoring system looks: the status document, ``k2eg-recorder status`` and ``status --check``
(exit 4), the systemd STATUS line (a real notify socket), the metrics endpoint and the log; a
reload that moves a run's directory is followed; the recording itself goes on regardless.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from daemon_support import (
    DaemonEnv,
    DaemonProcess,
    cli,
    complete_iterations,
    get,
    request,
    scrape,
    simulator,
    status,
    wait_for,
)

from recorder.broker import free_loopback_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUNS = """
runs:
  - name: periodic
    snapshot:
      snapshot_name: periodic_{token}
      pv_uri_list: [pva://SIM:AI:DOUBLE:1]
      time_window: 100
    output: {{directory: {data}/periodic, flush_interval_s: 0.3}}
  - name: shots
    autostart: false
    snapshot:
      snapshot_name: shots_{token}
      pv_uri_list: [pva://SIM:AI:DOUBLE:20]
      triggered: true
    output: {{directory: {shots}}}
"""


def mount_of(path: Path) -> str:
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return str(path)


def test_low_disk_is_reported_everywhere_and_recording_goes_on(
    tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str],
    daemons: list[DaemonProcess], notify_lines: tuple[str, list[str]],
) -> None:
    token = unique_name("d").replace("-", "_")
    data = tmp_path / "data"
    config = tmp_path / "runs.yaml"
    config.write_text(RUNS.format(token=token, data=data, shots=data / "shots" / "not-yet"))
    v = os.statvfs(tmp_path)
    free_now = v.f_bavail * v.f_frsize
    minimum = free_now + 2**40  # 1 TiB more than is free: this disk is "low"
    port = free_loopback_port()
    denv = DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config, {
        "RECORDER_DISK_MIN_FREE": str(minimum),
        "RECORDER_DISK_CHECK_INTERVAL_S": "0.3",
        "RECORDER_METRICS_PORT": str(port),
    })
    denv.extra["NOTIFY_SOCKET"], notified = notify_lines
    mount = mount_of(tmp_path)

    def disks() -> list[dict[str, Any]]:
        doc = status(admin)
        return [] if doc is None else list(doc["daemon"].get("disks") or [])

    with simulator(denv.bootstrap, denv.cmd_topic), denv.admin() as admin:
        daemon = DaemonProcess(denv)
        daemons.append(daemon)
        (disk,) = wait_for(disks, 40, "the daemon's disk report")
        assert disk["path"] == mount
        assert disk["directories"] == [str(data / "periodic"), str(data / "shots" / "not-yet")]
        assert disk["runs"] == ["periodic", "shots"]
        assert disk["min_free_bytes"] == minimum
        assert abs(disk["free_bytes"] - free_now) < 2**30, (disk, free_now)
        assert disk["total_bytes"] == v.f_blocks * v.f_frsize
        assert disk["warning"].endswith(" below the minimum of " + _size(minimum)), disk

        check = cli(denv, "status", "--check")  # what a monitoring script runs
        assert check.returncode == 4, check
        assert f"attention: disk {mount}: " in check.stderr, check.stderr
        assert f"disk {mount}: " in check.stdout and "(runs periodic, shots)" in check.stdout
        check_one = cli(denv, "status", "periodic", "--check")
        assert check_one.returncode == 4 and f"attention: disk {mount}" in check_one.stderr

        samples = wait_for(lambda: (s := scrape(port)) and
                           get(s, "disk_warning", path=mount) is not None and s,
                           20, "the disk gauges")
        assert get(samples, "disk_warning", path=mount) == 1
        free_metric = get(samples, "disk_free_bytes", path=mount)
        assert free_metric is not None and abs(free_metric - free_now) < 2**30

        # the warning is a warning: the run records on
        wait_for(lambda: complete_iterations(admin, "periodic") >= 5, 30, "5 iterations")

        # a reload that moves the triggered run is followed
        moved = tmp_path / "elsewhere"
        config.write_text(RUNS.format(token=token, data=data, shots=moved))
        assert request(admin, "reload").ok
        wait_for(lambda: (d := disks()) and str(moved) in d[0]["directories"], 20,
                 "the moved directory in the disk report")
        assert request(admin, "stop", "periodic").ok

        # SIGUSR1 (to the process group, as `systemctl kill` sends it): every process writes
        # its threads' stacks to its log and goes on
        os.killpg(daemon.proc.pid, signal.SIGUSR1)
        wait_for(lambda: "Current thread" in daemon.log_text(), 10, "the daemon's stacks")
        assert "_loop" in daemon.log_text()  # the main loop's frame
        assert request(admin, "status").ok

    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0, daemon.log_text()[-3000:]
    lines = [json.loads(line) for line in daemon.log_text().splitlines()
             if line.startswith("{")]
    warned = [e for e in lines if e.get("event") == "disk needs a look"]
    assert len(warned) == 1, warned  # once, not at every check
    assert warned[0]["path"] == mount and warned[0]["level"] == "warning"
    assert warned[0]["runs"] == ["periodic", "shots"]
    statuses = [line for m in notified for line in m.split("\n") if line.startswith("STATUS=")]
    assert any(f"; disk {mount}: " in line and "below the minimum" in line
               for line in statuses), statuses


def _size(n: int) -> str:
    from recorder.daemon.diskspace import format_bytes

    return format_bytes(n)
