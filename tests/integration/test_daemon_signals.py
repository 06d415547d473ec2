"""The daemon under signals, end to end (``k2eg-recorder run`` as its own process, the
embedded broker, the simulator): Ctrl-C on a terminal (SIGINT to the whole foreground process
group) while the daemon recovers the file a crash left; SIGTERM while a writer or that
recovery hangs; SIGHUP sent to every process of the daemon."""

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
    child_pids,
    complete_iterations,
    crash_with_leftover,
    h5_files,
    partial_files,
    read_files,
    run_state,
    simulator,
    wait_for,
    writer_pids,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


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
        crash_with_leftover(denv, admin, "sig", data, daemons)

        second = DaemonProcess(denv, "second")
        daemons.append(second)
        recovering = wait_for(lambda: child_pids(second.proc.pid, b"recorder.daemon.leftovers"),
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


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigterm_with_a_hung_writer_exits_within_the_time_it_asked_systemd_for(
    tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str],
    daemons: list[DaemonProcess], notify_lines: tuple[str, list[str]],
) -> None:
    """A writer that hangs (a file system that stopped answering, here SIGSTOP) when the
    daemon is told to stop: the daemon gives up on it after its shutdown budget, exits 0 and
    leaves no process behind. Its STOPPING=1 and EXTEND_TIMEOUT_USEC are what systemd goes by
    when the budget (RECORDER_SHUTDOWN_TIMEOUT_S) exceeds TimeoutStopSec=: the time asked
    for ended with the budget plus 10 s, while closing the Kafka client and reaping the
    writer processes (10 s of grace for a busy one) takes longer, so systemd killed the
    daemon (SIGKILL, the unit failed with a timeout) instead of it exiting 0."""
    config, data = _run_config(tmp_path, unique_name)
    denv = DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config,
                            extra={"RECORDER_SHUTDOWN_TIMEOUT_S": "3"})
    denv.extra["NOTIFY_SOCKET"], notified = notify_lines
    with simulator(denv.bootstrap, denv.cmd_topic), denv.admin() as admin:
        daemon = DaemonProcess(denv)
        daemons.append(daemon)
        wait_for(lambda: complete_iterations(admin, "sig") >= 5, 40, "5 iterations")
        writers = writer_pids(daemon.proc.pid)
        assert writers
        for w in writers:
            os.kill(w, signal.SIGSTOP)  # a writer hung on its file system
        seen = len(notified)
        granted: list[float] = []  # when systemd would kill it: each extension's end
        daemon.signal(signal.SIGTERM)
        deadline = time.monotonic() + 90
        while daemon.proc.poll() is None and time.monotonic() < deadline:
            now = time.monotonic()
            for message in notified[seen:]:
                for line in message.splitlines():
                    if line.startswith("EXTEND_TIMEOUT_USEC="):
                        granted.append(now + int(line.split("=", 1)[1]) / 1e6)
            seen = len(notified)
            time.sleep(0.02)
        exited = time.monotonic()
        code = daemon.wait(5)
    left = [w for w in writers if _alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert code == 0, daemon.log_text()[-3000:]
    assert any("STOPPING=1" in m for m in notified), notified
    assert left == [], daemon.log_text()[-3000:]
    assert "runs did not stop within the shutdown budget" in daemon.log_text()
    assert len(partial_files(data)) == 1  # kept, as the log says, for the next start
    assert granted and exited < max(granted), (exited, granted)



def test_sigterm_while_a_leftover_recovery_hangs_leaves_no_process_behind(
    tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str],
    daemons: list[DaemonProcess],
) -> None:
    """The recovery of a crash's leftover hangs (a file system that stopped answering, here
    SIGSTOP; or HDF5 looping on damage the heap scan does not know) when the daemon is told
    to stop: the daemon exits 0 after its shutdown budget, as it should, but the recovery
    process lived on, orphaned, with nothing left to end it at its deadline (outside
    systemd, whose KillMode=mixed kills what the main process leaves)."""
    config, data = _run_config(tmp_path, unique_name)
    denv = DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config,
                            extra={"RECORDER_SHUTDOWN_TIMEOUT_S": "3"})
    recovering: list[int] = []
    try:
        with simulator(denv.bootstrap, denv.cmd_topic), denv.admin() as admin:
            leftover = crash_with_leftover(denv, admin, "sig", data, daemons)
            whole = leftover.read_bytes()

            second = DaemonProcess(denv, "second")
            daemons.append(second)
            recovering = wait_for(
                lambda: child_pids(second.proc.pid, b"recorder.daemon.leftovers"), 60,
                "the leftover's recovery process", interval=0.005)
            for pid in recovering:
                os.kill(pid, signal.SIGSTOP)
            second.signal(signal.SIGTERM)
            assert second.wait(60) == 0, second.log_text()[-3000:]
        time.sleep(0.5)
        assert [pid for pid in recovering if _alive(pid)] == [], second.log_text()[-3000:]
        assert partial_files(data) == [leftover]  # for the next start, as it was
        assert leftover.read_bytes() == whole
    finally:
        for pid in recovering:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)



def test_sighup_to_every_process_of_the_daemon_reloads_and_recording_goes_on(
    tmp_path: Path, kafka_bootstrap: str, unique_name: Callable[[str], str],
    daemons: list[DaemonProcess],
) -> None:
    """SIGHUP reaches the writer processes too when it is sent to the unit (``systemctl kill
    -s HUP k2eg-recorder`` signals every process of it) or to the process group (a
    terminal's hangup): the daemon reloaded, but each writer died of it (SIGHUP's default
    action), so every run failed ("killed by SIGHUP") and stayed stopped until an admin
    start. A writer now ignores SIGHUP as it ignores SIGINT and SIGTERM."""
    config, data = _run_config(tmp_path, unique_name)
    denv = DaemonEnv.in_dir(tmp_path, kafka_bootstrap, unique_name, config)
    with simulator(denv.bootstrap, denv.cmd_topic), denv.admin() as admin:
        daemon = DaemonProcess(denv)
        daemons.append(daemon)
        wait_for(lambda: complete_iterations(admin, "sig") >= 5, 40, "5 iterations")
        writers = writer_pids(daemon.proc.pid)
        assert writers
        os.killpg(daemon.proc.pid, signal.SIGHUP)
        wait_for(lambda: "run definitions reloaded" in daemon.log_text(), 20, "the reload")
        before = complete_iterations(admin, "sig")
        wait_for(lambda: complete_iterations(admin, "sig") >= before + 5, 20,
                 "5 more iterations")
        assert all(_alive(w) for w in writers)
        state = run_state(admin, "sig") or {}
        assert state.get("state") == "recording" and state.get("errors") == 0, state
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.log_text()[-3000:]
    assert partial_files(data) == []
    (recorded,) = read_files(h5_files(data))
    assert recorded["status"] == "complete"
