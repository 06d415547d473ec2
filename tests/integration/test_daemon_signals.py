"""The daemon under signals, end to end (``k2eg-recorder run`` as its own process, the
embedded broker, the simulator): Ctrl-C on a terminal (SIGINT to the whole foreground process
group) while the daemon recovers the file a crash left."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from daemon_support import (
    DaemonEnv,
    DaemonProcess,
    complete_iterations,
    h5_files,
    partial_files,
    read_files,
    simulator,
    wait_for,
)

from recorder.sinks.writelock import writer_active

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _children(pid: int, marker: bytes) -> list[int]:
    """Child processes of ``pid`` whose command line holds ``marker`` (from ``/proc``)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and marker in cmd:
            out.append(int(entry.name))
    return out


def _run_config(tmp_path: Path, unique_name: Callable[[str], str]) -> tuple[Path, Path]:
    snap = unique_name("sig").replace("-", "_")
    data = tmp_path / "data"
    config = tmp_path / "runs.yaml"
    config.write_text(f"""
name: sig
snapshot:
  snapshot_name: {snap}
  pv_uri_list: [pva://SIM:AI:DOUBLE:1, pva://SIM:WF:DOUBLE:2:N4]
  time_window: 100
output: {{directory: {data}, flush_interval_s: 0.3}}
""")
    return config, data


def test_ctrl_c_while_a_leftover_is_recovered_does_not_abandon_it(
    tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str],
    daemons: list[DaemonProcess],
) -> None:
    """Ctrl-C reaches every process of the terminal's foreground group: the daemon (which
    stops cleanly) and the child process that recovers the file a crash left. That child
    died of it, the daemon took the intact file for one it cannot recover, resumed without
    it and forgot it: it stayed ``.partial`` for good, for an operator to find."""
    config, data = _run_config(tmp_path, unique_name)
    denv = DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config)
    with simulator(denv.bootstrap, denv.cmd_topic), denv.admin() as admin:
        first = DaemonProcess(denv, "first")
        daemons.append(first)
        wait_for(lambda: complete_iterations(admin, "sig") >= 8, 40, "8 iterations")
        first.signal(signal.SIGKILL)
        first.wait(10)
        (leftover,) = partial_files(data)
        wait_for(lambda: writer_active(leftover) is False, 20, "the writer process to end")

        second = DaemonProcess(denv, "second")
        daemons.append(second)
        recovering = wait_for(lambda: _children(second.proc.pid, b"recorder.daemon.leftovers"),
                              60, "the leftover's recovery process", interval=0.005)
        time.sleep(0.2)  # it runs (a terminal's Ctrl-C comes when it comes)
        os.killpg(second.proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group
        assert second.wait(60) == 0, second.log_text()[-3000:]
        assert recovering  # (the child is gone with it or finished)

        third = DaemonProcess(denv, "third")
        daemons.append(third)
        wait_for(lambda: complete_iterations(admin, "sig") >= 3, 40, "the resumed recording")
        third.signal(signal.SIGTERM)
        assert third.wait(60) == 0, third.log_text()[-3000:]
    assert partial_files(data) == [], (second.log_text()[-3000:], third.log_text()[-2000:])
    files = read_files(h5_files(data))
    crashed = [f for f in files if f["attrs"].get("recovered")]
    assert len(crashed) == 1 and crashed[0]["status"] == "aborted", [f["path"] for f in files]
